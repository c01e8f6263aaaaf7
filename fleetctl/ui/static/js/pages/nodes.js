// Nodes: being built (issue 17).
import { Page, html } from "../lib.js";

export function NodesPage() {
  return html`<${Page} name="nodes" title="Nodes" ready=${true}><p>Not built yet.</p></${Page}>`;
}

export function NodePage({ nodeId }) {
  return html`<${Page} name="node" title=${nodeId} ready=${true}><p>Not built yet.</p></${Page}>`;
}
