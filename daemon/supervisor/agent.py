"""One supervised agent: its state, its process, and the task that restarts it.

An `Agent` owns at most one `AgentProcess` and one runner task. The runner
waits start_secs (STARTING -> RUNNING; with start_secs = 0 the spawn itself
makes it RUNNING, one change), waits for the exit, asks
`policy.decide_after_exit` what next, and sleeps out backoff delays, all on
the injected clock. Operator actions (start/stop/restart) and spec changes
take the agent's lock, cancel the runner (it only ever waits; state changes
happen between awaits, so cancelling it is safe) and act on the process.
Every state change goes through `states.transition`, so an impossible move
raises instead of corrupting the agent.

Health (`daemon.supervisor.health.judge` decides, for every kind of check):
while RUNNING, the runner also sleeps (on the clock) until the heartbeat
deadline (`policy.heartbeat_deadline`); a heartbeat only moves the deadline,
and a runner that wakes early goes back to sleep until the new one. For a
probe check (http, tcp, command) the runner keeps a prober task beside it
that runs one probe (`daemon.supervisor.probes`) every interval and records
the result. When the agent turns UNHEALTHY it is reported and logged and,
if `policy.restarts_when_unhealthy`, a separate task restarts it under the
agent's lock (the restart cancels the runner, so the runner cannot do it
itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.sampler import Sampler
from daemon.supervisor.clock import Clock
from daemon.supervisor.health import Health, Probes, Verdict, judge, next_probe_at, record
from daemon.supervisor.logs import log_path
from daemon.supervisor.policy import (
    READOPT_GRACE,
    Action,
    ExitKind,
    LastExit,
    backoff_delay,
    decide_after_exit,
    exit_of_process,
    heartbeat_deadline,
    restarts_when_unhealthy,
    woke_stalled,
)
from daemon.supervisor.probes import run_probe
from daemon.supervisor.process import (
    AgentProcess,
    SpawnError,
    end_leftovers,
    find_leftovers,
    spawn,
)
from daemon.supervisor.spec import AgentSpec, HealthSpec
from daemon.supervisor.states import AgentStatus, Event, transition
from fleet.agentspec import PROBE_KINDS

__all__ = ["OPERATOR_STOP", "Agent", "AgentSnapshot", "Cause", "Context", "Health"]

log = logging.getLogger(__name__)
S = AgentStatus
Cause = tuple[ExitKind, str]
"""Why the daemon stops an agent's process: recorded as its LastExit."""
OPERATOR_STOP: Cause = ("operator", "stopped by an operator")


@dataclass(frozen=True)
class AgentSnapshot:
    """What an agent looks like right now (what ListAgents and SyncAgentStates carry)."""

    id: str
    """The agent's id."""
    type: str
    """Its spec's type."""
    status: AgentStatus
    """Lifecycle state."""
    pid: int
    """Pid of its process, 0 when none."""
    version: str
    """Version the agent registered with through the SDK, else its spec's version."""
    start_time_ms: int
    """When the current (or last) process started, epoch ms; 0 if never."""
    restart_count: int
    """Automatic and operator restarts so far."""
    last_heartbeat_ms: int
    """Last SDK register/heartbeat, epoch ms; 0 if never."""
    exit_code: int
    """Exit code of the last exit (-N: signal N, -1: unknown); 0 if it never exited."""
    last_exit: LastExit | None
    """How and when the last process ended (None if none ever did)."""
    message: str
    """One line on what happened last (e.g. the backoff, or "killed after stop_timeout")."""
    labels: dict[str, str]
    """Its spec's labels."""
    health: Health
    """"none" without a health check or process; else pending/healthy/unhealthy."""
    backoff_until_ms: int
    """In BACKOFF: when the next start happens, epoch ms; else 0."""
    config_version: int
    """Version of the config payload (bumps on each config change)."""
    revision: int = 0
    """Definition revision of its spec (0: the host's own agent)."""
    health_message: str = ""
    """Why the health check fails (while unhealthy, or pending after a failed probe)."""
    health_since_ms: int = 0
    """When `health` last changed, epoch ms; 0 if never."""
    log_problem: str = ""
    """Why its output is being lost (its log's filesystem is full); "" when it is not."""
    health_age_ms: int | None = None
    """How long ago `health` last changed, by the monotonic clock; None if never."""
    start_age_ms: int | None = None
    """How long ago the current (or last) process started, by the monotonic clock; None if
    never. The manager turns both into times on its own clock: the host's may be off."""


@dataclass(frozen=True)
class Context:
    """What every agent shares with its supervisor."""

    clock: Clock
    """Time and sleeps."""
    log_dir: Path
    """Where <id>.log files go."""
    socket_path: Path
    """The AgentService socket, passed to agents as FLEET_DAEMON_SOCKET."""
    sampler: Sampler
    """Samples the trees of running agents."""
    changed: Callable[[Agent], None]
    """Called after every visible change (persist + notify)."""
    restarted: Callable[[], None]
    """Called on each restart (the restarts_total counter)."""


class Agent:
    """State and process of one agent (see the module docstring)."""

    def __init__(self, spec: AgentSpec, ctx: Context) -> None:
        self.spec = spec
        self.started_spec = spec
        """The spec the current process was started with (its stop settings apply)."""
        self.ctx = ctx
        self.status = S.STOPPED
        self.proc: AgentProcess | None = None
        self.retries = 0
        self.restart_count = 0
        self.exit_code = 0
        self.last_exit: LastExit | None = None
        self.message = ""
        self.start_time = 0.0
        self.start_mono = 0.0
        """`start_time` on the monotonic clock (what `start_age_ms` is measured from)."""
        self.backoff_until = 0.0
        self.last_heartbeat = 0.0
        self.watched_since = 0.0
        """When the daemon began watching the current process (start or re-adoption)."""
        self.watch_grace = 0.0
        """Least time to the first heartbeat since `watched_since` (re-adoption: READOPT_GRACE)."""
        self.registered_version = ""
        self.config_version = 1
        self.operator_stopped = False
        self.removing = False
        self.health: Health = "none"
        self.health_message = ""
        self.health_since = 0.0
        """When `health` last changed."""
        self.health_since_mono = 0.0
        """`health_since` on the monotonic clock (what `health_age_ms` is measured from)."""
        self.probes = Probes()
        """What the probes of the current process said so far."""
        self.unhealthy_restarts = 0
        """Restarts by the health check since the agent was last healthy (paces them)."""
        self.unhealthy_delay = 0.0
        """Backoff before the pending health-check restart (0: at once)."""
        self.lock = asyncio.Lock()
        self.config_changed = asyncio.Event()
        self.log_problem = ""
        """Why its output is being lost ("": it is not); the supervisor watches the space."""
        self._runner: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self._restart_next = False

    # --- reading -----------------------------------------------------------

    def snapshot(self) -> AgentSnapshot:
        """The agent as ListAgents shows it."""
        proc = self.proc
        return AgentSnapshot(
            id=self.spec.id,
            type=self.spec.type,
            status=self.status,
            pid=proc.pid if proc is not None and proc.running else 0,
            version=self.registered_version or self.spec.version,
            start_time_ms=_ms(self.start_time),
            restart_count=self.restart_count,
            last_heartbeat_ms=_ms(self.last_heartbeat),
            exit_code=self.exit_code,
            last_exit=self.last_exit,
            message=self.message,
            labels=dict(self.spec.labels),
            health=self.health,
            backoff_until_ms=_ms(self.backoff_until) if self.status is S.BACKOFF else 0,
            config_version=self.config_version,
            revision=self.spec.revision,
            health_message=self.health_message,
            health_since_ms=_ms(self.health_since),
            log_problem=self.log_problem,
            health_age_ms=self._age_ms(self.health_since, self.health_since_mono),
            start_age_ms=self._age_ms(self.start_time, self.start_mono),
        )

    def _age_ms(self, wall: float, mono: float) -> int | None:
        """Ms since the moment stamped `wall` (and `mono`), by the monotonic clock."""
        if wall <= 0:
            return None
        return max(0, int((self.ctx.clock.monotonic() - mono) * 1000))

    def health_deadline(self) -> float | None:
        """When the heartbeat check fails without a further heartbeat; None without one."""
        if self.spec.health.kind != "heartbeat" or self.status not in (S.STARTING, S.RUNNING):
            return None
        return heartbeat_deadline(
            last_heartbeat=self.last_heartbeat,
            watched_since=self.watched_since,
            timeout=self.spec.health.timeout,
            grace=self.watch_grace,
        )

    def verdict(self, now: float) -> Verdict:
        """Health (and why not healthy) from the spec's check, for a live process."""
        return judge(
            self.spec.health,
            live=self.status in (S.STARTING, S.RUNNING),
            now=now,
            last_heartbeat=self.last_heartbeat,
            watched_since=self.watched_since,
            grace=self.watch_grace,
            probes=self.probes,
        )

    def _set_health(self, verdict: Verdict) -> bool:
        """Take `verdict` as the agent's health; True if health or its reason changed."""
        if verdict.health != self.health:
            self.health_since = self.ctx.clock.now()
            self.health_since_mono = self.ctx.clock.monotonic()
        if verdict.health == "healthy":
            self.unhealthy_restarts = 0
        changed = (verdict.health, verdict.reason) != (self.health, self.health_message)
        self.health, self.health_message = verdict.health, verdict.reason
        return changed

    def heartbeat(self) -> None:
        """An SDK register/heartbeat arrived: move the deadline, recompute health."""
        self.last_heartbeat = self.ctx.clock.now()
        self._poke.set()
        self.refresh_health()

    def refresh_health(self) -> bool:
        """Recompute health; True (and a change notification) if it changed."""
        if not self._set_health(self.verdict(self.ctx.clock.now())):
            return False
        self.ctx.changed(self)
        return True

    # --- state changes ------------------------------------------------------

    def _to(self, event: Event, message: str | None = None) -> None:
        self.status = transition(self.status, event)
        if message is not None:
            self.message = message
        self._set_health(self.verdict(self.ctx.clock.now()))
        log.info("agent %s: %s -> %s %s", self.spec.id, event.value, self.status.value, message)
        self.ctx.changed(self)

    def _started(self) -> None:
        """A process start (or a failed one) is now."""
        self.start_time = self.ctx.clock.now()
        self.start_mono = self.ctx.clock.monotonic()

    def _spawn_now(self) -> AgentProcess | None:
        """Start a process (SPAWN); on failure apply the backoff decision and return None."""
        spec = self.spec
        self.ctx.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = spawn(
                spec,
                log_path=log_path(self.ctx.log_dir, spec.id),
                socket_path=self.ctx.socket_path,
            )
        except SpawnError as exc:
            self.status = transition(self.status, Event.SPAWN)
            self._started()
            self._ended(LastExit("start_failed", -1, f"start failed: {exc}", self.start_time))
            self._decide(-1, 0.0, adopted=False, failed=str(exc))
            return None
        self.proc = proc
        self.started_spec = spec
        self._started()
        self.watched_since = self.start_time
        self.watch_grace = 0.0
        self.registered_version = ""  # a new process: the spec's version until it registers
        self.probes = Probes()
        self.ctx.sampler.track(spec.id, proc.pid)
        if spec.start_secs > 0:
            self._to(Event.SPAWN, f"started with pid {proc.pid}")
            return proc
        # start_secs = 0: a process that exists is started. RUNNING now, in one change,
        # not in the runner's next turn: a PushUpdate answered right after this apply
        # can honestly say RUNNING.
        self.status = transition(self.status, Event.SPAWN)
        self.retries = 0
        self._to(Event.STARTED, f"running with pid {proc.pid}")
        return proc

    def adopt(
        self, proc: AgentProcess, started_spec: AgentSpec, start_time: float, *, version: str = ""
    ) -> None:
        """Take over a live process found after a daemon restart, and watch it; `version`:
        what the process said it is when it registered, if the daemon recorded it."""
        self.proc = proc
        self.started_spec = started_spec
        self.start_time = start_time
        # How long it ran before this daemon, by this host's wall clock (one reading).
        self.start_mono = self.ctx.clock.monotonic() - max(0.0, self.ctx.clock.now() - start_time)
        self.registered_version = version
        # Its heartbeats paused while no daemon ran: count from now, with room to reconnect.
        self.watched_since = self.ctx.clock.now()
        self.watch_grace = READOPT_GRACE
        self.probes = Probes()
        self.ctx.sampler.track(self.spec.id, proc.pid)
        self._to(Event.ADOPT, f"re-adopted pid {proc.pid} after a daemon restart")
        self._start_runner(proc)

    async def _without_leftovers(self, proc: AgentProcess, how: LastExit) -> LastExit:
        """End what the ended `proc` left running (its group, setsid escapees); say so in `how`.

        As systemd's KillMode=control-group: a program that daemonizes (forks and
        exits) would otherwise leak a copy on every restart, unseen.
        """
        marks = {"FLEET_AGENT_ID": self.spec.id, "FLEET_DAEMON_SOCKET": str(self.ctx.socket_path)}
        left = await asyncio.to_thread(find_leftovers, proc.pid, marks)
        if not left:
            return how
        spec = self.started_spec
        note = await end_leftovers(left, spec.stop_signum, spec.stop_timeout, self.ctx.clock)
        log.warning("agent %s (pid %d) ended: %s", self.spec.id, proc.pid, note)
        return dataclasses.replace(how, reason=f"{how.reason}; {note}")

    def _ended(self, how: LastExit) -> None:
        """Record the end of a process (shown until the next one ends)."""
        self.last_exit = how
        self.exit_code = how.code
        log.info("agent %s: %s", self.spec.id, how.reason)

    def _decide(self, code: int, ran_for: float, *, adopted: bool, failed: str = "") -> None:
        decision = decide_after_exit(
            self.spec, code, ran_for, self.retries, adopted=adopted, spawn_error=failed
        )
        message = decision.message
        self.retries = decision.retries
        self._restart_next = decision.action is Action.RESTART
        if decision.action in (Action.BACKOFF, Action.FATAL):
            early = Event.SPAWN_FAILED if failed else Event.EXITED_EARLY
            self.backoff_until = self.ctx.clock.now() + decision.delay
            self._to(early, message)
            if decision.action is Action.FATAL:
                self._to(Event.GIVE_UP, message)
        else:
            self._to(Event.EXITED, message)

    async def _watch(self, proc: AgentProcess) -> None:
        """Wait start_secs (STARTING -> RUNNING) and the exit, then decide what next."""
        if self.status is S.STARTING:
            remaining = self.start_time + self.spec.start_secs - self.ctx.clock.now()
            waiter = asyncio.ensure_future(proc.wait())
            sleeper = asyncio.ensure_future(self.ctx.clock.sleep(remaining))
            try:
                await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
            if proc.running:
                self.retries = 0
                self._to(Event.STARTED, f"running with pid {proc.pid}")
        code = await self._wait_exit(proc)
        ran_for = self.ctx.clock.now() - self.start_time
        if self.status is S.RUNNING:
            ran_for = max(ran_for, self.spec.start_secs)  # it made it past start_secs
        how = exit_of_process(code, self.ctx.clock.now(), adopted=proc.unknown_exit)
        self._ended(await self._without_leftovers(proc, how))
        self.proc = None
        self.ctx.sampler.untrack(self.spec.id)
        self._decide(code, ran_for, adopted=proc.unknown_exit)

    async def _wait_exit(self, proc: AgentProcess) -> int:
        """Wait for the exit; meanwhile sleep to each heartbeat deadline (the watchdog)."""
        exited = asyncio.ensure_future(proc.wait())
        handled: float | None = None  # the deadline already acted on
        prober: asyncio.Task[None] | None = None
        probed: HealthSpec | None = None  # the check `prober` runs
        try:
            while not exited.done():
                if self.spec.health != probed:  # started, or the check changed in place
                    if prober is not None:
                        prober.cancel()
                        self.probes = Probes()
                        self.refresh_health()
                    probed, prober = self.spec.health, None
                    if probed.kind in PROBE_KINDS:
                        prober = asyncio.create_task(
                            self._probe_loop(proc, probed), name=f"agent-{self.spec.id}-probe"
                        )
                self._poke.clear()
                # A heartbeat or a spec change pokes: re-time from the new deadline.
                waits: set[asyncio.Future[Any]] = {exited, asyncio.ensure_future(self._poke.wait())}
                deadline = self.health_deadline()
                if deadline is not None and deadline != handled:
                    waits.add(asyncio.ensure_future(self._sleep_until(deadline)))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits - {exited}:
                        waiter.cancel()
                if exited.done():
                    break
                deadline = self.health_deadline()
                now = self.ctx.clock.now()
                if deadline is not None and now >= deadline and deadline != handled:
                    if woke_stalled(deadline, now):
                        self._stalled(now - deadline)
                        continue
                    handled = deadline
                    self._set_health(self.verdict(now))
                    self._unhealthy(proc)
        finally:
            exited.cancel()
            if prober is not None:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
        return await proc.wait()

    def _stalled(self, late: float) -> None:
        """The watchdog woke `late` s past the heartbeat deadline: this daemon was not running
        meanwhile, and the agent's heartbeats wait in its socket. Watch afresh, as after a
        re-adoption: pending until heard, restarted only if still silent after the grace."""
        self.watched_since = self.ctx.clock.now()
        self.watch_grace = READOPT_GRACE
        log.warning(
            "agent %s: the daemon itself was stalled %.1f s past the heartbeat deadline;"
            " waiting up to %.0f s for a heartbeat before judging the agent",
            self.spec.id,
            late,
            max(self.spec.health.timeout, READOPT_GRACE),
        )
        self.refresh_health()

    async def _probe_loop(self, proc: AgentProcess, check: HealthSpec) -> None:
        """Probe every interval while `proc` runs; act when the agent turns unhealthy."""
        probing_since = self.ctx.clock.now()
        while proc.running:
            await self._sleep_until(next_probe_at(check, self.probes, probing_since=probing_since))
            result = await run_probe(check, self.spec)
            if self.proc is not proc or not proc.running or self.spec.health != check:
                return  # it exited or changed meanwhile: this result says nothing
            # Time the schedule on the supervisor's clock (the probe's own stamp is wall time).
            self.probes = record(self.probes, dataclasses.replace(result, at=self.ctx.clock.now()))
            was = self.health
            if not self._set_health(self.verdict(self.ctx.clock.now())):
                continue
            if self.health == "unhealthy" and was != "unhealthy":
                self._unhealthy(proc)
                continue
            if self.health == "unhealthy":  # failing another way now
                self.message = self._unhealthy_line()
            elif self.health == "healthy" and was == "unhealthy":
                self.message = f"healthy again: {result.detail}"
            self.ctx.changed(self)

    async def _sleep_until(self, deadline: float) -> None:
        # Read the time when the sleep begins, not when it was scheduled.
        await self.ctx.clock.sleep(deadline - self.ctx.clock.now())

    def _unhealthy_line(self) -> str:
        if restarts_when_unhealthy(self.spec):
            delay = self.unhealthy_delay
            what = f"restarting in {delay:.1f}s (backoff)" if delay > 0 else "restarting"
        elif self.spec.restart == "never":
            what = "left running (restart = never)"
        else:
            what = "left running (restart_when_unhealthy = false)"
        return f"unhealthy: {self.health_message}; {what}"

    def _unhealthy(self, proc: AgentProcess) -> None:
        """The agent turned UNHEALTHY: report it; restart it if its spec says so."""
        restart = restarts_when_unhealthy(self.spec)
        # The first restart is at once; one that never got healthy again backs off.
        n = self.unhealthy_restarts
        self.unhealthy_delay = backoff_delay(n - 1, self.spec.backoff) if restart and n else 0.0
        self.message = self._unhealthy_line()
        log.warning("agent %s (pid %d): %s", self.spec.id, proc.pid, self.message)
        self.ctx.changed(self)
        if restart:
            self._recovery = asyncio.create_task(
                self._restart_hung(proc), name=f"agent-{self.spec.id}-watchdog"
            )

    async def _restart_hung(self, proc: AgentProcess) -> None:
        if self.unhealthy_delay > 0:
            await self.ctx.clock.sleep(self.unhealthy_delay)
        async with self.lock:
            # An operator, a spec change or a late heartbeat may have dealt with it meanwhile.
            if self.proc is not proc or not proc.running or self.health != "unhealthy":
                return
            if self.spec.health.kind == "heartbeat":
                silent = self.ctx.clock.now() - max(self.last_heartbeat, self.watched_since)
                why = f"killed by the health check after {silent:.1f} s without a heartbeat"
            else:
                why = f"killed by the health check: {self.health_message}"
            self.unhealthy_restarts += 1
            try:
                await self.restart(cause=("unhealthy", why))
            except Exception as exc:  # say so in the snapshot instead of dying silently
                log.exception("agent %s: restart of the hung agent failed", self.spec.id)
                self._to(Event.LOST, f"restart of the unhealthy agent failed: {exc!r}")

    async def _run(self, proc: AgentProcess | None) -> None:
        while True:
            if proc is not None:
                await self._watch(proc)
            if self.status is S.BACKOFF:
                await self.ctx.clock.sleep(self.backoff_until - self.ctx.clock.now())
            elif not (self.status is S.EXITED and self._restart_next):
                return
            self.restart_count += 1
            self.ctx.restarted()
            proc = self._spawn_now()

    def _start_runner(self, proc: AgentProcess | None) -> None:
        task = asyncio.create_task(self._run(proc), name=f"agent-{self.spec.id}")
        task.add_done_callback(self._runner_done)
        self._runner = task

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the supervisor: say so in the snapshot instead of dying silently.
        exc = task.exception()
        log.error("agent %s: supervision failed", self.spec.id, exc_info=exc)
        self._to(Event.LOST, f"supervision failed (a bug, please report): {exc!r}")

    async def _cancel_runner(self) -> None:
        task, self._runner = self._runner, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- operations (callers hold self.lock) --------------------------------

    async def start(self) -> None:
        """Start unless already starting/running; resets the retry count."""
        self.operator_stopped = False
        if self.status in (S.STARTING, S.RUNNING) and self.proc is not None and self.proc.running:
            return
        await self._cancel_runner()
        if self.status in (S.STARTING, S.RUNNING, S.UNKNOWN):
            await self._stop_process(OPERATOR_STOP)  # it just exited, or we lost track of it
        self.retries = 0
        proc = self._spawn_now()
        self._start_runner(proc)

    async def stop(self, *, operator: bool = True, cause: Cause = OPERATOR_STOP) -> None:
        """Stop the process group (escalating to SIGKILL) and end in STOPPED.

        `operator` keeps it stopped across daemon restarts; `cause` is recorded
        as the last exit (an operator, the health check, a new spec, ...).
        """
        if operator:
            self.operator_stopped = True
        await self._cancel_runner()
        await self._stop_process(cause)

    async def _stop_process(self, cause: Cause) -> None:
        proc = self.proc
        if self.status in (S.STARTING, S.RUNNING, S.UNKNOWN):
            self._to(Event.STOP, "stopping")
            if proc is not None and proc.running:
                spec = self.started_spec
                outcome = await proc.stop(spec.stop_signum, spec.stop_timeout, self.ctx.clock)
                kind, why = cause
                if outcome.killed:
                    why = f"{why} ({outcome.message})"
                how = LastExit(kind, outcome.exit_code, why, self.ctx.clock.now())
                self._ended(await self._without_leftovers(proc, how))
                message = outcome.message
            else:
                if proc is not None:  # it ended on its own just before; that is its last exit
                    code = await proc.wait()
                    now = self.ctx.clock.now()
                    how = exit_of_process(code, now, adopted=proc.unknown_exit)
                    self._ended(await self._without_leftovers(proc, how))
                message = "stopped (had already exited)"
            self.proc = None
            self.ctx.sampler.untrack(self.spec.id)
            self._to(Event.STOPPED, message)
        elif self.status is not S.STOPPED:
            self._to(Event.STOP, "stopped")

    async def restart(self, *, cause: Cause = ("operator", "restarted by an operator")) -> None:
        """Stop (if running) and start again with the current spec; `cause` as for stop."""
        was_running = self.proc is not None and self.proc.running
        await self.stop(operator=False, cause=cause)
        if was_running:
            self.restart_count += 1
            self.ctx.restarted()
        await self.start()

    async def detach(self) -> None:
        """Stop supervising but leave the process running (daemon shutdown)."""
        await self._cancel_runner()
        recovery, self._recovery = self._recovery, None
        if recovery is not None and recovery is not asyncio.current_task():
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
        if self.proc is not None:
            self.proc.close()

    def set_spec(self, spec: AgentSpec) -> None:
        """Swap in a spec that needs no restart; bumps config_version when config changed."""
        old, self.spec = self.spec, spec
        if old.health != spec.health:
            self.probes = Probes()  # results of another check say nothing of this one
        if old.config != spec.config:
            self.config_version += 1
            self.wake_config_watchers()
        self._set_health(self.verdict(self.ctx.clock.now()))
        self._poke.set()  # the health check may have changed: the watchdog re-times itself
        self.ctx.changed(self)

    def wake_config_watchers(self) -> None:
        """Wake `watch_config` waiters (config changed or agent removed)."""
        event, self.config_changed = self.config_changed, asyncio.Event()
        event.set()


def _ms(seconds: float) -> int:
    return int(seconds * 1000) if seconds > 0 else 0
