// Keeping a page's data fresh as events come. A refresh runs at most every
// `ms` and never supersedes a call still in flight: it waits for that answer
// and then asks again. Superseding would drop the answer, and on a big fleet
// (ListNodes of 5,000 nodes takes seconds) events arriving faster than the
// answer would keep a page from ever showing its data.
import { useEffect, useRef, useThrottled } from "./lib.js";

/**
 * A function that reloads `result` (what useCall returns, or anything with
 * `loading` and `reload()`) at most every `ms`: call it on each event.
 */
export function useRefresh(result, ms) {
  const latest = useRef(result);
  latest.current = result;
  const owed = useRef(false);
  const refresh = useThrottled(() => {
    if (latest.current.loading) owed.current = true;
    else latest.current.reload();
  }, ms);
  useEffect(() => {
    if (!result.loading && owed.current) {
      owed.current = false;
      result.reload();
    }
  }, [result.loading]); // eslint-disable-line react-hooks/exhaustive-deps
  return refresh;
}
