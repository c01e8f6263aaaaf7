// Nodes: the table of nodes a label selector picks, and one node's page with
// its properties, agents, editable labels and host metrics. Both refresh on
// the node events of the shared feed, throttled.
import { call } from "../api.js";
import { useEvents } from "../feed.js";
import {
  Badge, Confirm, ErrorBox, Page, Table, enumLabel, fmtAgo, fmtTime, href, html, useCall, useEffect,
  useInterval, useMemo, useState,
} from "../lib.js";
import { fmtDuration } from "../duration.js";
import { useRefresh } from "../live.js";
import { AGENT_STATES, HealthBadge, StateBadge, agentCounts, agentsCell, certExpiry, clockText, lastExitLine, nodeStatus, uptime } from "../present.js";
import { parseSelector } from "../selector.js";
import { NodeMetrics } from "../metrics.js";

const NODE_KINDS = new Set([
  "EVENT_KIND_NODE_REGISTERED", "EVENT_KIND_NODE_ONLINE", "EVENT_KIND_NODE_OFFLINE",
  "EVENT_KIND_NODE_LABELS_UPDATED", "EVENT_KIND_AGENT_STATE_CHANGED", "EVENT_KIND_NODE_UPDATE_ERROR",
  "EVENT_KIND_OPERATION",
]);
const TYPING_PAUSE_MS = 300;

function Labels({ labels }) {
  const entries = Object.entries(labels ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (!entries.length) return html`<span class="dim">–</span>`;
  return html`<span class="labels">${entries.map(([k, v]) => html`<span class="label">${k}=${v}</span>`)}</span>`;
}

function Drift({ node }) {
  if (node.drift) return html`<span title=${node.driftReason ?? ""}><${Badge} value="drift" kind="warn" /> <span class="dim">${node.driftReason}</span></span>`;
  return Number(node.desiredVersion ?? 0) ? html`<span class="dim">in sync</span>` : html`<span class="dim">–</span>`;
}

function Expiry({ node }) {
  const { text, kind } = certExpiry(node);
  return html`<span class=${kind ? `cert-${kind}` : ""}>${text}</span>`;
}

function AgentsCell({ node }) {
  const counts = agentCounts(node);
  const others = AGENT_STATES.filter((s) => s !== "RUNNING" && counts[s]);
  const stale = nodeStatus(node) === "online" ? "" : " (the node is not online: what its daemon last reported)";
  return html`<span title=${Object.entries(counts).map(([s, n]) => `${n} ${s.toLowerCase()}`).join(", ") + stale}>
    ${agentsCell(node)}${others.length > 0 && html` <span class="cert-warn">(${others.map((s) => `${counts[s]} ${s.toLowerCase()}`).join(", ")})</span>`}
  </span>`;
}

const NODE_COLUMNS = [
  { title: "Node", render: (n) => html`<a href=${href("nodes", n.nodeId)}>${n.nodeId}</a>` },
  { title: "Status", render: (n) => html`<${Badge} value=${nodeStatus(n)} kind=${nodeStatus(n) === "revoked" ? "bad" : undefined} />` },
  { title: "Agents", render: (n) => html`<${AgentsCell} node=${n} />` },
  { title: "Last heartbeat", render: (n) => fmtAgo(n.lastHeartbeat) },
  { title: "Labels", render: (n) => html`<${Labels} labels=${n.labels} />`, className: "wrap" },
  { title: "Desired state", render: (n) => html`<${Drift} node=${n} />`, className: "wrap" },
  { title: "Cert expires", render: (n) => html`<${Expiry} node=${n} />` },
  { title: "Hostname", render: (n) => n.hostname, className: "dim" },
  { title: "Version", render: (n) => n.daemonVersion, className: "dim" },
];

/** The selector text as the message ListNodes takes: {selector} or {error}. */
function checkSelector(text) {
  try {
    return { selector: parseSelector(text) };
  } catch (error) {
    return { error };
  }
}

function selectorOfHash() {
  return new URLSearchParams(location.hash.split("?")[1] ?? "").get("selector") ?? "";
}

const STATUSES = ["online", "offline", "revoked"];

export function NodesPage({ query }) {
  const [text, setText] = useState(query.get("selector") ?? "");
  const syntax = useMemo(() => checkSelector(text), [text]);
  // What ListNodes was last asked with: the last text that parsed, after a pause in typing.
  const [sent, setSent] = useState(() => {
    const first = checkSelector(text);
    return first.error ? { text: "", selector: {} } : { text, selector: first.selector };
  });
  const [status, setStatus] = useState(query.get("status") ?? "");
  const [search, setSearch] = useState("");

  useEffect(() => {
    if (syntax.error || text === sent.text) return undefined;
    const timer = setTimeout(() => {
      setSent({ text, selector: syntax.selector });
      // The selector goes in the URL (shareable, kept on reload) without a
      // hashchange, which would remount the page under the typing operator.
      history.replaceState(null, "", text ? `#/nodes?selector=${encodeURIComponent(text)}` : "#/nodes");
    }, TYPING_PAUSE_MS);
    return () => clearTimeout(timer);
  }, [text, syntax]); // eslint-disable-line react-hooks/exhaustive-deps
  useEffect(() => {
    // A link to #/nodes?selector=... followed while this page is open.
    const onHash = () => location.hash.startsWith("#/nodes?") || location.hash === "#/nodes" ? setText(selectorOfHash()) : null;
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);

  const nodes = useCall("ListNodes", { selector: sent.selector }, [sent]);
  const refresh = useRefresh(nodes, 3000);
  useEvents(refresh, (e) => NODE_KINDS.has(e.kind));
  useInterval(refresh, 30000); // heartbeats and certificate ages move without events

  const rejected = nodes.error?.code === "INVALID_ARGUMENT" ? nodes.error : null;
  const fieldError = syntax.error ?? rejected;
  // A refused selector's answer is no nodes, not the last selector's nodes.
  const listed = rejected ? null : nodes.data;
  const rows = useMemo(() => {
    const needle = search.trim().toLowerCase();
    return (listed?.nodes ?? [])
      .filter((n) => !status || nodeStatus(n) === status)
      .filter((n) => !needle || [n.nodeId, n.hostname, n.ip].join(" ").toLowerCase().includes(needle))
      .sort((a, b) => a.nodeId.localeCompare(b.nodeId));
  }, [listed, status, search]);
  const total = listed?.nodes?.length ?? 0;

  return html`<${Page} name="nodes" title="Nodes" ready=${Boolean(nodes.data || nodes.error)}>
    <div class="filters">
      <label>Label selector
        <input class=${`selector${fieldError ? " invalid" : ""}`} type="text" spellcheck="false" value=${text}
          placeholder="env=prod, tier in (web,api), !canary" aria-invalid=${Boolean(fieldError)}
          aria-describedby="selector-error" onInput=${(e) => setText(e.target.value)} />
      </label>
      <label>Status <select value=${status} onChange=${(e) => setStatus(e.target.value)}>
        <option value="">all</option>
        ${STATUSES.map((s) => html`<option value=${s}>${s}</option>`)}
      </select></label>
      <label>Search <input type="search" placeholder="node, hostname, IP" value=${search} onInput=${(e) => setSearch(e.target.value)} /></label>
      ${listed &&
      html`<span class="dim">${rows.length.toLocaleString()} of ${total.toLocaleString()} nodes${sent.text ? html` matching <code>${sent.text}</code>` : ""}</span>`}
    </div>
    ${fieldError &&
    html`<div class="field-error" id="selector-error" role="alert">
      ${syntax.error ? "Invalid selector: " : "The manager refused the selector: "}${fieldError.message}
      ${syntax.error && html`<span class="dim"> (showing ${sent.text ? html`nodes matching <code>${sent.text}</code>` : "every node"})</span>`}
    </div>`}
    <${ErrorBox} error=${rejected ? null : nodes.error} what="listing nodes" />
    <${Table} columns=${NODE_COLUMNS} rows=${rows} rowKey=${(n) => n.nodeId}
      empty=${listed ? "No node matches." : nodes.error ? "No nodes to show." : "Loading…"} />
  </${Page}>`;
}

// --- one node ------------------------------------------------------------------

/** The node's control stream, in `fleetctl nodes show`'s words. A lost stream is why a
 * node whose daemon just died still reads online with a fresh heartbeat. */
export function streamText(node, now = Date.now()) {
  const state = String(node.streamState ?? "").replace("CONTROL_STREAM_STATE_", "");
  if (state === "CONNECTED") return `connected since ${fmtTime(node.streamSince)} (${fmtAgo(node.streamSince, now)})`;
  if (state === "LOST") {
    const lost = `lost ${fmtAgo(node.streamSince, now)}`;
    if (nodeStatus(node) !== "online") return lost;
    const left = (Number(node.streamOfflineAt ?? 0) - now) / 1000;
    return left > 0
      ? `${lost}; offline in ${fmtDuration(left)} unless it reconnects`
      : `${lost}; its grace is over: offline at the next sweep unless it reconnects`;
  }
  if (state === "ELSEWHERE") return `connected to replica ${node.streamReplica}`;
  if (state === "NONE") return nodeStatus(node) === "online" ? "none (the daemon heartbeats over unary calls)" : "none";
  return "unknown";
}

/** The agents by state; whose word it is when the node is not online. */
function agentsText(node, counts) {
  const text = Object.entries(counts).map(([s, n]) => `${n} ${s.toLowerCase()}`).join(", ");
  if (!text) return "none";
  const status = nodeStatus(node);
  return status === "online" ? text : `${text} (as its daemon last reported; the node is ${status})`;
}

function Properties({ node }) {
  const counts = agentCounts(node);
  const expiry = certExpiry(node);
  const revoked = Number(node.revokeTime ?? 0);
  const rows = [
    ["Status", html`<${Badge} value=${nodeStatus(node)} kind=${revoked ? "bad" : undefined} />`],
    ["Hostname", node.hostname],
    ["IP", node.ip],
    ["OS/Arch", `${node.os || "?"}/${node.arch || "?"}`],
    ["Daemon version", node.daemonVersion],
    ["Agent version", node.agentVersion || "–"],
    ["Daemon address", node.daemonAddress],
    ["Control stream", streamText(node)],
    ["Connection", enumLabel(node.connectionState, "CONNECTION_STATE_") || "–"],
    ["Last heartbeat", Number(node.lastHeartbeat ?? 0) ? `${fmtTime(node.lastHeartbeat)} (${fmtAgo(node.lastHeartbeat)})` : "never"],
    ["Registered", fmtTime(node.registeredAt)],
    ["Agents", agentsText(node, counts)],
    ["Jobs", node.jobsDisabled ? "disabled (jobs.enabled = false in the host's daemon config)" : "enabled"],
    ...(clockText(node) ? [["Clock", clockText(node)]] : []),
    [
      "Certificate",
      html`${Number(node.certExpireTime ?? 0)
        ? html`<span class=${expiry.kind ? `cert-${expiry.kind}` : ""}>${expiry.kind === "bad" ? expiry.text : `expires in ${expiry.text}`}</span> (${fmtTime(node.certExpireTime)})`
        : "expiry unknown"}${revoked
        ? html`; <strong class="cert-bad">revoked</strong> at ${fmtTime(node.revokeTime)}: refused until it enrolls again`
        : ""}`,
    ],
    [
      "Desired state",
      Number(node.desiredVersion ?? 0) || node.drift
        ? html`version ${node.desiredVersion ?? 0} wanted, ${node.reportedVersion ?? 0} reported${node.drift
            ? html`: <${Badge} value="drift" kind="warn" /> ${node.driftReason}`
            : ", in sync"}`
        : "nothing pushed: no definition selects this node",
    ],
  ];
  return html`<div class="panel">
    <dl class="props">${rows.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}</dl>
    ${(node.updateErrors ?? []).length > 0 &&
    html`<h3>Update errors</h3>
      <ul class="update-errors">
        ${node.updateErrors.map((e) => html`<li><strong>${e.agentId}</strong> revision ${e.revision ?? 0}: ${e.reason}</li>`)}
      </ul>`}
  </div>`;
}

/** Where a node's effective label comes from, in fleetctl nodes show -o wide's words. */
export function labelSource(node, key) {
  const daemon = node.daemonLabels ?? {};
  if (!(key in (node.operatorLabels ?? {}))) return "daemon config";
  if (key in daemon && daemon[key] !== node.labels[key]) return `operator; overrides '${daemon[key]}' from the daemon config`;
  return "operator";
}

function LabelEditor({ node, onChanged }) {
  const [key, setKey] = useState("");
  const [value, setValue] = useState("");
  const [pending, setPending] = useState(null); // {title, set?, remove?}
  const [note, setNote] = useState("");
  const labels = Object.entries(node.labels ?? {}).sort(([a], [b]) => a.localeCompare(b));
  const operator = node.operatorLabels ?? {};
  const daemon = node.daemonLabels ?? {};

  const apply = async ({ set, remove }) => {
    const answer = await call("UpdateNodeLabels", { nodeId: node.nodeId, set, remove });
    const absent = answer.absentKeys ?? [];
    setNote(absent.length ? `${node.nodeId} had no label ${absent.join(", ")}; nothing removed.` : "Labels updated.");
    if (set) {
      setKey("");
      setValue("");
    }
    onChanged(answer.node);
  };
  const askSet = (e) => {
    e.preventDefault();
    const k = key.trim();
    const overrides = k in daemon && daemon[k] !== value ? ` (overrides ${k}=${daemon[k]} from the daemon's config)` : "";
    setPending({ title: `Set label on ${node.nodeId}`, targets: [`${k}=${value}${overrides}`], set: { [k]: value } });
  };
  const askRemove = (k) => {
    const back = k in daemon ? ` (${k}=${daemon[k]} from the daemon's config applies again)` : "";
    setPending({ title: `Remove label from ${node.nodeId}`, targets: [`${k}${back}`], remove: [k] });
  };

  return html`<div class="panel">
    <table class="plain">
      <thead><tr><th>Key</th><th>Value</th><th>Set by</th><th></th></tr></thead>
      <tbody>
        ${labels.length === 0 && html`<tr><td colspan="4" class="empty">No labels.</td></tr>`}
        ${labels.map(
          ([k, v]) => html`<tr key=${k}>
            <td class="mono">${k}</td>
            <td class="mono">${v}</td>
            <td class="dim">${labelSource(node, k)}</td>
            <td class="row-actions">
              <button onClick=${() => { setKey(k); setValue(v); }}>Edit</button>
              <button disabled=${!(k in operator)} onClick=${() => askRemove(k)}
                title=${k in operator ? `remove the operator's ${k}` : "set in the daemon's config: only the host can change it"}>Remove</button>
            </td>
          </tr>`,
        )}
      </tbody>
    </table>
    <form class="filters label-form" onSubmit=${askSet}>
      <label>Key <input class="mono" value=${key} required placeholder="tier" onInput=${(e) => setKey(e.target.value)} /></label>
      <label>Value <input class="mono" value=${value} placeholder="web" onInput=${(e) => setValue(e.target.value)} /></label>
      <button class="primary" type="submit" disabled=${!key.trim()}>Set label</button>
      <span class="dim">Operator labels override the daemon's and survive its re-registration.</span>
    </form>
    ${note && html`<p class="dim" role="status">${note}</p>`}
    ${pending &&
    html`<${Confirm} title=${pending.title} targets=${pending.targets} confirmLabel=${pending.remove ? "Remove" : "Set"}
      danger=${Boolean(pending.remove)} onConfirm=${() => apply(pending)} onClose=${() => setPending(null)} />`}
  </div>`;
}

const AGENT_COLUMNS = [
  { title: "Agent", render: (a) => html`<a href=${href("agents", a.nodeId, a.agent.id)}>${a.agent.id}</a>` },
  { title: "Type", render: (a) => a.agent.type },
  { title: "State", render: (a) => html`<${StateBadge} agent=${a.agent} stale=${a.stale} />` },
  { title: "Health", render: (a) => html`<${HealthBadge} agent=${a.agent} />` },
  { title: "PID", render: (a) => a.agent.pid || "–", className: "num" },
  { title: "Uptime", render: (a) => uptime(a.agent) },
  { title: "Restarts", render: (a) => a.agent.restartCount ?? 0, className: "num" },
  { title: "Last exit", render: (a) => lastExitLine(a.agent), className: "wrap" },
];

export function NodePage({ nodeId }) {
  const got = useCall("GetNode", { nodeId }, [nodeId]);
  const agents = useCall("ListAgents", { nodeId }, [nodeId]);
  const [edited, setEdited] = useState(null); // UpdateNodeLabels' answer, until the next reload
  const refreshNode = useRefresh(got, 2000);
  const refreshAgents = useRefresh(agents, 2000);
  useEvents(
    () => {
      refreshNode();
      refreshAgents();
    },
    (e) => e.nodeId === nodeId && NODE_KINDS.has(e.kind),
  );
  useEffect(() => setEdited(null), [got.data]);

  const node = edited ?? got.data?.node;
  const rows = useMemo(
    () => (agents.data?.agents ?? []).slice().sort((a, b) => a.agent.id.localeCompare(b.agent.id)),
    [agents.data],
  );
  return html`<${Page} name="node" title=${`Node ${nodeId}`} ready=${Boolean(got.data || got.error)}
      actions=${html`<a href=${`#/events?q=${encodeURIComponent(nodeId)}`}>Events</a>`}>
    <${ErrorBox} error=${got.error} what=${`node ${nodeId}`} />
    ${node &&
    html`<${Properties} node=${node} />
      <h2>Labels</h2>
      <${LabelEditor} node=${node} onChanged=${setEdited} />
      <h2>Agents</h2>
      <${ErrorBox} error=${agents.error} what="agents" />
      <${Table} columns=${AGENT_COLUMNS} rows=${rows} rowKey=${(a) => a.agent.id}
        empty=${agents.data ? "This node runs no agents." : "Loading…"} />
      <h2>Metrics</h2>
      <${NodeMetrics} nodeId=${nodeId} />`}
  </${Page}>`;
}
