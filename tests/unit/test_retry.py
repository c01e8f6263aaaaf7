"""fleet.retry: the pure backoff policy and the tenacity retry loop built on it."""

from __future__ import annotations

import random
import socket
import statistics
import time

import grpc
import pytest
import tenacity

from fleet.errors import InvalidArgument, Unavailable, from_rpc_error
from fleet.retry import Backoff, is_unavailable, retrying


def test_delay_without_jitter_grows_and_is_capped() -> None:
    """With jitter off, delays are initial * multiplier**attempt up to the maximum."""
    backoff = Backoff(initial=0.1, multiplier=2.0, maximum=1.0, jitter="none")
    delays = [backoff.delay(n) for n in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_delay_for_a_huge_attempt_is_the_maximum() -> None:
    """A float overflow far past the cap still yields the cap, not an error."""
    assert Backoff(maximum=30.0, jitter="none").delay(100_000) == 30.0
    assert 0.0 <= Backoff(maximum=30.0).delay(100_000, random.Random(1)) <= 30.0


def test_full_jitter_is_uniform_below_the_ceiling() -> None:
    """Full jitter draws from [0, ceiling], spread across it, and is repeatable with a seed."""
    backoff = Backoff(initial=1.0, multiplier=2.0, maximum=4.0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)]:
        samples = [backoff.delay(attempt, random.Random(seed)) for seed in range(2000)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert statistics.fmean(samples) == pytest.approx(ceiling / 2, rel=0.1)
        assert max(samples) > 0.9 * ceiling
    assert backoff.delay(3, random.Random(7)) == backoff.delay(3, random.Random(7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1.0}, "initial must be >= 0"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"initial": 5.0, "maximum": 1.0}, "maximum"),
    ],
)
def test_nonsense_backoff_is_rejected(kwargs: dict[str, float], message: str) -> None:
    """A backoff that would shrink or go negative is refused at construction."""
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_negative_attempt_is_rejected() -> None:
    """Attempt numbers are 0-based; a negative one is a caller bug."""
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        Backoff().delay(-1)


class Flaky:
    """A call that raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def down(n: int) -> list[BaseException]:
    return [Unavailable(f"down {i}") for i in range(1, n + 1)]


async def run(loop: tenacity.AsyncRetrying, call: Flaky) -> str:
    async for attempt in loop:
        with attempt:
            return call()
    raise AssertionError("the retry loop ended without an outcome")


async def test_retrying_sleeps_exactly_the_backoff_delays() -> None:
    """The tenacity loop waits Backoff.delay(0), delay(1), ... between attempts."""
    backoff = Backoff(initial=0.1, multiplier=3.0, maximum=0.5, jitter="none")
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    loop = retrying(backoff, retry_if=is_unavailable, max_attempts=5).copy(sleep=record)
    with pytest.raises(Unavailable, match="down 5"):
        await run(loop, Flaky(*down(9)))
    assert slept == pytest.approx([backoff.delay(n) for n in range(4)])


async def test_full_jitter_waits_stay_below_the_ceilings() -> None:
    """With full jitter each wait is within [0, Backoff.ceiling(attempt)]."""
    backoff = Backoff(initial=0.1, multiplier=2.0, maximum=0.3)
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    loop = retrying(backoff, retry_if=is_unavailable, max_attempts=6).copy(sleep=record)
    with pytest.raises(Unavailable):
        await run(loop, Flaky(*down(9)))
    assert len(slept) == 5
    assert all(0 <= s <= backoff.ceiling(n) for n, s in enumerate(slept))


async def test_retrying_succeeds_after_transient_failures() -> None:
    """Two UNAVAILABLE failures then success: the caller gets the result."""
    call = Flaky(*down(2))
    loop = retrying(Backoff(initial=0.001, maximum=0.01), retry_if=is_unavailable)
    assert await run(loop, call) == "ok"
    assert call.calls == 3


async def test_non_retryable_error_is_raised_at_once() -> None:
    """An error retry_if rejects is not retried and surfaces unchanged."""
    call = Flaky(InvalidArgument("bad"))
    with pytest.raises(InvalidArgument, match="bad"):
        await run(retrying(Backoff(initial=0.001), retry_if=is_unavailable), call)
    assert call.calls == 1


async def test_max_attempts_reraises_the_last_error() -> None:
    """After max_attempts failures the last error itself is raised (not RetryError)."""
    call = Flaky(*down(9))
    loop = retrying(Backoff(initial=0.001, maximum=0.001), retry_if=is_unavailable, max_attempts=3)
    with pytest.raises(Unavailable, match="down 3"):
        await run(loop, call)
    assert call.calls == 3


async def test_deadline_stops_before_a_wait_would_pass_it() -> None:
    """A wait that would end past the deadline is not started; the error surfaces now."""
    call = Flaky(*down(9))
    backoff = Backoff(initial=10.0, maximum=10.0, jitter="none")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="down 1"):
        await run(retrying(backoff, retry_if=is_unavailable, deadline=1), call)
    assert call.calls == 1
    assert time.monotonic() - started < 1.0


def test_max_attempts_must_be_positive() -> None:
    """Zero attempts would never call the block; refuse it."""
    with pytest.raises(ValueError, match="max_attempts"):
        retrying(Backoff(), retry_if=is_unavailable, max_attempts=0)


async def test_is_unavailable_for_a_real_refused_connection() -> None:
    """A gRPC call to a closed loopback port is UNAVAILABLE; other codes are not."""
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/fleet.test.Nothing/Call",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            await call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert is_unavailable(info.value)
    assert is_unavailable(from_rpc_error(info.value))
    assert not is_unavailable(InvalidArgument("x"))
    assert not is_unavailable(OSError("x"))
