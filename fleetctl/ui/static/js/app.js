// The console's shell: header, navigation, hash routes -> pages.
import { session } from "./api.js";
import { useFeedStatus } from "./feed.js";
import { ErrorBox, html, render, useEffect, useState } from "./lib.js";
import { AgentPage, AgentsPage } from "./pages/agents.js";
import { EventsPage } from "./pages/events.js";
import { JobPage, JobsPage } from "./pages/jobs.js";
import { NodePage, NodesPage } from "./pages/nodes.js";
import { OverviewPage } from "./pages/overview.js";
import { DefinitionPage, RolloutPage, RolloutsPage } from "./pages/rollouts.js";

// [pattern, page, nav section]; ":name" parts are passed to the page decoded.
const ROUTES = [
  ["", OverviewPage, "overview"],
  ["nodes", NodesPage, "nodes"],
  ["nodes/:nodeId", NodePage, "nodes"],
  ["agents", AgentsPage, "agents"],
  ["agents/:nodeId/:agentId", AgentPage, "agents"],
  ["rollouts", RolloutsPage, "rollouts"],
  ["rollouts/:rolloutId", RolloutPage, "rollouts"],
  ["definitions/:name", DefinitionPage, "rollouts"],
  ["jobs", JobsPage, "jobs"],
  ["jobs/:jobId", JobPage, "jobs"],
  ["events", EventsPage, "events"],
];

const NAV = [
  ["overview", "Overview", "#/"],
  ["nodes", "Nodes", "#/nodes"],
  ["agents", "Agents", "#/agents"],
  ["rollouts", "Rollouts", "#/rollouts"],
  ["jobs", "Jobs", "#/jobs"],
  ["events", "Events", "#/events"],
];

/** The route for a location hash: {Page, section, params, query}. */
export function match(hash) {
  const [path, queryString = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  for (const [pattern, Page, section] of ROUTES) {
    const want = pattern.split("/").filter(Boolean);
    if (want.length !== parts.length) continue;
    const params = {};
    if (want.every((w, i) => (w.startsWith(":") ? ((params[w.slice(1)] = decodeURIComponent(parts[i])), true) : w === parts[i]))) {
      return { Page, section, params, query: new URLSearchParams(queryString) };
    }
  }
  return null;
}

function useHash() {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const onChange = () => setHash(location.hash);
    addEventListener("hashchange", onChange);
    return () => removeEventListener("hashchange", onChange);
  }, []);
  return hash;
}

function LiveIndicator() {
  const { connected, error } = useFeedStatus();
  const title = connected ? "Live: events stream from the manager" : `Not live: ${error?.message ?? "reconnecting"}`;
  return html`<span class=${`live ${connected ? "on" : "off"}`} title=${title}>${connected ? "live" : "reconnecting…"}</span>`;
}

function Shell() {
  const hash = useHash();
  const [who, setWho] = useState(null);
  const [whoError, setWhoError] = useState(null);
  useEffect(() => {
    session().then(setWho, setWhoError);
  }, []);
  const route = match(hash);
  return html`<div class="shell">
    <header class="top">
      <a class="brand" href="#/">Fleet</a>
      <nav>
        ${NAV.map(([id, label, link]) => html`<a href=${link} class=${route?.section === id ? "active" : ""}>${label}</a>`)}
      </nav>
      <div class="who">
        <${LiveIndicator} />
        ${who && html`<span title=${`manager ${who.manager}`}>${who.operator}</span>`}
      </div>
    </header>
    <main>
      <${ErrorBox} error=${whoError} what="session" />
      ${route
        ? html`<${route.Page} key=${hash} ...${route.params} query=${route.query} />`
        : html`<section class="page" data-page="not-found" data-ready="true">
            <h1>Not found</h1>
            <p>No console page at <code>${hash}</code>. <a href="#/">Go to the overview</a>.</p>
          </section>`}
    </main>
  </div>`;
}

const root = document.getElementById("app");
root.replaceChildren(); // the boot message; Preact would render beside it
render(html`<${Shell} />`, root);
