// Durations as fleetctl reads and prints them (fleetctl/timespec.py): "30s",
// "5m", "1h30m" in forms, "3m12s" in tables.

const UNITS = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400, w: 604800 };
const PART = /(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/y;

/** Seconds in "1h30m" (parts of <number><unit>, unit ms/s/m/h/d/w); throws Error naming the text. */
export function parseDuration(text) {
  const spec = text.trim().toLowerCase();
  if (!spec) throw new Error("empty duration; use e.g. 30s, 5m, 1h, 2d");
  let total = 0;
  PART.lastIndex = 0;
  while (PART.lastIndex < spec.length) {
    const m = PART.exec(spec);
    if (!m) throw new Error(`'${text}' is not a duration; use e.g. 30s, 5m, 1h, 2d or 1h30m`);
    total += Number(m[1]) * UNITS[m[2]];
  }
  return total;
}

/** A short duration: 45s, 3m12s, 5h3m, 2d4h (kubectl's AGE style, as fleetctl prints it). */
export function fmtDuration(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const two = (big, unit, small, smallUnit) => (small ? `${big}${unit}${small}${smallUnit}` : `${big}${unit}`);
  if (s < 60) return `${s}s`;
  if (s < 3600) return two(Math.floor(s / 60), "m", s % 60, "s");
  if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "m");
  return two(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
}

/** Seconds between two epoch-millisecond times as the jobs tables show them ("0.4s", "3m12s"); "–" if unknown. */
export function fmtSpan(startMs, endMs) {
  const start = Number(startMs ?? 0);
  const end = Number(endMs ?? 0);
  if (!start || !end) return "–";
  const seconds = (end - start) / 1000;
  return seconds >= 60 ? fmtDuration(seconds) : `${seconds.toFixed(1)}s`;
}
