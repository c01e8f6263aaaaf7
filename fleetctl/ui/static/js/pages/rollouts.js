// Rollouts and definitions: being built (issue 17).
import { Page, html } from "../lib.js";

export function RolloutsPage() {
  return html`<${Page} name="rollouts" title="Rollouts" ready=${true}><p>Not built yet.</p></${Page}>`;
}

export function RolloutPage({ rolloutId }) {
  return html`<${Page} name="rollout" title=${`Rollout ${rolloutId}`} ready=${true}><p>Not built yet.</p></${Page}>`;
}

export function DefinitionPage({ name }) {
  return html`<${Page} name="definition" title=${name} ready=${true}><p>Not built yet.</p></${Page}>`;
}
