// The metrics charts of the node and agent pages: what to ask for and how to
// draw it (chart.js). A node's charts are the host series the manager stored
// (QueryMetrics, ~60 buckets over the chosen range, as `fleetctl metrics
// query`); an agent's are the per-process samples its daemon keeps for about
// an hour (GetAgentMetrics, as `fleetctl metrics agent`). Byte counters (disk
// and network I/O) are drawn as per-second rates.
import { call } from "./api.js";
import { Chart, rates } from "./chart.js";
import { ErrorBox, html, useCallback, useEffect, useInterval, useRef, useState } from "./lib.js";
import { Choice } from "./present.js";

const BUCKETS = 60; // what the manager picks itself when no step is given
const DASHED = [4, 4]; // a reference line: a total, a virtual size

const NODE_RANGES = [
  [15 * 60, "15 min"],
  [3600, "1 h"],
  [6 * 3600, "6 h"],
  [24 * 3600, "24 h"],
];
// Each chart: a metric type, the value names drawn ([name, label, dashed?])
// and their unit; `rate` for cumulative counters (daemon/convert.py says which).
const NODE_CHARTS = [
  { title: "CPU", type: "cpu", unit: "percent", series: [["usage_percent", "used"]] },
  { title: "Memory", type: "memory", unit: "bytes", series: [["used_bytes", "used"], ["total_bytes", "total", true]] },
  { title: "Disk space", type: "disk", unit: "bytes", series: [["used_bytes", "used"], ["total_bytes", "total", true]] },
  { title: "Disk I/O", type: "disk", unit: "bytesPerSecond", rate: true, series: [["read_bytes", "read"], ["write_bytes", "written"]] },
  { title: "Network", type: "network", unit: "bytesPerSecond", rate: true, series: [["bytes_recv", "received"], ["bytes_sent", "sent"]] },
];

/** {charts, error} of `load()`, again whenever `deps` change and every `everyMs`. */
function usePolled(load, deps, everyMs) {
  const [state, setState] = useState({ charts: null, error: null });
  const seq = useRef(0);
  const reload = useCallback(() => {
    const mine = ++seq.current;
    load().then(
      (charts) => mine === seq.current && setState({ charts, error: null }),
      (error) => mine === seq.current && setState((s) => ({ charts: s.charts, error })),
    );
  }, deps); // eslint-disable-line react-hooks/exhaustive-deps
  useEffect(reload, [reload]);
  useInterval(reload, everyMs);
  return state;
}

async function queryChart(nodeId, chart, rangeSeconds) {
  const end = Date.now();
  const start = end - rangeSeconds * 1000;
  const step = Math.max(1, Math.ceil(rangeSeconds / BUCKETS));
  const answer = await call("QueryMetrics", {
    nodeId,
    type: chart.type,
    name: chart.series.length === 1 ? chart.series[0][0] : "",
    // A rate is a difference: ask for the bucket before the first one drawn too.
    startTime: String(chart.rate ? start - step * 1000 : start),
    endTime: String(end),
    stepSeconds: String(step),
    // A counter's max in a bucket is its last value there.
    aggregate: chart.rate ? "AGGREGATE_MAX" : "AGGREGATE_AVG",
  });
  const byName = new Map((answer.series ?? []).map((s) => [s.name, (s.points ?? []).map((p) => [Number(p.timestamp ?? 0), p.value ?? 0])]));
  return {
    ...chart,
    span: [start, end],
    series: chart.series.map(([name, label, dashed]) => {
      const points = byName.get(name) ?? [];
      return { label, dash: dashed ? DASHED : undefined, points: chart.rate ? rates(points).filter(([t]) => t >= start) : points };
    }),
  };
}

function Charts({ charts, error, what }) {
  return html`<${ErrorBox} error=${error} what=${what} />
    ${charts
      ? html`<div class="charts">${charts.map((c) => html`<${Chart} key=${c.title} title=${c.title} unit=${c.unit} series=${c.series} span=${c.span} />`)}</div>`
      : !error && html`<p class="dim">Loading metrics…</p>`}`;
}

/** A node's host metrics over a chosen range, refreshed every 30 s. */
export function NodeMetrics({ nodeId }) {
  const [range, setRange] = useState(NODE_RANGES[1][0]);
  const { charts, error } = usePolled(() => Promise.all(NODE_CHARTS.map((c) => queryChart(nodeId, c, range))), [nodeId, range], 30000);
  return html`<div class="metrics">
    <${Choice} label="Time range" options=${NODE_RANGES} value=${range} onChange=${setRange} />
    <${Charts} charts=${charts} error=${error} what="metrics" />
  </div>`;
}

const AGENT_RANGES = [
  [5 * 60, "5 min"],
  [15 * 60, "15 min"],
  [3600, "1 h"],
];

/** GetAgentMetrics' samples as the agent page's charts, over `span` ([startMs, endMs]). */
export function agentCharts(dataPoints, span) {
  const points = (dataPoints ?? []).map((p) => ({ ...p, t: Number(p.timestamp ?? 0) })).sort((a, b) => a.t - b.t);
  const series = (field) => points.map((p) => [p.t, Number(p[field] ?? 0)]);
  const charts = [
    { title: "CPU (% of one core)", unit: "percent", series: [{ label: "cpu", points: series("cpu") }] },
    {
      title: "Memory",
      unit: "bytes",
      series: [
        { label: "resident", points: series("memoryRss") },
        { label: "virtual", points: series("memoryVms"), dash: DASHED },
      ],
    },
    {
      title: "Disk I/O",
      unit: "bytesPerSecond",
      series: [
        { label: "read", points: rates(series("diskReadBytes")) },
        { label: "written", points: rates(series("diskWriteBytes")) },
      ],
    },
    {
      title: "Process tree",
      unit: "count",
      series: [
        { label: "processes", points: series("processes") },
        { label: "threads", points: series("threads") },
        { label: "open files", points: series("openFiles") },
      ],
    },
  ];
  return charts.map((c) => ({ ...c, span }));
}

/** An agent's per-process samples from its daemon, refreshed every 10 s (its sampling interval). */
export function AgentMetrics({ nodeId, agentId }) {
  const [range, setRange] = useState(AGENT_RANGES[1][0]);
  const { charts, error } = usePolled(
    async () => {
      const answer = await call("GetAgentMetrics", { nodeId, agentId, durationSeconds: String(range) });
      const end = Date.now();
      return agentCharts(answer.dataPoints, [end - range * 1000, end]);
    },
    [nodeId, agentId, range],
    10000,
  );
  return html`<div class="metrics">
    <${Choice} label="Time range" options=${AGENT_RANGES} value=${range} onChange=${setRange} />
    <${Charts} charts=${charts} error=${error} what="metrics of its daemon" />
  </div>`;
}
