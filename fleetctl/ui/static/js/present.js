// How the overview, nodes and agents pages present nodes and agents: the
// words, durations and badge colours fleetctl uses (fleetctl/nodes.py,
// agents.py, views.py), so the console and the CLI say the same thing.
import { fmtDuration } from "./duration.js";
import { Badge, enumLabel, fmtAgo, html } from "./lib.js";

export const AGENT_STATES = ["RUNNING", "STARTING", "BACKOFF", "STOPPING", "STOPPED", "EXITED", "FATAL", "UNKNOWN"];
export const HEALTHS = ["HEALTHY", "UNHEALTHY", "PENDING"];

/** "online", "offline" or "revoked" (a revoked node cannot come back online). */
export function nodeStatus(node) {
  if (Number(node.revokeTime ?? 0)) return "revoked";
  return enumLabel(node.status, "NODE_STATUS_") || "unknown";
}

// A certificate this close to expiry is a warning: renewal should have
// happened at two thirds of its lifetime (fleetctl nodes list's yellow).
const CERT_WARN_MS = 24 * 3600 * 1000;

/** {text, kind} for a node's certificate expiry: "6d23h" / "expired 2h ago" / "–". */
export function certExpiry(node, now = Date.now()) {
  const at = Number(node.certExpireTime ?? 0);
  if (!at) return { text: "–", kind: "" };
  if (at <= now) return { text: `expired ${fmtAgo(at, now)}`, kind: "bad" };
  return { text: fmtDuration((at - now) / 1000), kind: at - now < CERT_WARN_MS ? "warn" : "" };
}

/** {status: count} of a node's agentCounts ("RUNNING": 3). */
export function agentCounts(node) {
  const out = {};
  for (const c of node.agentCounts ?? []) out[(c.status ?? "AGENT_STATUS_UNSPECIFIED").replace("AGENT_STATUS_", "")] = c.count ?? 0;
  return out;
}

/** "3/4": running of all, as fleetctl nodes list's AGENTS column; "3/4*" when the node is
 * not online (the counts are what its daemon last reported). */
export function agentsCell(node) {
  const counts = agentCounts(node);
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  if (!total) return "0";
  return `${counts.RUNNING ?? 0}/${total}${nodeStatus(node) === "online" ? "" : "*"}`;
}

/** An agent's state as a badge ("running"; "running*" when its node is offline and the state stale). */
export function StateBadge({ agent, stale }) {
  const state = enumLabel(agent?.status, "AGENT_STATUS_") || "unknown";
  return html`<span title=${stale ? "its node is offline: this is what its daemon last reported" : ""}
    ><${Badge} value=${state + (stale ? "*" : "")} kind=${state} /></span>`;
}

/** An agent's health: "healthy", "unhealthy", "pending", or "–" without a health check. */
export function healthWord(agent) {
  return enumLabel(agent?.health, "AGENT_HEALTH_") || "–";
}

export function HealthBadge({ agent }) {
  const word = healthWord(agent);
  return word === "–" ? html`<span class="dim">none</span>` : html`<${Badge} value=${word} />`;
}

/** "killed by SIGKILL (3m ago)", or "–" if its process never ended. */
export function lastExitLine(agent, now = Date.now()) {
  const how = agent?.lastExit;
  if (!how || !how.reason) return "–";
  return `${how.reason} (${fmtAgo(how.time, now)})`;
}

/** How long a RUNNING agent has been up, "–" otherwise (fleetctl agents list's UPTIME). */
export function uptime(agent, now = Date.now()) {
  const start = Number(agent?.startTime ?? 0);
  return agent?.status === "AGENT_STATUS_RUNNING" && start ? fmtDuration((now - start) / 1000) : "–";
}

/** A range choice shown as buttons: [[value, label], ...]. */
export function Choice({ options, value, onChange, label }) {
  return html`<div class="choice" role="group" aria-label=${label}>
    ${options.map(
      ([v, text]) => html`<button class=${v === value ? "on" : ""} aria-pressed=${v === value} onClick=${() => onChange(v)}>${text}</button>`,
    )}
  </div>`;
}

/** A clock offset as fleet/clockskew.py words it ("2.5s", "7m12s", "2h1m"). */
function skewDuration(ms) {
  const abs = Math.abs(ms);
  const s = Math.round(abs / 1000);
  if (s < 60) return `${(abs / 1000).toFixed(1)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}

/** `nodes show`'s Clock line (fleet/clockskew.py clock_words): how far the node's clock is
 * off the manager's and what that costs; "" within 2 s or unknown (an older daemon). */
export function clockText(node) {
  if (node.clockOffsetMs === undefined || node.clockOffsetMs === null) return "";
  const off = Number(node.clockOffsetMs);
  if (Math.abs(off) < 2000) return "";
  const where = off < 0 ? "behind the manager" : "ahead of the manager";
  let text = `${skewDuration(off)} ${where} (the times it stamps are off by as much`;
  if (off > 5 * 60 * 1000) {
    text +=
      "; its metric samples are more than 5m0s ahead: the manager refuses them and the daemon" +
      " drops each batch, so its metrics stop";
  } else if (off < -2000) {
    text += `; its metric samples are stored ${skewDuration(off)} in the past`;
  }
  return `${text}); run NTP on the host`;
}
