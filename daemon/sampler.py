"""Resource sampling: each agent's process tree, and the host, with psutil.

One `Sampler.sample()` call is one pass: a single scan of /proc for parent
pids gives every agent's tree (agent + descendants) at once, instead of one
full scan per agent as `psutil.Process.children()` would do. That scan is the
biggest fixed cost (it reads every process on the host), so it runs only
every `rescan_interval` (5 s) or when the set of agents changed; in between
the known trees are sampled. New descendants therefore show up within 5 s;
exited ones drop out at once. Each process is
read inside `oneshot()`, and `psutil.Process` objects are kept across passes
(so `cpu_percent(None)` has the previous cpu times to diff against and no
object is re-created per sample). Samples go into a bounded ring buffer
(`deque(maxlen)`) per agent.

Tree totals: cpu % and the other figures are sums over the processes alive
at the sample; read/write bytes are the live processes' cumulative I/O (they
drop when a child exits); open_files counts file descriptors (`num_fds`, a
cheap listdir) rather than `open_files()` (readlink of each fd).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

__all__ = [
    "DiskStats",
    "HostSample",
    "MemoryStats",
    "NetworkStats",
    "ResourceSample",
    "Sampler",
    "children_map",
]


@dataclass(frozen=True)
class ResourceSample:
    """One sample of an agent's process tree."""

    timestamp_ms: int
    """When it was taken (Unix epoch milliseconds)."""
    cpu_percent: float
    """CPU use since the previous sample, % of one core, summed over the tree."""
    rss: int
    """Resident memory, bytes."""
    vms: int
    """Virtual memory, bytes."""
    read_bytes: int
    """Disk bytes read by the live processes of the tree."""
    write_bytes: int
    """Disk bytes written by the live processes of the tree."""
    open_files: int
    """Open file descriptors."""
    threads: int
    """Threads."""
    processes: int
    """Processes in the tree (the agent and its descendants)."""


@dataclass(frozen=True)
class MemoryStats:
    """Host memory."""

    total: int
    """Bytes of physical memory."""
    used: int
    """Bytes used."""
    available: int
    """Bytes available to new processes without swapping."""
    percent: float
    """Used, in % of total."""


@dataclass(frozen=True)
class DiskStats:
    """One filesystem's usage plus the host's disk I/O counters."""

    mount: str
    """The mount point measured (the daemon's disk_path, "/" by default)."""
    total: int
    """Bytes in the filesystem."""
    used: int
    """Bytes used."""
    percent: float
    """Used, in % of total."""
    read_bytes: int
    """Bytes read from all disks since boot."""
    write_bytes: int
    """Bytes written to all disks since boot."""


@dataclass(frozen=True)
class NetworkStats:
    """Host network counters since boot, all interfaces."""

    bytes_sent: int
    """Bytes sent."""
    bytes_recv: int
    """Bytes received."""
    packets_sent: int
    """Packets sent."""
    packets_recv: int
    """Packets received."""
    errors_in: int
    """Receive errors."""
    errors_out: int
    """Send errors."""


@dataclass(frozen=True)
class HostSample:
    """One sample of the host."""

    timestamp_ms: int
    """When it was taken (Unix epoch milliseconds)."""
    cpu_percent: float
    """CPU use of the whole host since the previous host sample, % of all cores."""
    cores: int
    """Logical CPUs the daemon may use (its affinity mask; placement capacity)."""
    memory: MemoryStats
    """Memory."""
    disk: DiskStats
    """Disk."""
    network: NetworkStats
    """Network."""


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids for every process on the host (one /proc scan)."""
    result: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # exited during the scan
        try:
            data = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        # comm may contain spaces and ")": after the last ")" come " <state> <ppid> ".
        start = data.rindex(b")") + 4
        ppid = int(data[start : data.index(b" ", start)])
        result.setdefault(ppid, []).append(int(name))
    return result


class Sampler:
    """Samples agents' process trees and the host into bounded ring buffers."""

    def __init__(
        self, buffer_size: int = 3600, *, disk_path: str = "/", rescan_interval: float = 5.0
    ) -> None:
        self._buffer_size = buffer_size
        self._disk_path = disk_path
        self._rescan_ms = int(rescan_interval * 1000)
        self._last_scan_ms: int | None = None
        self._scanned_roots: dict[str, int] = {}
        self._roots: dict[str, int] = {}
        self._buffers: dict[str, deque[ResourceSample]] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._trees: dict[str, frozenset[int]] = {}
        psutil.cpu_percent(None)  # prime the host cpu counter

    def track(self, agent_id: str, pid: int) -> None:
        """Sample `pid`'s tree as `agent_id` from the next pass (keeps the agent's buffer)."""
        self._roots[agent_id] = pid
        self._buffers.setdefault(agent_id, deque(maxlen=self._buffer_size))

    def untrack(self, agent_id: str, *, forget: bool = False) -> None:
        """Stop sampling `agent_id`; `forget` also drops its buffer (agent removed)."""
        self._roots.pop(agent_id, None)
        self._trees.pop(agent_id, None)
        if forget:
            self._buffers.pop(agent_id, None)

    def tree_pids(self, agent_id: str) -> frozenset[int]:
        """Pids of `agent_id`'s tree at the last pass."""
        return self._trees.get(agent_id, frozenset())

    def sample(self, now_ms: int) -> None:
        """One pass over every tracked agent's tree."""
        if not self._roots:
            self._procs.clear()
            return
        rescan = (
            self._last_scan_ms is None
            or now_ms - self._last_scan_ms >= self._rescan_ms
            or now_ms < self._last_scan_ms  # the wall clock was stepped back
            or self._scanned_roots != self._roots
        )
        kids = children_map() if rescan else {}
        if rescan:
            self._last_scan_ms = now_ms
            self._scanned_roots = dict(self._roots)
        seen: set[int] = set()
        for agent_id, root in self._roots.items():
            tree = _tree(root, kids) if rescan else self._trees.get(agent_id, frozenset([root]))
            seen.update(tree)
            self._trees[agent_id] = frozenset(tree)
            sample = self._sample_tree(tree, now_ms)
            if sample is not None:
                self._buffers[agent_id].append(sample)
        for pid in [p for p in self._procs if p not in seen]:
            del self._procs[pid]

    def _sample_tree(self, pids: Iterable[int], now_ms: int) -> ResourceSample | None:
        cpu = 0.0
        rss = vms = rd = wr = fds = threads = count = 0
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    mem = proc.memory_info()
                    rss += mem.rss
                    vms += mem.vms
                    threads += proc.num_threads()
                    with contextlib.suppress(psutil.AccessDenied):
                        io = proc.io_counters()
                        rd += io.read_bytes
                        wr += io.write_bytes
                    with contextlib.suppress(psutil.AccessDenied):
                        fds += proc.num_fds()
                count += 1
            except psutil.Error:
                self._procs.pop(pid, None)  # gone (or a zombie) since the scan
        if count == 0:
            return None
        return ResourceSample(now_ms, round(cpu, 2), rss, vms, rd, wr, fds, threads, count)

    def samples(self, agent_id: str, since_ms: int = 0) -> list[ResourceSample]:
        """Buffered samples of `agent_id` taken at or after `since_ms`, oldest first."""
        buffer = self._buffers.get(agent_id)
        if not buffer:
            return []
        return [s for s in buffer if s.timestamp_ms >= since_ms]

    def latest(self, agent_id: str) -> ResourceSample | None:
        """The newest sample of `agent_id`, if any."""
        buffer = self._buffers.get(agent_id)
        return buffer[-1] if buffer else None

    def host_sample(self, now_ms: int) -> HostSample:
        """Sample the host now (cpu % is since the previous call)."""
        vm = psutil.virtual_memory()
        du = psutil.disk_usage(self._disk_path)
        dio = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        return HostSample(
            timestamp_ms=now_ms,
            cpu_percent=psutil.cpu_percent(None),
            cores=len(os.sched_getaffinity(0)),
            memory=MemoryStats(vm.total, vm.used, vm.available, vm.percent),
            disk=DiskStats(
                self._disk_path,
                du.total,
                du.used,
                du.percent,
                dio.read_bytes if dio else 0,
                dio.write_bytes if dio else 0,
            ),
            network=NetworkStats(
                net.bytes_sent,
                net.bytes_recv,
                net.packets_sent,
                net.packets_recv,
                net.errin,
                net.errout,
            ),
        )


def _tree(root: int, kids: dict[int, list[int]]) -> list[int]:
    tree = [root]
    i = 0
    while i < len(tree):
        tree.extend(kids.get(tree[i], ()))
        i += 1
    return tree
