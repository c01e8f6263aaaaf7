// An agent's log, followed live (ReadAgentLog with follow): the last lines
// of the file, then new ones as they are written. At most MAX_LINES are kept;
// the view sticks to the end unless the operator scrolled up to read.
// The daemon sends an agent's stdout and stderr to one file, interleaved as
// written, so the log cannot tell them apart (docs/agents.md).
import { stream } from "./api.js";
import { ErrorBox, html, useEffect, useRef, useState } from "./lib.js";

export const MAX_LINES = 2000;
const TAIL_BYTES = 64 * 1024; // where to start: enough of the end for a screenful or two
const FLUSH_MS = 100; // batch chunks that arrive together into one render
const MARK = "── ";

function decodeBase64(text) {
  return Uint8Array.from(atob(text ?? ""), (c) => c.charCodeAt(0));
}

/**
 * Lines of a followed log, bounded: `push(text)` adds decoded text (lines
 * may span chunks), `mark(note)` a line of the console's own.
 */
export class LogLines {
  constructor(max = MAX_LINES) {
    this.max = max;
    this.lines = [];
    this.partial = "";
    this.dropped = 0; // lines let go of at the top
  }

  push(text) {
    const parts = (this.partial + text).split("\n");
    this.partial = parts.pop();
    this.lines.push(...parts);
    this.trim();
  }

  mark(note) {
    if (this.partial) {
      this.lines.push(this.partial);
      this.partial = "";
    }
    this.lines.push(MARK + note);
    this.trim();
  }

  trim() {
    const over = this.lines.length - this.max;
    if (over > 0) {
      this.lines.splice(0, over);
      this.dropped += over;
    }
  }

  text() {
    return this.lines.join("\n") + (this.partial ? `\n${this.partial}` : "");
  }
}

export function AgentLog({ nodeId, agentId }) {
  const [view, setView] = useState({ text: "", count: 0, dropped: 0 });
  const [status, setStatus] = useState({ following: false, error: null, ended: false });
  const [attempt, setAttempt] = useState(0); // bumped by "Reconnect"
  const [stuck, setStuck] = useState(true); // showing the end: new lines scroll into view
  const box = useRef(null);
  const log = useRef(null);
  const resumeAt = useRef(null); // next_offset of the last chunk, to resume after a break

  useEffect(() => {
    const abort = new AbortController();
    const lines = log.current ?? (log.current = new LogLines());
    const decoder = new TextDecoder();
    let timer = null;
    // Reading from the middle of the file: the text before its first newline is
    // only the end of a line, and is skipped.
    let skipping = resumeAt.current === null;
    const flush = () => {
      timer = null;
      setView({ text: lines.text(), count: lines.lines.length, dropped: lines.dropped });
    };
    const onChunk = (chunk) => {
      if (chunk.rotated) lines.mark("the log was rotated; continuing with the new file");
      let text = decoder.decode(decodeBase64(chunk.data), { stream: true });
      if (skipping && Number(chunk.offset ?? 0) > 0) {
        const end = text.indexOf("\n");
        text = end < 0 ? "" : text.slice(end + 1);
        skipping = end < 0;
      } else {
        skipping = false;
      }
      lines.push(text);
      resumeAt.current = chunk.nextOffset ?? resumeAt.current;
      if (!timer) timer = setTimeout(flush, FLUSH_MS);
    };
    const offset = resumeAt.current ?? String(-TAIL_BYTES);
    setStatus({ following: true, error: null, ended: false });
    stream("ReadAgentLog", { nodeId, agentId, offset, follow: true }, onChunk, { signal: abort.signal }).then(
      () => {
        lines.mark("the log stream ended");
        flush();
        setStatus({ following: false, error: null, ended: true });
      },
      (error) => {
        if (error.name === "AbortError") return;
        flush();
        setStatus({ following: false, error, ended: true });
      },
    );
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [nodeId, agentId, attempt]);

  useEffect(() => {
    if (stuck && box.current) box.current.scrollTop = box.current.scrollHeight;
  }, [view, stuck]);

  const onScroll = () => {
    const el = box.current;
    setStuck(el.scrollTop + el.clientHeight >= el.scrollHeight - 8);
  };
  const toEnd = () => {
    setStuck(true);
    box.current.scrollTop = box.current.scrollHeight;
  };

  return html`<div class="log-view">
    <div class="log-head">
      <span class=${`live ${status.following ? "on" : "off"}`}>${status.following ? "following" : "stopped"}</span>
      <span class="dim">
        ${view.count.toLocaleString()} ${view.count === 1 ? "line" : "lines"}${view.dropped ? ` (the last ${MAX_LINES.toLocaleString()}; older ones let go)` : ""};
        stdout and stderr interleaved, as the daemon writes both to one file
      </span>
      ${!stuck && html`<button onClick=${toEnd}>Scroll to the end ↓</button>`}
      ${status.ended && html`<button onClick=${() => setAttempt((n) => n + 1)}>Reconnect</button>`}
    </div>
    <${ErrorBox} error=${status.error} what="following the log" />
    <pre class="log" ref=${box} onScroll=${onScroll} data-log=${`${nodeId}/${agentId}`}>${view.text || (status.following ? "Waiting for output…" : "")}</pre>
  </div>`;
}
