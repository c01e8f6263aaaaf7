// Overview: the fleet at a glance, live. Nodes by status and agents by state
// come from ListNodes alone (each node carries its agents' counts), so the
// page is ready as soon as that one answer is on screen, even at 5,000 nodes;
// unhealthy agents, live rollouts, running jobs and the newest events fill in
// beside it. Events refresh each part, throttled.
import { recentEvents, useEvents } from "../feed.js";
import {
  Badge, ErrorBox, Page, Table, enumLabel, fmtAgo, href, html, useCall, useMemo, useState,
} from "../lib.js";
import { useRefresh } from "../live.js";
import { AGENT_STATES, HealthBadge, StateBadge, agentCounts, certExpiry, lastExitLine, nodeStatus } from "../present.js";
import { EVENT_COLUMNS, mergeEvents } from "./events.js";
import { rolloutHref } from "./rollout-parts.js";

const EVENTS_SHOWN = 15;
const ATTENTION_SHOWN = 10;
const NODE_KINDS = new Set([
  "EVENT_KIND_NODE_REGISTERED", "EVENT_KIND_NODE_ONLINE", "EVENT_KIND_NODE_OFFLINE",
  "EVENT_KIND_NODE_LABELS_UPDATED", "EVENT_KIND_AGENT_STATE_CHANGED", "EVENT_KIND_NODE_UPDATE_ERROR",
]);
const RUNNING_JOBS = { states: ["JOB_STATE_PENDING", "JOB_STATE_RUNNING"] };
const JOB_ENDED = new Set(["SUCCESS", "FAILED", "TIMEOUT", "CANCELLED", "SKIPPED", "UNDELIVERABLE"]);

/** What the overview counts of ListNodes' answer (one pass over the nodes). */
export function summarize(nodes, now = Date.now()) {
  const byStatus = { online: 0, offline: 0, revoked: 0 };
  const agents = {};
  let unseen = 0; // agents of nodes not online: their last report is no count of what runs
  const attention = [];
  let drift = 0;
  let certs = 0;
  for (const node of nodes) {
    const status = nodeStatus(node);
    byStatus[status] = (byStatus[status] ?? 0) + 1;
    for (const [state, n] of Object.entries(agentCounts(node))) {
      if (status === "online") agents[state] = (agents[state] ?? 0) + n;
      else unseen += n;
    }
    const cert = certExpiry(node, now);
    if (node.drift) drift += 1;
    if (cert.kind) certs += 1;
    const why = [
      status !== "online" && status,
      node.drift && `drift: ${node.driftReason || "does not run what it should"}`,
      cert.kind && `certificate ${cert.text.startsWith("expired") ? cert.text : `expires in ${cert.text}`}`,
    ].filter(Boolean);
    if (why.length) attention.push({ node, why: why.join("; ") });
  }
  attention.sort((a, b) => a.node.nodeId.localeCompare(b.node.nodeId));
  const agentTotal = Object.values(agents).reduce((a, b) => a + b, 0) + unseen;
  return { byStatus, agents, unseen, agentTotal, drift, certs, attention };
}

function Card({ title, big, link, children }) {
  return html`<div class="card">
    <h3>${link ? html`<a href=${link}>${title}</a>` : title}</h3>
    <div class="big">${big}</div>
    <ul class="tally">${children}</ul>
  </div>`;
}

function Tally({ label, kind, count, link }) {
  const badge = html`<${Badge} value=${label} kind=${kind ?? label} />`;
  return html`<li>${link ? html`<a href=${link}>${badge}</a>` : badge}<span class="num">${count.toLocaleString()}</span></li>`;
}

const ROLLOUT_KINDS = { running: "running", paused: "paused", "awaiting promotion": "warn", reverting: "warn", pending: "pending" };

function jobWhat(job) {
  const spec = job.spec ?? {};
  const command = spec.steps?.[0]?.command;
  return spec.name || command?.argv?.join(" ") || (command?.script ? "script" : job.id);
}

function jobProgress(job) {
  let done = 0;
  let total = 0;
  for (const c of job.counts ?? []) {
    const n = c.count ?? 0;
    total += n;
    if (JOB_ENDED.has(enumLabel(c.state, "JOB_TARGET_STATE_").toUpperCase())) done += n;
  }
  return { done, total };
}

function Progress({ done, total }) {
  const pct = total ? Math.round((done * 100) / total) : 0;
  return html`<div class="progress-cell" title=${`${done} of ${total}`}>
    <div class="progress"><div style=${{ width: `${pct}%` }}></div></div>
    <span class="dim">${done}/${total}</span>
  </div>`;
}

const ROLLOUT_COLUMNS = [
  { title: "Definition", render: (r) => html`<a href=${rolloutHref(r)}>${r.name}</a>` },
  {
    title: "State",
    render: (r) => {
      const state = enumLabel(r.state, "ROLLOUT_STATE_");
      return html`<${Badge} value=${state} kind=${ROLLOUT_KINDS[state] ?? state} />`;
    },
  },
  { title: "Revision", render: (r) => `${r.previousRevision ?? 0} → ${r.targetRevision ?? 0}` },
  {
    title: "Nodes done",
    render: (r) => html`<${Progress} done=${r.done ?? 0} total=${(r.pending ?? 0) + (r.updating ?? 0) + (r.done ?? 0) + (r.failed ?? 0)} />`,
  },
  { title: "Started", render: (r) => fmtAgo(r.createdAt) },
  { title: "By", key: "actor" },
];

const JOB_COLUMNS = [
  { title: "Job", render: (j) => html`<a href=${href("jobs", j.id)} class="mono">${j.id}</a>` },
  { title: "What", render: (j) => jobWhat(j), className: "wrap" },
  { title: "State", render: (j) => html`<${Badge} value=${enumLabel(j.state, "JOB_STATE_")} />` },
  { title: "Targets done", render: (j) => html`<${Progress} ...${jobProgress(j)} />` },
  { title: "Started", render: (j) => fmtAgo(j.createdAt) },
];

const ATTENTION_COLUMNS = [
  {
    title: "Subject",
    render: (row) =>
      row.agent
        ? html`<a href=${href("agents", row.nodeId, row.agent.id)}>${row.nodeId}/${row.agent.id}</a>`
        : html`<a href=${href("nodes", row.node.nodeId)}>${row.node.nodeId}</a>`,
  },
  {
    title: "State",
    render: (row) =>
      row.agent
        ? html`<${StateBadge} agent=${row.agent} stale=${row.stale} /> <${HealthBadge} agent=${row.agent} />`
        : html`<${Badge} value=${nodeStatus(row.node)} />`,
  },
  { title: "Why", render: (row) => row.why, className: "wrap" },
];

export function OverviewPage() {
  const nodes = useCall("ListNodes", {});
  // The rest once the counts are on screen: on a big fleet they would slow
  // ListNodes down (the manager reads every agent to find the unhealthy ones).
  const after = { when: Boolean(nodes.data || nodes.error) };
  const unhealthy = useCall("ListAgents", { unhealthy: true }, [], after);
  const rollouts = useCall("ListRollouts", { live: true }, [], after);
  const jobs = useCall("ListJobs", RUNNING_JOBS, [], after);
  const [events, setEvents] = useState(() => recentEvents().slice(0, EVENTS_SHOWN));

  const refreshNodes = useRefresh(nodes, 3000);
  const refreshUnhealthy = useRefresh(unhealthy, 3000);
  const refreshRollouts = useRefresh(rollouts, 2000);
  const refreshJobs = useRefresh(jobs, 2000);
  useEvents((event, history) => {
    setEvents((old) => mergeEvents(old, [event], EVENTS_SHOWN));
    if (history) return; // older than what the calls above answered
    const kind = event.kind ?? "";
    if (NODE_KINDS.has(kind)) {
      refreshNodes();
      refreshUnhealthy();
    }
    if (kind.startsWith("EVENT_KIND_ROLLOUT_")) refreshRollouts();
    if (kind.startsWith("EVENT_KIND_JOB_")) refreshJobs();
  }, undefined, { history: true });

  const sum = useMemo(() => nodes.data && summarize(nodes.data.nodes ?? []), [nodes.data]);
  const sick = useMemo(() => unhealthy.data?.agents ?? [], [unhealthy.data]);
  const attention = useMemo(
    () => [
      ...(sum?.attention ?? []).slice(0, ATTENTION_SHOWN),
      ...sick.slice(0, ATTENTION_SHOWN).map((a) => ({
        nodeId: a.nodeId,
        agent: a.agent,
        stale: a.stale,
        why: a.agent.healthMessage || lastExitLine(a.agent),
      })),
    ],
    [sum, sick],
  );
  const liveRollouts = rollouts.data?.rollouts ?? [];
  const runningJobs = jobs.data?.jobs ?? [];

  return html`<${Page} name="overview" title="Overview" ready=${Boolean(nodes.data || nodes.error)}>
    <${ErrorBox} error=${nodes.error} what="nodes" />
    ${sum &&
    html`<div class="cards overview-cards">
      <${Card} title="Nodes" big=${(nodes.data.nodes ?? []).length.toLocaleString()} link="#/nodes">
        ${Object.entries(sum.byStatus)
          .filter(([status, n]) => n || status !== "revoked")
          .map(([status, n]) => html`<${Tally} label=${status} count=${n} />`)}
      </${Card}>
      <${Card} title="Agents" big=${sum.agentTotal.toLocaleString()} link="#/agents">
        ${AGENT_STATES.filter((s) => sum.agents[s]).map((s) => {
          const state = s.toLowerCase();
          return html`<${Tally} label=${state} count=${sum.agents[s]} link=${`#/agents?state=${state}`} />`;
        })}
        ${sum.unseen > 0 && html`<${Tally} label="node offline" kind="unknown" count=${sum.unseen} />`}
      </${Card}>
      <${Card} title="Agent health" big=${unhealthy.data ? sick.length.toLocaleString() : "…"}>
        <li class="dim">${sick.length === 1 ? "agent" : "agents"} unhealthy${unhealthy.data && sick.length > 0 ? html` · <a href="#/agents?health=unhealthy">show</a>` : ""}</li>
      </${Card}>
      <${Card} title="Desired state" big=${sum.drift.toLocaleString()} link="#/nodes">
        <li class="dim">${sum.drift === 1 ? "node does" : "nodes do"} not run what they should</li>
        <li class="dim">${sum.certs.toLocaleString()} ${sum.certs === 1 ? "certificate" : "certificates"} expired or expiring within a day</li>
      </${Card}>
      <${Card} title="Rollouts" big=${rollouts.data ? liveRollouts.length : "…"} link="#/rollouts">
        <li class="dim">in progress</li>
      </${Card}>
      <${Card} title="Jobs" big=${jobs.data ? runningJobs.length : "…"} link="#/jobs">
        <li class="dim">running or pending</li>
      </${Card}>
    </div>`}
    <div class="columns">
      <section>
        <h2>Rollouts in progress</h2>
        <${ErrorBox} error=${rollouts.error} what="rollouts" />
        <${Table} columns=${ROLLOUT_COLUMNS} rows=${liveRollouts} rowKey=${(r) => r.id} pageSize=${10}
          empty=${rollouts.data ? "No rollout in progress." : "Loading…"} />
      </section>
      <section>
        <h2>Jobs running</h2>
        <${ErrorBox} error=${jobs.error} what="jobs" />
        <${Table} columns=${JOB_COLUMNS} rows=${runningJobs} rowKey=${(j) => j.id} pageSize=${10}
          empty=${jobs.data ? "No job running." : "Loading…"} />
      </section>
    </div>
    <h2>Needs attention</h2>
    <${ErrorBox} error=${unhealthy.error} what="unhealthy agents" />
    <${Table} columns=${ATTENTION_COLUMNS} rows=${attention} pageSize=${2 * ATTENTION_SHOWN}
      rowKey=${(row) => (row.agent ? `a/${row.nodeId}/${row.agent.id}` : `n/${row.node.nodeId}`)}
      empty=${sum ? "Every node is online and in sync; no agent is unhealthy." : "Loading…"} />
    ${sum && (sum.attention.length > ATTENTION_SHOWN || sick.length > ATTENTION_SHOWN) &&
    html`<p class="dim">
      Showing the first ${ATTENTION_SHOWN} of ${sum.attention.length} nodes and ${Math.min(ATTENTION_SHOWN, sick.length)} of ${sick.length} unhealthy agents:
      see <a href="#/nodes">nodes</a> and <a href="#/agents?health=unhealthy">unhealthy agents</a>.
    </p>`}
    <h2>Last events <a class="more" href="#/events">all events</a></h2>
    <${Table} columns=${EVENT_COLUMNS} rows=${events} rowKey=${(e) => e.id} pageSize=${EVENTS_SHOWN}
      empty="No events yet; new ones appear as they happen." />
  </${Page}>`;
}
