// What the jobs pages share: a job's and a target's words (the ones
// `fleetctl jobs list` and `jobs show` use), state badges, and the lines
// that say where a job runs and what.
import { fmtDuration, fmtSpan } from "../duration.js";
import { Badge, fmtTime, html } from "../lib.js";
import { selectorText } from "../selector-text.js";

const KIND = {
  PENDING: "pending",
  QUEUED: "pending",
  RUNNING: "live",
  SUCCESS: "ok",
  FAILED: "bad",
  TIMEOUT: "bad",
  PARTIAL: "warn",
  CANCELLED: "idle",
  SKIPPED: "warn",
  UNDELIVERABLE: "warn",
};

/** Outcomes first, then what still moves: the order `fleetctl` counts targets in. */
const TARGET_ORDER = ["SUCCESS", "FAILED", "TIMEOUT", "CANCELLED", "SKIPPED", "UNDELIVERABLE", "RUNNING", "QUEUED", "PENDING"];
export const TERMINAL_TARGET = new Set(TARGET_ORDER.slice(0, 6));
/** What RerunJob with failed_only runs again. */
export const RERUN_STATES = new Set(["FAILED", "TIMEOUT", "UNDELIVERABLE"]);

export const jobState = (job) => (job?.state ?? "JOB_STATE_UNSPECIFIED").replace("JOB_STATE_", "");
export const targetState = (t) => (t?.state ?? "JOB_TARGET_STATE_UNSPECIFIED").replace("JOB_TARGET_STATE_", "");

/** The job has not ended (cancel applies; its targets and output still change). */
export const jobLive = (job) => !Number(job?.endedAt ?? 0);

export function JobBadge({ state }) {
  return html`<${Badge} value=${state.toLowerCase()} kind=${KIND[state] ?? "idle"} />`;
}

/** {"SUCCESS": 3, ...} from a job's counts, or from its targets when it carries no counts. */
export function countsOf(job, targets = job?.targets ?? []) {
  const out = {};
  if (job?.counts?.length) {
    for (const c of job.counts) out[targetState(c)] = c.count ?? 0;
  } else {
    for (const t of targets) out[targetState(t)] = (out[targetState(t)] ?? 0) + 1;
  }
  return out;
}

/** "3 success, 1 failed, 2 running" in fleetctl's order; "no targets" when empty. */
export function countsText(counts) {
  const parts = TARGET_ORDER.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.toLowerCase()}`);
  return parts.join(", ") || "no targets";
}

/** How long a job took, from its creation to its end: "1.2s", "3m12s"; "–" while it runs. */
export function jobDuration(job) {
  return fmtSpan(job.createdAt, job.endedAt);
}

/** An exit code as `jobs show` prints it: "0", "signal 9", or "–" before the target ended. */
export function exitText(target) {
  if (!Number(target.startedAt ?? 0) || !TERMINAL_TARGET.has(targetState(target))) return "–";
  const code = target.exitCode ?? 0;
  return code < 0 ? `signal ${-code}` : String(code);
}

// Quote a word the way a POSIX shell would need it (shlex.join's rule).
const quote = (w) => (w === "" ? "''" : /^[\w@%+=:,./-]+$/.test(w) ? w : `'${w.replaceAll("'", `'"'"'`)}'`);

/** A step's command for people: the argv, or the interpreter and the script's first line. */
export function commandText(step) {
  const command = step?.command ?? {};
  if (command.argv?.length) return command.argv.map(quote).join(" ");
  const lines = (command.script ?? "").trim().split("\n");
  const more = lines.length > 1 ? ` (+${lines.length - 1} lines)` : "";
  return `${(command.interpreter ?? []).map(quote).join(" ")} <<< ${JSON.stringify(lines[0] ?? "")}${more}`;
}

/** Where the job runs: "selector env=prod" or "nodes web-1, web-2". */
export function whereText(spec = {}) {
  if (spec.selector) return `selector ${selectorText(spec.selector) || "(every node)"}`;
  return `nodes ${(spec.nodeIds ?? []).join(", ")}`;
}

/** The window: "max_concurrency 2, max_errors 1, canary 1, timeout 10m, lock apt". */
export function policyText(spec = {}) {
  const parts = [`max_concurrency ${spec.maxConcurrency || "all"}`];
  if (spec.maxErrors) parts.push(`max_errors ${spec.maxErrors}`);
  if (spec.canary) parts.push(`canary ${spec.canary}`);
  if (spec.timeoutSeconds != null) parts.push(`timeout ${fmtDuration(spec.timeoutSeconds)}`);
  if (spec.deliveryTimeoutSeconds != null) parts.push(`delivery ${fmtDuration(spec.deliveryTimeoutSeconds)}`);
  if (spec.lock) parts.push(`lock ${spec.lock}`);
  return parts.join(", ");
}

/** The job's name for people: its spec's name, else its first step's command. */
export function jobTitle(job) {
  const steps = job?.spec?.steps ?? [];
  return job?.spec?.name || (steps.length === 1 ? commandText(steps[0]) : `${steps.length} steps`);
}

/** The manager's delivery timeout for a job that sets none (manager.service.jobs). */
const DEFAULT_DELIVERY_TIMEOUT = 300;

/**
 * Why a live job's PENDING targets wait, in `fleetctl run`'s words (fleetctl/joboutput.py
 * offline_note): their node is offline, or online in its control stream's grace with no
 * way to reach it. `pending`: node ids; `nodes`: ListNodes' answer. "" if neither.
 */
export function waitingNote(job, pending, nodes) {
  const byId = new Map(nodes.map((n) => [n.nodeId, n]));
  const offline = [];
  const lost = [];
  for (const id of [...pending].sort()) {
    const node = byId.get(id);
    if (node?.status === "NODE_STATUS_OFFLINE") offline.push(node);
    else if (node?.streamState === "CONTROL_STREAM_STATE_LOST") lost.push(node);
  }
  if (!offline.length && !lost.length) return "";
  const firstFive = (items) => items.slice(0, 5).join(", ") + (items.length > 5 ? ` and ${items.length - 5} more` : "");
  const parts = [];
  if (offline.length) {
    const names = offline.map((n) => (Number(n.lastHeartbeat ?? 0) ? `${n.nodeId} (offline since ${fmtTime(n.lastHeartbeat)})` : n.nodeId));
    parts.push(`${offline.length} target(s) wait for their node to come back online: ${firstFive(names)}`);
  }
  if (lost.length) {
    const names = lost.map((n) => `${n.nodeId} (lost at ${fmtTime(n.streamSince)})`);
    parts.push(`${lost.length} target(s) wait for their node's control stream to come back (the node still counts as online): ${firstFive(names)}`);
  }
  const timeout = job.spec?.deliveryTimeoutSeconds ?? DEFAULT_DELIVERY_TIMEOUT;
  const until = fmtTime(Number(job.createdAt ?? 0) + Math.round(timeout * 1000));
  return `${parts.join("; ")}; any not delivered by ${until} (the delivery timeout, ${fmtDuration(timeout)}) ends undeliverable (not counted against max_errors)`;
}
