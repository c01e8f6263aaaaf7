// What every page shares: Preact + htm (fleet data is rendered as text,
// never as HTML: no page may use dangerouslySetInnerHTML), formatting,
// and the hooks that load and refresh data.
import { html, render, useCallback, useEffect, useMemo, useRef, useState } from "../vendor/preact-htm.mjs";
import { call } from "./api.js";

export { html, render, useCallback, useEffect, useMemo, useRef, useState };

/** "EVENT_KIND_NODE_ONLINE" -> "node online" (the prefix is the enum's name). */
export function enumLabel(value, prefix) {
  if (!value) return "";
  return String(value).replace(prefix, "").toLowerCase().replaceAll("_", " ");
}

// Times in fleet.v1 are Unix epoch milliseconds (int64, so strings in JSON);
// 0 means never (protos/fleet/v1/common.proto).

/** Epoch milliseconds -> local "2026-12-06 14:03:07"; "–" for 0. */
export function fmtTime(value) {
  const n = Number(value ?? 0);
  if (!n) return "–";
  const d = new Date(n);
  const pad = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Epoch milliseconds as "12s ago", "5m ago", "3h ago", "2d ago"; "never" for 0. */
export function fmtAgo(value, now = Date.now()) {
  const t = Number(value ?? 0);
  if (!t) return "never";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** Bytes -> "1.5 GiB". */
export function fmtBytes(n) {
  let v = Number(n ?? 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

/** {a: "1", b: "2"} -> "a=1, b=2" (labels, attributes). */
export function fmtLabels(map) {
  return Object.entries(map ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");
}

/**
 * Call `method` with `body` now and whenever `deps` change; `reload()` calls
 * again (keeping the old data on screen meanwhile). {data, error, loading, reload}.
 * With `when` false the first call waits until it is true (a costly call
 * that should not slow down what a page shows first).
 */
export function useCall(method, body, deps = [], { when = true } = {}) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const seq = useRef(0);
  const reload = useCallback(() => {
    const mine = ++seq.current;
    setState((s) => ({ ...s, loading: true }));
    call(method, body).then(
      (data) => mine === seq.current && setState({ data, error: null, loading: false }),
      (error) => mine === seq.current && setState((s) => ({ data: s.data, error, loading: false })),
    );
  }, deps); // eslint-disable-line react-hooks/exhaustive-deps
  useEffect(() => {
    if (when) reload();
  }, [reload, when]);
  return { ...state, reload };
}

/** Run `fn` every `ms` milliseconds while mounted. */
export function useInterval(fn, ms) {
  const saved = useRef(fn);
  saved.current = fn;
  useEffect(() => {
    const id = setInterval(() => saved.current(), ms);
    return () => clearInterval(id);
  }, [ms]);
}

/** `fn` at most once per `ms` (the last call wins): refreshes after bursts of events. */
export function useThrottled(fn, ms) {
  const saved = useRef(fn);
  saved.current = fn;
  const timer = useRef(null);
  useEffect(() => () => clearTimeout(timer.current), []);
  return useCallback(() => {
    if (timer.current) return;
    timer.current = setTimeout(() => {
      timer.current = null;
      saved.current();
    }, ms);
  }, [ms]);
}

/** An error shown in place (role="alert", which the browser tests look for). */
export function ErrorBox({ error, what }) {
  if (!error) return null;
  const code = error.code && error.code !== "UNKNOWN" ? ` (${error.code})` : "";
  return html`<div class="error" role="alert">${what ? `${what}: ` : ""}${error.message}${code}</div>`;
}

/**
 * A page's root: `name` for data-page, `ready` once its first data is on
 * screen (data-ready="true", what the browser tests and the time-to-data
 * measurement wait for).
 */
export function Page({ name, title, ready, actions, children }) {
  return html`<section class="page" data-page=${name} data-ready=${ready ? "true" : "false"}>
    <header class="page-head"><h1>${title}</h1><div class="actions">${actions}</div></header>
    ${children}
  </section>`;
}

/** A link to a console route ("#/nodes/n1"): path parts are URI-encoded. */
export function href(...parts) {
  return "#/" + parts.map((p) => encodeURIComponent(p)).join("/");
}

/** A table that shows `pageSize` rows at a time (5,000 nodes must stay fast). */
export function Table({ columns, rows, rowKey, pageSize = 100, empty = "Nothing to show." }) {
  const [page, setPage] = useState(0);
  const pages = Math.max(1, Math.ceil(rows.length / pageSize));
  const current = Math.min(page, pages - 1);
  const shown = rows.slice(current * pageSize, (current + 1) * pageSize);
  return html`<div class="table-wrap">
    <table>
      <thead><tr>${columns.map((c) => html`<th class=${c.className ?? ""}>${c.title}</th>`)}</tr></thead>
      <tbody>
        ${shown.length === 0
          ? html`<tr><td class="empty" colspan=${columns.length}>${empty}</td></tr>`
          : shown.map(
              (row) => html`<tr key=${rowKey(row)}>
                ${columns.map((c) => html`<td class=${c.className ?? ""}>${c.render ? c.render(row) : row[c.key]}</td>`)}
              </tr>`,
            )}
      </tbody>
    </table>
    ${pages > 1 &&
    html`<div class="pager">
      <button disabled=${current === 0} onClick=${() => setPage(current - 1)}>‹ Previous</button>
      <span>${current * pageSize + 1}–${Math.min(rows.length, (current + 1) * pageSize)} of ${rows.length}</span>
      <button disabled=${current >= pages - 1} onClick=${() => setPage(current + 1)}>Next ›</button>
    </div>`}
  </div>`;
}

/**
 * A confirmation that names what it is about to do: `targets` are listed
 * (the first 20, then a count). `onConfirm` returns a promise; its error is
 * shown in the dialog.
 */
export function Confirm({ title, targets = [], confirmLabel = "Confirm", danger = false, onConfirm, onClose }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const go = () => {
    setBusy(true);
    Promise.resolve(onConfirm()).then(
      () => onClose(),
      (err) => {
        setError(err);
        setBusy(false);
      },
    );
  };
  return html`<div class="modal-backdrop">
    <div class="modal" role="dialog" aria-modal="true" aria-label=${title}>
      <h2>${title}</h2>
      ${targets.length > 0 &&
      html`<ul class="targets">
        ${targets.slice(0, 20).map((t) => html`<li>${t}</li>`)}
        ${targets.length > 20 && html`<li>… and ${targets.length - 20} more</li>`}
      </ul>`}
      <${ErrorBox} error=${error} />
      <div class="modal-actions">
        <button onClick=${onClose} disabled=${busy}>Cancel</button>
        <button class=${danger ? "danger" : "primary"} onClick=${go} disabled=${busy}>${busy ? "Working…" : confirmLabel}</button>
      </div>
    </div>
  </div>`;
}

/** A status word with its colour class ("online", "offline", "running", "failed", ...). */
export function Badge({ value, kind }) {
  return html`<span class=${`badge badge-${kind ?? value}`}>${value}</span>`;
}
