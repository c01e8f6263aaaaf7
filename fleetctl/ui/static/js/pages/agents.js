// Agents: being built (issue 17).
import { Page, html } from "../lib.js";

export function AgentsPage() {
  return html`<${Page} name="agents" title="Agents" ready=${true}><p>Not built yet.</p></${Page}>`;
}

export function AgentPage({ nodeId, agentId }) {
  return html`<${Page} name="agent" title=${`${nodeId}/${agentId}`} ready=${true}><p>Not built yet.</p></${Page}>`;
}
