"""Enrollment's pure decisions: token usability, name scope, certificate times, the rate limit."""

from __future__ import annotations

import math

import pytest

from fleet.errors import InvalidArgument, PermissionDenied
from manager.service.enrollment import (
    CLOCK_SKEW_MS,
    EnrollLimiter,
    TokenBucket,
    TokenFacts,
    check_new_key,
    check_scope,
    check_token_request,
    is_revoked,
    new_not_before,
    revocation_cutoff,
    token_problem,
    token_state,
)
from manager.service.self_renewal import renewal_due

NOW = 1_800_000_000_123
USABLE = TokenFacts(expires_ms=NOW + 1000, uses_left=1, revoked_ms=0)


@pytest.mark.parametrize(
    ("token", "secret_ok", "problem"),
    [
        (USABLE, True, None),
        (None, True, "unknown"),
        (USABLE, False, "unknown"),
        (TokenFacts(NOW, 1, 0), True, "expired"),
        (TokenFacts(NOW + 1, 0, 0), True, "used up"),
        (TokenFacts(NOW + 1, 1, NOW - 5), True, "revoked"),
        (TokenFacts(NOW - 1, 0, NOW - 5), True, "revoked"),
    ],
)
def test_token_problem(token: TokenFacts | None, secret_ok: bool, problem: str | None) -> None:
    """Unknown, wrong secret, expired (at the instant), used up, revoked (wins) or usable."""
    assert token_problem(token, secret_ok=secret_ok, now_ms=NOW) == problem


def test_token_state_for_listing() -> None:
    """A usable token reads "usable"; others their problem."""
    assert token_state(USABLE, NOW) == "usable"
    assert token_state(TokenFacts(NOW, 3, 0), NOW) == "expired"


def test_node_name_token_enrolls_only_its_name_existing_or_revoked() -> None:
    """A --node-name token enrolls that name, new, existing or revoked, and no other."""
    for exists, revoked in [(False, False), (True, False), (True, True), (False, True)]:
        check_scope(node_name="web-1", name_prefix="", name="web-1", exists=exists, revoked=revoked)
    with pytest.raises(PermissionDenied, match="enrolls only node web-1, not web-2"):
        check_scope(node_name="web-1", name_prefix="", name="web-2", exists=False, revoked=False)


@pytest.mark.parametrize("prefix", ["", "web-"])
def test_prefix_and_any_name_tokens_enroll_only_new_names(prefix: str) -> None:
    """Without a node name, an existing or revoked name needs a --node-name token."""
    check_scope(node_name="", name_prefix=prefix, name="web-1", exists=False, revoked=False)
    with pytest.raises(PermissionDenied) as exists:
        check_scope(node_name="", name_prefix=prefix, name="web-1", exists=True, revoked=False)
    assert exists.value.message == (
        "node web-1 already exists; enrolling it again needs a token made with"
        " `fleetctl tokens create --node-name web-1`"
    )
    with pytest.raises(
        PermissionDenied, match=r"web-1 was revoked; .*`fleetctl tokens create --node-name web-1`"
    ):
        check_scope(node_name="", name_prefix=prefix, name="web-1", exists=False, revoked=True)


def test_prefix_token_refuses_other_names() -> None:
    """A prefix token refuses a name outside its prefix."""
    with pytest.raises(PermissionDenied, match="starting with 'web-', not db-1"):
        check_scope(node_name="", name_prefix="web-", name="db-1", exists=False, revoked=False)


def test_revocation_cutoff_is_the_next_whole_second() -> None:
    """Strictly after now, on a second boundary (X.509 times are whole seconds)."""
    assert revocation_cutoff(1_000_123) == 1_001_000
    assert revocation_cutoff(1_000_000) == 1_001_000


def test_new_certificate_passes_the_deny_list_and_old_ones_do_not() -> None:
    """A certificate issued right after a revocation starts at the cutoff (accepted,
    inclusive); one issued just before starts before it (refused)."""
    revoked_at = NOW
    cutoff = revocation_cutoff(revoked_at)
    old = new_not_before(revoked_at - 1)
    new = new_not_before(revoked_at + 1, cutoff)
    assert is_revoked(old, cutoff)
    assert new == cutoff
    assert not is_revoked(new, cutoff)
    later = NOW + 10 * CLOCK_SKEW_MS
    assert new_not_before(later, cutoff) == (later - CLOCK_SKEW_MS) // 1000 * 1000


def test_not_before_is_back_dated_to_a_whole_second() -> None:
    """Without a revocation, five minutes back, rounded down to the second."""
    assert new_not_before(NOW) == (NOW - CLOCK_SKEW_MS) // 1000 * 1000
    assert new_not_before(NOW) % 1000 == 0


@pytest.mark.parametrize("lifetime_s", [45, 600, 3600, 7 * 86400])
def test_a_short_lifetime_is_back_dated_by_a_tenth_of_it_and_not_due_at_once(
    lifetime_s: int,
) -> None:
    """Back-dated min(5 min, lifetime / 10): a 45 s certificate is not due for renewal (two
    thirds from notBefore, minus the daemon's jitter) when it is issued, nor a 7-day one."""
    lifetime_ms = lifetime_s * 1000
    not_before = new_not_before(NOW, lifetime_ms=lifetime_ms)
    skew = min(CLOCK_SKEW_MS, lifetime_ms // 10)
    assert not_before == (NOW - skew) // 1000 * 1000
    span = NOW + lifetime_ms - not_before
    earliest_renewal = not_before + span * (2 / 3 - 0.05)
    assert earliest_renewal - NOW > lifetime_ms / 2
    assert new_not_before(NOW, NOW + 500, lifetime_ms=lifetime_ms) == NOW + 500, "cutoff wins"


def test_renewal_needs_a_new_key() -> None:
    """The CSR's key equal to the certificate in use is INVALID_ARGUMENT."""
    check_new_key(b"new", b"old")
    with pytest.raises(InvalidArgument, match="renewal needs a new key"):
        check_new_key(b"same", b"same")


def _request(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "node_name": "",
        "name_prefix": "",
        "labels": {},
        "ttl_seconds": 0.0,
        "uses": 0,
        "description": "",
        "max_ttl_days": 30.0,
    }
    base.update(changes)
    return base


def test_token_request_defaults() -> None:
    """ttl 0 is an hour, uses 0 is one."""
    spec = check_token_request(**_request())  # type: ignore[arg-type]
    assert spec.ttl_ms == 3_600_000
    assert spec.uses == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"node_name": "a", "name_prefix": "b"}, "name_prefix: give node_name or name_prefix"),
        ({"node_name": "Web_1"}, "node_name: invalid node id 'Web_1'"),
        ({"name_prefix": "-web"}, "name_prefix: invalid name prefix '-web'"),
        ({"name_prefix": "w" * 64}, "name_prefix: invalid name prefix"),
        ({"labels": {"bad key!": "x"}}, "labels: "),
        ({"ttl_seconds": -1.0}, "ttl: must be positive"),
        ({"ttl_seconds": math.nan}, "ttl: must be positive"),
        ({"ttl_seconds": math.inf}, "ttl: at most 30 days"),
        ({"ttl_seconds": 31 * 86400.0}, "ttl: at most 30 days (the manager's"),
        ({"uses": 10_001}, "uses: must be 1..10000"),
        ({"uses": -1}, "uses: must be 1..10000"),
        ({"description": "a\x00b"}, "description: at most 1024 characters, without NUL"),
    ],
)
def test_bad_token_requests_name_the_field(changes: dict[str, object], needle: str) -> None:
    """Each bad field is INVALID_ARGUMENT naming it."""
    with pytest.raises(InvalidArgument) as err:
        check_token_request(**_request(**changes))  # type: ignore[arg-type]
    assert needle in err.value.message


def test_prefix_may_end_with_a_dash() -> None:
    """'web-' is a valid start of a name."""
    assert check_token_request(**_request(name_prefix="web-")).name_prefix == "web-"  # type: ignore[arg-type]


def test_token_bucket_refills_at_its_rate() -> None:
    """burst at once, then one per 1/rate seconds; `wait` says how long."""
    bucket = TokenBucket(rate=2.0, burst=2, at=100.0)
    for _ in range(2):
        assert bucket.wait(100.0) == 0
        bucket.take()
    assert bucket.wait(100.0) == pytest.approx(0.5)
    assert bucket.wait(100.5) == 0


def test_limiter_per_caller_share_and_global_ceiling() -> None:
    """One caller gets a tenth of the burst (at least 1); all callers together the burst."""
    limiter = EnrollLimiter(rate=5.0, burst=20)
    assert limiter.per_caller() == (1.0, 2.0)
    assert [limiter.admit("10.0.0.1", 0.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.admit("10.0.0.1", 0.0) == pytest.approx(1.0)
    for i in range(9):  # other callers spend the rest of the global burst
        assert limiter.admit(f"10.0.1.{i}", 0.0) == 0.0
        assert limiter.admit(f"10.0.1.{i}", 0.0) == 0.0
    assert limiter.admit("10.0.2.1", 0.0) > 0, "the global bucket is empty"
    assert limiter.admit("10.0.2.1", 1.0) == 0.0, "refilled at 5/s"


def test_limiter_forgets_refilled_callers_when_full() -> None:
    """Past max_callers, buckets that refilled are dropped to make room."""
    limiter = EnrollLimiter(rate=1000.0, burst=1000, max_callers=2)
    limiter.admit("a", 0.0)
    limiter.admit("b", 0.0)
    assert limiter.admit("c", 100.0) == 0.0
    assert set(limiter._callers) == {"c"}


def test_the_manager_renews_its_certificate_at_two_thirds() -> None:
    """Due from two thirds of the lifetime on."""
    assert not renewal_due(0.0, 300.0, 199.9)
    assert renewal_due(0.0, 300.0, 200.0)
    assert renewal_due(0.0, 300.0, 400.0)
