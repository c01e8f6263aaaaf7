// A LabelSelector (proto3 JSON) printed as selector text, the way fleetctl
// prints one (fleet.selectors.Selector.__str__): requirements sorted by key,
// then operator, each with the operator it was written with. The inverse of
// parseSelector in selector.js.

// The operator as written, in canonical order (fleet.selectors.Operator).
const WRITTEN = {
  EQUALS: "=",
  DOUBLE_EQUALS: "==",
  IN: "in",
  NOT_EQUALS: "!=",
  NOT_IN: "notin",
  EXISTS: "",
  NOT_EXISTS: "!",
  GT: ">",
  LT: "<",
};
const RANK = Object.fromEntries(Object.keys(WRITTEN).map((op, i) => [op, i]));

function requirementText({ key, op, values }) {
  if (op === "EXISTS") return key;
  if (op === "NOT_EXISTS") return `!${key}`;
  if (op === "IN" || op === "NOT_IN") return `${key} ${WRITTEN[op]} (${values.join(",")})`;
  return `${key}${WRITTEN[op] ?? op}${values[0] ?? ""}`;
}

/** "env=prod,tier in (api,web)"; "" for a selector that picks every node. */
export function selectorText(selector) {
  const all = [
    ...Object.entries(selector?.matchLabels ?? {}).map(([key, value]) => ({ key, op: "EQUALS", values: [value] })),
    ...(selector?.matchExpressions ?? []).map((e) => ({
      key: e.key,
      op: (e.operator ?? "").replace("SELECTOR_OPERATOR_", ""),
      values: [...(e.values ?? [])].sort(),
    })),
  ];
  all.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : (RANK[a.op] ?? 99) - (RANK[b.op] ?? 99)));
  return all.map(requirementText).join(",");
}
