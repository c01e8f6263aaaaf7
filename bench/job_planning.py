"""Job planning cost: the driver's `JobTargets` against walking every target each pass.

    python bench/job_planning.py                 # 500/100, 5,000/500, 20,000/500
    python bench/job_planning.py --smoke         # 50 targets, window 10

In process, no I/O: the decisions alone. One job of N targets, window W,
every node online; each pass dispatches what the plan says, then the
oldest 10 targets in flight succeed (as answers arriving between two
passes), until every target has ended. The reference is what the driver
did before `JobTargets`: `jobs.plan` over every target at every pass
(walking N targets per pass, so quadratic in N over a job). Both sides
run the same passes and must decide the same dispatches (checked); the
figure is each side's time for the whole job and their ratio.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manager.service.jobs import (
    JobLimits,
    JobTargets,
    NodeFacts,
    Target,
    TargetState,
    plan,
)

ANSWERS_PER_PASS = 10
NOW = 1_000_000.0


def _job(n: int) -> tuple[dict[str, Target], dict[str, NodeFacts]]:
    ids = [f"n{i:05d}" for i in range(n)]
    return {i: Target(i) for i in ids}, {i: NodeFacts(last_seen=NOW) for i in ids}


def run(
    n: int,
    decide: Callable[[dict[str, Target], set[str]], Sequence[str]],
    put: Callable[[Target], None],
    targets: dict[str, Target],
) -> tuple[float, list[list[str]]]:
    """Drive one job to its end; (seconds spent deciding, each pass's dispatch)."""
    in_flight: collections.deque[str] = collections.deque()
    flying: set[str] = set()
    passes: list[list[str]] = []
    spent = 0.0
    ended = 0
    while ended < n:
        t0 = time.perf_counter()
        dispatch = list(decide(targets, flying))
        spent += time.perf_counter() - t0
        passes.append(dispatch)
        in_flight.extend(dispatch)
        flying.update(dispatch)
        for _ in range(min(ANSWERS_PER_PASS, len(in_flight))):
            node_id = in_flight.popleft()
            flying.discard(node_id)
            put(Target(node_id, TargetState.SUCCESS, updated=NOW))
            ended += 1
        if not dispatch and not in_flight and ended < n:
            raise RuntimeError("stuck: nothing dispatched and nothing in flight")
    return spent, passes


def measure(n: int, window: int) -> tuple[float, float, int, int]:
    """(walking seconds, JobTargets seconds, passes, JobTargets walks) for one job."""
    limits = JobLimits(created=NOW, concurrency=window)

    walked, facts = _job(n)

    def walk(targets: dict[str, Target], flying: set[str]) -> Sequence[str]:
        return plan(targets, facts, limits, NOW, in_flight=flying).dispatch

    def put_walked(t: Target) -> None:
        walked[t.node_id] = t

    ref_s, ref_passes = run(n, walk, put_walked, walked)

    kept_targets, facts2 = _job(n)
    kept = JobTargets(kept_targets, limits)

    def keep(_: dict[str, Target], flying: set[str]) -> Sequence[str]:
        return kept.plan(facts2, NOW, in_flight=flying).dispatch

    new_s, new_passes = run(n, keep, kept.put, kept.targets)
    if new_passes != ref_passes:
        raise RuntimeError(f"{n}/{window}: JobTargets dispatched differently from plan")
    return ref_s, new_s, len(ref_passes), kept.walks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny job")
    parser.add_argument(
        "--sizes",
        default="500/100,5000/500,20000/500",
        help="comma-separated TARGETS/WINDOW pairs",
    )
    args = parser.parse_args(argv)
    sizes = "50/10" if args.smoke else args.sizes
    print("targets  window  passes  walking every pass  JobTargets (walks)  ratio")
    for pair in sizes.split(","):
        n, window = (int(x) for x in pair.split("/"))
        ref_s, new_s, passes, walks = measure(n, window)
        ratio = new_s / ref_s if ref_s else float("nan")
        print(
            f"{n:7d}  {window:6d}  {passes:6d}  {ref_s * 1000:15.1f} ms"
            f"  {new_s * 1000:9.1f} ms ({walks:3d})  {ratio:5.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
