"""Enrollment decisions as pure functions of plain values and `now` (epoch ms).

- Whether a join token can be spent (`token_problem`): the caller of
  Enroll only ever learns `INVALID_TOKEN` (one message for unknown,
  expired, used up and revoked, so tokens cannot be probed); the precise
  reason goes to the manager's log, the metrics label and the event.
- Whether a token may enroll a name (`check_scope`): a token made for one
  node name enrolls that name only, and is the only kind that may enroll a
  name that exists or was revoked; prefix and any-name tokens enroll new
  names only.
- Certificate times: the revocation cutoff (`revocation_cutoff`, the next
  whole second, since X.509 times are whole seconds), the notBefore of a
  new certificate (`new_not_before`: back-dated for clock skew, by at most
  a tenth of its lifetime, but never before the node's cutoff, so a
  re-enrolled node's new certificate passes the deny list while its old
  ones do not), and `is_revoked`.
- Renewal (`check_new_key`): the CSR must carry a new key.
- What an operator may ask of a token (`check_token_request`).
- The enrollment rate limit: token buckets, global and per caller IP
  (`EnrollLimiter`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fleet.errors import InvalidArgument, PermissionDenied
from fleet.labels import MAX_NAME_LENGTH, validate_labels, validate_node_id

__all__ = [
    "CLOCK_SKEW_MS",
    "DEFAULT_TOKEN_TTL_SECONDS",
    "INVALID_TOKEN",
    "MAX_DESCRIPTION",
    "MAX_TOKEN_USES",
    "EnrollLimiter",
    "TokenBucket",
    "TokenFacts",
    "TokenProblem",
    "TokenSpec",
    "check_new_key",
    "check_scope",
    "check_token_request",
    "is_revoked",
    "new_not_before",
    "revocation_cutoff",
    "token_problem",
    "token_state",
]

INVALID_TOKEN = "the join token is not valid (unknown, expired, used up or revoked)"  # noqa: S105
"""What an enrolling host is told for every unusable token."""

CLOCK_SKEW_MS = 5 * 60 * 1000
"""New certificates start this far in the past, for hosts with a slow clock (as fleet.pki)."""

DEFAULT_TOKEN_TTL_SECONDS = 3600.0
"""A token created without a ttl is valid for an hour."""

MAX_TOKEN_USES = 10_000
"""Most enrollments one token may allow."""

MAX_DESCRIPTION = 1024
"""Longest token description (characters)."""

TokenProblem = Literal["unknown", "expired", "used up", "revoked"]
"""Why a token cannot be spent (for the log, metrics and events; never for the caller)."""

_PREFIX_RE = re.compile(r"[a-z0-9][-a-z0-9]*")


@dataclass(frozen=True)
class TokenFacts:
    """What decides whether a stored token can be spent."""

    expires_ms: int
    """When it stops being valid."""
    uses_left: int
    """Enrollments left."""
    revoked_ms: int
    """When it was revoked; 0: not revoked."""


def token_problem(token: TokenFacts | None, *, secret_ok: bool, now_ms: int) -> TokenProblem | None:
    """Why `token` cannot enroll now (None: it can). A wrong secret is "unknown".

    Revoked wins over expired and used up: it is what the operator did last.
    """
    if token is None or not secret_ok:
        return "unknown"
    if token.revoked_ms:
        return "revoked"
    if now_ms >= token.expires_ms:
        return "expired"
    if token.uses_left <= 0:
        return "used up"
    return None


def token_state(token: TokenFacts, now_ms: int) -> Literal["usable"] | TokenProblem:
    """How `fleetctl tokens list` describes a stored token."""
    return token_problem(token, secret_ok=True, now_ms=now_ms) or "usable"


def reenroll_refusal(name: str, what: str) -> str:
    """The refusal for an existing or revoked `name`, with the whole command that fixes it."""
    return (
        f"node {name} {what}; enrolling it again needs a token made with"
        f" `fleetctl tokens create --node-name {name}`"
    )


def check_scope(
    *, node_name: str, name_prefix: str, name: str, exists: bool, revoked: bool
) -> None:
    """PermissionDenied unless a token for `node_name` / `name_prefix` may enroll `name`.

    `exists`: a node record `name` exists; `revoked`: `name` was revoked.
    """
    if node_name:
        if name != node_name:
            raise PermissionDenied(f"this join token enrolls only node {node_name}, not {name}")
        return
    if name_prefix and not name.startswith(name_prefix):
        raise PermissionDenied(
            f"this join token enrolls only new names starting with {name_prefix!r}, not {name}"
        )
    if exists or revoked:
        what = "already exists" if exists else "was revoked"
        raise PermissionDenied(reenroll_refusal(name, what))


def revocation_cutoff(now_ms: int) -> int:
    """The cutoff recorded when a node is revoked at `now_ms`: the next whole second.

    Certificate times are whole seconds; every certificate issued until now
    starts at or before `now` (back-dated, in fact), so strictly before this.
    """
    return (now_ms // 1000 + 1) * 1000


def new_not_before(now_ms: int, cutoff_ms: int = 0, *, lifetime_ms: int | None = None) -> int:
    """The notBefore (epoch ms, whole seconds) of a certificate issued at `now_ms`.

    Back-dated by `CLOCK_SKEW_MS`, at most a tenth of `lifetime_ms` (the time
    from issue to notAfter; None: no limit), but not before the node's
    revocation cutoff (0: none), so the new certificate passes the deny list.
    The limit keeps a short-lived certificate's renewal point (two thirds from
    notBefore, daemon.renewal) in the future: five minutes back, a lifetime
    under ten minutes would be due for renewal as soon as it is issued.
    """
    skew = CLOCK_SKEW_MS if lifetime_ms is None else min(CLOCK_SKEW_MS, lifetime_ms // 10)
    skewed = (now_ms - skew) // 1000 * 1000
    return max(skewed, cutoff_ms)


def is_revoked(not_before_ms: int, cutoff_ms: int) -> bool:
    """True if a certificate starting at `not_before_ms` is refused by a cutoff.

    Inclusive for the new certificate: one starting exactly at the cutoff passes.
    """
    return not_before_ms < cutoff_ms


def check_new_key(csr_key_der: bytes, current_key_der: bytes) -> None:
    """InvalidArgument if a renewal's CSR carries the key of the certificate in use."""
    if csr_key_der == current_key_der:
        raise InvalidArgument(
            "renewal needs a new key: the CSR's key is the one of the certificate in use",
            field="csr_pem",
        )


@dataclass(frozen=True)
class TokenSpec:
    """A CreateJoinToken request, checked and with defaults applied."""

    node_name: str
    """The one name it enrolls, or ""."""
    name_prefix: str
    """The prefix new names must have, or ""."""
    labels: Mapping[str, str]
    """Granted as operator labels."""
    ttl_ms: int
    """Validity from creation."""
    uses: int
    """Enrollments it allows."""
    description: str
    """Free text for the operator."""


def check_token_request(
    *,
    node_name: str,
    name_prefix: str,
    labels: Mapping[str, str],
    ttl_seconds: float,
    uses: int,
    description: str,
    max_ttl_days: float,
) -> TokenSpec:
    """The token to create; InvalidArgument naming the field that is wrong."""
    if node_name and name_prefix:
        raise InvalidArgument(
            "give node_name or name_prefix, not both (node_name enrolls exactly that name)",
            field="name_prefix",
        )
    if node_name:
        validate_node_id(node_name, field="node_name")
    if name_prefix and (
        len(name_prefix) > MAX_NAME_LENGTH or not _PREFIX_RE.fullmatch(name_prefix)
    ):
        raise InvalidArgument(
            f"invalid name prefix {name_prefix[:70]!r}: must start a valid node name"
            " (lower case letters, digits and '-', starting with a letter or digit,"
            f" at most {MAX_NAME_LENGTH} characters)",
            field="name_prefix",
        )
    validate_labels(labels, field="labels")
    if math.isnan(ttl_seconds) or ttl_seconds < 0:
        raise InvalidArgument(f"must be positive (0: one hour), got {ttl_seconds}", field="ttl")
    ttl = ttl_seconds or DEFAULT_TOKEN_TTL_SECONDS
    if ttl > max_ttl_days * 86400:
        raise InvalidArgument(
            f"at most {_days(max_ttl_days)} (the manager's enroll.max_token_ttl_days),"
            f" got {_days(ttl / 86400)}",
            field="ttl",
        )
    uses = uses or 1
    if not 1 <= uses <= MAX_TOKEN_USES:
        raise InvalidArgument(f"must be 1..{MAX_TOKEN_USES} (0: one), got {uses}", field="uses")
    if len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise InvalidArgument(
            f"at most {MAX_DESCRIPTION} characters, without NUL", field="description"
        )
    return TokenSpec(
        node_name=node_name,
        name_prefix=name_prefix,
        labels=dict(labels),
        ttl_ms=max(1, round(ttl * 1000)),
        uses=uses,
        description=description,
    )


# --- the rate limit -----------------------------------------------------------------------


@dataclass
class TokenBucket:
    """`rate` attempts per second, up to `burst` at once. Time is a parameter."""

    rate: float
    """Refill per second."""
    burst: float
    """Capacity."""
    tokens: float = -1.0
    """Attempts available (starts full)."""
    at: float = 0.0
    """When `tokens` was last computed."""

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def wait(self, now: float) -> float:
        """Seconds until one attempt is available (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        """Spend one attempt (after `wait` said 0)."""
        self.tokens -= 1

    def full(self, now: float) -> bool:
        """True if it refilled completely (it can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.burst


@dataclass
class EnrollLimiter:
    """The global bucket and one per caller IP (a tenth of it, at least 1/s and 1).

    Per-IP buckets that refilled are forgotten, so the map holds only recent
    callers; past `max_callers` of them, new callers share the global bucket alone.
    """

    rate: float
    """Global attempts per second."""
    burst: int
    """Global attempts at once."""
    max_callers: int = 10_000
    """Most per-IP buckets kept."""
    _global: TokenBucket = field(init=False)
    _callers: dict[str, TokenBucket] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._global = TokenBucket(self.rate, self.burst)

    def per_caller(self) -> tuple[float, float]:
        """(rate, burst) of each caller's bucket."""
        return max(1.0, self.rate / 10), max(1.0, self.burst / 10)

    def admit(self, peer: str, now: float) -> float:
        """0 if an attempt from `peer` may go ahead (and spend it), else seconds to wait."""
        bucket = self._callers.get(peer)
        if bucket is None:
            if len(self._callers) >= self.max_callers:
                self._forget_full(now)
            if len(self._callers) < self.max_callers:
                rate, burst = self.per_caller()
                bucket = self._callers[peer] = TokenBucket(rate, burst, at=now)
        wait = max(self._global.wait(now), bucket.wait(now) if bucket is not None else 0.0)
        if wait > 0:
            return wait
        self._global.take()
        if bucket is not None:
            bucket.take()
        return 0.0

    def _forget_full(self, now: float) -> None:
        for peer in [p for p, b in self._callers.items() if b.full(now)]:
            del self._callers[peer]


def _days(days: float) -> str:
    return f"{days:.4g} day" if days == 1 else f"{days:.4g} days"
