// Overview: being built (issue 17).
import { Page, html } from "../lib.js";

export function OverviewPage() {
  return html`<${Page} name="overview" title="Overview" ready=${true}><p>Not built yet.</p></${Page}>`;
}
