"""The fan-out sliding window: concurrency bound, refill, max_errors, batches, cancel."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from fleet.errors import Unavailable
from manager.service.fanout import Outcome, sliding_window


class Probe:
    """Async calls that record how many run at once; targets named 'bad*' fail."""

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays = delays or {}
        self.now = 0
        self.peak = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    async def __call__(self, target: str) -> str:
        self.started.append(target)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.delays.get(target, 0.01))
            if target.startswith("bad"):
                raise Unavailable(f"{target}: failed to connect")
            self.finished.append(target)
            return target.upper()
        except asyncio.CancelledError:
            self.cancelled.append(target)
            raise
        finally:
            self.now -= 1


async def batches(targets: list[str], probe: Probe, **kw: object) -> list[list[Outcome[str, str]]]:
    return [b async for b in sliding_window(targets, probe, **kw)]  # type: ignore[arg-type]


async def collect(targets: list[str], probe: Probe, **kw: object) -> list[Outcome[str, str]]:
    return [o for batch in await batches(targets, probe, **kw) for o in batch]


async def test_never_more_than_max_concurrency_in_flight() -> None:
    """Twenty targets with a window of three never run more than three calls at once."""
    probe = Probe()
    targets = [f"t{i}" for i in range(20)]
    outcomes = await collect(targets, probe, max_concurrency=3)
    assert probe.peak == 3
    assert sorted(o.target for o in outcomes) == sorted(targets)
    assert all(o.kind == "ok" and o.value == o.target.upper() for o in outcomes)


async def test_window_slides_instead_of_batching() -> None:
    """A slow target does not hold the others back: the free slot is refilled at once."""
    probe = Probe({"slow": 0.5})
    targets = ["slow", *[f"t{i}" for i in range(10)]]
    outcomes = await collect(targets, probe, max_concurrency=2)
    # In batches of two, t1..t9 would only start after "slow" finished.
    assert [o.target for o in outcomes][-1] == "slow"
    assert probe.peak == 2


async def test_max_errors_stops_launching_and_skips_the_rest() -> None:
    """After two failures nothing new starts; the untouched targets come back SKIPPED."""
    probe = Probe()
    targets = ["bad1", "bad2", "t1", "t2", "t3"]
    outcomes = await collect(targets, probe, max_concurrency=1, max_errors=2)
    kinds = [(o.target, o.kind) for o in outcomes]
    assert kinds == [
        ("bad1", "failed"),
        ("bad2", "failed"),
        ("t1", "skipped"),
        ("t2", "skipped"),
        ("t3", "skipped"),
    ]
    assert probe.started == ["bad1", "bad2"]
    assert "bad1: failed to connect" in outcomes[0].error
    assert "max_errors 2" in outcomes[2].error


async def test_in_flight_calls_finish_when_max_errors_is_reached() -> None:
    """Calls already running when the limit is hit are reported, not abandoned."""
    probe = Probe({"bad": 0.01, "t1": 0.1})
    outcomes = await collect(["bad", "t1", "t2"], probe, max_concurrency=2, max_errors=1)
    assert {(o.target, o.kind) for o in outcomes} == {
        ("bad", "failed"),
        ("t1", "ok"),
        ("t2", "skipped"),
    }


async def test_zero_max_errors_means_no_limit() -> None:
    """With max_errors 0 every target is attempted, however many fail."""
    probe = Probe()
    targets = ["bad1", "bad2", "bad3", "t1"]
    outcomes = await collect(targets, probe, max_concurrency=2, max_errors=0)
    assert sorted(probe.started) == sorted(targets)
    assert sum(o.kind == "failed" for o in outcomes) == 3


async def test_closing_the_stream_cancels_in_flight_and_launches_nothing_more() -> None:
    """A client that goes away after the first outcome stops the rollout there."""
    probe = Probe({"t0": 0.01, "t1": 5.0, "t2": 5.0})
    targets = [f"t{i}" for i in range(10)]
    async with aclosing(sliding_window(targets, probe, max_concurrency=3)) as stream:
        first = await anext(stream)
    assert [o.target for o in first] == ["t0"]
    # t3 refilled the window before t0 was yielded; it is cancelled, perhaps before it ran.
    assert {"t1", "t2"} <= set(probe.cancelled)
    assert set(probe.started) <= {"t0", "t1", "t2", "t3"}
    assert probe.finished == ["t0"]
    assert probe.now == 0


async def test_task_cancellation_stops_the_rollout() -> None:
    """Cancelling the consumer (a dropped RPC) cancels the calls in flight."""
    probe = Probe(dict.fromkeys(("t0", "t1"), 5.0))

    async def consume() -> None:
        async with aclosing(sliding_window(["t0", "t1", "t2"], probe, max_concurrency=2)) as s:
            async for _ in s:
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(probe.cancelled) == ["t0", "t1"]
    assert "t2" not in probe.started


@pytest.mark.parametrize(("conc", "errors"), [(0, 0), (1, -1)])
async def test_bad_limits_are_refused(conc: int, errors: int) -> None:
    """A window below one or a negative error budget is a ValueError naming it."""
    with pytest.raises(ValueError, match="max_"):
        await collect(["t"], Probe(), max_concurrency=conc, max_errors=errors)


async def test_empty_target_list_yields_nothing() -> None:
    """No targets, no outcomes, no calls."""
    probe = Probe()
    assert await collect([], probe, max_concurrency=4) == []
    assert probe.started == []


async def test_outcomes_finished_while_the_consumer_is_busy_come_together() -> None:
    """A consumer still sending one batch gets everything that finished meanwhile in the next."""
    probe = Probe({"t0": 0.01, **{f"t{i}": 0.05 for i in range(1, 6)}})
    seen: list[list[str]] = []
    targets = [f"t{i}" for i in range(6)]
    async with aclosing(sliding_window(targets, probe, max_concurrency=6)) as stream:
        async for batch in stream:
            seen.append([o.target for o in batch])
            await asyncio.sleep(0.3)  # busy: t1..t5 all finish meanwhile
    assert seen == [["t0"], ["t1", "t2", "t3", "t4", "t5"]]


async def test_the_window_keeps_sliding_while_the_consumer_is_busy() -> None:
    """A consumer busy with one batch does not hold the window: freed slots refill meanwhile."""
    probe = Probe()
    targets = [f"t{i}" for i in range(5)]
    seen: list[list[str]] = []
    async with aclosing(sliding_window(targets, probe, max_concurrency=1)) as stream:
        async for batch in stream:
            seen.append([o.target for o in batch])
            await asyncio.sleep(0.3)  # busy: t1..t4 run one after the other meanwhile
    assert seen == [["t0"], ["t1", "t2", "t3", "t4"]]
    assert probe.peak == 1


async def test_batch_interval_gathers_outcomes_but_refills_at_once() -> None:
    """Held for a batch, outcomes still free their slot at once: the window keeps sliding."""
    probe = Probe()
    targets = [f"t{i}" for i in range(5)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await batches(targets, probe, max_concurrency=1, batch_interval=5.0)
    # One at a time, each 10 ms; the batch is yielded when nothing is left running.
    assert loop.time() - start < 2.0
    assert [[o.target for o in b] for b in got] == [targets]


async def test_a_held_batch_is_yielded_when_due_while_calls_still_run() -> None:
    """An outcome waits at most batch_interval, however long the other calls take."""
    probe = Probe({"fast": 0.01, "slow": 1.0})
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[tuple[list[str], float]] = []
    async for batch in sliding_window(
        ["fast", "slow"], probe, max_concurrency=2, batch_interval=0.1
    ):
        seen.append(([o.target for o in batch], loop.time() - start))
    assert [t for t, _ in seen] == [["fast"], ["slow"]]
    assert 0.1 <= seen[0][1] < 0.6  # held for the interval, not until "slow" ended
    assert seen[1][1] >= 1.0
