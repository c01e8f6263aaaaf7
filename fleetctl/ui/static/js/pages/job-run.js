// "Run a job" on the jobs page: a form for the JobSpec `fleetctl run` builds
// (the nodes by selector or by name, a command as argv or a shell script,
// the window and timeouts), the plan first (RunJob with plan: the targets,
// nothing run), then the run after a confirmation naming the target count and
// nodes. Mistakes found here are shown next to their field; what only the
// manager can judge (a label, a timeout's range, a selector matching nothing)
// comes back in its words.
import { call } from "../api.js";
import { parseDuration } from "../duration.js";
import { Confirm, ErrorBox, Table, html, useState } from "../lib.js";
import { SelectorSyntaxError, parseSelector } from "../selector.js";
import { commandText, policyText, whereText } from "./job-parts.js";

/** A mistake in one field of the form: shown next to it. */
class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

/**
 * A command line split into words as a POSIX shell would (quotes and
 * backslashes; nothing expanded): `grep -c 'a b' f` -> ["grep", "-c", "a b", "f"].
 */
export function splitWords(text) {
  const words = [];
  let word = null; // null: between words
  let quote = null;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quote === "'") {
      if (c === "'") quote = null;
      else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === "\\" && i + 1 < text.length && '"\\$`\n'.includes(text[i + 1])) word += text[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      word ??= "";
    } else if (c === "\\" && i + 1 < text.length) {
      word = (word ?? "") + text[++i];
    } else if (/\s/.test(c)) {
      if (word !== null) words.push(word);
      word = null;
    } else {
      word = (word ?? "") + c;
    }
  }
  if (quote) throw new Error(`the ${quote === "'" ? "single" : "double"} quote is not closed`);
  if (word !== null) words.push(word);
  return words;
}

const EMPTY = {
  target: "selector", // or "nodes"
  selector: "",
  nodes: "",
  mode: "argv", // or "shell"
  command: "",
  name: "",
  maxConcurrency: "",
  maxErrors: "",
  canary: "",
  timeout: "",
  deliveryTimeout: "",
  lock: "",
  user: "",
  cwd: "",
  env: "",
};

function count(text, field) {
  if (!text.trim()) return 0;
  if (!/^\d+$/.test(text.trim())) throw new FieldError(field, `a whole number >= 0, got '${text}'`);
  return Number(text);
}

function seconds(text, field) {
  try {
    return text.trim() ? parseDuration(text) : undefined;
  } catch (err) {
    throw new FieldError(field, err.message);
  }
}

/** The form's values as a JobSpec (proto3 JSON); throws FieldError naming the field. */
export function buildSpec(form) {
  const command = {};
  if (form.mode === "shell") {
    if (!form.command.trim()) throw new FieldError("command", "give the script to run");
    Object.assign(command, { script: form.command, interpreter: ["/bin/sh"] });
  } else {
    let argv;
    try {
      argv = splitWords(form.command);
    } catch (err) {
      throw new FieldError("command", err.message);
    }
    if (!argv.length || !argv[0]) throw new FieldError("command", "give the program to run and its arguments");
    command.argv = argv;
  }
  const env = {};
  for (const line of form.env.split("\n").filter((l) => l.trim())) {
    const at = line.indexOf("=");
    if (at <= 0) throw new FieldError("env", `NAME=VALUE per line, got '${line}'`);
    env[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  if (Object.keys(env).length) command.env = env;
  if (form.user.trim()) command.user = form.user.trim();
  if (form.cwd.trim()) command.cwd = form.cwd.trim();

  const spec = { steps: [{ command }] };
  if (form.target === "nodes") {
    const nodeIds = form.nodes.split(/[\s,]+/).filter(Boolean);
    if (!nodeIds.length) throw new FieldError("nodes", "name at least one node");
    spec.nodeIds = nodeIds;
  } else {
    try {
      spec.selector = parseSelector(form.selector); // blank: every node
    } catch (err) {
      if (err instanceof SelectorSyntaxError) throw new FieldError("selector", err.message);
      throw err;
    }
  }
  if (form.name.trim()) spec.name = form.name.trim();
  if (form.maxConcurrency.trim()) spec.maxConcurrency = form.maxConcurrency.trim();
  // Blank fields are left out, so the manager's defaults apply (as fleetctl run without the flag).
  const maxErrors = count(form.maxErrors, "maxErrors");
  if (maxErrors) spec.maxErrors = maxErrors;
  const canary = count(form.canary, "canary");
  if (canary) spec.canary = canary;
  const timeout = seconds(form.timeout, "timeout");
  if (timeout !== undefined) spec.timeoutSeconds = timeout;
  const delivery = seconds(form.deliveryTimeout, "deliveryTimeout");
  if (delivery !== undefined) spec.deliveryTimeoutSeconds = delivery;
  if (form.lock.trim()) spec.lock = form.lock.trim();
  return spec;
}

function planColumns(spec) {
  return [
    { title: "#", className: "num", render: (t) => t.index },
    { title: "Node", key: "nodeId" },
    spec.canary > 0 && { title: "Stage", render: (t) => (t.stage ? "–" : "canary") },
    { title: "Note", render: (t) => t.reason || "–", className: "wrap" },
  ].filter(Boolean);
}

/**
 * The form, its plan and the run. `onStarted(job)` gets the started job;
 * `onClose()` hides the form.
 */
export function RunJobForm({ onStarted, onClose }) {
  const [form, setForm] = useState(EMPTY);
  const [problem, setProblem] = useState(null); // FieldError
  const [error, setError] = useState(null); // the manager's answer to the plan
  const [plan, setPlan] = useState(null); // {spec, job}
  const [confirming, setConfirming] = useState(false);
  const [busy, setBusy] = useState(false);

  // Any change makes the plan stale: plan again before running.
  const set = (key) => (e) => {
    setForm({ ...form, [key]: e.target.value });
    setPlan(null);
    setProblem(null);
    setError(null);
  };
  const fieldError = (key) => problem?.field === key && html`<span class="field-error" role="alert">${problem.message}</span>`;

  const doPlan = async (e) => {
    e.preventDefault();
    let spec;
    try {
      spec = buildSpec(form);
    } catch (err) {
      if (err instanceof FieldError) return setProblem(err);
      throw err;
    }
    setBusy(true);
    try {
      const answer = await call("RunJob", { spec, plan: true });
      setPlan({ spec, job: answer.job });
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  const run = async () => {
    const answer = await call("RunJob", { spec: plan.spec });
    onStarted(answer.job);
  };

  const targets = (plan?.job.targets ?? []).map((t, i) => ({ ...t, index: i + 1 }));
  const what = plan && commandText(plan.spec.steps[0]);
  const radio = (key, value, label) =>
    html`<label><input type="radio" name=${key} value=${value} checked=${form[key] === value} onChange=${set(key)} /> ${label}</label>`;

  return html`<div class="panel">
    <form class="run" onSubmit=${doPlan} aria-label="Run a job">
      <div class="row">
        <fieldset><legend class="dim">Nodes</legend>${radio("target", "selector", "by selector")}${radio("target", "nodes", "by name")}</fieldset>
        ${form.target === "selector"
          ? html`<label class="grow">Selector (blank: every node)
              <input class="selector" name="selector" placeholder="env=prod, tier in (web,api), !canary" value=${form.selector} onInput=${set("selector")} />
              ${fieldError("selector")}</label>`
          : html`<label class="grow">Nodes (comma or space separated)
              <input name="nodes" placeholder="web-1, web-2" value=${form.nodes} onInput=${set("nodes")} />${fieldError("nodes")}</label>`}
      </div>
      <div class="row">
        <fieldset><legend class="dim">Command</legend>${radio("mode", "argv", "program and arguments")}${radio("mode", "shell", "shell script (/bin/sh)")}</fieldset>
        <label class="grow">${form.mode === "shell" ? "Script, run by /bin/sh" : "Command (words split as a shell would; no shell runs it)"}
          <textarea name="command" rows="2" placeholder=${form.mode === "shell" ? "df -h | grep /data" : "systemctl restart nginx"}
            value=${form.command} onInput=${set("command")}></textarea>${fieldError("command")}</label>
      </div>
      <details>
        <summary>Options: name, window, timeouts, lock, user, environment</summary>
        <div class="row">
          <label>Name <input name="name" class="short" value=${form.name} onInput=${set("name")} /></label>
          <label>Max concurrency <input name="maxConcurrency" class="short" placeholder="all; 10 or 25%" value=${form.maxConcurrency} onInput=${set("maxConcurrency")} /></label>
          <label>Max errors <input name="maxErrors" class="short" placeholder="0: no limit" value=${form.maxErrors} onInput=${set("maxErrors")} />${fieldError("maxErrors")}</label>
          <label>Canary <input name="canary" class="short" placeholder="0: none" value=${form.canary} onInput=${set("canary")} />${fieldError("canary")}</label>
          <label>Timeout <input name="timeout" class="short" placeholder="1h" value=${form.timeout} onInput=${set("timeout")} />${fieldError("timeout")}</label>
          <label>Delivery timeout <input name="deliveryTimeout" class="short" placeholder="5m" value=${form.deliveryTimeout} onInput=${set("deliveryTimeout")} />${fieldError("deliveryTimeout")}</label>
          <label>Lock <input name="lock" class="short" value=${form.lock} onInput=${set("lock")} /></label>
          <label>User <input name="user" class="short" placeholder="the daemon's" value=${form.user} onInput=${set("user")} /></label>
          <label>Directory <input name="cwd" placeholder="the daemon's job directory" value=${form.cwd} onInput=${set("cwd")} /></label>
          <label class="grow">Environment (NAME=VALUE per line)
            <textarea name="env" rows="2" value=${form.env} onInput=${set("env")}></textarea>${fieldError("env")}</label>
        </div>
      </details>
      <div class="row">
        <button type="submit" class="primary" disabled=${busy}>${busy ? "Planning…" : "Plan"}</button>
        <button type="button" onClick=${onClose}>Close</button>
        <span class="dim">The plan lists the nodes it would run on; nothing runs until you confirm.</span>
      </div>
    </form>
    <${ErrorBox} error=${error} what="the manager refused the job" />
    ${plan &&
    html`<div class="panel plan" data-plan="true">
      <h2>Plan: ${targets.length} target${targets.length === 1 ? "" : "s"}</h2>
      <dl class="props">
        <dt>Targets</dt><dd>${whereText(plan.spec)}</dd>
        <dt>Policy</dt><dd>${policyText(plan.spec)}</dd>
        <dt>Command</dt><dd class="mono">${what}</dd>
      </dl>
      <${Table} columns=${planColumns(plan.spec)} rows=${targets} rowKey=${(t) => t.nodeId} empty="No targets." />
      <div class="row modal-actions">
        <button class="primary" disabled=${!targets.length} onClick=${() => setConfirming(true)}>Run on ${targets.length} node${targets.length === 1 ? "" : "s"}…</button>
      </div>
    </div>`}
    ${confirming &&
    html`<${Confirm}
      title=${`Run ${what} on ${targets.length} node${targets.length === 1 ? "" : "s"}?`}
      targets=${targets.map((t) => t.nodeId)}
      confirmLabel="Run"
      onConfirm=${run}
      onClose=${() => setConfirming(false)}
    />`}
  </div>`;
}
