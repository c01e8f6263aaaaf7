"""The cyclic garbage collector's settings for a serving manager."""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "settle_gc"]

GEN0_THRESHOLD = 20_000
"""Allocations (net) between young collections; Python's default is 700."""


def settle_gc() -> None:
    """Once the manager serves: freeze what is alive and collect less often.

    Everything alive now (modules, classes, the server's long-lived state) lives as
    long as the process: frozen, the full collections no longer traverse it (they
    did every ~15 s for ~200 ms of CPU at 5,000 nodes, the heartbeat's tail
    latency). A job's dispatch allocates a few objects per call and answer (gRPC
    calls, rows, messages), nearly all freed by reference counting: at the default
    threshold the collector ran about 30 times per 500-target job, 8-50 ms of the
    manager's ~300 ms of CPU (bench/jobs.py); at 20,000 the garbage is mostly gone
    before a young collection looks, and the older generations follow less often.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
