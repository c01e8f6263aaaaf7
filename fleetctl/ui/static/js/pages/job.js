// One job (#/jobs/<id>): what it runs and where, its state and every
// target's, followed live with WatchJob (the job with every target first,
// then the job and the targets that changed, until it ends); its output
// followed live; cancel, and re-run the failed targets, each confirmed by name.
// PENDING targets whose node is offline or without its stream say so, as
// `fleetctl run` does.
import { call, stream } from "../api.js";
import { fmtSpan } from "../duration.js";
import { Confirm, ErrorBox, Page, Table, fmtAgo, fmtBytes, fmtTime, href, html, useCall, useEffect, useInterval, useMemo, useState } from "../lib.js";
import { JobOutput } from "./job-output.js";
import {
  JobBadge,
  RERUN_STATES,
  TERMINAL_TARGET,
  commandText,
  countsOf,
  countsText,
  exitText,
  jobDuration,
  jobLive,
  jobState,
  jobTitle,
  policyText,
  targetState,
  waitingNote,
  whereText,
} from "./job-parts.js";

/** Follow WatchJob: {job, targets (by node), error}; reconnect if it breaks while the job runs. */
function useWatchedJob(jobId) {
  const [state, setState] = useState({ job: null, targets: new Map(), error: null });
  useEffect(() => {
    const abort = new AbortController();
    let live = true;
    (async () => {
      for (let delay = 1000; live && !abort.signal.aborted; delay = Math.min(delay * 2, 15000)) {
        try {
          await stream(
            "WatchJob",
            { jobId },
            (m) => {
              live = jobLive(m.job);
              delay = 1000;
              setState((old) => {
                // The first message carries every target (m.job.targets), later ones the changed.
                const targets = new Map(m.job.targets?.length ? [] : old.targets);
                for (const t of [...(m.job.targets ?? []), ...(m.targets ?? [])]) targets.set(t.nodeId, t);
                return { job: m.job, targets, error: null };
              });
            },
            { signal: abort.signal },
          );
        } catch (err) {
          if (err.name === "AbortError") return;
          setState((old) => ({ ...old, error: err }));
          if (err.code === "NOT_FOUND" || err.code === "INVALID_ARGUMENT") return;
        }
        if (live) await new Promise((r) => setTimeout(r, delay));
      }
    })();
    return () => abort.abort();
  }, [jobId]);
  return state;
}

// How often a live job with PENDING targets asks again why they wait.
const WAITING_REFRESH_MS = 10_000;

/** Why the live job's PENDING targets wait ("" if they do not, or for no reason we know). */
function useWaiting(job, rows) {
  const pending = job && jobLive(job) ? rows.filter((t) => targetState(t) === "PENDING").map((t) => t.nodeId) : [];
  const key = pending.join(" ");
  const nodes = useCall("ListNodes", { selector: job?.spec?.selector ?? {} }, [job?.id, key], { when: pending.length > 0 });
  useInterval(() => pending.length && !nodes.loading && nodes.reload(), WAITING_REFRESH_MS);
  return pending.length && nodes.data ? waitingNote(job, pending, nodes.data.nodes ?? []) : "";
}

function targetColumns(job, showOutput) {
  const canary = (job.spec?.canary ?? 0) > 0;
  return [
    { title: "Node", render: (t) => html`<a href=${href("nodes", t.nodeId)}>${t.nodeId}</a>` },
    { title: "State", render: (t) => html`<${JobBadge} state=${targetState(t)} />` },
    { title: "Exit", className: "num", render: exitText },
    {
      title: "Duration",
      className: "num",
      render: (t) => (TERMINAL_TARGET.has(targetState(t)) ? fmtSpan(t.startedAt, t.endedAt) : "–"),
    },
    canary && { title: "Stage", render: (t) => (t.stage ? "–" : "canary") },
    { title: "Started", render: (t) => fmtTime(t.startedAt) },
    {
      title: "Output",
      className: "num",
      render: (t) => (t.outputTruncated ? `${fmtBytes(t.outputStoredBytes)} of ${fmtBytes(t.outputBytes)} (cut)` : fmtBytes(t.outputBytes)),
    },
    {
      title: "",
      render: (t) => html`<button class="link" onClick=${() => showOutput(t.nodeId)} aria-label=${`show the output of ${t.nodeId}`}>output</button>`,
    },
    { title: "Reason", render: (t) => t.reason || "–", className: "wrap" },
  ].filter(Boolean);
}

const STEP_COLUMNS = [
  { title: "Node", key: "nodeId" },
  { title: "Step", render: (s) => `${(s.index ?? 0) + 1}. ${s.name}` },
  { title: "State", render: (s) => html`<${JobBadge} state=${targetState(s)} />` },
  { title: "Exit", className: "num", render: exitText },
  { title: "Duration", className: "num", render: (s) => fmtSpan(s.startedAt, s.endedAt) },
  { title: "Reason", render: (s) => s.reason || "–", className: "wrap" },
];

function stepsText(spec) {
  const steps = spec?.steps ?? [];
  if (steps.length === 1) return html`<span class="mono">${commandText(steps[0])}</span>`;
  return html`<ol class="steps">${steps.map((s) => {
    const when = (s.when ?? "STEP_WHEN_ON_SUCCESS").replace("STEP_WHEN_", "").toLowerCase();
    return html`<li><b>${s.name}</b>${when === "on_success" ? "" : ` [${when}]`}: <span class="mono">${commandText(s)}</span></li>`;
  })}</ol>`;
}

export function JobPage({ jobId }) {
  const { job, targets, error } = useWatchedJob(jobId);
  const [asking, setAsking] = useState(null);
  const [outcome, setOutcome] = useState(null);
  const [outputNode, setOutputNode] = useState("");
  const rows = useMemo(() => [...targets.values()].sort((a, b) => a.nodeId.localeCompare(b.nodeId)), [targets]);
  const steps = useMemo(() => rows.flatMap((t) => (t.steps ?? []).map((s) => ({ ...s, nodeId: t.nodeId }))), [rows]);
  const nodeIds = useMemo(() => rows.map((t) => t.nodeId), [rows]);
  const waiting = useWaiting(job, rows);

  const ready = job !== null || error !== null;
  if (!job) {
    return html`<${Page} name="job" title=${`Job ${jobId}`} ready=${ready}>
      <${ErrorBox} error=${error} what="loading the job" />
    </${Page}>`;
  }

  const state = jobState(job);
  const live = jobLive(job);
  const counts = countsOf(job, rows);
  const what = jobTitle(job);
  const failed = rows.filter((t) => RERUN_STATES.has(targetState(t)));
  const unfinished = rows.filter((t) => !TERMINAL_TARGET.has(targetState(t)));
  const askCancel = () =>
    setAsking({
      title: `Cancel job ${job.id} (${what})? Running targets are stopped (TERM, then KILL after a grace); pending ones never start.`,
      targets: unfinished.map((t) => `${t.nodeId} (${targetState(t).toLowerCase()})`),
      confirmLabel: "Cancel the job",
      danger: true,
      onConfirm: async () => {
        const answer = await call("CancelJob", { jobId: job.id });
        setOutcome(html`Cancelled: job ${job.id} is ${jobState(answer.job).toLowerCase()} (${countsText(countsOf(answer.job))}).`);
      },
    });
  const askRerun = () =>
    setAsking({
      title: `Re-run ${what} as a new job on the ${failed.length} target${failed.length === 1 ? "" : "s"} of job ${job.id} that failed, timed out or were undeliverable?`,
      targets: failed.map((t) => `${t.nodeId}: ${targetState(t).toLowerCase()}${t.reason ? ` (${t.reason})` : ""}`),
      confirmLabel: "Re-run",
      onConfirm: async () => {
        const answer = await call("RerunJob", { jobId: job.id, failedOnly: true });
        location.hash = href("jobs", answer.job.id);
      },
    });

  const actions = html`
    ${live && html`<button class="danger" onClick=${askCancel}>Cancel…</button>`}
    ${!live && failed.length > 0 && html`<button onClick=${askRerun}>Re-run failed…</button>`}
  `;
  const done = rows.filter((t) => TERMINAL_TARGET.has(targetState(t))).length;
  return html`<${Page} name="job" title=${`Job ${job.id}`} ready=${ready} actions=${actions}>
    <${ErrorBox} error=${error} what="following the job" />
    ${outcome && html`<div class="notice" role="status">${outcome}</div>`}
    <div class="panel">
      <dl class="props">
        ${job.spec?.name && html`<dt>Name</dt><dd>${job.spec.name}</dd>`}
        <dt>State</dt><dd><${JobBadge} state=${state} /> ${job.reason && html`<span>${job.reason}</span>`}</dd>
        <dt>Created</dt><dd>${fmtTime(job.createdAt)} (${fmtAgo(job.createdAt)}) by ${job.actor || "–"}</dd>
        ${!live && html`<dt>Ended</dt><dd>${fmtTime(job.endedAt)} (took ${jobDuration(job)})</dd>`}
        ${job.rerunOf && html`<dt>Rerun of</dt><dd><a href=${href("jobs", job.rerunOf)}>${job.rerunOf}</a></dd>`}
        <dt>Targets</dt><dd>${whereText(job.spec)}: ${done}/${rows.length} done (${countsText(counts)})</dd>
        <dt>Policy</dt><dd>${policyText(job.spec)}</dd>
        <dt>${(job.spec?.steps ?? []).length === 1 ? "Command" : "Steps"}</dt><dd>${stepsText(job.spec)}</dd>
      </dl>
    </div>
    <h2>Targets</h2>
    ${waiting && html`<div class="notice" role="status" aria-label="why targets wait">${waiting}</div>`}
    <${Table} columns=${targetColumns(job, setOutputNode)} rows=${rows} rowKey=${(t) => t.nodeId} empty="No targets." />
    ${(job.spec?.steps ?? []).length > 1 &&
    html`<h2>Steps</h2>
      <${Table} columns=${STEP_COLUMNS} rows=${steps} rowKey=${(s) => `${s.nodeId}/${s.index ?? 0}`} empty="No steps ran yet." />`}
    <h2>Output</h2>
    <${JobOutput} jobId=${job.id} nodeIds=${nodeIds} node=${outputNode} onNode=${setOutputNode} />
    ${asking && html`<${Confirm} ...${asking} onClose=${() => setAsking(null)} />`}
  </${Page}>`;
}
