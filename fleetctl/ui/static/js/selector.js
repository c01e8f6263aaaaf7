// Kubernetes label selectors typed into the console (`env=prod, tier in (web,api), !canary`),
// parsed into the LabelSelector message the API takes. A port of the parser in
// fleet/selectors.py, so the console accepts what `fleetctl -l` accepts and says
// what is wrong at the same position in the same words. Only the syntax is
// checked here: the manager checks keys and values against the label rules
// (fleet/labels.py) and answers INVALID_ARGUMENT naming the bad one, which the
// page shows next to the box.

/** The selector text does not parse; `position` is the 0-based offset. */
export class SelectorSyntaxError extends Error {
  constructor(position, message) {
    super(`position ${position}: ${message}`);
    this.position = position;
  }
}

// Whitespace is selector.go's: space, tab, CR, LF. Two-character symbols first.
const TOKEN = /(!=|==|[=!(),><])|([^ \t\r\n=!(),><]+)/g;
const KEYWORDS = new Set(["in", "notin"]);
const BINARY = {
  "=": "SELECTOR_OPERATOR_EQUALS",
  "==": "SELECTOR_OPERATOR_DOUBLE_EQUALS",
  "!=": "SELECTOR_OPERATOR_NOT_EQUALS",
  in: "SELECTOR_OPERATOR_IN",
  notin: "SELECTOR_OPERATOR_NOT_IN",
  ">": "SELECTOR_OPERATOR_GT",
  "<": "SELECTOR_OPERATOR_LT",
};
const EXPECTED_OP = "'=', '==', '!=', 'in', 'notin', '>', '<', ',' or end of string";
const INT64_MAX = 2n ** 63n - 1n;

function lex(text) {
  const tokens = [];
  for (const m of text.matchAll(TOKEN)) {
    const [, symbol, word] = m;
    const kind = symbol ?? (KEYWORDS.has(word) ? word : "id");
    tokens.push({ kind, text: symbol ?? word, pos: m.index });
  }
  tokens.push({ kind: "end", text: "", pos: text.length });
  return tokens;
}

// Python's repr() of a string, which the CLI's messages quote words with.
function repr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const escaped = text
    .replaceAll("\\", "\\\\")
    .replaceAll(quote, `\\${quote}`)
    .replace(/[\x00-\x1f\x7f]/g, (c) => ({ "\t": "\\t", "\n": "\\n", "\r": "\\r" })[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
  return `${quote}${escaped}${quote}`;
}

function shown(token) {
  return token.kind === "end" ? "end of string" : repr(token.text);
}

/** The operand of `>`/`<`: a non-negative int64 written in decimal digits. */
function isIntegerOperand(text) {
  return /^[0-9]+$/.test(text) && BigInt(text) <= INT64_MAX;
}

class Parser {
  constructor(text) {
    this.tokens = lex(text);
    this.index = 0;
  }

  // As in selector.go, 'in'/'notin' are plain words where a key or value goes.
  peek(asValue = true) {
    const token = this.tokens[this.index];
    return asValue && KEYWORDS.has(token.kind) ? { ...token, kind: "id" } : token;
  }

  take(asValue = true) {
    const token = this.peek(asValue);
    this.index += 1;
    return token;
  }

  parse() {
    const requirements = [];
    if (this.peek().kind === "end") return requirements;
    for (;;) {
      let token = this.peek();
      if (token.kind !== "id" && token.kind !== "!") {
        const after = requirements.length ? "after ','" : "at the start";
        throw new SelectorSyntaxError(token.pos, `expected a label key or '!' ${after}, found ${shown(token)}`);
      }
      requirements.push(this.requirement());
      token = this.take();
      if (token.kind === "end") return requirements;
      if (token.kind !== ",") throw new SelectorSyntaxError(token.pos, `expected ',' or end of string, found ${shown(token)}`);
    }
  }

  requirement() {
    const negated = this.peek().kind === "!";
    if (negated) this.take();
    let token = this.take();
    if (token.kind !== "id") throw new SelectorSyntaxError(token.pos, `expected a label key, found ${shown(token)}`);
    const key = token.text;
    token = this.peek();
    if (token.kind === "," || token.kind === "end") {
      return { key, operator: negated ? "SELECTOR_OPERATOR_NOT_EXISTS" : "SELECTOR_OPERATOR_EXISTS", values: [] };
    }
    if (negated) {
      throw new SelectorSyntaxError(
        token.pos,
        `'!${key}' takes no operator or value; expected ',' or end of string, found ${shown(token)}`,
      );
    }
    const operator = this.take(false);
    const op = BINARY[operator.kind];
    if (!op) throw new SelectorSyntaxError(operator.pos, `expected ${EXPECTED_OP} after key ${repr(key)}, found ${shown(operator)}`);
    token = this.peek();
    let values;
    if (KEYWORDS.has(operator.kind)) {
      values = this.valueSet(operator);
    } else if (token.kind === "," || token.kind === "end") {
      values = [{ kind: "id", text: "", pos: token.pos }]; // `k=` and `k=,j=x`: the empty value
    } else if (token.kind === "id") {
      values = [this.take()];
    } else {
      throw new SelectorSyntaxError(token.pos, `expected a value after ${repr(operator.text)}, found ${shown(token)}`);
    }
    if ((operator.kind === ">" || operator.kind === "<") && !isIntegerOperand(values[0].text)) {
      throw new SelectorSyntaxError(
        values[0].pos,
        `expected a non-negative 64-bit integer after ${repr(operator.text)}, found ${shown(values[0].text ? values[0] : token)}`,
      );
    }
    return { key, operator: op, values: values.map((v) => v.text) };
  }

  valueSet(operator) {
    let token = this.take();
    if (token.kind !== "(") throw new SelectorSyntaxError(token.pos, `expected '(' after ${repr(operator.text)}, found ${shown(token)}`);
    // Comma-separated items, each a value or nothing (the empty value).
    const values = [];
    for (;;) {
      token = this.peek();
      let expected = "a value, ',' or ')'";
      if (token.kind === "id") {
        values.push(this.take());
        token = this.peek();
        expected = `',' or ')' after ${repr(values[values.length - 1].text)}`;
      } else {
        values.push({ kind: "id", text: "", pos: token.pos });
      }
      if (token.kind === ")") {
        this.take();
        return values;
      }
      if (token.kind !== ",") throw new SelectorSyntaxError(token.pos, `expected ${expected}, found ${shown(token)}`);
      this.take();
    }
  }
}

/**
 * Selector text -> the LabelSelector message as proto3 JSON ({} selects
 * everything). `k=v` goes to matchLabels unless the key is already there (a
 * map holds one value per key), as fleet.selectors.to_proto does; everything
 * else is a matchExpressions entry with the operator as written. Throws
 * SelectorSyntaxError.
 */
export function parseSelector(text) {
  const selector = {};
  for (const r of new Parser(text).parse()) {
    if (r.operator === "SELECTOR_OPERATOR_EQUALS" && !(r.key in (selector.matchLabels ?? {}))) {
      (selector.matchLabels ??= {})[r.key] = r.values[0];
      continue;
    }
    const expression = { key: r.key, operator: r.operator };
    if (r.values.length) expression.values = [...new Set(r.values)].sort();
    (selector.matchExpressions ??= []).push(expression);
  }
  return selector;
}
