"""One agent process: spawn it detached, watch it with a pidfd, stop it for good.

- Spawned with `subprocess.Popen` (its fork/exec runs in C without Python
  code in the child, so it is safe in a threaded daemon): its own session and
  process group, stdin /dev/null, stdout+stderr the log file opened O_APPEND.
  The child holds that fd, so a daemon crash loses no log line and no agent.
- Exit is detected with `os.pidfd_open` + `loop.add_reader` (no polling),
  then reaped with `waitpid(WNOHANG)`. A re-adopted agent is not our child:
  its exit code is unknown (-1).
- Orphans: an agent spawned just before a daemon crash may be missing from
  agents.json; `find_orphans` finds it by the environment the daemon gave it
  (FLEET_AGENT_ID and this daemon's FLEET_DAEMON_SOCKET) so it is adopted,
  not started a second time.
- Stop (trio's terminate-wait-kill): the stop signal to the process group and
  to any descendant that left it (then SIGCONT, so a stopped one acts on it),
  wait `stop_timeout` for all of them, then SIGKILL the group and every
  descendant seen, and wait until they are gone.
- Leftovers: once an agent's process ended (on its own or stopped), what it
  left running is ended the same way (`find_leftovers`, `end_leftovers`): the
  rest of its process group, and processes that escaped it (setsid, a double
  fork: reparented to init, no longer descendants) found by the environment
  the daemon gave the agent. One that cleared that environment and left the
  group cannot be told apart from any other process: it is not caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Awaitable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from daemon.supervisor.clock import Clock
from daemon.supervisor.spec import AgentSpec, resolve_executable

__all__ = [
    "AgentProcess",
    "SpawnError",
    "StopOutcome",
    "adopt",
    "cannot_enter",
    "daemon_env",
    "end_leftovers",
    "find_leftovers",
    "find_orphans",
    "name_processes",
    "spawn",
    "spawn_detached",
]

CREATE_TIME_TOLERANCE = 0.05
"""Seconds two create times may differ and still be the same process (clock-tick rounding)."""
_DAEMON_ONLY_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
)
"""systemd's protocol variables address the daemon's unit, not its agents: never inherited."""
KILL_WAIT = 5.0
"""Seconds to wait for SIGKILLed processes to disappear (they cannot refuse)."""


class SpawnError(RuntimeError):
    """The agent's program could not be started (exec failed, bad user, ...)."""


@dataclass(frozen=True)
class StopOutcome:
    """How a stop ended."""

    exit_code: int
    """The agent's exit code (-N for signal N, -1 unknown)."""
    killed: bool
    """True when stop_timeout passed and the group was SIGKILLed."""
    message: str
    """One line for the snapshot, e.g. "killed after stop_timeout (10s)"."""


class AgentProcess:
    """A live (or just exited) agent process and its pidfd watch."""

    def __init__(self, pid: int, create_time: float, *, adopted: bool) -> None:
        self.pid = pid
        """The agent's pid; also its process group id and session id."""
        self.create_time = create_time
        """psutil create time; with `pid` it identifies the process across pid reuse."""
        self.adopted = adopted
        """True when re-adopted after a daemon restart (not necessarily our child)."""
        self.exit_code: int | None = None
        """Set once the process has exited."""
        self.unknown_exit = False
        """True when the exit code could not be read (not our child)."""
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        self._watch()

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._reap()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        code = -1
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            # Not our child (re-adopted after a daemon restart): init reaps it.
            self.unknown_exit = True
        self.exit_code = code
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def running(self) -> bool:
        """True until the exit was detected."""
        return self.exit_code is None

    async def wait(self) -> int:
        """Wait for the exit; returns the exit code (shielded: cancelling the caller is fine)."""
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Stop watching (the daemon is shutting down and leaves the agent running)."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self._exited.done():
            self._exited.cancel()

    def tree(self) -> list[psutil.Process]:
        """The agent's descendants now (collected before signalling: they may reparent)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    async def stop(self, signum: int, grace: float, clock: Clock) -> StopOutcome:
        """Signal the group, wait `grace` seconds, then SIGKILL the group and every descendant."""
        if not self.running:
            code = self.exit_code if self.exit_code is not None else -1
            return StopOutcome(code, False, "already exited")
        descendants = self.tree()
        _signal_all(self.pid, descendants, signum)
        if signum not in (signal.SIGKILL, signal.SIGCONT):
            # A stopped process (SIGSTOP, a debugger, a hung agent frozen on purpose)
            # keeps a SIGTERM pending; continuing it lets it handle the signal now.
            _signal_all(self.pid, descendants, signal.SIGCONT)
        name = signal.Signals(signum).name
        if await _wait_procs(descendants, grace, clock, also=self.wait()):
            return StopOutcome(await self.wait(), False, f"stopped by {name}")
        descendants = _unique([*descendants, *self.tree()])
        _signal_all(self.pid, descendants, signal.SIGKILL)
        await _wait_procs(descendants, KILL_WAIT, clock, also=self.wait())
        message = f"killed after stop_timeout ({grace:g}s): did not exit on {name}"
        code = self.exit_code if self.exit_code is not None else -int(signal.SIGKILL)
        return StopOutcome(code, True, message)


def find_leftovers(pgid: int, marks: dict[str, str]) -> list[psutil.Process]:
    """Live processes in process group `pgid`, or whose environment has all of `marks`.

    Called once the process `pgid` led has ended: what is found is what it left
    behind (a background child, or one that escaped with setsid or a double fork
    but kept the environment the daemon gave the agent). Reads every process's
    environment: run it in a thread.
    """
    found: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter(["environ", "status"]):
        try:
            if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.info["environ"] or {}
            if all(env.get(k) == v for k, v in marks.items()) or os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


async def end_leftovers(
    procs: list[psutil.Process], signum: int, grace: float, clock: Clock
) -> str:
    """Stop `procs` (`signum`, `grace` seconds, SIGKILL); "" if none, else one line naming them."""
    if not procs:
        return ""
    names = name_processes(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)
            if signum not in (signal.SIGKILL, signal.SIGCONT):
                proc.send_signal(signal.SIGCONT)
    if not await _wait_procs(procs, grace, clock):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        await _wait_procs(procs, KILL_WAIT, clock)
    return f"it left {len(procs)} process(es) running, ended: pid {names}"


def name_processes(procs: list[psutil.Process]) -> str:
    """'1532 (sleep), 1535 (sleep)': read before they are signalled (a gone one has no name)."""
    names = []
    for proc in procs:
        try:
            names.append(f"{proc.pid} ({proc.name()})")
        except psutil.Error:
            names.append(str(proc.pid))
    return ", ".join(names)


async def _wait_procs(
    procs: list[psutil.Process],
    wait_s: float,
    clock: Clock,
    also: Awaitable[Any] | None = None,
) -> bool:
    """Wait (on pidfds, no polling) until all of `procs` are gone and `also` is done.

    False after `wait_s` seconds; `also` is cancelled then (the agent's own
    exit: shielded, so only this wait for it ends).
    """
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    waits: list[asyncio.Future[Any]] = [] if also is None else [asyncio.ensure_future(also)]
    for proc in procs:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            fd = os.pidfd_open(proc.pid)
        except (psutil.Error, OSError):
            continue
        fut: asyncio.Future[Any] = loop.create_future()
        loop.add_reader(fd, _set_done, fut)
        fds.append(fd)
        waits.append(fut)
    if not waits:
        return True
    sleeper = asyncio.ensure_future(clock.sleep(wait_s))
    everything: asyncio.Future[Any] = asyncio.gather(*waits)
    try:
        done, _ = await asyncio.wait({everything, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        return everything in done
    finally:
        sleeper.cancel()
        everything.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everything
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def _unique(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for proc in procs:
        seen.setdefault(proc.pid, proc)
    return list(seen.values())


def _signal_all(pgid: int, descendants: list[psutil.Process], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
    for proc in descendants:
        # psutil refuses to signal a pid that was reused by another process;
        # getpgid fails for one that exited since the tree was read.
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) != pgid:
                proc.send_signal(signum)


def _set_done(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


def spawn(spec: AgentSpec, *, log_path: Path, socket_path: Path) -> AgentProcess:
    """Start `spec` detached in its own session, writing to `log_path`; `SpawnError` on failure."""
    env = daemon_env()
    env.update(spec.env)
    env["FLEET_AGENT_ID"] = spec.id
    env["FLEET_DAEMON_SOCKET"] = str(socket_path)
    if spec.version:
        # What the spec declares, for an agent with no version of its own to report.
        env["FLEET_AGENT_VERSION"] = spec.version
    return spawn_detached(spec.argv, env=env, cwd=spec.cwd, user=spec.user, output_path=log_path)


def daemon_env() -> dict[str, str]:
    """The daemon's environment without what addresses the daemon's own unit."""
    return {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}


def spawn_detached(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: str,
    user: str,
    output_path: Path,
    pass_fds: Sequence[int] = (),
) -> AgentProcess:
    """Start `argv` in its own session, stdout+stderr appended to `output_path`.

    Shared by agents and job steps. `user` is switched to only when the
    daemon runs as root (HOME/USER/LOGNAME follow it); `SpawnError` when the
    user or program does not exist or the exec fails.
    """
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None
    if user and os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise SpawnError(f"unknown user {user!r}") from None
        uid, gid, groups = pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        # The child changes directory before it drops to the user, so it would start
        # in a directory it cannot use: say so instead.
        denied = cannot_enter(cwd, user, uid, groups) if cwd else ""
        if denied:
            raise SpawnError(denied)
    executable = resolve_executable(argv[0], env=env, cwd=cwd)
    if executable is None:
        raise SpawnError(f"program {argv[0]!r} not found or not executable")
    log_fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        popen = subprocess.Popen(  # noqa: S603 -- argv from a validated spec, never a shell
            list(argv),
            executable=executable,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd=cwd or None,
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from None
    finally:
        os.close(log_fd)
    # We watch and reap the child ourselves (pidfd + waitpid). Mark the Popen
    # finished so its __del__ neither warns nor queues it for
    # subprocess._cleanup(), which would reap our child and steal its status.
    popen.returncode = 0
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        create_time = 0.0  # exited and reaped already? the pidfd watch reports it
    try:
        return AgentProcess(popen.pid, create_time, adopted=False)
    except OSError as exc:  # e.g. out of fds for the pidfd: never leave it unwatched
        with contextlib.suppress(OSError):
            os.killpg(popen.pid, signal.SIGKILL)
            os.waitpid(popen.pid, 0)
        raise SpawnError(f"cannot watch {argv[0]!r} (pid {popen.pid}): {exc}") from None


def cannot_enter(path: str, user: str, uid: int, groups: Collection[int]) -> str:
    """Why `user` may not enter directory `path` (by mode bits, no ACLs); "" if it may."""
    if uid == 0:
        return ""
    where = Path(os.path.abspath(path))
    for directory in (*reversed(where.parents), where):
        try:
            st = os.stat(directory)
        except OSError:
            return ""  # missing: the spawn says so itself
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return (
                f"working directory {path!r}: user {user!r} may not enter {str(directory)!r}"
                f" (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
            )
    return ""


def adopt(pid: int, create_time: float) -> AgentProcess | None:
    """Watch a process from before a daemon restart if pid AND create time still match."""
    if pid <= 0:
        return None
    if not _same_process(pid, create_time):
        return None
    proc = AgentProcess(pid, create_time, adopted=True)
    # The pid could have been reused between the check and pidfd_open: check again.
    if proc.running and not _same_process(pid, create_time):
        proc.close()
        return None
    return proc if proc.running else None


def _same_process(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return (
            abs(p.create_time() - create_time) <= CREATE_TIME_TOLERANCE
            and p.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def find_orphans(
    socket_path: Path, agent_ids: Collection[str], *, exclude: Collection[int] = ()
) -> dict[str, tuple[int, float]]:
    """Live agent processes of this daemon that it has no record of: id -> (pid, create time).

    A candidate has FLEET_DAEMON_SOCKET == `socket_path` and FLEET_AGENT_ID in
    `agent_ids`, and leads its own session (as `spawn` starts agents; its
    descendants inherit the environment but not the session). When several
    match, the oldest wins. Processes we may not inspect are skipped.
    """
    wanted = set(agent_ids)
    socket = str(socket_path)
    found: dict[str, tuple[int, float]] = {}
    if not wanted:
        return found
    for proc in psutil.process_iter(["environ", "create_time", "status"]):
        try:
            env = proc.info["environ"] or {}
            agent_id = env.get("FLEET_AGENT_ID", "")
            if (
                agent_id not in wanted
                or env.get("FLEET_DAEMON_SOCKET") != socket
                or proc.pid in exclude
                or proc.info["status"] == psutil.STATUS_ZOMBIE
                or os.getsid(proc.pid) != proc.pid
            ):
                continue
        except (psutil.Error, OSError):
            continue
        created = float(proc.info["create_time"])
        if agent_id not in found or created < found[agent_id][1]:
            found[agent_id] = (proc.pid, created)
    return found
