// A job's output on its page, followed live (ReadJobOutput with follow):
// every target's lines interleaved as the manager stored them, each prefixed
// with its node, or one target's alone. Bytes are decoded per node (a UTF-8
// character split across two chunks comes out whole), cut into lines, and
// kept in a bounded buffer; the view follows the end unless the reader
// scrolled up. The daemon stores stdout and stderr of a job as one stream,
// so the two cannot be told apart here (nor in `fleetctl jobs logs`).
import { stream } from "../api.js";
import { ErrorBox, html, useEffect, useRef, useState } from "../lib.js";

const MAX_LINES = 5000;
const PAINT_MS = 100; // at most ten repaints a second, however fast lines come

function bytesOf(base64) {
  return Uint8Array.from(atob(base64 ?? ""), (c) => c.charCodeAt(0));
}

/** Lines from ReadJobOutput messages, per node: complete lines out, partial ones held. */
export class OutputLines {
  constructor(max = MAX_LINES) {
    this.max = max;
    this.lines = []; // {id, node, text, note}
    this.dropped = 0;
    this.nextId = 0;
    this.decoders = new Map();
    this.partial = new Map();
    this.ended = new Set();
  }

  add(node, text, note = false) {
    this.lines.push({ id: this.nextId++, node, text: text.replace(/\r$/, ""), note });
    if (this.lines.length > this.max) {
      const cut = this.lines.length - this.max;
      this.lines.splice(0, cut);
      this.dropped += cut;
    }
  }

  /** One ReadJobOutput message; `jobId` names the job in the cut-output note. */
  feed(message, jobId) {
    const node = message.nodeId ?? "";
    if (!this.decoders.has(node)) this.decoders.set(node, new TextDecoder("utf-8"));
    if (message.data) {
      const text = (this.partial.get(node) ?? "") + this.decoders.get(node).decode(bytesOf(message.data), { stream: true });
      const parts = text.split("\n");
      this.partial.set(node, parts.pop());
      for (const line of parts) this.add(node, line);
    }
    if (message.truncated) {
      this.flush(node);
      this.add(
        node,
        `[the manager stored only the first ${message.nextOffset ?? 0} bytes of this output; the rest is on the node: fleetctl jobs logs ${jobId} ${node} --from-node]`,
        true,
      );
    }
    if (message.eof) {
      this.flush(node);
      this.ended.add(node);
    }
  }

  /** The node's last line, if it ended without a newline. */
  flush(node) {
    const rest = (this.partial.get(node) ?? "") + (this.decoders.get(node)?.decode() ?? "");
    this.partial.set(node, "");
    if (rest) this.add(node, rest);
  }

  flushAll() {
    for (const node of this.partial.keys()) this.flush(node);
  }
}

/**
 * The output panel of the job page: `nodeIds` are the job's targets, `node`
 * the one shown ("" for every target's), `onNode` picks another.
 */
export function JobOutput({ jobId, nodeIds, node, onNode }) {
  const [view, setView] = useState({ lines: [], dropped: 0, done: false });
  const [error, setError] = useState(null);
  const [attempt, setAttempt] = useState(0);
  const box = useRef(null);
  const atEnd = useRef(true);

  useEffect(() => {
    const abort = new AbortController();
    const buffer = new OutputLines();
    let timer = null;
    const paint = (done = false) => {
      clearTimeout(timer);
      timer = null;
      setView({ lines: buffer.lines.slice(), dropped: buffer.dropped, done });
    };
    const later = () => {
      timer ??= setTimeout(paint, PAINT_MS);
    };
    setView({ lines: [], dropped: 0, done: false });
    setError(null);
    const request = { jobId, follow: true, ...(node && { nodeId: node }) };
    const onMessage = (message) => {
      buffer.feed(message, jobId);
      later();
    };
    stream("ReadJobOutput", request, onMessage, { signal: abort.signal }).then(
      () => {
        buffer.flushAll();
        paint(true);
      },
      (err) => {
        if (err.name === "AbortError") return;
        buffer.flushAll();
        paint(false);
        setError(err);
      },
    );
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [jobId, node, attempt]);

  // Follow the end unless the reader scrolled up to read something.
  useEffect(() => {
    const el = box.current;
    if (el && atEnd.current) el.scrollTop = el.scrollHeight;
  }, [view]);
  const onScroll = () => {
    const el = box.current;
    atEnd.current = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
  };

  const width = Math.max(0, ...nodeIds.map((n) => n.length));
  const prefix = (line) => (node ? null : html`<span class="node">${line.node.padEnd(width)} | </span>`);
  return html`<div class="output">
    <div class="output-bar">
      <label>Output of <select value=${node} onChange=${(e) => onNode(e.target.value)} aria-label="output of">
        <option value="">every target</option>
        ${nodeIds.map((n) => html`<option value=${n}>${n}</option>`)}
      </select></label>
      <span class="dim">
        ${view.done ? "all of it: the targets finished" : "following as it is stored"}; stdout and stderr together, as the
        daemon keeps them${view.dropped ? `; the first ${view.dropped} lines were dropped (the page keeps ${MAX_LINES})` : ""}
      </span>
      ${error && html`<button onClick=${() => setAttempt(attempt + 1)}>Read again</button>`}
    </div>
    <${ErrorBox} error=${error} what="reading the output" />
    <pre class="log output" ref=${box} onScroll=${onScroll} aria-label="job output">
      ${view.lines.length === 0 && html`<span class="note">${view.done ? "(no output)" : "(no output yet)"}</span>`}
      ${view.lines.map((l) => html`<span key=${l.id} class=${l.note ? "note" : ""}>${prefix(l)}${l.text}</span>`)}
    </pre>
  </div>`;
}
