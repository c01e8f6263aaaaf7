// Jobs: being built (issue 17).
import { Page, html } from "../lib.js";

export function JobsPage() {
  return html`<${Page} name="jobs" title="Jobs" ready=${true}><p>Not built yet.</p></${Page}>`;
}

export function JobPage({ jobId }) {
  return html`<${Page} name="job" title=${`Job ${jobId}`} ready=${true}><p>Not built yet.</p></${Page}>`;
}
