"""The node deny list in memory: node name -> cutoff; certificates starting before it are refused.

`NodeIdentities.require_node` (every ManagerService call, and Connect's
hello) asks `check(name, pem)`. A name not on the list costs one dict
lookup; for a listed name the certificate's notBefore is parsed once per
PEM and memoised. The list is loaded at start, updated at once by a
RevokeNode on this replica (`add`), and re-read from the database every
`interval` seconds for revocations made on other replicas; a node newly
listed by that refresh is handed to `on_revoked` (which closes its
streams and channels here too). Every refusal is handed to `on_refused`
(a counter: a revoked daemon retries for ever, so no log line each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable

from fleet.errors import Unauthenticated
from manager.service.enrollment import is_revoked

__all__ = ["DenyList", "not_before_ms", "revoked_message"]

log = logging.getLogger(__name__)


def not_before_ms(pem: bytes) -> int:
    """The notBefore of the first certificate in `pem` (epoch ms); ValueError if unparsable."""
    from cryptography import x509  # only for listed names: the hot path never parses

    cert = x509.load_pem_x509_certificate(pem)
    return int(cert.not_valid_before_utc.timestamp() * 1000)


def revoked_message(node_id: str, cutoff_ms: int) -> str:
    """What a revoked certificate's holder is told."""
    when = dt.datetime.fromtimestamp(cutoff_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"the certificate of node/{node_id} was revoked at {when}; enroll the host again"


class DenyList:
    """Revoked node names and their cutoffs (epoch ms)."""

    def __init__(
        self,
        load: Callable[[], Awaitable[dict[str, int]]],
        *,
        interval: float = 5.0,
        on_revoked: Callable[[list[str]], Awaitable[None]] | None = None,
        on_refused: Callable[[str], None] = lambda _node_id: None,
        max_memo: int = 10_000,
    ) -> None:
        self._load = load
        self._interval = interval
        self._on_revoked = on_revoked
        self._on_refused = on_refused
        self._max_memo = max_memo
        self._cutoffs: dict[str, int] = {}
        self._not_before: dict[bytes, int] = {}  # pem -> notBefore, listed names only
        # Listed names whose daemon has since shown a certificate newer than the cutoff
        # (re-enrolled): the pool may dial them again.
        self._cleared: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._cutoffs)

    def cutoff(self, node_id: str) -> int:
        """`node_id`'s cutoff, 0 if it is not listed."""
        return self._cutoffs.get(node_id, 0)

    def check(self, node_id: str, pem: bytes | None) -> None:
        """Unauthenticated if `pem` (node `node_id`'s certificate) starts before its cutoff.

        Without a PEM (no real TLS peer) a listed name is refused: there is
        no way to tell an old certificate from a new one.
        """
        cutoff = self._cutoffs.get(node_id)
        if cutoff is None:
            return
        if pem is None:
            self._on_refused(node_id)
            raise Unauthenticated(revoked_message(node_id, cutoff))
        start = self._not_before.get(pem)
        if start is None:
            try:
                start = not_before_ms(pem)
            except ValueError:
                raise Unauthenticated("the client certificate could not be parsed") from None
            if len(self._not_before) >= self._max_memo:
                del self._not_before[next(iter(self._not_before))]
            self._not_before[pem] = start
        if is_revoked(start, cutoff):
            self._on_refused(node_id)
            raise Unauthenticated(revoked_message(node_id, cutoff))
        self._cleared.add(node_id)

    def dial_refusal(self, node_id: str) -> str | None:
        """Why the manager must not dial `node_id`'s daemon, or None.

        The manager cannot see the notBefore of the certificate a dialled
        daemon serves (grpc checks only its name), so a listed node is not
        dialled until it has called in with a certificate newer than its
        cutoff, i.e. enrolled again.
        """
        cutoff = self._cutoffs.get(node_id)
        if cutoff is None or node_id in self._cleared:
            return None
        return revoked_message(node_id, cutoff) + " (the manager does not call it until then)"

    def add(self, node_id: str, cutoff_ms: int) -> None:
        """`node_id` was revoked here: refuse its older certificates from now on."""
        self._cutoffs[node_id] = cutoff_ms
        self._cleared.discard(node_id)

    def merge(self, entries: dict[str, int]) -> list[str]:
        """Take the database's list; the names that are new or got a later cutoff.

        Merged, not replaced: entries are never removed and cutoffs only move
        later, and a read that began before this replica's own `add` must not
        undo it.
        """
        changed = sorted(n for n, c in entries.items() if self._cutoffs.get(n, -1) < c)
        for name in changed:
            self._cutoffs[name] = entries[name]
            self._cleared.discard(name)
        return changed

    async def load(self) -> None:
        """Read the list now (at start); the memo is kept (notBefore never changes)."""
        self.merge(await self._load())

    async def refresh(self) -> list[str]:
        """Re-read the list; names revoked elsewhere since are passed to `on_revoked`."""
        changed = self.merge(await self._load())
        if changed:
            log.info("revoked on another replica: %s", ", ".join(changed))
            if self._on_revoked is not None:
                await self._on_revoked(changed)
        return changed

    def start(self) -> None:
        """Refresh every `interval` seconds until `stop`."""
        self._task = asyncio.create_task(self._run(), name="deny-list")

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception as exc:  # the database is down: keep the last list, try again
                log.warning("could not refresh the node deny list: %s", exc)

    def listed(self) -> Iterable[str]:
        """Every listed name."""
        return iter(self._cutoffs)
