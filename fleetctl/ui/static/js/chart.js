// Time-series charts for the node and agent pages: uPlot with a time axis, a
// value axis in the series' unit, a legend that shows the values under the
// cursor, one colour per series, an empty state, and a width that follows
// its container. Also the arithmetic the pages need to feed it: aligning
// series on one time axis and turning cumulative counters into rates.
import uPlot from "../vendor/uplot.mjs";
import { fmtTime, html, useEffect, useMemo, useRef } from "./lib.js";

const COLORS = ["#1f6feb", "#1a7f37", "#bc4c00", "#8250df", "#cf222e", "#0a7b83"];
const HEIGHT = 180;

function trim(v) {
  // Three significant digits, without a trailing ".0": 0.5, 12.3, 512, 1024.
  return Number(v.toPrecision(3)).toString();
}

function bytes(v) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${trim(v)} ${units[i]}`;
}

function count(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${trim(v / 1e9)}G`;
  if (a >= 1e6) return `${trim(v / 1e6)}M`;
  if (a >= 1e4) return `${trim(v / 1e3)}k`;
  return trim(v);
}

/** Value formatters by unit name: how the axis and the legend write a value. */
export const UNITS = {
  percent: (v) => `${trim(v)}%`,
  bytes,
  bytesPerSecond: (v) => `${bytes(v)}/s`,
  perSecond: (v) => `${count(v)}/s`,
  count,
};

// Tick steps for byte axes: powers of two, so ticks fall on 256 MiB, 512 MiB, ...
const BINARY_STEPS = Array.from({ length: 51 }, (_, i) => 2 ** i);

/**
 * Series of [epochMs, value] points -> uPlot's columns: one sorted time
 * column (the union of every series' times), then each series' values, null
 * where a series has no point at that time.
 */
export function align(series) {
  const times = [...new Set(series.flatMap((s) => s.points.map(([t]) => t)))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const columns = series.map((s) => {
    const values = new Array(times.length).fill(null);
    for (const [t, v] of s.points) values[index.get(t)] = v;
    return values;
  });
  return [times, ...columns];
}

/**
 * Per-second rates between consecutive [epochMs, counterValue] points, each
 * stamped with the later point's time. A counter that went down was reset (a
 * reboot, a process gone from an agent's tree): no rate for that step, the
 * count goes on from the lower value. As fleetctl.chart.rates.
 */
export function rates(points) {
  const out = [];
  for (let i = 1; i < points.length; i++) {
    const [t0, v0] = points[i - 1];
    const [t1, v1] = points[i];
    if (t1 > t0 && v1 >= v0) out.push([t1, ((v1 - v0) * 1000) / (t1 - t0)]);
  }
  return out;
}

// As fleetctl's charts: a series that never goes below zero is drawn from 0
// (a percentage up to at least 100), so a line's height is its size and a
// quiet series does not swing from bottom to top.
function yRange(unit) {
  return (_u, min, max) => {
    if (min == null || max == null) return [0, unit === "percent" ? 100 : 1];
    if (min >= 0) {
      const top = unit === "percent" ? Math.max(100, max) : max * 1.1;
      return [0, top > 0 ? top : 1];
    }
    const pad = (max - min) * 0.1 || 1;
    return [min - pad, max + pad];
  };
}

// The newest value of a column: what the legend shows while the cursor is off the chart.
function newest(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i];
  return null;
}

function options(series, unit, width, height, span) {
  const fmt = UNITS[unit] ?? UNITS.count;
  const shown = (v) => (v == null ? "–" : fmt(v));
  const axis = { stroke: "#656d76", grid: { stroke: "#eaeef2", width: 1 }, ticks: { stroke: "#d0d7de", width: 1 } };
  return {
    width,
    height,
    ms: 1, // times are epoch milliseconds, as everywhere in fleet.v1
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: {
      // The whole range asked for, not just the part with data.
      x: { time: true, range: (_u, min, max) => span.current ?? [min, max] },
      y: { range: yRange(unit) },
    },
    series: [
      { label: "time", value: (_u, t, _s, idx) => (idx == null ? "latest" : t == null ? "–" : fmtTime(t)) },
      ...series.map((s, i) => {
        const color = s.color ?? COLORS[i % COLORS.length];
        return {
          label: s.label,
          stroke: color,
          fill: series.length === 1 ? `${color}1a` : undefined,
          width: 1.5,
          dash: s.dash,
          spanGaps: true, // an empty bucket means no sample, not zero
          value: (u, v, si, idx) => shown(idx == null ? newest(u.data[si]) : v),
        };
      }),
    ],
    axes: [
      { ...axis, space: 70 },
      {
        ...axis,
        size: unit === "percent" ? 50 : 78,
        values: (_u, ticks) => ticks.map(fmt),
        incrs: unit === "bytes" || unit === "bytesPerSecond" ? BINARY_STEPS : undefined,
      },
    ],
  };
}

/**
 * A chart of `series` ([{label, points: [[epochMs, value], ...], color?, dash?}])
 * in `unit` (a key of UNITS), over `span` ([startMs, endMs]; default: the
 * data's). Shows `empty` instead when no series has a point.
 */
export function Chart({ title, unit = "count", series, span, height = HEIGHT, empty = "No data in this range." }) {
  const box = useRef(null);
  const plot = useRef(null);
  const spanRef = useRef(span);
  spanRef.current = span;
  const data = useMemo(() => align(series), [series]);
  const hasData = data[0].length > 0;
  // A new uPlot when what is drawn changes shape; new values alone are setData.
  const shape = `${unit}|${height}|${series.map((s) => s.label).join("|")}`;

  useEffect(() => {
    if (!hasData) return undefined;
    const el = box.current;
    const u = new uPlot(options(series, unit, el.clientWidth || 400, height, spanRef), data, el);
    plot.current = u;
    const resized = new ResizeObserver(() => {
      if (el.clientWidth && el.clientWidth !== u.width) u.setSize({ width: el.clientWidth, height });
    });
    resized.observe(el);
    return () => {
      resized.disconnect();
      u.destroy();
      plot.current = null;
    };
  }, [shape, hasData]); // eslint-disable-line react-hooks/exhaustive-deps

  useEffect(() => {
    plot.current?.setData(data);
  }, [data]);

  return html`<figure class="chart" data-chart=${title}>
    <figcaption>${title}</figcaption>
    ${hasData ? html`<div class="chart-plot" ref=${box}></div>` : html`<div class="chart-empty">${empty}</div>`}
  </figure>`;
}
