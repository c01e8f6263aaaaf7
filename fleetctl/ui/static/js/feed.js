// One followed WatchEvents stream for the whole console: pages subscribe to
// it to update live instead of each opening its own. It resumes after the
// last event seen when the stream breaks (fleetctl ui or the manager
// restarted), so no event is missed across a reconnect.
import { stream } from "./api.js";
import { useEffect, useRef, useState } from "./lib.js";

const KEEP = 500; // events kept for the overview and the events page
const listeners = new Set();
const statusListeners = new Set();
let recent = [];
let lastId = 0;
let status = { connected: false, error: null };
let started = false;

function setStatus(next) {
  status = next;
  for (const fn of statusListeners) fn(status);
}

async function run() {
  let delay = 1000;
  for (;;) {
    const body = lastId ? { fromEventId: String(lastId), follow: true } : { follow: true, tail: 100 };
    try {
      await stream("WatchEvents", body, (message) => {
        if (!status.connected) setStatus({ connected: true, error: null });
        delay = 1000;
        const event = message.event;
        if (!event) return;
        lastId = Math.max(lastId, Number(event.id));
        recent = [event, ...recent].slice(0, KEEP);
        for (const fn of listeners) fn(event);
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
 * Call `onEvent(event)` for every new event while mounted; `filter(event)`
 * picks the ones wanted. Pages refresh their data from it (throttled).
 */
export function useEvents(onEvent, filter = () => true) {
  const saved = useRef({ onEvent, filter });
  saved.current = { onEvent, filter };
  useEffect(() => {
    start();
    const fn = (event) => saved.current.filter(event) && saved.current.onEvent(event);
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
