"""Renewing the node certificate over the manager link, without a restart.

When: at two thirds of the certificate's lifetime, a little earlier by a
per-certificate jitter (up to 5% of the lifetime) so the nodes of one
enrollment wave do not all renew at the same moment (`seconds_until_renewal`).
A failed attempt is retried with full-jitter exponential backoff (5 s
doubling, capped at 1 h), but never later than the expiry minus a margin
(a tenth of the lifetime, at most 5 min): the last try before expiry is
always made (`retry_delay`). Both are pure functions of the validity, `now`
and the jitter, tested on a manual clock.

How (`CertRenewer.renew_once`): a new key and CSR (in a child process, as
daemon.tlsfiles checks the files, so cryptography stays out of the daemon),
ManagerService.RenewCertificate over the link's open mTLS connection, the
answer checked in a child (the very checks the daemon runs at start, and the
same node identity), then the key, the certificate and the CA written
atomically, in that order, over the configured ``[tls]`` files. Serving picks
them up within a second (fleet.tls looks at most once a second); the link
moves its connection to them (`ManagerLink.use_new_credentials`).

The loop also keeps the expiry for ``/metrics`` and re-reads the files at
least every 10 min, so a certificate replaced by hand is scheduled anew.
With ``[tls] auto_renew = false`` it only watches, and warns once per
certificate when renewal would be due.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable

from daemon.manager_link import ManagerLink
from daemon.tlsfiles import check_bundle, new_key_and_csr
from fleet.errors import ConfigError, FailedPrecondition, FleetError
from fleet.files import write_file_atomic
from fleet.identity import Identity
from fleet.retry import Backoff
from fleet.tls import TLSConfig
from fleet.v1 import manager_pb2

__all__ = [
    "OUTCOMES",
    "RETRY",
    "CertRenewer",
    "expiry_margin",
    "renewal_time",
    "retry_delay",
    "seconds_until_renewal",
]

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3
"""Share of the lifetime after which the certificate is renewed."""
JITTER_SHARE = 0.05
"""Renewal comes up to this share of the lifetime earlier (jitter 1.0)."""
RETRY = Backoff(initial=5.0, multiplier=2.0, maximum=3600.0)
"""Backoff between failed attempts (full jitter), before the expiry cap."""
MIN_RETRY_SECONDS = 1.0
"""No retry comes sooner (full jitter can draw ~0)."""
MAX_MARGIN = dt.timedelta(minutes=5)
RECHECK_SECONDS = 600.0
"""While waiting, the files are re-read at least this often."""
OUTCOMES = ("success", "failure")
"""Values of the renewals counter's `outcome` label."""


def renewal_time(not_before: dt.datetime, not_after: dt.datetime, jitter: float) -> dt.datetime:
    """When to renew: two thirds into the lifetime, earlier by `jitter` (0..1) x 5% of it."""
    lifetime = not_after - not_before
    return not_before + lifetime * (RENEW_AT - JITTER_SHARE * min(max(jitter, 0.0), 1.0))


def seconds_until_renewal(
    not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, jitter: float
) -> float:
    """Seconds from `now` until renewal is due; 0 when it is due already."""
    return max(0.0, (renewal_time(not_before, not_after, jitter) - now).total_seconds())


def expiry_margin(not_before: dt.datetime, not_after: dt.datetime) -> dt.timedelta:
    """How long before expiry the last retry is made: a tenth of the lifetime, at most 5 min."""
    return min(MAX_MARGIN, (not_after - not_before) / 10)


def retry_delay(
    attempt: int,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime,
    backoff: Backoff = RETRY,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based).

    The backoff's delay (at least 1 s), but never past expiry minus the margin;
    once that point has passed, at most the margin, so a renewal that can
    still get through (an open connection outlives its certificate) is tried
    often, and the delay never grows to an hour on an expiring certificate.
    """
    delay = max(backoff.delay(attempt, rng), MIN_RETRY_SECONDS)
    margin = expiry_margin(not_before, not_after)
    left = (not_after - margin - now).total_seconds()
    cap = left if left > 0 else margin.total_seconds()
    return min(delay, cap)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _left(not_after: dt.datetime, now: dt.datetime) -> str:
    seconds = (not_after - now).total_seconds()
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"in {seconds / size:.1f}{unit}"
    return f"in {seconds:.0f}s"


class CertRenewer:
    """Renews this node's certificate over `link` when due (module doc).

    `clock` is the wall clock in seconds (tests pass their own); `rng` draws
    the jitter and the backoff.
    """

    def __init__(
        self,
        tls: TLSConfig,
        identity: Identity,
        link: ManagerLink,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        backoff: Backoff = RETRY,
    ) -> None:
        self._tls = tls
        self._identity = identity
        self._link = link
        self.enabled = enabled
        """`[tls] auto_renew`: renew when due (else only watch the expiry)."""
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not crypto
        self._backoff = backoff
        self.validity: tuple[dt.datetime, dt.datetime] | None = None
        """(not before, not after) of the certificate in use, as last read."""
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        """Renewal attempts by outcome (for /metrics)."""
        self._scheduled: tuple[dt.datetime, dt.datetime] | None = None
        self._jitter = 0.0
        self._task: asyncio.Task[None] | None = None

    def expiry_timestamp(self) -> float:
        """When the certificate in use expires (Unix seconds); 0 if unknown."""
        return self.validity[1].timestamp() if self.validity else 0.0

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    async def start(self) -> None:
        """Read the certificate's validity and start the loop (returns at once)."""
        await self._read_validity()
        self._task = asyncio.create_task(self._run(), name="cert-renewal")

    async def stop(self) -> None:
        """Stop the loop; a renewal writing its files finishes them first (a thread)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _read_validity(self) -> tuple[dt.datetime, dt.datetime] | None:
        """The files' validity; the last known one if they cannot be read now (mid-write,
        expired: then the loop still knows when it expires)."""
        try:
            self.validity = await asyncio.to_thread(self._tls.leaf_validity)
        except FleetError as exc:
            log.debug("certificate validity not re-read: %s", exc)
        return self.validity

    async def _run(self) -> None:
        attempt = 0
        warned: dt.datetime | None = None
        while True:
            validity = await self._read_validity()
            if validity is None:  # never readable: nothing to schedule; look again later
                await asyncio.sleep(RECHECK_SECONDS)
                continue
            not_before, not_after = validity
            if validity != self._scheduled:
                self._scheduled = validity
                self._jitter = self._rng.random()
                attempt = 0
                log.info(
                    "certificate of %s valid until %s; renewal %s at %s",
                    self._identity,
                    _fmt(not_after),
                    "due" if self.enabled else "(auto_renew is off) would be due",
                    _fmt(renewal_time(not_before, not_after, self._jitter)),
                )
            wait = seconds_until_renewal(not_before, not_after, self._now(), self._jitter)
            if wait > 0 or not self.enabled:
                if wait <= 0 and warned != not_after:
                    warned = not_after
                    log.warning(
                        "certificate of %s expires at %s (%s) and [tls] auto_renew is off:"
                        " replace it before then",
                        self._identity,
                        _fmt(not_after),
                        _left(not_after, self._now()),
                    )
                await asyncio.sleep(min(wait, RECHECK_SECONDS) if wait > 0 else RECHECK_SECONDS)
                continue
            try:
                await self.renew_once()
            except Exception as exc:
                self.outcomes["failure"] += 1
                now = self._now()
                delay = retry_delay(
                    attempt,
                    not_before=not_before,
                    not_after=not_after,
                    now=now,
                    backoff=self._backoff,
                    rng=self._rng,
                )
                attempt += 1
                if not isinstance(exc, FleetError | OSError):
                    log.exception("certificate renewal failed unexpectedly")
                log.warning(
                    "certificate renewal failed: %s; the certificate expires at %s (%s);"
                    " next try in %.0fs",
                    _why(exc),
                    _fmt(not_after),
                    _left(not_after, now),
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                self.outcomes["success"] += 1
                attempt = 0

    async def renew_once(self) -> tuple[dt.datetime, dt.datetime]:
        """One renewal: new key, RenewCertificate, checks, files, reconnect; the new validity.

        Raises FleetError (the manager's refusal, an unusable answer, no
        connection) or OSError (the files could not be written); the old
        files stay in place unless all checks passed.
        """
        key_pem, csr_pem = await asyncio.to_thread(new_key_and_csr, self._identity)
        reply = await self._link.renew_certificate(
            manager_pb2.RenewCertificateRequest(node_id=self._identity.name, csr_pem=csr_pem)
        )
        ca_pem = reply.ca_pem or await asyncio.to_thread(self._tls.ca_file.read_bytes)
        try:
            loaded = await asyncio.to_thread(
                check_bundle, self._tls, ca_pem, reply.certificate_pem, key_pem, now=self._now()
            )
        except ConfigError as exc:
            raise ConfigError(
                f"the manager's new certificate is unusable, the old one stays: {exc.message}"
            ) from None
        if loaded.identity != self._identity:
            raise FleetError(
                f"the manager issued a certificate for {loaded.identity.uri}, not"
                f" {self._identity.uri}; the old one stays"
            )
        await asyncio.to_thread(self._write, key_pem, reply.certificate_pem, ca_pem)
        _, _, not_before, not_after = loaded.validity[0]
        self.validity = (not_before, not_after)
        log.info(
            "certificate of %s renewed: valid until %s; written to %s",
            self._identity,
            _fmt(not_after),
            self._tls.cert_file,
        )
        if await self._link.use_new_credentials():
            log.info("manager link moving to the renewed certificate")
        return not_before, not_after

    def _write(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
        # Key first: a reader pairing the new key with the old certificate fails its
        # check and keeps the old pair until the certificate lands too (fleet.tls).
        write_file_atomic(self._tls.key_file, key_pem, mode=0o600)
        write_file_atomic(self._tls.cert_file, cert_pem, mode=0o644)
        try:
            same = self._tls.ca_file.read_bytes() == ca_pem
        except OSError:
            same = False
        if not same:
            write_file_atomic(self._tls.ca_file, ca_pem, mode=0o644)


def _why(exc: BaseException) -> str:
    if isinstance(exc, FailedPrecondition) and not isinstance(exc, ConfigError):
        return f"the manager issues no certificates ({exc.message})"
    if isinstance(exc, ConfigError) or (isinstance(exc, FleetError) and exc.code.name == "UNKNOWN"):
        return exc.message
    if isinstance(exc, FleetError):
        return f"{exc.code.name}: {exc.message}"
    return str(exc) or type(exc).__name__
