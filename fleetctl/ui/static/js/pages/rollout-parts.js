// What the rollout, rollouts and definition pages share: a rollout's words
// (the ones `fleetctl rollout status` and `rollout list` use), its state
// badge, progress bar and the table of rollouts.
import { fmtDuration } from "../duration.js";
import { Badge, fmtAgo, href, html } from "../lib.js";

const KIND = {
  PENDING: "pending",
  RUNNING: "live",
  PAUSED: "paused",
  AWAITING_PROMOTION: "warn",
  REVERTING: "warn",
  SUCCESSFUL: "ok",
  FAILED: "bad",
  REVERTED: "bad",
  CANCELLED: "idle",
};
const PHASE_KIND = { PENDING: "pending", UPDATING: "live", DONE: "ok", FAILED: "bad" };

/** "ROLLOUT_STATE_AWAITING_PROMOTION" -> "AWAITING_PROMOTION" (an unset state is PENDING's 0). */
export const rolloutState = (r) => (r?.state ?? "ROLLOUT_STATE_UNSPECIFIED").replace("ROLLOUT_STATE_", "");
export const nodePhase = (n) => (n?.phase ?? "ROLLOUT_NODE_PHASE_UNSPECIFIED").replace("ROLLOUT_NODE_PHASE_", "");

/** The rollout has not ended (pause, resume, promote and abort act on it). */
export const isLive = (r) => !Number(r?.endedAt ?? 0);

/** A state word as a coloured badge ("awaiting promotion"). */
export function StateBadge({ state }) {
  return html`<${Badge} value=${state.toLowerCase().replaceAll("_", " ")} kind=${KIND[state] ?? "idle"} />`;
}

export function PhaseBadge({ phase }) {
  return html`<${Badge} value=${phase.toLowerCase()} kind=${PHASE_KIND[phase] ?? "idle"} />`;
}

/** The link to a rollout's page; the definition's name rides along (the API addresses rollouts by it). */
export function rolloutHref(r) {
  return `${href("rollouts", r.id)}?name=${encodeURIComponent(r.name)}`;
}

/** "1 → 2", "3 → back to 2", or "1" for a first revision. */
export function revisionsText(r) {
  const target = r.targetRevision ?? "0";
  if (Number(r.revertedFrom ?? 0)) return `${r.revertedFrom} → back to ${target}`;
  return Number(r.previousRevision ?? 0) ? `${r.previousRevision} → ${target}` : target;
}

/** "canary", a batch number, or "–" before the first batch. */
export function batchText(batch) {
  const b = Number(batch ?? 0);
  return b < 0 ? "–" : b === 0 ? "canary" : String(b);
}

/** Nodes the rollout counts (offline ones are counted in their phase too). */
export function total(r) {
  return (r.pending ?? 0) + (r.updating ?? 0) + (r.done ?? 0) + (r.failed ?? 0);
}

/** "3/10 done, 1 updating, 6 pending (2 offline), 0 failed" as `rollout status` says it. */
export function countsText(r) {
  const parts = [`${r.done ?? 0}/${total(r)} done`];
  if (r.updating) parts.push(`${r.updating} updating`);
  if (r.pending) parts.push(`${r.pending} pending${r.offline ? ` (${r.offline} offline)` : ""}`);
  if (r.failed) parts.push(`${r.failed} failed`);
  return parts.join(", ");
}

/** The update policy in `rollout status` words ("max_parallel 1, canary 1 (manual promote), ..."). */
export function policyText(policy = {}) {
  const parts = [`max_parallel ${policy.maxParallel || "25%"}`];
  if (policy.canary) parts.push(`canary ${policy.canary} (${policy.autoPromote ? "auto-promote" : "manual promote"})`);
  const seconds = [
    ["minHealthyTimeSeconds", "min_healthy_time", 10],
    ["healthyDeadlineSeconds", "healthy_deadline", 300],
    ["progressDeadlineSeconds", "progress_deadline", 600],
    ["pauseBetweenBatchesSeconds", "pause", 0],
  ];
  for (const [key, label, fallback] of seconds) {
    const value = policy[key] ?? fallback;
    if (value) parts.push(`${label} ${fmtDuration(value)}`);
  }
  if (policy.autoRevert) parts.push("auto_revert");
  return parts.join(", ");
}

/** A thin bar: done (and failed) out of the total. */
export function Progress({ done = 0, failed = 0, of = 0 }) {
  const pct = (n) => `${of ? (100 * n) / of : 0}%`;
  return html`<div class="progress stacked" title=${`${done} of ${of} done${failed ? `, ${failed} failed` : ""}`}>
    <div style=${{ width: pct(done) }}></div>
    ${failed > 0 && html`<div class="failed" style=${{ width: pct(failed) }}></div>`}
  </div>`;
}

/** Live rollouts first, then newest first (ids grow with time). */
export function liveFirst(rollouts) {
  return [...rollouts].sort((a, b) => isLive(b) - isLive(a) || Number(b.id) - Number(a.id));
}

/** The columns of a rollouts table (`rollout list`'s); `withName` adds the definition. */
export function rolloutColumns({ withName = true } = {}) {
  return [
    { title: "ID", className: "num", render: (r) => html`<a href=${rolloutHref(r)}>${r.id}</a>` },
    withName && { title: "Definition", render: (r) => html`<a href=${href("definitions", r.name)}>${r.name}</a>` },
    { title: "Revision", render: revisionsText },
    { title: "State", render: (r) => html`<${StateBadge} state=${rolloutState(r)} />` },
    { title: "Batch", className: "num", render: (r) => batchText(r.batch) },
    {
      title: "Progress",
      render: (r) => html`<div class="progress-line"><${Progress} done=${r.done} failed=${r.failed} of=${total(r)} />
        <span>${countsText(r)}</span></div>`,
    },
    { title: "Started", render: (r) => fmtAgo(r.createdAt) },
    { title: "By", key: "actor" },
    { title: "Reason", render: (r) => r.reason || "–", className: "wrap" },
  ].filter(Boolean);
}
