// Agents: every agent of the fleet, filtered by state, health and text; and
// one agent's page with its state, last exit, health, spec, per-process
// metrics, its log followed live, and start / stop / restart.
import { call, stream } from "../api.js";
import { AgentLog } from "../agentlog.js";
import { useEvents } from "../feed.js";
import {
  Badge, Confirm, ErrorBox, Page, Table, enumLabel, fmtAgo, fmtLabels, fmtTime, href, html, useCall, useCallback,
  useEffect, useInterval, useMemo, useRef, useState,
} from "../lib.js";
import { useRefresh } from "../live.js";
import { AgentMetrics } from "../metrics.js";
import { AGENT_STATES, HEALTHS, HealthBadge, StateBadge, healthWord, lastExitLine, uptime } from "../present.js";

const STATE_CHANGED = "EVENT_KIND_AGENT_STATE_CHANGED";
// A node going offline or coming back changes whether its agents are stale.
const LIST_KINDS = new Set([STATE_CHANGED, "EVENT_KIND_NODE_ONLINE", "EVENT_KIND_NODE_OFFLINE"]);

/** Re-render every `ms` (ages and uptimes move on by themselves). */
function useTick(ms) {
  const [, setTick] = useState(0);
  useInterval(() => setTick((n) => n + 1), ms);
}

/** Whether a NodeAgent passes the agents page's filters (state, health: lowercase words). */
export function agentMatches(item, state, health, needle) {
  const agent = item.agent ?? {};
  if (state && enumLabel(agent.status, "AGENT_STATUS_") !== state) return false;
  if (health && healthWord(agent) !== (health === "none" ? "–" : health)) return false;
  if (!needle) return true;
  const hay = [item.nodeId, agent.id, agent.type, agent.message, agent.lastExit?.reason, fmtLabels(agent.labels)].join(" ");
  return hay.toLowerCase().includes(needle);
}

const LIST_COLUMNS = [
  {
    title: "Node/agent",
    render: (a) => html`<a href=${href("agents", a.nodeId, a.agent.id)}>${a.nodeId}/${a.agent.id}</a>`,
  },
  { title: "Type", render: (a) => a.agent.type },
  { title: "State", render: (a) => html`<${StateBadge} agent=${a.agent} stale=${a.stale} />` },
  { title: "Health", render: (a) => html`<${HealthBadge} agent=${a.agent} />` },
  { title: "Restarts", render: (a) => a.agent.restartCount ?? 0, className: "num" },
  { title: "Uptime", render: (a) => uptime(a.agent), className: "num" },
  { title: "Last exit", render: (a) => lastExitLine(a.agent), className: "wrap" },
];

function setQuery(params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v)).toString();
  // Without a hashchange, which would remount the page under the operator's hands.
  history.replaceState(null, "", `#/agents${query ? `?${query}` : ""}`);
}

export function AgentsPage({ query }) {
  const [state, setState] = useState(query.get("state") ?? "");
  const [health, setHealth] = useState(query.get("health") ?? "");
  const [text, setText] = useState(query.get("q") ?? "");
  // The manager's last synced states of every agent: one call, filtered here.
  const agents = useCall("ListAgents", {});
  const refresh = useRefresh(agents, 3000);
  useEvents(refresh, (e) => LIST_KINDS.has(e.kind));
  useTick(10000);
  useEffect(() => setQuery({ state, health, q: text }), [state, health, text]);
  useEffect(() => {
    // A link to #/agents?... followed while this page is open (the shell keeps it mounted).
    const onHash = () => {
      const [path, query = ""] = location.hash.split("?");
      if (path !== "#/agents") return;
      const params = new URLSearchParams(query);
      setState(params.get("state") ?? "");
      setHealth(params.get("health") ?? "");
      setText(params.get("q") ?? "");
    };
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);

  const all = agents.data?.agents ?? [];
  const rows = useMemo(() => {
    const needle = text.trim().toLowerCase();
    return all
      .filter((a) => agentMatches(a, state, health, needle))
      .sort((a, b) => a.nodeId.localeCompare(b.nodeId) || a.agent.id.localeCompare(b.agent.id));
  }, [all, state, health, text]);
  const stale = useMemo(() => new Set(all.filter((a) => a.stale).map((a) => a.nodeId)), [all]);

  return html`<${Page} name="agents" title="Agents" ready=${Boolean(agents.data || agents.error)}>
    <div class="filters">
      <label>State <select value=${state} onChange=${(e) => setState(e.target.value)}>
        <option value="">any</option>
        ${AGENT_STATES.map((s) => html`<option value=${s.toLowerCase()}>${s.toLowerCase()}</option>`)}
      </select></label>
      <label>Health <select value=${health} onChange=${(e) => setHealth(e.target.value)}>
        <option value="">any</option>
        ${HEALTHS.map((h) => html`<option value=${h.toLowerCase()}>${h.toLowerCase()}</option>`)}
        <option value="none">no health check</option>
      </select></label>
      <label>Search <input type="search" placeholder="node, agent, type, message" value=${text} onInput=${(e) => setText(e.target.value)} /></label>
      <span class="dim">${rows.length.toLocaleString()} of ${all.length.toLocaleString()} agents</span>
    </div>
    <${ErrorBox} error=${agents.error} what="listing agents" />
    ${stale.size > 0 &&
    html`<p class="dim">* the node is offline: its agents are shown as its daemon last reported them
      (${[...stale].sort().slice(0, 5).join(", ")}${stale.size > 5 ? ` and ${stale.size - 5} more` : ""}).</p>`}
    <${Table} columns=${LIST_COLUMNS} rows=${rows} rowKey=${(a) => `${a.nodeId}/${a.agent.id}`}
      empty=${agents.data ? "No agent matches." : "Loading…"} />
  </${Page}>`;
}

// --- one agent -----------------------------------------------------------------

/**
 * The agent as its daemon says now (ListAgents live: with its spec), or, when
 * the daemon cannot be asked, as it last reported (`unreachable` says why),
 * as `fleetctl agents show` does.
 */
async function loadAgent(nodeId, agentId) {
  let answer = await call("ListAgents", { nodeId, live: true });
  let unreachable = "";
  if ((answer.errors ?? []).length) {
    unreachable = answer.errors[0].message.replace(`${nodeId}: `, "");
    answer = await call("ListAgents", { nodeId });
  }
  const item = (answer.agents ?? []).find((a) => a.agent?.id === agentId);
  if (!item) throw Object.assign(new Error(`node '${nodeId}' has no agent '${agentId}'`), { code: "NOT_FOUND" });
  return { item, unreachable };
}

/** As useCall, for loadAgent: {data: {item, unreachable}, error, loading, reload}. */
function useAgent(nodeId, agentId) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const seq = useRef(0);
  const reload = useCallback(() => {
    const mine = ++seq.current;
    setState((s) => ({ ...s, loading: true }));
    loadAgent(nodeId, agentId).then(
      (data) => mine === seq.current && setState({ data, error: null, loading: false }),
      (error) => mine === seq.current && setState((s) => ({ data: s.data, error, loading: false })),
    );
  }, [nodeId, agentId]);
  useEffect(reload, [reload]);
  return { ...state, reload };
}

function healthLine(agent) {
  const word = healthWord(agent);
  if (word === "–") return "none (no health check: a live process is a healthy agent)";
  const since = Number(agent.healthSince ?? 0) ? ` since ${fmtTime(agent.healthSince)} (${fmtAgo(agent.healthSince)})` : "";
  return html`<${Badge} value=${word} />${since}${agent.healthMessage ? `: ${agent.healthMessage}` : ""}`;
}

function StateProps({ item, unreachable }) {
  const a = item.agent;
  const how = a.lastExit;
  const revision = Number(a.revision ?? 0);
  const rows = [
    ["State", html`<${StateBadge} agent=${a} stale=${item.stale} /> <span class="dim">${a.message}</span>`],
    ["Type", a.type],
    ["PID", a.pid || "–"],
    ["Version", a.version || "–"],
    ["Started", Number(a.startTime ?? 0) ? `${fmtTime(a.startTime)} (up ${uptime(a)})` : "–"],
    ["Restarts", String(a.restartCount ?? 0)],
    [
      "Last exit",
      how?.reason
        ? `${how.reason} (${enumLabel(how.kind, "AGENT_EXIT_KIND_")}, exit code ${how.exitCode ?? 0}), ${fmtTime(how.time)} (${fmtAgo(how.time)})`
        : "never exited",
    ],
    ["Health", healthLine(a)],
    ["Last heartbeat", Number(a.lastHeartbeat ?? 0) ? `${fmtTime(a.lastHeartbeat)} (${fmtAgo(a.lastHeartbeat)})` : "– (not an SDK agent, or not registered)"],
    ...(a.status === "AGENT_STATUS_BACKOFF" ? [["Next start", fmtTime(a.backoffUntil)]] : []),
    ["Config version", String(a.configVersion ?? 0)],
    [
      "Revision",
      revision
        ? html`${revision} of the definition <a href=${href("definitions", a.id)}>${a.id}</a>`
        : "none (an agent of the host's own config)",
    ],
    ["Labels", fmtLabels(a.labels) || "–"],
    [
      "Reported",
      unreachable
        ? `${Number(item.reportedAt ?? 0) ? `${fmtTime(item.reportedAt)} (${fmtAgo(item.reportedAt)})` : "unknown"}: its daemon could not be asked (${unreachable})`
        : "live (asked its daemon now)",
    ],
  ];
  return html`<dl class="props">${rows.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}</dl>`;
}

/** argv as a shell would need it typed (as Python's shlex.join). */
export function shellJoin(argv) {
  return (argv ?? []).map((w) => (/^[\w@%+=:,./-]+$/.test(w) ? w : `'${w.replaceAll("'", `'"'"'`)}'`)).join(" ");
}

function checkLine(check) {
  const kind = enumLabel(check?.kind, "HEALTH_CHECK_KIND_");
  if (!kind) return null;
  const target = { http: check.url, tcp: check.address, command: shellJoin(check.command) }[kind];
  const timing = [
    `timeout ${check.timeoutSeconds ?? 0}s`,
    check.intervalSeconds && `every ${check.intervalSeconds}s`,
    check.failureThreshold > 1 && `${check.failureThreshold} failures`,
    check.restartWhenUnhealthy && "restarts when unhealthy",
  ].filter(Boolean);
  return `${kind}${target ? ` ${target}` : ""} (${timing.join(", ")})`;
}

function SpecProps({ agent, unreachable }) {
  const spec = agent.spec;
  if (!spec) {
    return html`<p class="dim">${unreachable ? `Unavailable: its daemon could not be asked (${unreachable}).` : "Not reported by this daemon (an older fleet-daemon)."}</p>`;
  }
  const checks = [spec.health, ...(spec.checks ?? [])].map(checkLine).filter(Boolean);
  const rows = [
    ["Command", html`<code>${shellJoin(spec.argv)}</code>`],
    ["Env (names)", Object.keys(spec.env ?? {}).sort().join(", ") || "–"],
    ["Working dir", spec.cwd || "–"],
    ["User", spec.user || "the daemon's"],
    [
      "Restart policy",
      `${enumLabel(spec.restart, "RESTART_POLICY_") || "unspecified"}; autostart ${spec.autostart ? "yes" : "no"}, start_secs ${spec.startSecs ?? 0}, max_retries ${spec.maxRetries ?? 0}`,
    ],
    ["Stop", `${spec.stopSignal || "SIGTERM"}, then SIGKILL after ${spec.stopTimeoutSeconds ?? 0}s`],
    ["Health checks", checks.length ? html`${checks.map((c) => html`<div>${c}</div>`)}` : "none"],
    ...(spec.artifact?.name ? [["Artifact", `${spec.artifact.name} ${spec.artifact.version ?? ""} (${spec.artifact.digest ?? ""})`]] : []),
    ["Log file", agent.logPath || "–"],
  ];
  return html`<dl class="props">${rows.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}</dl>`;
}

const OPERATIONS = {
  start: { op: "AGENT_OPERATION_START", verb: "Start", done: "started" },
  stop: { op: "AGENT_OPERATION_STOP", verb: "Stop", done: "stopped" },
  restart: { op: "AGENT_OPERATION_RESTART", verb: "Restart", done: "restarted" },
};
const STOPPED = new Set(["AGENT_STATUS_STOPPED", "AGENT_STATUS_EXITED", "AGENT_STATUS_FATAL"]);

function Operations({ nodeId, agentId, agent, offline, onDone }) {
  const [asking, setAsking] = useState(null); // a key of OPERATIONS
  const [result, setResult] = useState("");
  const run = async (name) => {
    const answer = await call("OperateAgent", { nodeId, agentId, operation: OPERATIONS[name].op });
    const after = answer.agent?.agent ?? {};
    setResult(`${nodeId}/${agentId} ${OPERATIONS[name].done}: now ${enumLabel(after.status, "AGENT_STATUS_")}${after.pid ? ` (pid ${after.pid})` : ""}.`);
    onDone();
  };
  const stopped = STOPPED.has(agent?.status);
  // An offline node's daemon cannot be asked: say so here rather than after a confirmation.
  const away = offline ? "its node is offline: its daemon cannot be asked" : "";
  return html`<div class="operations">
    <button onClick=${() => setAsking("start")} disabled=${offline || !stopped} title=${away || (stopped ? "" : "it is not stopped")}>Start</button>
    <button onClick=${() => setAsking("stop")} disabled=${offline || stopped} title=${away}>Stop</button>
    <button onClick=${() => setAsking("restart")} disabled=${offline} title=${away}>Restart</button>
    ${result && html`<span class="dim" role="status">${result}</span>`}
    ${asking &&
    html`<${Confirm} title=${`${OPERATIONS[asking].verb} this agent?`} targets=${[`${nodeId}/${agentId}`]}
      confirmLabel=${OPERATIONS[asking].verb} danger=${asking !== "start"}
      onConfirm=${() => run(asking)} onClose=${() => setAsking(null)} />`}
  </div>`;
}

const HISTORY = 200; // of the node's agent events, to find this agent's last few
const CHANGES_SHOWN = 10;
const AGENT_KINDS = [STATE_CHANGED, "EVENT_KIND_OPERATION"];

/** This agent's recent state changes and operations, newest first, live. */
function useChanges(nodeId, agentId) {
  const [changes, setChanges] = useState([]);
  const mine = (e) => e.nodeId === nodeId && e.agentId === agentId && AGENT_KINDS.includes(e.kind);
  useEffect(() => {
    const abort = new AbortController();
    const loaded = [];
    const body = { nodeId, kinds: AGENT_KINDS, tail: HISTORY };
    stream("WatchEvents", body, (m) => m.event && mine(m.event) && loaded.push(m.event), { signal: abort.signal }).then(
      () => setChanges((live) => merge(live, loaded)),
      () => {}, // the history is a nicety: the state above is what counts
    );
    return () => abort.abort();
  }, [nodeId, agentId]); // eslint-disable-line react-hooks/exhaustive-deps
  return [changes, (event) => setChanges((old) => merge(old, [event]))];
}

function merge(a, b) {
  const byId = new Map([...a, ...b].map((e) => [e.id, e]));
  return [...byId.values()].sort((x, y) => Number(y.id) - Number(x.id)).slice(0, CHANGES_SHOWN);
}

const CHANGE_COLUMNS = [
  { title: "Time", render: (e) => fmtTime(e.timestamp) },
  { title: "Kind", render: (e) => enumLabel(e.kind, "EVENT_KIND_") },
  { title: "Actor", key: "actor" },
  { title: "Message", key: "message", className: "wrap" },
];

// The log and the metrics are read from the daemon: an offline node's would only fail.
const OFFLINE_NOTE = "Its node is offline: the log and metrics are read from its daemon, which cannot be asked now.";

export function AgentPage({ nodeId, agentId }) {
  const agent = useAgent(nodeId, agentId);
  const [changes, addChange] = useChanges(nodeId, agentId);
  const refresh = useRefresh(agent, 2000);
  useEvents(
    (event, history) => {
      addChange(event);
      if (!history) refresh();
    },
    (e) => e.nodeId === nodeId && e.agentId === agentId && AGENT_KINDS.includes(e.kind),
    { history: true },
  );
  useTick(10000);

  const { item, unreachable } = agent.data ?? {};
  const ref = `${nodeId}/${agentId}`;
  return html`<${Page} name="agent" title=${`Agent ${ref}`} ready=${Boolean(agent.data || agent.error)}
      actions=${html`<a href=${href("nodes", nodeId)}>Node ${nodeId}</a>`}>
    <${ErrorBox} error=${agent.error} what=${ref} />
    ${item &&
    html`<${Operations} nodeId=${nodeId} agentId=${agentId} agent=${item.agent} offline=${item.stale} onDone=${agent.reload} />
      <div class="panel"><${StateProps} item=${item} unreachable=${unreachable} /></div>
      <h2>Recent changes</h2>
      <${Table} columns=${CHANGE_COLUMNS} rows=${changes} rowKey=${(e) => e.id} pageSize=${CHANGES_SHOWN}
        empty="No state change or operation recorded lately." />
      <h2>Log</h2>
      ${item.stale ? html`<p class="dim">${OFFLINE_NOTE}</p>` : html`<${AgentLog} nodeId=${nodeId} agentId=${agentId} />`}
      <h2>Metrics <span class="dim">(its process tree, sampled by its daemon)</span></h2>
      ${item.stale ? html`<p class="dim">${OFFLINE_NOTE}</p>` : html`<${AgentMetrics} nodeId=${nodeId} agentId=${agentId} />`}
      <h2>Spec</h2>
      <div class="panel"><${SpecProps} agent=${item.agent} unreachable=${unreachable} /></div>`}
  </${Page}>`;
}
