// Events: the manager's event feed, live, filterable by kind and text.
import { stream } from "../api.js";
import { useEvents } from "../feed.js";
import { ErrorBox, Page, Table, enumLabel, fmtLabels, fmtTime, href, html, useEffect, useMemo, useState } from "../lib.js";

const KINDS = [
  "NODE_REGISTERED", "NODE_ONLINE", "NODE_OFFLINE", "NODE_LABELS_UPDATED", "AGENT_STATE_CHANGED",
  "NODE_CLOCK_SKEW",
  "OPERATION", "DEFINITION_APPLIED", "DEFINITION_DELETED", "ROLLOUT_STARTED", "ROLLOUT_BATCH",
  "ROLLOUT_NODE_FAILED", "ROLLOUT_AWAITING_PROMOTION", "ROLLOUT_PROMOTED", "ROLLOUT_PAUSED",
  "ROLLOUT_RESUMED", "ROLLOUT_SUCCEEDED", "ROLLOUT_FAILED", "ROLLOUT_REVERTING", "ROLLOUT_REVERTED",
  "ROLLOUT_CANCELLED", "ARTIFACT_PUSHED", "ARTIFACT_DELETED", "NODE_UPDATE_ERROR", "JOB_STARTED",
  "JOB_TARGET_FINISHED", "JOB_FINISHED",
].map((k) => `EVENT_KIND_${k}`);

const HISTORY = 500; // events loaded when the page opens

/** The events newest first, at most `limit`, without duplicates by id. */
export function mergeEvents(older, newer, limit = 2000) {
  const seen = new Set();
  const out = [];
  for (const e of [...newer, ...older]) {
    if (seen.has(e.id)) continue;
    seen.add(e.id);
    out.push(e);
    if (out.length >= limit) break;
  }
  return out.sort((a, b) => Number(b.id) - Number(a.id));
}

function matches(event, kind, text) {
  if (kind && event.kind !== kind) return false;
  if (!text) return true;
  const hay = [event.nodeId, event.agentId, event.message, event.actor, fmtLabels(event.attributes)].join(" ").toLowerCase();
  return hay.includes(text.toLowerCase());
}

const ID_COLUMN = { title: "ID", key: "id", className: "num" };
const ATTRIBUTES_COLUMN = { title: "Attributes", render: (e) => fmtLabels(e.attributes), className: "wrap dim" };

/** An event's time, kind, subject (linked), actor and message: the overview's "last events" too. */
export const EVENT_COLUMNS = [
  { title: "Time", render: (e) => fmtTime(e.timestamp) },
  { title: "Kind", render: (e) => enumLabel(e.kind, "EVENT_KIND_") },
  {
    title: "Subject",
    render: (e) =>
      e.agentId
        ? html`<a href=${href("agents", e.nodeId, e.agentId)}>${e.nodeId}/${e.agentId}</a>`
        : e.nodeId
          ? html`<a href=${href("nodes", e.nodeId)}>${e.nodeId}</a>`
          : "–",
  },
  { title: "Actor", key: "actor" },
  { title: "Message", key: "message", className: "wrap" },
];

const COLUMNS = [ID_COLUMN, ...EVENT_COLUMNS, ATTRIBUTES_COLUMN];

export function EventsPage({ query }) {
  const [events, setEvents] = useState([]);
  const [ready, setReady] = useState(false);
  const [error, setError] = useState(null);
  const [kind, setKind] = useState(query.get("kind") ?? "");
  const [text, setText] = useState(query.get("q") ?? "");

  useEffect(() => {
    const abort = new AbortController();
    const loaded = [];
    stream("WatchEvents", { tail: HISTORY }, (m) => m.event && loaded.push(m.event), { signal: abort.signal }).then(
      () => {
        setEvents((live) => mergeEvents(loaded, live));
        setReady(true);
      },
      (err) => {
        if (err.name !== "AbortError") setError(err);
        setReady(true);
      },
    );
    return () => abort.abort();
  }, []);
  useEvents((event) => setEvents((old) => mergeEvents(old, [event])), undefined, { history: true });

  const shown = useMemo(() => events.filter((e) => matches(e, kind, text)), [events, kind, text]);
  return html`<${Page} name="events" title="Events" ready=${ready}>
    <div class="filters">
      <label>Kind <select value=${kind} onChange=${(e) => setKind(e.target.value)}>
        <option value="">all</option>
        ${KINDS.map((k) => html`<option value=${k}>${enumLabel(k, "EVENT_KIND_")}</option>`)}
      </select></label>
      <label>Search <input type="search" placeholder="node, agent, actor, message" value=${text} onInput=${(e) => setText(e.target.value)} /></label>
      <span class="dim">${shown.length} of ${events.length} events, newest first; new ones appear as they happen</span>
    </div>
    <${ErrorBox} error=${error} what="loading events" />
    <${Table} columns=${COLUMNS} rows=${shown} rowKey=${(e) => e.id} empty="No events match." />
  </${Page}>`;
}

