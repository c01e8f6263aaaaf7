// One definition (#/definitions/<name>): its current spec, selector and
// rollout strategy, every revision (who, when, why), the diff between any two
// of them, and its rollouts; refreshed on this definition's events.
import { call } from "../api.js";
import { diffLines, hunks, stableJson } from "../diff.js";
import { fmtDuration } from "../duration.js";
import { useEvents } from "../feed.js";
import { ErrorBox, Page, Table, fmtAgo, fmtTime, html, useCallback, useEffect, useInterval, useMemo, useState, useThrottled } from "../lib.js";
import { selectorText } from "../selector-text.js";
import { StateBadge, isLive, liveFirst, policyText, rolloutColumns, rolloutHref, rolloutState } from "./rollout-parts.js";

const LIVE_REFRESH_MS = 5000;

/** An agent's `config` is bytes (base64 in JSON): shown as the JSON or text it holds. */
function decodeConfig(base64) {
  const text = new TextDecoder().decode(Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)));
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** A revision's definition as the text the page shows and diffs: sorted JSON, config decoded. */
export function definitionText(definition) {
  const agent = definition?.agent;
  const readable = agent?.config ? { ...definition, agent: { ...agent, config: decodeConfig(agent.config) } } : definition;
  return stableJson(readable ?? {});
}

function placementText(placement) {
  if (!placement?.count) return "every matching node";
  const parts = [`${placement.count} of the matching nodes`];
  if (placement.spread) parts.push(`spread over ${placement.spread}`);
  parts.push(`reschedule after ${fmtDuration(placement.rescheduleAfterSeconds ?? 300)} offline`);
  return parts.join(", ");
}

function Diff({ older, newer }) {
  const found = useMemo(() => {
    const ops = diffLines(definitionText(older.definition).split("\n"), definitionText(newer.definition).split("\n"));
    return hunks(ops, 3);
  }, [older, newer]);
  const sign = { same: " ", del: "-", add: "+" };
  // One block per line (htm drops whitespace-only text with newlines, so no "\n" between them).
  return html`<pre class="diff" aria-label=${`diff from revision ${older.revision} to revision ${newer.revision}`}>
    <span class="diff-file">--- revision ${older.revision}</span>
    <span class="diff-file">+++ revision ${newer.revision}</span>
    ${found.length === 0 && html`<span class="diff-none">(no differences)</span>`}
    ${found.map(
      (h) => html`<span class="diff-hunk">${h.header}</span>
        ${h.lines.map((l) => html`<span class=${`diff-${l.kind}`}>${sign[l.kind]}${l.text}</span>`)}`,
    )}
  </pre>`;
}

export function DefinitionPage({ name }) {
  const [data, setData] = useState(null); // {status, revisions, rollouts}
  const [error, setError] = useState(null);
  const [pair, setPair] = useState(null); // {from, to}: the revisions diffed

  const load = useCallback(() => {
    Promise.all([
      call("GetDefinition", { name }),
      call("ListDefinitionRevisions", { name }),
      call("ListRollouts", { name, limit: 100 }),
    ]).then(([got, history, rollouts]) => {
      setData({ status: got.status, revisions: history.revisions ?? [], rollouts: rollouts.rollouts ?? [] });
      setError(null);
    }, setError);
  }, [name]);
  useEffect(load, [load]);
  const refresh = useThrottled(load, 2000);
  useEvents(refresh, (e) => /^EVENT_KIND_(ROLLOUT|DEFINITION)_/.test(e.kind ?? "") && e.attributes?.name === name);
  const live = data?.status?.rollout && isLive(data.status.rollout);
  useInterval(() => live && refresh(), LIVE_REFRESH_MS);

  const revisions = data?.revisions ?? [];
  // By default the newest revision against the one before it.
  const to = pair?.to ?? revisions[0]?.revision;
  const from = pair?.from ?? revisions[1]?.revision ?? to;
  const older = revisions.find((r) => r.revision === from);
  const newer = revisions.find((r) => r.revision === to);
  const choose = (side, revision) => setPair({ from, to, [side]: revision });

  const ready = data !== null || error !== null;
  if (!data) {
    return html`<${Page} name="definition" title=${name} ready=${ready}>
      <${ErrorBox} error=${error} what="loading the definition" />
    </${Page}>`;
  }
  const { status } = data;
  const current = status.current ?? {};
  const definition = current.definition ?? {};
  const rollout = status.rollout;
  const revisionColumns = [
    {
      title: "From",
      render: (r) => html`<input type="radio" name="diff-from" aria-label=${`diff from revision ${r.revision}`}
        checked=${r.revision === from} onChange=${() => choose("from", r.revision)} />`,
    },
    {
      title: "To",
      render: (r) => html`<input type="radio" name="diff-to" aria-label=${`diff to revision ${r.revision}`}
        checked=${r.revision === to} onChange=${() => choose("to", r.revision)} />`,
    },
    { title: "Revision", className: "num", key: "revision" },
    { title: "Applied", render: (r) => `${fmtTime(r.createdAt)} (${fmtAgo(r.createdAt)})` },
    { title: "By", key: "actor" },
    { title: "Message", render: (r) => (r.deleted ? "(deleted) " : "") + (r.message || "–"), className: "wrap" },
  ];

  return html`<${Page} name="definition" title=${`Definition ${name}`} ready=${ready}>
    <${ErrorBox} error=${error} what="refreshing" />
    <div class="panel">
      <dl class="props">
        <dt>Revision</dt><dd>${current.revision}${current.deleted ? " (deleted)" : ""}</dd>
        <dt>Applied</dt><dd>${fmtTime(current.createdAt)} (${fmtAgo(current.createdAt)}) by ${current.actor || "–"}${current.message ? `: ${current.message}` : ""}</dd>
        <dt>Stable</dt><dd>${Number(status.stableRevision ?? 0) ? `revision ${status.stableRevision}` : "none yet"}</dd>
        <dt>Nodes</dt><dd>${status.nodesCurrent ?? 0} of ${status.nodes ?? 0} run the current revision and are healthy; ${status.nodesFailed ?? 0} failed${status.unplaced ? `; ${status.unplaced} unplaced: ${status.unplacedReason}` : ""}</dd>
        <dt>Rollout</dt><dd>${rollout
          ? html`<a href=${rolloutHref(rollout)}>#${rollout.id}</a> <${StateBadge} state=${rolloutState(rollout)} /> revision ${rollout.targetRevision}${rollout.reason ? ` ${rollout.reason}` : ""}`
          : "none yet"}</dd>
        <dt>Selector</dt><dd class="mono">${selectorText(definition.selector) || "(every node)"}</dd>
        <dt>Placement</dt><dd>${placementText(definition.placement)}</dd>
        <dt>Strategy</dt><dd>${policyText(definition.update)}</dd>
      </dl>
    </div>
    <h2>Current spec <span class="dim">revision ${current.revision}; the agent's config decoded</span></h2>
    <pre class="spec">${definitionText(definition)}</pre>
    <h2>Revisions <span class="dim">newest first; pick two to compare</span></h2>
    <${Table} columns=${revisionColumns} rows=${revisions} rowKey=${(r) => r.revision} empty="No revisions." />
    ${older && newer && html`<h2>Diff <span class="dim">revision ${from} → ${to}</span></h2><${Diff} older=${older} newer=${newer} />`}
    <h2>Rollouts</h2>
    <${Table} columns=${rolloutColumns({ withName: false })} rows=${liveFirst(data.rollouts)} rowKey=${(r) => r.id} empty="No rollouts." />
  </${Page}>`;
}
