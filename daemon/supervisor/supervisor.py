"""The supervisor: every agent of this node, their desired set, and the daemon's memory.

Lifecycle: `start(specs)` re-adopts what is still running from before a
daemon restart (from agents.json, or found by its environment when a crash
came between its spawn and the flush below), starts the rest, and starts the sampling loop; `stop()`
leaves agents running (unless asked) with their pids persisted so the next
daemon re-adopts them.

Desired set: the host's own specs (the TOML: `start`, `reload` on SIGHUP)
plus the set the manager pushed (`apply`, versioned, kept across restarts in
update.json). A pushed agent whose id is also the host's is refused for this
node, and so is one only this host cannot run (its program, user or
directory missing here): the host's own agent keeps running, and the
refusals are reported (`refused`) until they are resolved. Applying
validates everything first and changes nothing on a spec that is invalid
anywhere; then it persists, then acts. The same version with the same specs
again is a no-op (a manager's retry after a lost answer).

Artifacts: a pushed spec may name an artifact (`daemon.artifacts`). Each
apply makes every artifact of the set ready (`ArtifactCache.ensure`: an
installed copy is verified, a missing one downloaded) before any agent
changes, waiting at most `artifact_wait` seconds so the manager's push never
times out on a large download. What is not ready by then keeps fetching in
the background: an agent already running keeps its old spec (and process),
a new one shows as STARTING "waiting for artifact ..." without a process,
and both converge when the fetch ends. A fetch that fails refuses that
agent only (the old instance keeps running); a transient failure is retried
with backoff. `{artifact}` in argv, cwd and env is replaced by the ready
path. After each apply the cache keeps the artifacts of the current and the
previous pushed sets (`retain`).

Persistence of agents.json is coalesced to once per event-loop turn
(`call_soon`), so a spawn is on disk before the loop does anything else.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import psutil

from daemon.artifacts import ArtifactCache, ArtifactError, substitute
from daemon.sampler import HostSample, ResourceSample, Sampler
from daemon.supervisor.agent import Agent, AgentSnapshot, Cause, Context
from daemon.supervisor.clock import Clock, SystemClock
from daemon.supervisor.logs import LogChunk, LogSpace, log_path, read_log, rotate_if_needed
from daemon.supervisor.persistence import PersistedAgent, StateStore
from daemon.supervisor.process import adopt, find_orphans
from daemon.supervisor.spec import AgentSpec, SpecError, check_on_host, validate_here
from daemon.supervisor.states import AgentStatus
from fleet.artifacts import ArtifactRef
from fleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Resource,
    ResourceExhausted,
)
from fleet.retry import Backoff

__all__ = ["AgentSnapshot", "ApplyResult", "LogChunk", "Refusal", "Supervisor"]

log = logging.getLogger(__name__)
# Why the supervisor itself stops or restarts agents (recorded as their last exit).
_DAEMON_STOP: Cause = ("daemon", "stopped with the daemon (stop_agents_on_exit)")
_REMOVED: Cause = ("updated", "removed from this node's agents")
_REMOVED_WHILE_DOWN: Cause = (
    "updated",
    "removed from this node's agents while the daemon was down",
)
_NEW_SPEC: Cause = ("updated", "restarted for a new spec")
_NEW_SPEC_WHILE_DOWN: Cause = ("updated", "restarted: its spec changed while the daemon was down")
Operation = Literal["start", "stop", "restart"]


@dataclass(frozen=True)
class Refusal:
    """A pushed agent this node does not run, and why."""

    agent_id: str
    """The agent."""
    revision: int
    """The definition revision it came from."""
    reason: str
    """Why, in words."""


@dataclass(frozen=True)
class ApplyResult:
    """What `apply` / `reload` did."""

    version: int
    """The node's spec version after the call (0: the TOML's specs, nothing pushed)."""
    added: tuple[str, ...]
    """New agents (started if autostart)."""
    changed: tuple[str, ...]
    """Agents whose process hash changed: restarted with the new spec."""
    removed: tuple[str, ...]
    """Agents stopped and forgotten."""
    reconfigured: tuple[str, ...]
    """Agents whose spec changed without needing a restart (policy, labels, config)."""
    refused: tuple[Refusal, ...] = ()
    """Pushed agents this node does not run (see `Supervisor.refused`)."""
    fetching: tuple[str, ...] = ()
    """Pushed agents whose artifact is still being fetched: they change when it is ready."""


@dataclass(frozen=True)
class _Desired:
    """What the supervisor should run now (`_combined`)."""

    specs: tuple[AgentSpec, ...]
    """Specs ready to run (the host's own, pushed ones with their artifact substituted)."""
    waiting: dict[str, AgentSpec] = field(default_factory=dict)
    """Pushed specs whose artifact is not ready yet, by id."""
    keep: frozenset[str] = frozenset()
    """Pushed agents refused for their artifact: an instance already running keeps running."""


LOG_CHECK_INTERVAL = 1.0
"""Seconds between checks of the agents' log sizes (a stat each): however long the
sample interval, a chatty agent's log passes its limit by about a second of output."""
_FETCH_RETRY = Backoff(initial=10.0, maximum=300.0, jitter="none")
"""Delays between attempts at an artifact the manager could not deliver (transient)."""


def _refs(specs: Sequence[AgentSpec]) -> tuple[ArtifactRef, ...]:
    return tuple(s.artifact for s in specs if s.artifact is not None)


def validate_specs(specs: Sequence[AgentSpec]) -> None:
    """Validate the host's own specs and id uniqueness; `SpecError` for the first problem."""
    seen: set[str] = set()
    for spec in specs:
        validate_here(spec)
        if spec.artifact is not None:
            raise SpecError(
                "only an agent a manager pushes can use an artifact",
                field=f"agents[{spec.id}].artifact",
            )
        if spec.id in seen:
            raise SpecError(f"duplicate agent id {spec.id!r}", field=f"agents[{spec.id}].id")
        seen.add(spec.id)


class Supervisor:
    """Supervises this node's agents (see the module docstring)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        log_dir: Path,
        socket_path: Path,
        clock: Clock | None = None,
        on_change: Callable[[AgentSnapshot], None] | None = None,
        sample_interval: float = 1.0,
        sample_buffer: int = 3600,
        tree_rescan_interval: float = 5.0,
        artifacts: ArtifactCache | None = None,
        artifact_wait: float = 5.0,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._store = StateStore(state_dir)
        self._agents_unsaved = False  # the last agents.json write failed (a full disk)
        self._rotation_failed: set[str] = set()  # agents whose last log rotation failed
        self._log_space: dict[str, LogSpace] = {}  # per agent: its log filesystem's episode
        self._artifacts = artifacts
        self._artifact_wait = artifact_wait
        self._on_refused = on_refused
        self._resolved: dict[str, Path | ArtifactError] = {}  # digest -> outcome, current set
        self._fetches: dict[str, asyncio.Task[None]] = {}  # digest -> background ensure
        self._waiting: dict[str, ArtifactRef] = {}  # agent id -> the artifact it waits for
        self._placeholders: set[str] = set()  # waiting agents that have no process yet
        self._previous_refs: tuple[ArtifactRef, ...] = ()
        self._followups: set[asyncio.Task[None]] = set()
        self._retry_now = asyncio.Event()  # set by an apply: retrying fetches try again now
        self._shown_waiting: set[str] = set()  # agents last reported as waiting
        self.artifact_retry = _FETCH_RETRY
        """Delays between attempts at an artifact the manager could not deliver (transient)."""
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._on_change = on_change
        self._sample_interval = sample_interval
        self.sampler = Sampler(sample_buffer, rescan_interval=tree_rescan_interval)
        """The resource sampler (per-agent ring buffers, host samples)."""
        self._ctx = Context(
            clock=self._clock,
            log_dir=log_dir,
            socket_path=socket_path,
            sampler=self.sampler,
            changed=self._changed,
            restarted=self._count_restart,
        )
        self._agents: dict[str, Agent] = {}
        self._version = 0
        self._host: tuple[AgentSpec, ...] = ()
        self._pushed: tuple[AgentSpec, ...] = ()
        self._refused: tuple[Refusal, ...] = ()
        self._config_name = "daemon.toml"
        self._apply_lock = asyncio.Lock()
        self._sample_task: asyncio.Task[None] | None = None
        self._flush_pending = False
        self.restarts_total = 0
        """Restarts of any agent since this supervisor started (for Prometheus)."""
        self.sample_seconds_total = 0.0
        """Wall time spent sampling, for the daemon's own metrics."""

    # --- lifecycle ------------------------------------------------------------

    async def start(self, specs: Sequence[AgentSpec], *, config_name: str = "") -> None:
        """Re-adopt, restart changed, autostart the rest; start sampling.

        `specs` are the host's own (the TOML named `config_name`, for messages);
        a pushed set on disk runs beside them. `SpecError` (an InvalidArgument)
        if a TOML spec is invalid.
        """
        if self._sample_task is not None:
            raise RuntimeError("Supervisor.start() called twice")
        validate_specs(specs)
        self._config_name = config_name or self._config_name
        self._host = tuple(specs)
        pushed = self._store.load_update()
        if pushed is not None:
            self._version, self._pushed = pushed[0], tuple(pushed[1])
        await self._find_installed()
        desired = self._combined()
        persisted = self._store.load_agents()
        specs = list(desired.specs)
        placeholders: builtins.list[AgentSpec] = []
        for agent_id in (*desired.waiting, *desired.keep):
            old = persisted.get(agent_id)
            if old is not None and old.pid:
                specs.append(old.spec)  # what ran before keeps running until its artifact is ready
            elif agent_id in desired.waiting:
                placeholders.append(desired.waiting[agent_id])
        wanted = {s.id: s for s in (*specs, *placeholders)}
        leftovers = [p for i, p in persisted.items() if i not in wanted]
        # Before starting anything: agents spawned just before a crash, unrecorded.
        orphans = await asyncio.to_thread(
            find_orphans,
            self._ctx.socket_path,
            wanted,
            exclude={p.pid for p in persisted.values() if p.pid},
        )
        for spec in specs:
            agent = self._agents[spec.id] = Agent(spec, self._ctx)
            await self._resume(agent, persisted.get(spec.id), orphans.get(spec.id))
        for spec in placeholders:
            self._agents[spec.id] = Agent(spec, self._ctx)
        self._placeholders = {s.id for s in placeholders}
        for old in leftovers:  # removed while the daemon was down
            proc = adopt(old.pid, old.create_time) if old.pid else None
            if proc is not None:
                agent = Agent(old.spec, self._ctx)
                agent.adopt(proc, old.spec, old.start_time)
                async with agent.lock:
                    await agent.stop(operator=False, cause=_REMOVED_WHILE_DOWN)
                agent.wake_config_watchers()
        self._flush()
        self._sample_task = asyncio.create_task(self._sample_loop(), name="supervisor-sampler")
        for ref in self._waiting.values():
            self._start_fetch(ref)

    async def _resume(
        self, agent: Agent, old: PersistedAgent | None, orphan: tuple[int, float] | None
    ) -> None:
        spec = agent.spec
        if old is not None:
            agent.restart_count = old.restart_count
            agent.operator_stopped = old.operator_stopped
            if old.last_exit is not None:
                agent.last_exit, agent.exit_code = old.last_exit, old.last_exit.code
            agent.config_version = old.config_version + (old.spec.config != spec.config)
            proc = adopt(old.pid, old.create_time) if old.pid else None
            if proc is not None:
                agent.adopt(proc, old.spec, old.start_time, version=old.registered_version)
                if old.process_hash != spec.process_hash():
                    log.info("agent %s: spec changed while the daemon was down", spec.id)
                    async with agent.lock:
                        await agent.restart(cause=_NEW_SPEC_WHILE_DOWN)
                return
        proc = adopt(*orphan) if orphan is not None else None
        if proc is not None:
            # Its spec was never recorded; the current one is the best guess.
            log.warning(
                "agent %s: adopting pid %d, started by a daemon that stopped before recording it",
                spec.id,
                proc.pid,
            )
            agent.operator_stopped = False
            agent.adopt(proc, spec, proc.create_time)
            return
        if spec.autostart and not agent.operator_stopped:
            async with agent.lock:
                await agent.start()

    async def stop(self, *, stop_agents: bool = False) -> None:
        """Stop sampling and supervising; agents keep running unless `stop_agents`."""
        if self._sample_task is not None:
            self._sample_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sample_task
            self._sample_task = None
        for task in (*self._fetches.values(), *self._followups):
            task.cancel()
        await asyncio.gather(*self._fetches.values(), *self._followups, return_exceptions=True)
        self._fetches.clear()

        async def finish(agent: Agent) -> None:
            async with agent.lock:
                if stop_agents:
                    await agent.stop(operator=False, cause=_DAEMON_STOP)
                await agent.detach()

        await asyncio.gather(*(finish(a) for a in self._agents.values()))
        self._flush()

    # --- reading ----------------------------------------------------------------

    def list(self) -> list[AgentSnapshot]:
        """Every agent, sorted by id."""
        return [self._snapshot(self._agents[i]) for i in sorted(self._agents)]

    def get(self, agent_id: str) -> AgentSnapshot:
        """One agent; `NotFound` if there is no such agent."""
        return self._snapshot(self._agent(agent_id))

    def _snapshot(self, agent: Agent) -> AgentSnapshot:
        """The agent's snapshot; one waiting for its artifact says so (STARTING if it has
        no process yet)."""
        snap = agent.snapshot()
        ref = self._waiting.get(snap.id)
        if ref is None or self._artifacts is None:
            return snap
        message = self._artifacts.waiting_message(ref)
        if snap.id in self._placeholders:
            return replace(snap, status=AgentStatus.STARTING, message=message)
        return replace(snap, message=f"{message}; the running instance is kept until then")

    def spec(self, agent_id: str) -> AgentSpec:
        """The current spec of an agent; `NotFound` if there is no such agent."""
        return self._agent(agent_id).spec

    @property
    def version(self) -> int:
        """Version of the pushed spec set in force (0 if none was pushed)."""
        return self._version

    def _agent(self, agent_id: str) -> Agent:
        try:
            return self._agents[agent_id]
        except KeyError:
            raise NotFound(
                f"agent {agent_id!r} is not supervised on this node",
                resource=Resource("agent", agent_id),
            ) from None

    # --- operations ---------------------------------------------------------------

    async def operate(self, agent_id: str, op: Operation) -> AgentSnapshot:
        """start / stop / restart, idempotent; the resulting snapshot."""
        agent = self._agent(agent_id)
        if op not in ("start", "stop", "restart"):
            raise InvalidArgument(f"unknown operation {op!r}: use start, stop or restart")
        if agent.removing:
            raise FailedPrecondition(f"agent {agent_id!r} is being removed")
        if agent_id in self._placeholders:
            raise FailedPrecondition(
                f"agent {agent_id!r} is waiting for its artifact: it starts when the download"
                " completes"
            )
        async with agent.lock:
            if agent.removing:
                raise FailedPrecondition(f"agent {agent_id!r} is being removed")
            if op == "start":
                await agent.start()
            elif op == "stop":
                await agent.stop()
            else:
                await agent.restart()
            return self._snapshot(agent)

    async def apply(self, version: int, specs: Sequence[AgentSpec]) -> ApplyResult:
        """Make `specs` (the complete pushed set) run beside the host's own, as `version`.

        An older version is FailedPrecondition; the same version with the same
        specs is a no-op; a spec invalid anywhere is SpecError and nothing
        changes. Pushed agents the host defines itself, or cannot run, are
        refused (in the result and `refused`); the rest apply.
        """
        seen: set[str] = set()
        for spec in specs:
            spec.validate()  # what holds anywhere; host checks make refusals instead
            if spec.id in seen:
                raise SpecError(f"duplicate agent id {spec.id!r}", field=f"agents[{spec.id}].id")
            seen.add(spec.id)
            if spec.artifact is not None:  # the manager fills in the whole reference
                spec.artifact.check(field=f"agents[{spec.id}].artifact")
        async with self._apply_lock:
            if version == self._version and tuple(specs) == self._pushed:
                return ApplyResult(version, (), (), (), (), self._refused)
            if version <= self._version:
                raise FailedPrecondition(
                    f"stale spec version {version}: this node already has version {self._version}"
                )
            try:
                self._store.save_update(version, specs)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # Nothing applied: the manager is told why and pushes again later.
                raise ResourceExhausted(
                    f"cannot store update version {version} in {self._store.update_path}: "
                    f"{exc.strerror}; free space on the node's state_dir"
                ) from exc
            if set(_refs(specs)) != set(_refs(self._pushed)):
                self._previous_refs = _refs(self._pushed)  # a rollback finds these on disk
            self._version, self._pushed = version, tuple(specs)
            await self._prepare_artifacts()
            result = await self._converge(self._combined())
            await self._retain()
            return result

    async def reload(self, specs: Sequence[AgentSpec]) -> ApplyResult:
        """SIGHUP: the TOML's specs become the host's own; the pushed set stays beside them."""
        validate_specs(specs)
        async with self._apply_lock:
            self._host = tuple(specs)
            return await self._converge(self._combined())

    @property
    def refused(self) -> tuple[Refusal, ...]:
        """Pushed agents this node does not run, and why (reported to the manager)."""
        return self._refused

    def _combined(self) -> _Desired:
        """The host's own specs plus the pushed ones it can run; sets `refused`.

        A pushed spec with an artifact runs with ``{artifact}`` substituted once
        it is ready, waits while it is fetched, and is refused when the fetch failed.
        """
        own = {s.id for s in self._host}
        refused: builtins.list[Refusal] = []
        runnable: builtins.list[AgentSpec] = []
        waiting: dict[str, AgentSpec] = {}
        keep: set[str] = set()
        for pushed in self._pushed:
            spec = pushed
            if spec.id in own:
                refused.append(
                    Refusal(
                        spec.id,
                        spec.revision,
                        f"agent {spec.id!r} is defined in this host's {self._config_name}; the"
                        " host's own agent is kept: rename the definition or remove the agent"
                        " from the host's config",
                    )
                )
                continue
            if spec.artifact is not None:
                outcome = self._resolved.get(spec.artifact.digest)
                if self._artifacts is None:
                    outcome = ArtifactError(spec.artifact, "this daemon has no artifact cache")
                if outcome is None:
                    waiting[spec.id] = spec
                    continue
                if isinstance(outcome, ArtifactError):
                    refused.append(Refusal(spec.id, spec.revision, str(outcome)))
                    keep.add(spec.id)
                    continue
                spec = substitute(spec, outcome)
            try:
                check_on_host(spec)
            except SpecError as exc:
                refused.append(Refusal(spec.id, spec.revision, f"cannot run here: {exc.message}"))
                continue
            runnable.append(spec)
        if refused != list(self._refused):
            for r in refused:
                log.warning(
                    "pushed agent %s (revision %d) refused: %s", r.agent_id, r.revision, r.reason
                )
        self._refused = tuple(refused)
        self._waiting = {i: s.artifact for i, s in waiting.items() if s.artifact is not None}
        return _Desired((*self._host, *runnable), waiting, frozenset(keep))

    async def _converge(self, desired: _Desired) -> ApplyResult:
        wanted = {s.id: s for s in desired.specs}
        placeholders: dict[str, AgentSpec] = {}
        for agent_id in (*desired.waiting, *desired.keep):
            agent = self._agents.get(agent_id)
            if agent is not None and agent_id not in self._placeholders:
                wanted[agent_id] = agent.spec  # the running instance is kept as it is
            elif agent_id in desired.waiting:
                placeholders[agent_id] = desired.waiting[agent_id]
        promoted = {i for i in self._placeholders if i in wanted}  # their artifact is ready
        added = [i for i in wanted if i not in self._agents or i in promoted]
        removed = [i for i in self._agents if i not in wanted and i not in placeholders]
        changed: list[str] = []
        reconfigured: list[str] = []
        for agent_id, spec in wanted.items():
            agent = self._agents.get(agent_id)
            if agent is None or agent.spec == spec or agent_id in promoted:
                continue
            if agent.spec.process_hash() != spec.process_hash():
                changed.append(agent_id)
            else:
                reconfigured.append(agent_id)
        for agent_id in removed:
            self._agents[agent_id].removing = True
        for agent_id in added:
            if agent_id in promoted:
                self._agents[agent_id].set_spec(wanted[agent_id])
            else:
                self._agents[agent_id] = Agent(wanted[agent_id], self._ctx)
        for agent_id, spec in placeholders.items():  # no process until the artifact is ready
            if agent_id not in self._agents:
                self._agents[agent_id] = Agent(spec, self._ctx)
            elif self._agents[agent_id].spec != spec:
                self._agents[agent_id].set_spec(spec)
        self._placeholders = set(placeholders)
        for agent_id in self._shown_waiting ^ set(desired.waiting):  # their message changed
            if agent_id in self._agents:
                self._changed(self._agents[agent_id])
        self._shown_waiting = set(desired.waiting)

        async def remove(agent: Agent) -> None:
            async with agent.lock:
                await agent.stop(operator=False, cause=_REMOVED)
            self._agents.pop(agent.spec.id, None)
            self.sampler.untrack(agent.spec.id, forget=True)
            agent.wake_config_watchers()

        async def change(agent: Agent, spec: AgentSpec) -> None:
            async with agent.lock:
                was_active = agent.status not in (AgentStatus.STOPPED, AgentStatus.EXITED)
                agent.set_spec(spec)
                if not agent.operator_stopped and (was_active or spec.autostart):
                    await agent.restart(cause=_NEW_SPEC)

        async def add(agent: Agent) -> None:
            if agent.spec.autostart:
                async with agent.lock:
                    await agent.start()

        for agent_id in reconfigured:
            self._agents[agent_id].set_spec(wanted[agent_id])
        await asyncio.gather(
            *(remove(self._agents[i]) for i in removed),
            *(change(self._agents[i], wanted[i]) for i in changed),
            *(add(self._agents[i]) for i in added),
        )
        self._flush()
        return ApplyResult(
            self._version,
            tuple(added),
            tuple(changed),
            tuple(removed),
            tuple(reconfigured),
            self._refused,
            tuple(sorted(desired.waiting)),
        )

    # --- artifacts ----------------------------------------------------------------------

    async def _find_installed(self) -> None:
        """At start: the pushed set's artifacts already installed (verified), without fetching."""
        if self._artifacts is None:
            return
        for ref in _refs(self._pushed):
            try:
                path = await self._artifacts.installed(ref)
            except ArtifactError as exc:
                self._resolved[ref.digest] = exc
                continue
            if path is not None:
                self._resolved[ref.digest] = path

    async def _prepare_artifacts(self) -> None:
        """Make the pushed set's artifacts ready, waiting at most `artifact_wait` seconds.

        Every apply checks them again (a damaged installed copy is fetched
        again); what is not ready in time carries on in the background.
        """
        refs = {r.digest: r for r in _refs(self._pushed)}
        for digest in [d for d in self._fetches if d not in refs]:
            self._fetches.pop(digest).cancel()  # no longer needed; the partial file is kept
        self._resolved = {}
        self._retry_now.set()  # a fetch waiting to retry tries again for this push
        self._retry_now = asyncio.Event()
        if self._artifacts is None or not refs:
            return
        for ref in refs.values():
            self._start_fetch(ref)
        pending = [self._fetches[d] for d in refs if d in self._fetches]
        if pending:
            await asyncio.wait(pending, timeout=self._artifact_wait)

    def _start_fetch(self, ref: ArtifactRef) -> None:
        if ref.digest in self._fetches or self._artifacts is None:
            return
        task = asyncio.create_task(self._fetch(self._artifacts, ref), name=f"artifact {ref.label}")
        self._fetches[ref.digest] = task

    async def _fetch(self, cache: ArtifactCache, ref: ArtifactRef) -> None:
        """`ensure` one artifact, recording the outcome; a transient failure is retried."""
        attempt = 0
        try:
            while True:
                outcome: Path | ArtifactError
                try:
                    outcome = await cache.ensure(ref)
                except ArtifactError as exc:
                    outcome = exc
                except Exception as exc:  # a bug must refuse the agent, not hang it forever
                    log.exception("artifact %s: unexpected error", ref.label)
                    outcome = ArtifactError(ref, f"unexpected error: {exc}")
                self._resolved[ref.digest] = outcome
                if isinstance(outcome, Path) or not outcome.transient:
                    if isinstance(outcome, ArtifactError):
                        log.warning("%s", outcome)
                    return
                delay = self.artifact_retry.delay(attempt)
                log.warning("%s; trying again in %.0fs", outcome, delay)
                self._follow_up()  # report the refusal meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), delay)
                attempt += 1
        finally:
            if self._fetches.get(ref.digest) is asyncio.current_task():
                del self._fetches[ref.digest]
                self._follow_up()

    def _follow_up(self) -> None:
        """Converge again soon (a fetch ended): after any apply in progress."""
        if self._sample_task is None:
            return  # not started yet, or stopping
        task = asyncio.create_task(self._reconverge(), name="supervisor-artifact-converge")
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    async def _reconverge(self) -> None:
        async with self._apply_lock:
            before = self._refused
            await self._converge(self._combined())
            await self._retain()
        if self._refused != before and self._on_refused is not None:
            self._on_refused()

    async def _retain(self) -> None:
        """Keep the artifacts of the current and previous pushed sets and of running agents."""
        if self._artifacts is None:
            return
        running = [a.spec.artifact for a in self._agents.values() if a.spec.artifact is not None]
        try:
            await self._artifacts.retain((*_refs(self._pushed), *self._previous_refs, *running))
        except OSError as exc:
            log.warning("cannot clean up the artifact cache: %s", exc)

    # --- logs, samples, pids ------------------------------------------------------------

    def log_path(self, agent_id: str) -> Path:
        """Where the agent's current log file is."""
        self._agent(agent_id)
        return log_path(self._ctx.log_dir, agent_id)

    def read_log(self, agent_id: str, offset: int, max_bytes: int) -> LogChunk:
        """A chunk of the agent's log; negative offset from the end; `rotated` if offset > size."""
        path = self.log_path(agent_id)
        try:
            return read_log(path, offset, max_bytes)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="max_bytes") from None

    def samples(self, agent_id: str, duration_s: float) -> builtins.list[ResourceSample]:
        """The agent's samples of the last `duration_s` seconds (all buffered if <= 0)."""
        self._agent(agent_id)
        since = 0 if duration_s <= 0 else int((self._clock.now() - duration_s) * 1000)
        return self.sampler.samples(agent_id, since)

    def host_sample(self) -> HostSample:
        """A host sample taken now (cpu % since the previous call)."""
        return self.sampler.host_sample(int(self._clock.now() * 1000))

    def agent_for_pid(self, pid: int) -> str | None:
        """The agent whose process tree `pid` is in, if any."""
        roots = {
            a.proc.pid: agent_id
            for agent_id, a in self._agents.items()
            if a.proc is not None and a.proc.running
        }
        current = pid
        for _ in range(128):  # ancestry is short; the bound guards against loops
            if current in roots:
                return roots[current]
            if current <= 1:
                return None
            try:
                current = psutil.Process(current).ppid()
            except psutil.Error:
                return None
        return None

    # --- SDK-facing hooks ----------------------------------------------------------------

    def agent_registered(self, agent_id: str, *, version: str, pid: int) -> AgentSnapshot:
        """An SDK agent registered (from `pid`): record its version, count as a heartbeat."""
        agent = self._agent(agent_id)
        log.info("agent %s registered from pid %d, version %r", agent_id, pid, version)
        agent.registered_version = version
        agent.heartbeat()
        self._changed(agent)  # the version shows now, not with the next full sync
        return self._snapshot(agent)

    def agent_heartbeat(self, agent_id: str) -> None:
        """An SDK heartbeat: moves the agent's watchdog deadline."""
        self._agent(agent_id).heartbeat()

    def config_of(self, agent_id: str) -> tuple[bytes, int]:
        """The agent's config payload and its version."""
        agent = self._agent(agent_id)
        return agent.spec.config.encode(), agent.config_version

    async def watch_config(
        self, agent_id: str, after_version: int
    ) -> AsyncIterator[tuple[bytes, int]]:
        """Yield (payload, version) whenever the config version exceeds `after_version`.

        Ends when the agent is removed. `NotFound` for an unknown agent.
        """
        agent = self._agent(agent_id)
        while self._agents.get(agent_id) is agent:
            event = agent.config_changed
            if agent.config_version > after_version:
                after_version = agent.config_version
                yield agent.spec.config.encode(), after_version
                continue
            await event.wait()

    # --- internals -------------------------------------------------------------------------

    def _count_restart(self) -> None:
        self.restarts_total += 1

    def _changed(self, agent: Agent) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)
        if self._on_change is not None and self._agents.get(agent.spec.id) is agent:
            try:
                self._on_change(self._snapshot(agent))
            except Exception:
                log.exception("on_change callback failed for agent %s", agent.spec.id)

    def _flush(self) -> None:
        self._flush_pending = False
        entries: dict[str, PersistedAgent] = {}
        for agent_id, a in self._agents.items():
            running = a.proc is not None and a.proc.running
            proc = a.proc if running else None
            spec = a.started_spec if proc is not None else a.spec
            entries[agent_id] = PersistedAgent(
                spec=spec,
                pid=proc.pid if proc is not None else 0,
                create_time=proc.create_time if proc is not None else 0.0,
                process_hash=spec.process_hash(),
                operator_stopped=a.operator_stopped,
                config_version=a.config_version,
                restart_count=a.restart_count,
                start_time=a.start_time,
                last_exit=a.last_exit,
                registered_version=a.registered_version if proc is not None else "",
            )
        try:
            self._store.save_agents(entries)
        except OSError as exc:
            # Said once, not at every flush (several a second on a full disk).
            if not self._agents_unsaved:
                log.error(  # noqa: TRY400 -- one clear line, no traceback
                    "cannot write %s (%s); agents keep running, and a daemon restarted "
                    "meanwhile may not re-adopt them until it can",
                    self._store.agents_path,
                    exc.strerror or exc,
                )
            self._agents_unsaved = True
        else:
            if self._agents_unsaved:
                log.warning("%s written again", self._store.agents_path)
            self._agents_unsaved = False

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # On the monotonic clock: a wall-clock schedule stepped back would stop sampling.
        next_sample = self._clock.monotonic()
        while True:
            started = loop.time()
            try:
                if self._clock.monotonic() >= next_sample:
                    next_sample = self._clock.monotonic() + self._sample_interval
                    self.sampler.sample(int(self._clock.now() * 1000))
                await self._rotate_logs()
            except Exception:  # keep sampling: one bad tick must not end supervision's upkeep
                log.exception("sampler tick failed")
            self.sample_seconds_total += loop.time() - started
            await self._clock.sleep(min(self._sample_interval, LOG_CHECK_INTERVAL))

    def _log_free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still use in log_dir (None: cannot tell)."""
        try:
            st = os.statvfs(self._ctx.log_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _watch_log_space(self, agent: Agent, path: Path, free: int, now: float) -> None:
        """Say once per episode that a running agent's output is lost, and when it is not."""
        space = self._log_space.setdefault(agent.spec.id, LogSpace())
        since = space.full_since
        said = space.observe(free, now)
        if said == "full":
            agent.log_problem = (
                f"no space left on the filesystem of {path}: the agent's output is being"
                " lost until space is freed there"
            )
            log.warning("agent %s: %s", agent.spec.id, agent.log_problem)
            self._changed(agent)
        elif said == "back":
            agent.log_problem = ""
            lost = f" (lost for {now - since:.0f} s)" if since is not None else ""
            log.warning(
                "agent %s: space is free again on the filesystem of %s: its output is"
                " logged again%s",
                agent.spec.id,
                path,
                lost,
            )
            self._changed(agent)

    async def _rotate_logs(self) -> None:
        """Per agent: rotate its log when past its limit (health is timed by each runner),
        and say when its output is being lost to a full log filesystem."""
        free = self._log_free_bytes()
        now = self._clock.monotonic()  # an episode's length: a wall-clock step must not end it
        for gone in self._log_space.keys() - self._agents.keys():
            del self._log_space[gone]
        for agent in list(self._agents.values()):
            spec = agent.spec
            path = log_path(self._ctx.log_dir, spec.id)
            if free is not None and agent.proc is not None and agent.proc.running:
                self._watch_log_space(agent, path, free, now)
            try:
                if spec.log_max_bytes and path.stat().st_size > spec.log_max_bytes:
                    await asyncio.to_thread(
                        rotate_if_needed, path, spec.log_max_bytes, spec.log_backups
                    )
                    if spec.id in self._rotation_failed:
                        self._rotation_failed.discard(spec.id)
                        log.warning("agent %s: log rotated again", spec.id)
            except OSError as exc:
                # Once per agent, not every tick (a full disk fails each one).
                if not isinstance(exc, FileNotFoundError) and spec.id not in self._rotation_failed:
                    self._rotation_failed.add(spec.id)
                    log.warning("agent %s: log rotation failed: %s", spec.id, exc)
