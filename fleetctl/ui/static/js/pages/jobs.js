// Jobs (#/jobs): every job, newest first, live (refreshed on the job events,
// and every few seconds while one runs); and the form that runs a new one
// (#/jobs?run opens it). The job page lives in its own module.
import { call } from "../api.js";
import { useEvents } from "../feed.js";
import { ErrorBox, Page, Table, fmtAgo, href, html, useCallback, useEffect, useInterval, useState, useThrottled } from "../lib.js";
import { JobBadge, countsOf, countsText, jobDuration, jobLive, jobState, jobTitle } from "./job-parts.js";
import { RunJobForm } from "./job-run.js";

export { JobPage } from "./job.js";

const LIMIT = 200; // jobs listed, newest first
const LIVE_REFRESH_MS = 5000;

const COLUMNS = [
  { title: "ID", render: (j) => html`<a class="mono" href=${href("jobs", j.id)}>${j.id}</a>` },
  { title: "Name", render: jobTitle, className: "wrap" },
  { title: "State", render: (j) => html`<${JobBadge} state=${jobState(j)} />` },
  { title: "Targets", render: (j) => countsText(countsOf(j)) },
  { title: "Created", render: (j) => fmtAgo(j.createdAt) },
  { title: "Duration", className: "num", render: (j) => jobDuration(j) },
  { title: "By", key: "actor" },
  { title: "Reason", render: (j) => j.reason || "–", className: "wrap" },
  { title: "Rerun of", render: (j) => (j.rerunOf ? html`<a href=${href("jobs", j.rerunOf)}>${j.rerunOf}</a>` : "–") },
];

function openJob(job) {
  location.hash = href("jobs", job.id);
}

export function JobsPage({ query }) {
  const [jobs, setJobs] = useState(null);
  const [error, setError] = useState(null);
  const [running, setRunning] = useState(query.has("run"));

  const load = useCallback(() => {
    call("ListJobs", { limit: LIMIT }).then((answer) => {
      setJobs(answer.jobs ?? []);
      setError(null);
    }, setError);
  }, []);
  useEffect(load, [load]);
  const refresh = useThrottled(load, 2000);
  useEvents(refresh, (e) => (e.kind ?? "").startsWith("EVENT_KIND_JOB_"));
  const anyLive = (jobs ?? []).some(jobLive);
  useInterval(() => anyLive && refresh(), LIVE_REFRESH_MS);

  const live = (jobs ?? []).filter(jobLive).length;
  const actions = !running && html`<button class="primary" onClick=${() => setRunning(true)}>Run a job…</button>`;
  return html`<${Page} name="jobs" title="Jobs" ready=${jobs !== null || error !== null} actions=${actions}>
    ${running &&
    html`<${RunJobForm} onStarted=${openJob} onClose=${() => setRunning(false)} />`}
    <${ErrorBox} error=${error} what="loading jobs" />
    ${jobs?.length > 0 && html`<p class="dim">${live ? `${live} running; ` : ""}${jobs.length === LIMIT ? `the newest ${LIMIT}` : "every job"}, newest first</p>`}
    <${Table} columns=${COLUMNS} rows=${jobs ?? []} rowKey=${(j) => j.id} empty="No jobs. Run one with the button above or fleetctl run." />
  </${Page}>`;
}
