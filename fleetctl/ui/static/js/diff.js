// A line diff for the console (a definition's revisions side by side): the
// longest common subsequence of the lines, after the common head and tail are
// set aside, grouped into unified-diff hunks with a few lines of context.
// Definitions are tens of lines, so the quadratic table stays small; a
// pathological pair past MAX_CELLS is shown as "everything changed" rather
// than freezing the page.

const MAX_CELLS = 4_000_000;

/**
 * The edit script from lines `a` to lines `b`: [{kind: "same"|"del"|"add",
 * text, a, b}], `a`/`b` the 1-based line numbers on each side (0 where the
 * line is not on that side).
 */
export function diffLines(a, b) {
  let head = 0;
  while (head < a.length && head < b.length && a[head] === b[head]) head += 1;
  let tail = 0;
  while (tail < a.length - head && tail < b.length - head && a[a.length - 1 - tail] === b[b.length - 1 - tail]) tail += 1;
  const midA = a.slice(head, a.length - tail);
  const midB = b.slice(head, b.length - tail);

  const out = [];
  const same = (i, j) => out.push({ kind: "same", text: a[i], a: i + 1, b: j + 1 });
  for (let i = 0; i < head; i += 1) same(i, i);
  for (const op of middle(midA, midB)) {
    if (op.kind === "same") same(head + op.i, head + op.j);
    else if (op.kind === "del") out.push({ kind: "del", text: midA[op.i], a: head + op.i + 1, b: 0 });
    else out.push({ kind: "add", text: midB[op.j], a: 0, b: head + op.j + 1 });
  }
  for (let k = tail; k > 0; k -= 1) same(a.length - k, b.length - k);
  return out;
}

function middle(a, b) {
  const n = a.length;
  const m = b.length;
  if (n * m > MAX_CELLS) {
    return [...a.map((_, i) => ({ kind: "del", i })), ...b.map((_, j) => ({ kind: "add", j }))];
  }
  // lcs[i][j]: length of the LCS of a[i:] and b[j:] (one flat array, row-major).
  const w = m + 1;
  const lcs = new Uint32Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i -= 1) {
    for (let j = m - 1; j >= 0; j -= 1) {
      lcs[i * w + j] = a[i] === b[j] ? lcs[(i + 1) * w + j + 1] + 1 : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
    }
  }
  const ops = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) ops.push({ kind: "same", i: i++, j: j++ });
    else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) ops.push({ kind: "del", i: i++ });
    else ops.push({ kind: "add", j: j++ });
  }
  while (i < n) ops.push({ kind: "del", i: i++ });
  while (j < m) ops.push({ kind: "add", j: j++ });
  return ops;
}

/**
 * The changes of an edit script as unified-diff hunks, each with `context`
 * unchanged lines around it: [{header: "@@ -3,7 +3,8 @@", lines}]. No
 * changes: [].
 */
export function hunks(ops, context = 3) {
  const changed = ops.map((op, k) => (op.kind === "same" ? -1 : k)).filter((k) => k >= 0);
  if (!changed.length) return [];
  const out = [];
  let start = Math.max(0, changed[0] - context);
  let end = Math.min(ops.length, changed[0] + context + 1);
  const flush = () => {
    const lines = ops.slice(start, end);
    const from = lines.filter((l) => l.kind !== "add");
    const to = lines.filter((l) => l.kind !== "del");
    // As diff -u: an empty side starts at the line before the hunk.
    const first = (side, key) => (side.length ? side[0][key] : firstBefore(ops, start, key));
    out.push({
      header: `@@ -${first(from, "a")},${from.length} +${first(to, "b")},${to.length} @@`,
      lines,
    });
  };
  for (const k of changed.slice(1)) {
    if (k - context > end) {
      flush();
      start = k - context;
    }
    end = Math.min(ops.length, k + context + 1);
  }
  flush();
  return out;
}

function firstBefore(ops, index, key) {
  for (let k = index - 1; k >= 0; k -= 1) if (ops[k][key]) return ops[k][key];
  return 0;
}

/** `value` as pretty JSON with object keys sorted, so two revisions line up key by key. */
export function stableJson(value) {
  const sorted = (v) => {
    if (Array.isArray(v)) return v.map(sorted);
    if (v && typeof v === "object") {
      return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted(v[k])]));
    }
    return v;
  };
  return JSON.stringify(sorted(value), null, 2);
}
