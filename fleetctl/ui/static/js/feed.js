// One followed WatchEvents stream for the whole console: pages subscribe to
// it to update live instead of each opening its own. It resumes after the
// last event seen when the stream breaks (fleetctl ui or the manager
// restarted), so no event is missed across a reconnect.
import { stream } from "./api.js";
import { useEffect, useRef, useState } from "./lib.js";

const KEEP = 500; // events kept for the overview and the events page
const HISTORY = 100; // events loaded when the console opens
const listeners = new Set();
const statusListeners = new Set();
let recent = [];
let lastId = 0;
let status = { connected: false, error: null };
let started = false;
let historyLoaded = false;

function setStatus(next) {
  status = next;
  for (const fn of statusListeners) fn(status);
}

function receive(message, history) {
  const event = message.event;
  if (!event || Number(event.id) <= lastId) return; // seen already (a retried history)
  lastId = Number(event.id);
  recent = [event, ...recent].slice(0, KEEP);
  for (const fn of listeners) fn(event, history);
}

async function run() {
  let delay = 1000;
  for (;;) {
    try {
      if (!historyLoaded) {
        // The newest events first, on their own: listeners are told they are
        // history, so a page does not reload what it has just loaded because of them.
        await stream("WatchEvents", { tail: HISTORY }, (message) => receive(message, true));
        historyLoaded = true;
      }
      // Then every event after the last one seen (after none: the history was empty).
      await stream("WatchEvents", { fromEventId: String(lastId), follow: true }, (message) => {
        if (!status.connected) setStatus({ connected: true, error: null });
        delay = 1000;
        receive(message, false);
      });
      setStatus({ connected: false, error: null });
    } catch (error) {
      setStatus({ connected: false, error });
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function start() {
  if (!started) {
    started = true;
    setStatus({ connected: true, error: null }); // optimistic until the first failure
    run();
  }
}

/** The newest events seen (newest first), at most KEEP. */
export function recentEvents() {
  return recent;
}

/**
 * Call `onEvent(event, history)` for every event `filter(event)` picks while
 * mounted. The newest events that were there when the console opened are
 * loaded once, right after; they reach only listeners that ask for them
 * (`{history: true}`, with `history` true), so a page does not reload what
 * it has just loaded because of them. Pages refresh on new events (throttled).
 */
export function useEvents(onEvent, filter = () => true, { history: wantHistory = false } = {}) {
  const saved = useRef({ onEvent, filter, wantHistory });
  saved.current = { onEvent, filter, wantHistory };
  useEffect(() => {
    start();
    const fn = (event, history) => {
      const { onEvent: on, filter: wanted, wantHistory: past } = saved.current;
      if ((past || !history) && wanted(event)) on(event, history);
    };
    listeners.add(fn);
    return () => listeners.delete(fn);
  }, []);
}

/** {connected, error} of the shared stream, for the header's live indicator. */
export function useFeedStatus() {
  const [value, setValue] = useState(status);
  useEffect(() => {
    start();
    statusListeners.add(setValue);
    setValue(status);
    return () => statusListeners.delete(setValue);
  }, []);
  return value;
}
