// One rollout (#/rollouts/<id>?name=<definition>): progress per batch, every
// node's phase, the failures and why, followed live with WatchRollout (the
// manager sends the rollout again on every change until it ends); and the
// controls: pause, resume, promote, abort, undo, each confirmed by name.
import { ApiError, call, stream } from "../api.js";
import { Confirm, ErrorBox, Page, Table, fmtAgo, fmtTime, href, html, useEffect, useMemo, useRef, useState } from "../lib.js";
import {
  PhaseBadge,
  Progress,
  StateBadge,
  batchText,
  countsText,
  isLive,
  nodePhase,
  policyText,
  revisionsText,
  rolloutHref,
  rolloutState,
  total,
} from "./rollout-parts.js";

const FIND_LIMIT = 1000; // ListRollouts' most: how far back a rollout is found without its name

// The controls of a live rollout, in the states the manager accepts them
// (manager/service/rollout.py), and what each does, for its confirmation.
const CONTROLS = [
  {
    id: "pause",
    rpc: "PauseRollout",
    label: "Pause",
    states: ["PENDING", "RUNNING", "REVERTING"],
    effect: () => "No new batch starts; nodes already moving finish.",
  },
  {
    id: "resume",
    rpc: "ResumeRollout",
    label: "Resume",
    states: ["PAUSED"],
    effect: () => "Its next batches start again; the progress deadline counts from now.",
  },
  {
    id: "promote",
    rpc: "PromoteRollout",
    label: "Promote",
    states: ["AWAITING_PROMOTION"],
    effect: () => "The canaries are healthy: the remaining batches go ahead.",
  },
  {
    id: "abort",
    rpc: "AbortRollout",
    label: "Abort",
    danger: true,
    states: ["PENDING", "RUNNING", "PAUSED", "AWAITING_PROMOTION", "REVERTING"],
    effect: (r) =>
      r.policy?.autoRevert && Number(r.previousRevision ?? 0)
        ? `It fails now, and the nodes it moved go back to revision ${r.previousRevision} (auto_revert).`
        : `It fails now; the nodes it moved keep revision ${r.targetRevision} until you act.`,
  },
];

const NODE_COLUMNS = [
  { title: "Node", render: (n) => html`<a href=${href("nodes", n.nodeId)}>${n.nodeId}</a>` },
  { title: "Batch", className: "num", render: (n) => batchText(n.batch) },
  { title: "Phase", render: (n) => html`<${PhaseBadge} phase=${nodePhase(n)} />` },
  { title: "Online", render: (n) => (n.offline ? html`<span class="bad-text">offline</span>` : "online") },
  { title: "Runs", className: "num", render: (n) => (Number(n.runningRevision ?? 0) ? n.runningRevision : "–") },
  { title: "Agent", render: (n) => (n.status ?? "").replace("AGENT_STATUS_", "").toLowerCase() || "–" },
  { title: "Health", render: (n) => (n.health ?? "").replace("AGENT_HEALTH_", "").toLowerCase() || "–" },
  { title: "Since", render: (n) => fmtAgo(n.since) },
  { title: "Reason", render: (n) => n.reason || "–", className: "wrap" },
];

/** Nodes by the batch that moved them, in order, with their counts; not-yet-moved nodes last. */
export function batchesOf(rollout) {
  const groups = new Map();
  for (const n of rollout.nodes ?? []) {
    const b = Number(n.batch ?? 0);
    const key = b < 0 ? -1 : b;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(n);
  }
  const count = (nodes, phase) => nodes.filter((n) => nodePhase(n) === phase).length;
  return [...groups.entries()]
    .sort(([a], [b]) => (a < 0) - (b < 0) || a - b)
    .map(([number, nodes]) => ({
      number,
      nodes,
      done: count(nodes, "DONE"),
      updating: count(nodes, "UPDATING"),
      failed: count(nodes, "FAILED"),
      pending: count(nodes, "PENDING"),
    }));
}

function batchLabel(number) {
  return number < 0 ? "not moved yet" : number === 0 ? "canary batch" : `batch ${number}`;
}

/** Progress per batch; `current` is the batch moving now (null once the rollout ended). */
function BatchTable({ batches, current, onPick }) {
  const numbers = ["Nodes", "Done", "Updating", "Failed", "Pending"];
  return html`<div class="table-wrap">
    <table class="batches">
      <thead><tr><th>Batch</th><th>Progress</th>${numbers.map((t) => html`<th class="num">${t}</th>`)}</tr></thead>
      <tbody>
        ${batches.length === 0 && html`<tr><td class="empty" colspan="7">No nodes in this rollout.</td></tr>`}
        ${batches.map(
          (b) => html`<tr key=${b.number} class=${b.number === current ? "current" : ""}>
            <td>
              <button class="link" title="show this batch's nodes" onClick=${() => onPick(String(b.number))}>${batchLabel(b.number)}</button>
              ${b.number === current && html` <span class="dim">(current)</span>`}
            </td>
            <td><${Progress} done=${b.done} failed=${b.failed} of=${b.nodes.length} /></td>
            ${[b.nodes.length, b.done, b.updating, b.failed, b.pending].map((n) => html`<td class="num">${n}</td>`)}
          </tr>`,
        )}
      </tbody>
    </table>
  </div>`;
}

/** The definition's name for a rollout id, when the link carried none (e.g. from the overview). */
async function findName(rolloutId) {
  const answer = await call("ListRollouts", { limit: FIND_LIMIT });
  const found = (answer.rollouts ?? []).find((r) => r.id === rolloutId);
  if (!found) {
    throw new ApiError(
      "NOT_FOUND",
      `rollout ${rolloutId} is not among the newest ${FIND_LIMIT} rollouts; open it from its definition's page`,
    );
  }
  return found.name;
}

/** Follow WatchRollout; reconnect (after a pause) if the stream breaks while the rollout is live. */
function useWatchedRollout(name, rolloutId) {
  const [rollout, setRollout] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    if (!name) return undefined;
    const abort = new AbortController();
    let last = null;
    (async () => {
      for (let delay = 1000; !abort.signal.aborted; delay = Math.min(delay * 2, 15000)) {
        try {
          await stream(
            "WatchRollout",
            { name, rolloutId },
            (m) => {
              last = m.rollout;
              setRollout(m.rollout);
              setError(null);
              delay = 1000;
            },
            { signal: abort.signal },
          );
          if (last && !isLive(last)) return; // the watch ends with the rollout
        } catch (err) {
          if (err.name === "AbortError") return;
          setError(err);
          if (err.code === "NOT_FOUND" || err.code === "INVALID_ARGUMENT") return;
        }
        await new Promise((r) => setTimeout(r, delay));
      }
    })();
    return () => abort.abort();
  }, [name, rolloutId]);
  return { rollout, error };
}

export function RolloutPage({ rolloutId, query }) {
  const [name, setName] = useState(query.get("name"));
  const [nameError, setNameError] = useState(null);
  useEffect(() => {
    if (!name) findName(rolloutId).then(setName, setNameError);
  }, []);
  const { rollout, error } = useWatchedRollout(name, rolloutId);
  const [why, setWhy] = useState("");
  const [asking, setAsking] = useState(null); // the confirmation open: {title, targets, ...}
  const [outcome, setOutcome] = useState(null); // what the last control did, in words
  const [batch, setBatch] = useState("all");
  const [undoError, setUndoError] = useState(null);
  const busy = useRef(false);

  const batches = useMemo(() => (rollout ? batchesOf(rollout) : []), [rollout]);
  const shownNodes = useMemo(() => {
    const nodes = rollout?.nodes ?? [];
    if (batch === "all") return nodes;
    if (batch === "failed") return nodes.filter((n) => nodePhase(n) === "FAILED");
    return batches.find((b) => String(b.number) === batch)?.nodes ?? [];
  }, [rollout, batches, batch]);

  const ready = rollout !== null || nameError !== null || error !== null;
  const title = `Rollout ${rolloutId}${name ? ` of ${name}` : ""}`;
  if (!rollout) {
    return html`<${Page} name="rollout" title=${title} ready=${ready}>
      <${ErrorBox} error=${nameError ?? error} what="loading the rollout" />
      ${!ready && html`<p class="dim">Loading…</p>`}
    </${Page}>`;
  }

  const state = rolloutState(rollout);
  const live = isLive(rollout);
  const described = `rollout ${rollout.id} of ${rollout.name}: revision ${revisionsText(rollout)}, ${state.toLowerCase().replaceAll("_", " ")}, ${countsText(rollout)}`;
  const control = (c) => ({
    title: `${c.label} rollout ${rollout.id} of ${rollout.name}? ${c.effect(rollout)}`,
    targets: [described],
    confirmLabel: c.label,
    danger: c.danger,
    onConfirm: async () => {
      const answer = await call(c.rpc, { name: rollout.name, message: why });
      setOutcome(`${c.label}: rollout ${answer.rollout.id} of ${rollout.name} is now ${rolloutState(answer.rollout).toLowerCase()}.`);
    },
  });
  const previous = rollout.previousRevision ?? "0";
  const askUndo = async () => {
    if (busy.current) return;
    busy.current = true;
    setUndoError(null);
    const request = { name: rollout.name, toRevision: previous, message: why };
    try {
      const { change } = await call("UndoRollout", { ...request, plan: true });
      setAsking({
        title: `Undo: roll ${rollout.name} back to revision ${previous}? ${change.summary}.`,
        targets: (change.nodes ?? []).map(
          (n) => `${n.nodeId}: ${(n.action ?? "").replace("NODE_CHANGE_ACTION_", "").toLowerCase()}${n.reason ? ` (${n.reason})` : ""}`,
        ),
        confirmLabel: "Undo",
        onConfirm: async () => {
          const done = (await call("UndoRollout", request)).change;
          const started = Number(done.rolloutId ?? 0)
            ? html`; <a href=${rolloutHref({ id: done.rolloutId, name: rollout.name })}>rollout ${done.rolloutId}</a> started`
            : "";
          setOutcome(html`Undo: ${rollout.name} revision ${done.revision} holds revision ${previous}'s content${started}.`);
        },
      });
    } catch (err) {
      setUndoError(err);
    } finally {
      busy.current = false;
    }
  };

  const actions = html`
    <input class="why" placeholder="why (optional; kept in the audit)" value=${why} onInput=${(e) => setWhy(e.target.value)} />
    ${live &&
    CONTROLS.filter((c) => c.states.includes(state)).map(
      (c) => html`<button class=${c.danger ? "danger" : ""} onClick=${() => setAsking(control(c))}>${c.label}</button>`,
    )}
    ${Number(previous) > 0 && html`<button onClick=${askUndo}>Undo…</button>`}
  `;
  const failed = (rollout.nodes ?? []).filter((n) => nodePhase(n) === "FAILED");

  return html`<${Page} name="rollout" title=${title} ready=${ready} actions=${actions}>
    <${ErrorBox} error=${error} what="following the rollout" />
    <${ErrorBox} error=${undoError} what="undo" />
    ${outcome && html`<div class="notice" role="status">${outcome}</div>`}
    <div class="panel">
      <dl class="props">
        <dt>Definition</dt><dd><a href=${href("definitions", rollout.name)}>${rollout.name}</a></dd>
        <dt>Revision</dt><dd>${revisionsText(rollout)}</dd>
        <dt>State</dt><dd><${StateBadge} state=${state} /> ${rollout.reason && html`<span>${rollout.reason}</span>`}</dd>
        <dt>Started</dt><dd>${fmtTime(rollout.createdAt)} (${fmtAgo(rollout.createdAt)}) by ${rollout.actor || "–"}${rollout.message ? `: ${rollout.message}` : ""}</dd>
        ${!live && html`<dt>Ended</dt><dd>${fmtTime(rollout.endedAt)}</dd>`}
        <dt>Policy</dt><dd>${policyText(rollout.policy)}</dd>
        <dt>Progress</dt><dd class="progress-line"><${Progress} done=${rollout.done} failed=${rollout.failed} of=${total(rollout)} /> <span>${countsText(rollout)}</span></dd>
      </dl>
      ${state === "AWAITING_PROMOTION" && html`<p class="dim">The canaries are healthy: promote to go on with the other batches.</p>`}
    </div>
    ${failed.length > 0 &&
    html`<div class="panel failures">
      <h2>Failed nodes</h2>
      <ul>${failed.map((n) => html`<li><a href=${href("nodes", n.nodeId)}>${n.nodeId}</a>: ${n.reason || "no reason given"}</li>`)}</ul>
    </div>`}
    <h2>Batches</h2>
    <${BatchTable} batches=${batches} current=${live ? Number(rollout.batch ?? 0) : null} onPick=${setBatch} />
    <h2>Nodes</h2>
    <div class="filters">
      <label>Show <select value=${batch} onChange=${(e) => setBatch(e.target.value)}>
        <option value="all">every node</option>
        <option value="failed">failed nodes</option>
        ${batches.map((b) => html`<option value=${String(b.number)}>${batchLabel(b.number)}</option>`)}
      </select></label>
      <span class="dim">${shownNodes.length} of ${(rollout.nodes ?? []).length} nodes${live ? "; updates as the rollout moves" : ""}</span>
    </div>
    <${Table} columns=${NODE_COLUMNS} rows=${shownNodes} rowKey=${(n) => n.nodeId} empty="No nodes." />
    ${asking && html`<${Confirm} ...${asking} onClose=${() => setAsking(null)} />`}
  </${Page}>`;
}
