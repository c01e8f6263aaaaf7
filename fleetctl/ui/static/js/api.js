// The console's API client. It speaks the manager's HTTP API dialect
// (docs/http-api.md) to fleetctl ui, which makes each call over the
// operator's own gRPC connection: POST /v1/fleet.v1.FleetService/<Method>
// with proto3 JSON (lowerCamel field names, enums by name, 64-bit integers
// as strings, default values left out), and newline-delimited
// {"result": ...} / {"error": ...} lines for server streams.

const PREFIX = "/v1/fleet.v1.FleetService/";

/** A call that ended with a gRPC status other than OK. */
export class ApiError extends Error {
  constructor(code, message, metadata = {}) {
    super(message);
    this.code = code; // "NOT_FOUND", "INVALID_ARGUMENT", ... or "NETWORK"
    this.metadata = metadata;
  }
}

function post(method, body, signal) {
  return fetch(PREFIX + method, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body ?? {}),
    signal,
  }).catch((err) => {
    if (err.name === "AbortError") throw err;
    throw new ApiError("NETWORK", "cannot reach fleetctl ui (is it still running?)");
  });
}

async function failure(res) {
  const text = await res.text();
  try {
    const e = JSON.parse(text);
    return new ApiError(e.code ?? "UNKNOWN", e.message ?? res.statusText, e.metadata);
  } catch {
    return new ApiError("UNKNOWN", `${res.status} ${text.trim() || res.statusText}`);
  }
}

/** One unary call: resolves to the response message, rejects with ApiError. */
export async function call(method, body = {}, { signal } = {}) {
  const res = await post(method, body, signal);
  if (!res.ok) throw await failure(res);
  return res.json();
}

/**
 * A server stream: calls onMessage(message) for each message as it comes;
 * resolves when the stream ends, rejects with ApiError (or AbortError when
 * `signal` aborts it).
 */
export async function stream(method, body, onMessage, { signal } = {}) {
  const res = await post(method, body, signal);
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, end);
      buffered = buffered.slice(end + 1);
      if (!line) continue;
      const item = JSON.parse(line);
      if (item.error) throw new ApiError(item.error.code, item.error.message, item.error.metadata);
      onMessage(item.result);
    }
  }
}

/** Who the console acts as: {operator: "operator/alice", manager: "host:port"}. */
export async function session() {
  const res = await fetch("/console/session");
  if (!res.ok) throw new ApiError("UNAUTHENTICATED", (await res.text()).trim());
  return res.json();
}
