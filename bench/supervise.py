"""fleet-daemon against supervisord on the same programs, in one run.

    .venv/bin/python bench/supervise.py            # full run (~2-3 minutes)
    .venv/bin/python bench/supervise.py --smoke    # tiny run for the test suite

Both supervisors run as real processes (`python -m daemon.cli` and
`supervisord -n`) supervising the same commands. Printed:

1. crash-to-respawn latency p50/p99: a bash program that appends
   `$EPOCHREALTIME` (a builtin, no fork) to a file and exits 3; restarted at
   once by both (daemon: restart=always, start_secs=0; supervisord:
   autorestart=true, startsecs=0). Latency = gap between consecutive
   timestamps, i.e. exit -> reap -> respawn -> bash start-up (the last part is
   the same for both).
2. wall time from launching the supervisor to all N agents running (each
   agent touches a marker file, then execs sleep).
3. idle CPU (% of one core) and RSS of the supervisor process with 20 agents,
   the daemon at its shipped defaults (its sampling interval is printed).
4. the daemon's CPU with 100 agents sampled at 1 Hz (target <= 3% of one
   core), next to supervisord's with the same 100 agents.
5. the gRPC floor: idle CPU and RSS of a process that only serves an empty
   grpc.aio server (no TLS, no services, no agents), measured the same way.
   Any supervisor that serves gRPC in its own process costs at least this;
   it is printed next to supervisord's so the idle targets can be judged.

CPU is the on-CPU time of all the supervisor's threads from
/proc/<pid>/task/*/schedstat (nanoseconds), not clock ticks (10 ms), so an
idle supervisord's figure is a real number and the ratio means something.

Every figure is printed with supervisord's and the ratio daemon/supervisord.
The machine is shared: run it once, note the load average printed at the end.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import itertools
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.pki import CertificateAuthority  # noqa: E402

BASH = shutil.which("bash") or "/bin/bash"
SLEEP = shutil.which("sleep") or "/bin/sleep"
# A sleep duration unique to this run (a valid number, ~12 days): it marks our
# agents so leftovers can be found and killed after `exec sleep` replaced bash.
MARK = f"{1_000_000 + os.getpid()}.{random.randint(100_000, 999_999)}"


@dataclass(frozen=True)
class Program:
    """One supervised program: name and argv."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Sizes:
    """How big each part of the run is."""

    crash_seconds: float
    start_agents: int
    idle_agents: int
    idle_seconds: float
    sample_agents: int
    sample_seconds: float
    settle_seconds: float


FULL = Sizes(20.0, 100, 20, 10.0, 100, 20.0, 3.0)
SMOKE = Sizes(3.0, 4, 3, 1.0, 4, 1.0, 0.5)


def _toml_list(items: tuple[str, ...]) -> str:
    return (
        "["
        + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
        + "]"
    )


class Supervisor(abc.ABC):
    """Starts one supervisor process over `programs` in its own directory."""

    name = ""

    def __init__(
        self,
        work: Path,
        programs: list[Program],
        *,
        crash: bool,
        sample_interval: float | None = None,
    ) -> None:
        self.work = work
        self.programs = programs
        self.crash = crash
        self.sample_interval = sample_interval  # None: the daemon's default
        work.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line that starts this supervisor."""

    def start(self) -> None:
        with open(self.work / "supervisor.err", "ab") as err:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_leftovers(self.work)


class Daemon(Supervisor):
    """fleet-daemon with a throwaway node certificate and no reachable manager."""

    name = "fleet-daemon"

    def command(self) -> list[str]:
        tls = CertificateAuthority.create().issue("node", "bench").write(self.work / "tls")
        agents = "".join(
            f'[[agents]]\nid = "{p.name}"\nargv = {_toml_list(p.argv)}\n'
            + (
                'restart = "always"\nstart_secs = 0.0\nmax_retries = 1000000\n'
                if self.crash
                else "start_secs = 0.0\n"
            )
            for p in self.programs
        )
        interval = (
            f"sample_interval_seconds = {self.sample_interval}"
            if self.sample_interval is not None
            else ""
        )
        cfg = self.work / "daemon.toml"
        cfg.write_text(
            f"""
listen = "127.0.0.1:0"
state_dir = "{self.work}/state"
run_dir = "{self.work}/run"
log_dir = "{self.work}/log"
metrics_listen = ""
log_level = "warning"
stop_agents_on_exit = true
{interval}
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["127.0.0.1:1"]
{agents}
"""
        )
        return [sys.executable, "-m", "daemon.cli", "--config", str(cfg)]


class Supervisord(Supervisor):
    """supervisord (PyPI `supervisor`) in the foreground."""

    name = "supervisord"

    def command(self) -> list[str]:
        lines = [
            "[supervisord]",
            "nodaemon=true",
            f"logfile={self.work}/supervisord.log",
            f"pidfile={self.work}/supervisord.pid",
            f"childlogdir={self.work}",
            "loglevel=warn",
        ]
        for p in self.programs:
            lines += [
                f"[program:{p.name}]",
                "command=" + " ".join(_sd_quote(a) for a in p.argv),
                "autostart=true",
                "autorestart=true",
                "startsecs=0",
                "startretries=1000000",
                f"stdout_logfile={self.work}/{p.name}.log",
                "redirect_stderr=true",
                "stopasgroup=true",
                "killasgroup=true",
            ]
        conf = self.work / "supervisord.conf"
        conf.write_text("\n".join(lines) + "\n")
        exe = Path(sys.executable).parent / "supervisord"
        return [str(exe), "-n", "-c", str(conf)]


def _sd_quote(arg: str) -> str:
    # supervisord splits `command` with shlex.
    import shlex

    return shlex.quote(arg)


def _kill_leftovers(work: Path) -> None:
    marker = str(work)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part or part == MARK for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


def _count_marked() -> int:
    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        with suppress(psutil.Error):
            count += MARK in (proc.info["cmdline"] or [])
    return count


@contextmanager
def running(sup: Supervisor) -> Iterator[Supervisor]:
    sup.start()
    try:
        yield sup
    finally:
        sup.stop()


def _wait_files(directory: Path, count: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if len(list(directory.iterdir())) >= count:
            return time.monotonic()
        time.sleep(0.005)
    raise RuntimeError(
        f"only {len(list(directory.iterdir()))}/{count} agents started in {timeout}s"
    )


def _cpu_ns(pid: int) -> dict[str, int]:
    """Nanoseconds on CPU of each live thread of `pid` (schedstat's first field)."""
    times: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(OSError):  # the thread ended just now
            times[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return times


def _default_sample_interval() -> float:
    from daemon.config import DaemonConfig

    field = {f.name: f for f in dataclasses.fields(DaemonConfig)}["sample_interval_seconds"]
    return float(field.default)  # type: ignore[arg-type]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the four measurements ---------------------------------------------------


def crash_latency(cls: type[Supervisor], root: Path, seconds: float) -> list[float]:
    """Gaps (ms) between consecutive starts of a program that exits at once."""
    stamps = root / "stamps"
    script = f'echo "$EPOCHREALTIME" >> {stamps}; exit 3'
    sup = cls(root / "sup", [Program("crasher", (BASH, "-c", script))], crash=True)
    with running(sup):
        deadline = time.monotonic() + 120
        while not stamps.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the supervisor is still starting up
        time.sleep(seconds)
    times = [float(x) for x in stamps.read_text().split()] if stamps.exists() else []
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def start_wall(cls: type[Supervisor], root: Path, n: int) -> float:
    """Seconds from launching the supervisor to all n agents running."""
    marks = root / "marks"
    marks.mkdir(parents=True)
    programs = [
        Program(f"a{i}", (BASH, "-c", f"touch {marks}/a{i}; exec {SLEEP} {MARK}")) for i in range(n)
    ]
    sup = cls(root / "sup", programs, crash=False)
    t0 = time.monotonic()
    with running(sup):
        done = _wait_files(marks, n, timeout=300)
    return done - t0


def idle_cost(
    cls: type[Supervisor],
    root: Path,
    n: int,
    window: float,
    settle: float,
    sample_interval: float | None = None,
) -> tuple[float, int]:
    """(% of one core, RSS bytes) of the supervisor process with n idle agents."""
    marks = root / "marks"
    marks.mkdir(parents=True)
    programs = [
        Program(f"i{i}", (BASH, "-c", f"touch {marks}/i{i}; exec {SLEEP} {MARK}")) for i in range(n)
    ]
    sup = cls(root / "sup", programs, crash=False, sample_interval=sample_interval)
    with running(sup):
        _wait_files(marks, n, timeout=300)
        time.sleep(settle)
        cost = _idle_window(sup.name, sup.pid, window)
        alive = _count_marked()
        if alive != n:  # a crash-looping agent would make this no idle measurement
            raise RuntimeError(f"{sup.name}: {alive}/{n} agents running after the window")
    return cost


def _idle_window(name: str, pid: int, window: float) -> tuple[float, int]:
    """(% of one core over `window` seconds, RSS bytes at its end) of process `pid`."""
    c0, t0 = _cpu_ns(pid), time.monotonic()
    time.sleep(window)
    c1, t1 = _cpu_ns(pid), time.monotonic()
    if c0.keys() - c1.keys():  # its CPU since t0 is lost: the figure would be low
        raise RuntimeError(f"{name}: a thread ended during the window; run again")
    used_ns = sum(c1[tid] - c0.get(tid, 0) for tid in c1)
    return used_ns / 1e9 / (t1 - t0) * 100, psutil.Process(pid).memory_info().rss


GRPC_FLOOR = """
import asyncio
from grpc import aio

async def main():
    server = aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""
"""An empty grpc.aio server: what serving gRPC from Python costs before any code of ours."""


def grpc_floor(window: float, settle: float) -> tuple[float, int]:
    """(% of one core, RSS bytes) of an idle process serving an empty grpc.aio server."""
    proc = subprocess.Popen(
        [sys.executable, "-c", GRPC_FLOOR], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != b"serving\n":
            raise RuntimeError(f"the bare grpc.aio server exited with {proc.wait()}")
        time.sleep(settle)
        return _idle_window("grpc.aio floor", proc.pid, window)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    kinds: list[type[Supervisor]] = [Daemon, Supervisord]
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir="/tmp"))
    results: dict[str, dict[str, float]] = {k.name: {} for k in kinds}
    try:
        for cls in kinds:
            r = results[cls.name]
            gaps = crash_latency(cls, root / cls.name / "crash", sizes.crash_seconds)
            if not gaps:
                raise RuntimeError(f"{cls.name}: only {len(gaps)} respawns measured")
            r["respawn_p50_ms"] = statistics.median(gaps)
            r["respawn_p99_ms"] = _pct(gaps, 0.99)
            r["respawns"] = len(gaps)
            r["start_wall_s"] = start_wall(cls, root / cls.name / "start", sizes.start_agents)
            cpu, rss = idle_cost(
                cls,
                root / cls.name / "idle",
                sizes.idle_agents,
                sizes.idle_seconds,
                sizes.settle_seconds,
            )
            r["idle_cpu_pct"], r["idle_rss_mib"] = cpu, rss / 2**20
            cpu100, _ = idle_cost(
                cls,
                root / cls.name / "sample",
                sizes.sample_agents,
                sizes.sample_seconds,
                sizes.settle_seconds,
                sample_interval=1.0,
            )
            r["cpu_n_agents_pct"] = cpu100
        floor_cpu, floor_rss = grpc_floor(sizes.idle_seconds, sizes.settle_seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    d, s = results["fleet-daemon"], results["supervisord"]
    every = f"{_default_sample_interval():g} s"
    rows = [
        ("crash-to-respawn p50 (ms)", "respawn_p50_ms", "target <= 0.05x"),
        ("crash-to-respawn p99 (ms)", "respawn_p99_ms", ""),
        (f"start {sizes.start_agents} agents, wall (s)", "start_wall_s", ""),
        (f"idle CPU, {sizes.idle_agents} agents (% core)", "idle_cpu_pct", "target <= 1.0x"),
        (f"idle RSS, {sizes.idle_agents} agents (MiB)", "idle_rss_mib", "target <= 1.5x"),
        (f"CPU, {sizes.sample_agents} agents @1 Hz (% core)", "cpu_n_agents_pct", "daemon <= 3%"),
    ]
    print(f"{'measure':42} {'fleet-daemon':>13} {'supervisord':>12} {'ratio':>8}  note")
    for label, key, note in rows:
        ratio = f"{d[key] / s[key]:8.3f}" if s[key] else "     n/a"  # below clock resolution
        print(f"{label:42} {d[key]:13.3f} {s[key]:12.3f} {ratio}  {note}")
    print(
        f"idle rows: the daemon at its defaults, sampling every {every}; "
        f"the {sizes.sample_agents}-agent row: sample_interval_seconds = 1.0"
    )
    floor_ratio = f"{floor_cpu / s['idle_cpu_pct']:.2f}x" if s["idle_cpu_pct"] else "n/a"
    print(
        f"gRPC floor (an empty grpc.aio server, nothing else): idle CPU {floor_cpu:.3f}% "
        f"({floor_ratio} supervisord), RSS {floor_rss / 2**20:.1f} MiB "
        f"({floor_rss / 2**20 / s['idle_rss_mib']:.2f}x supervisord)"
    )
    print(
        f"respawns measured: daemon {int(d['respawns'])}, supervisord {int(s['respawns'])}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
