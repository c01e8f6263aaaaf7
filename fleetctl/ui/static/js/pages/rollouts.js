// Rollouts and definitions (#/rollouts): every definition with how far the
// fleet is with it, and the rollouts, live ones first; both refresh on the
// definition and rollout events, and every few seconds while one is live
// (a node getting done makes no event). The rollout page and the definition
// page live in their own modules.
import { call } from "../api.js";
import { useEvents } from "../feed.js";
import { ErrorBox, Page, Table, fmtAgo, href, html, useCallback, useEffect, useInterval, useMemo, useState, useThrottled } from "../lib.js";
import { selectorText } from "../selector-text.js";
import { StateBadge, isLive, liveFirst, rolloutColumns, rolloutHref, rolloutState } from "./rollout-parts.js";

export { DefinitionPage } from "./definition.js";
export { RolloutPage } from "./rollout.js";

const LIMIT = 200; // rollouts listed (ListRollouts caps at 1000)
const LIVE_REFRESH_MS = 5000;

/** Definition and rollout events: what changes these pages. */
export const isDesiredEvent = (e) => /^EVENT_KIND_(ROLLOUT|DEFINITION)_/.test(e.kind ?? "");

const DEFINITION_COLUMNS = [
  { title: "Name", render: (d) => html`<a href=${href("definitions", d.current.definition.name)}>${d.current.definition.name}</a>` },
  { title: "Revision", className: "num", render: (d) => d.current.revision },
  { title: "Stable", className: "num", render: (d) => (Number(d.stableRevision ?? 0) ? d.stableRevision : "–") },
  {
    title: "Nodes",
    className: "num",
    render: (d) => `${d.nodesCurrent ?? 0}/${d.nodes ?? 0}${d.current.deleted ? " (deleted)" : ""}`,
  },
  { title: "Failed", className: "num", render: (d) => d.nodesFailed ?? 0 },
  {
    title: "Rollout",
    render: (d) =>
      d.rollout
        ? html`<a href=${rolloutHref(d.rollout)}>#${d.rollout.id}</a> <${StateBadge} state=${rolloutState(d.rollout)} />`
        : "–",
  },
  { title: "Selector", render: (d) => html`<code>${selectorText(d.current.definition.selector) || "(every node)"}</code>` },
  { title: "Updated", render: (d) => fmtAgo(d.current.createdAt) },
  { title: "By", render: (d) => d.current.actor },
];

export function RolloutsPage() {
  const [definitions, setDefinitions] = useState(null);
  const [rollouts, setRollouts] = useState(null);
  const [error, setError] = useState(null);

  const load = useCallback(() => {
    Promise.all([call("ListDefinitions", { includeDeleted: false }), call("ListRollouts", { limit: LIMIT })]).then(
      ([defs, ros]) => {
        setDefinitions(defs.definitions ?? []);
        setRollouts(ros.rollouts ?? []);
        setError(null);
      },
      setError,
    );
  }, []);
  useEffect(load, [load]);
  const refresh = useThrottled(load, 2000);
  useEvents(refresh, isDesiredEvent);
  const anyLive = (rollouts ?? []).some(isLive);
  useInterval(() => anyLive && refresh(), LIVE_REFRESH_MS);

  const sortedDefs = useMemo(
    () => [...(definitions ?? [])].sort((a, b) => a.current.definition.name.localeCompare(b.current.definition.name)),
    [definitions],
  );
  const sortedRollouts = useMemo(() => liveFirst(rollouts ?? []), [rollouts]);
  const live = sortedRollouts.filter(isLive).length;
  const ready = (definitions !== null && rollouts !== null) || error !== null;

  return html`<${Page} name="rollouts" title="Rollouts" ready=${ready}>
    <${ErrorBox} error=${error} what="loading rollouts" />
    <h2>Definitions</h2>
    <${Table}
      columns=${DEFINITION_COLUMNS}
      rows=${sortedDefs}
      rowKey=${(d) => d.current.definition.name}
      empty="No definitions. Apply one with fleetctl apply -f FILE."
    />
    <h2>Rollouts <span class="dim">${live ? `${live} live, ` : ""}${sortedRollouts.length} shown, live first</span></h2>
    <${Table} columns=${rolloutColumns()} rows=${sortedRollouts} rowKey=${(r) => r.id} empty="No rollouts." />
  </${Page}>`;
}
