"""The sampler reads /proc itself; its figures are psutil's for the same real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from daemon.sampler import Sampler


def test_tree_figures_match_psutil() -> None:
    """rss, vms, threads, fds and I/O of a real two-process tree equal psutil's readings,
    and a spinning child's cpu % is measured over the interval like psutil's."""
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'while True: pass']); "
        "time.sleep(60)"
    )
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        parent = psutil.Process(root.pid)
        deadline = time.monotonic() + 30
        while not parent.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = [parent, *parent.children()]
        sampler = Sampler(10, rescan_interval=0.0)
        sampler.track("a", root.pid)
        for p in procs:
            p.cpu_percent(None)
        sampler.sample(1)
        time.sleep(1.0)
        sampler.sample(2)
        ours = sampler.latest("a")
        theirs_cpu = sum(p.cpu_percent(None) for p in procs)
        assert ours is not None
        assert ours.processes == 2
        assert ours.threads == sum(p.num_threads() for p in procs)
        assert ours.open_files == sum(p.num_fds() for p in procs)
        assert ours.vms == sum(p.memory_info().vms for p in procs)
        assert abs(ours.rss - sum(p.memory_info().rss for p in procs)) < 1_000_000
        io = [p.io_counters() for p in procs]
        assert ours.read_bytes == sum(i.read_bytes for i in io)
        assert ours.write_bytes == sum(i.write_bytes for i in io)
        assert ours.cpu_percent > 5.0  # the spinning child, even on a busy machine
        assert abs(ours.cpu_percent - theirs_cpu) < max(25.0, theirs_cpu * 0.5)
    finally:
        for p in psutil.Process(root.pid).children():
            p.kill()
        root.kill()
        root.wait()


def test_a_gone_process_is_dropped() -> None:
    """A process that exited is not sampled again (and its cpu reading is forgotten)."""
    proc = subprocess.Popen(["sleep", "30"])
    sampler = Sampler(10, rescan_interval=0.0)
    sampler.track("a", proc.pid)
    sampler.sample(1)
    proc.kill()
    proc.wait()
    sampler.sample(2)
    assert sampler.latest("a") is not None
    assert len(sampler.samples("a")) == 1  # the second pass found nothing to sample
    assert sampler.tree_pids("a") == frozenset({proc.pid})
