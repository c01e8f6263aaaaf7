"""Operators and jobs: run, list, show, watch, read output, cancel, rerun.

Any replica serves these. Starting a job stores it with every target
PENDING, its audit entry and its `JOB_STARTED` event in one transaction, then
pokes the driver (`manager.service.job_driver`), which sends the targets.
Cancelling marks the targets (PENDING ones end CANCELLED at once), then
asks the nodes running them to stop (a node that misses it learns it from
the answer to its next report). Reads and watches poll the database, so they
work from any replica whichever one drives the job. On SQLite (one manager,
which commits every change) a watch learns the changed targets from the
commits (`manager.service.job_watch`) and reads only the job's row each poll;
it re-reads every target when the job's row changed (a cancel, the end) and
every `WATCH_FULL_READ` seconds as a safety net.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import operator
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from fleet.errors import FailedPrecondition, FleetError, InvalidArgument, NotFound
from fleet.v1 import jobs_pb2
from manager.pool import DaemonPool
from manager.service.job_driver import NodesRead, load_spec
from manager.service.job_spec import check_spec, resolve_targets
from manager.service.job_updates import JobUpdates, finished_message
from manager.service.job_watch import WatchHub
from manager.service.jobs import (
    TERMINAL,
    JobState,
    NodeFacts,
    TargetState,
    foreseen,
    job_id_problem,
    resolve_concurrency,
    stages,
)
from manager.storage import NodeRepository
from manager.storage.events import event_row
from manager.storage.jobs import (
    JobRecord,
    JobRepository,
    JobTargetRecord,
    JobTx,
    OutputChunk,
    sqlite_jobs,
)

__all__ = ["RERUN_STATES", "JobView", "Jobs", "OutputPiece", "new_job_id"]

RERUN_STATES = frozenset({TargetState.FAILED, TargetState.TIMEOUT, TargetState.UNDELIVERABLE})
"""What `rerun --failed` runs again. CANCELLED and SKIPPED are left out: an operator
stopped them on purpose, or the job stopped launching them; rerun without
--failed runs every target again."""
OUTPUT_SETTLE = 10.0
"""A finished target's output may still be arriving (the daemon uploads the tail
after its final report); a follower waits this long for it past the end."""
_READ_BYTES = 256 * 1024
WATCH_FULL_READ = 5.0
"""A watch fed by commits re-reads every target of its job this often anyway."""


def new_job_id(now: float) -> str:
    """A unique id that sorts by creation time ("20261213-101530-123-a1b2c3")."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class JobView:
    """A job as operators read it."""

    record: JobRecord
    """The stored row (id empty for a plan)."""
    spec: jobs_pb2.JobSpec
    """What it runs."""
    targets: tuple[JobTargetRecord, ...] = ()
    """Per target (get, run, watch); empty in lists."""
    counts: Mapping[str, int] = field(default_factory=dict)
    """Targets per state."""


@dataclass(frozen=True)
class OutputPiece:
    """Some output of one target, or the news that it ended."""

    node_id: str
    """The target's node."""
    data: bytes
    """The bytes (may be empty with eof or truncated)."""
    offset: int
    """Offset of data's first byte."""
    next_offset: int
    """Where the next read starts."""
    truncated: bool = False
    """No more of this output is stored here; the rest is on the node."""
    eof: bool = False
    """The target ended and all its stored output was sent."""


def _counts(targets: Collection[JobTargetRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in targets:
        out[t.state] = out.get(t.state, 0) + 1
    return out


def _describe(spec: jobs_pb2.JobSpec) -> str:
    cmd = spec.steps[0].command
    first = " ".join(cmd.argv) if cmd.argv else f"a {cmd.interpreter[0]} script"
    more = f" (+{len(spec.steps) - 1} step(s))" if len(spec.steps) > 1 else ""
    return (first[:200] + more).strip()


class Jobs:
    """Operator actions on jobs and their reads (see the module docstring)."""

    def __init__(
        self,
        repo: JobRepository,
        nodes: NodeRepository,
        pool: DaemonPool,
        *,
        clock: Callable[[], float],
        on_change: Callable[[str], None] = lambda job_id: None,
        on_started: Callable[[JobRecord, Sequence[JobTargetRecord], NodesRead], None] | None = None,
        poll_interval: float = 0.25,
        call_timeout: float = 10.0,
        updates: JobUpdates | None = None,
    ) -> None:
        self._repo = repo
        self._nodes = nodes
        self._pool = pool
        self._clock = clock
        self._on_change = on_change
        self._on_started = on_started
        self._poll = poll_interval
        self._call_timeout = call_timeout
        # Watches follow this process's commits where it commits every change (SQLite).
        self._hub: WatchHub | None = None
        if updates is not None and repo.db.dialect == "sqlite":
            self._hub = WatchHub()
            updates.listen_rows(self._hub.committed)

    # --- starting -------------------------------------------------------------------------

    async def run(
        self, spec: jobs_pb2.JobSpec, *, actor: str, plan: bool = False, rerun_of: str = ""
    ) -> JobView:
        """Validate, resolve the targets and (unless `plan`) store and start the job."""
        checked = check_spec(spec)
        read_at = time.monotonic()
        labelled, reach = await self._nodes.labelled_reach()
        picked = resolve_targets(checked, labelled)
        concurrency = resolve_concurrency(spec.max_concurrency, len(picked))
        now = self._clock()
        now_ms = int(now * 1000)
        job_id = "" if plan else new_job_id(now)
        record = JobRecord(
            id=job_id,
            name=spec.name,
            spec=json_format.MessageToJson(spec, indent=None, sort_keys=True),
            actor=actor,
            created_ms=now_ms,
            rerun_of=rerun_of,
            concurrency=concurrency,
        )
        targets = tuple(
            JobTargetRecord(job_id, n, idx=i, stage=stage, updated_ms=now_ms)
            for i, (n, stage) in enumerate(stages([p.node_id for p in picked], spec.canary))
        )
        if plan:
            # What can be told now (the driver's rules, in its words): a node with jobs
            # off, or offline and waiting for the delivery timeout.
            facts = {
                r.node_id: NodeFacts(
                    online=r.status == "online",
                    last_seen=r.last_seen_ms / 1000,
                    jobs_disabled=r.jobs_disabled,
                )
                for r in reach
            }
            targets = tuple(
                dataclasses.replace(
                    t, reason=foreseen(t.node_id, facts[t.node_id], checked.delivery_timeout)
                )
                for t in targets
            )
            return JobView(record, spec, targets, _counts(targets))
        view = JobView(record, spec, targets, _counts(targets))

        what = f"job {job_id}" + (f" ({spec.name})" if spec.name else "")
        audit = {
            "actor": actor,
            "action": "job.rerun" if rerun_of else "job.run",
            "target": job_id,
            "detail": {
                "name": spec.name,
                "command": _describe(spec),
                "targets": str(len(targets)),
                **({"rerun_of": rerun_of} if rerun_of else {}),
            },
            "outcome": "ok",
            "now_ms": now_ms,
        }
        started = event_row(
            "JOB_STARTED",
            now_ms=now_ms,
            actor=actor,
            message=f"{what} started by {actor} on {len(targets)} node(s): {_describe(spec)}"
            + (f" (re-runs {rerun_of})" if rerun_of else ""),
            attributes={"job_id": job_id, "targets": str(len(targets))},
        )
        await self._repo.add_job(record, targets, audits=[audit], events=[started])
        if self._hub is not None:
            self._hub.started(job_id, targets)  # before the driver can commit a row of it
        if self._on_started is not None:
            # As stored, and the nodes as read: the driver need not read either again.
            self._on_started(record, targets, NodesRead(reach, read_at))
        else:
            self._on_change(job_id)
        return view

    async def rerun(
        self, job_id: str, *, failed_only: bool, actor: str, plan: bool = False
    ) -> JobView:
        """A new job with the same spec on the job's nodes (only those that failed, timed
        out or were undeliverable with `failed_only`); with `plan`, only resolved."""
        view = await self.get(job_id)
        nodes = [
            t.node_id
            for t in view.targets
            if not failed_only or TargetState(t.state) in RERUN_STATES
        ]
        if not nodes:
            raise FailedPrecondition(
                f"job {job_id}: no target failed, timed out or was undeliverable: nothing to"
                " re-run of those alone"
            )
        spec = jobs_pb2.JobSpec()
        spec.CopyFrom(view.spec)
        spec.ClearField("selector")
        del spec.node_ids[:]
        spec.node_ids.extend(nodes)
        if spec.canary > len(nodes):
            spec.canary = len(nodes)
        return await self.run(spec, actor=actor, plan=plan, rerun_of=job_id)

    # --- cancelling -----------------------------------------------------------------------

    async def cancel(self, job_id: str, node_ids: Sequence[str], *, actor: str) -> JobView:
        """Cancel the whole job, or the targets of `node_ids`. Idempotent."""
        _check_id(job_id)
        now_ms = int(self._clock() * 1000)
        reason = f"cancelled by {actor}"
        committed: list[JobTargetRecord] = []  # the rows written, for the watches

        async def body(tx: JobTx) -> list[str]:
            committed.clear()  # a retried transaction starts again
            job = await tx.job(job_id, for_update=True)
            if job is None:
                raise NotFound(f"job {job_id!r} does not exist")
            targets = await tx.targets(job_id, for_update=True)
            for i, n in enumerate(node_ids):
                if n not in targets:
                    raise InvalidArgument(
                        f"{n!r} is not a target of job {job_id}", field=f"node_ids[{i}]"
                    )
            if job.ended_ms:
                return []
            chosen = [targets[n] for n in node_ids] if node_ids else list(targets.values())
            changed = []
            running = []
            for t in chosen:
                state = TargetState(t.state)
                if state in TERMINAL or t.cancel_requested:
                    continue
                if state is TargetState.PENDING:
                    after = dataclasses.replace(
                        t,
                        state=TargetState.CANCELLED.value,
                        reason=reason,
                        ended_ms=now_ms,
                        cancel_requested=True,
                        updated_ms=now_ms,
                    )
                    tx.event(
                        "JOB_TARGET_FINISHED",
                        now_ms=now_ms,
                        node_id=t.node_id,
                        actor=actor,
                        message=finished_message(job_id, after),
                        attributes={"job_id": job_id, "state": after.state},
                    )
                else:
                    after = dataclasses.replace(t, cancel_requested=True, updated_ms=now_ms)
                    running.append(t.node_id)
                changed.append(after)
            await tx.put_targets(changed)
            committed.extend(changed)
            if not node_ids and not job.cancelled_ms:
                await tx.update_job(
                    dataclasses.replace(job, cancelled_ms=now_ms, reason=job.reason or reason)
                )
            tx.audit(
                actor=actor,
                action="job.cancel",
                target=job_id,
                detail={
                    "nodes": ",".join(node_ids) if node_ids else "all",
                    "changed": str(len(changed)),
                },
                outcome="ok",
                now_ms=now_ms,
            )
            return running

        running = await self._repo.run(body)
        if self._hub is not None:
            # Its rows may come after a later commit's: watches filter them by time,
            # the hub's memory of the job would be older than the database.
            self._hub.forget(job_id)
            self._hub.committed(committed)
        self._on_change(job_id)
        if running:
            await self._cancel_on_nodes(job_id, running)
        return await self.get(job_id)

    async def _cancel_on_nodes(self, job_id: str, node_ids: Sequence[str]) -> None:
        addresses = {n.node_id: n.daemon_address for n in await self._nodes.list()}

        async def one(node_id: str) -> None:
            # Best effort: a node that misses it learns it from its next report's answer.
            with contextlib.suppress(FleetError):
                await self._pool.cancel_job(
                    node_id, addresses.get(node_id, ""), job_id, call_timeout=self._call_timeout
                )

        await asyncio.gather(*(one(n) for n in node_ids if n in addresses))

    # --- reads ----------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobView:
        """One job with its targets."""
        _check_id(job_id)

        record, targets = await self._repo.job_with_targets(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        listed = tuple(targets.values())
        return JobView(record, load_spec(record.spec), listed, _counts(listed))

    async def list(
        self, *, states: Collection[JobState] = (), since_ms: int = 0, limit: int = 100
    ) -> list[JobView]:
        """Jobs newest first, without their targets (with their counts)."""
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"must be 0..1000, got {limit}", field="limit")
        if since_ms < 0:
            raise InvalidArgument(f"must be >= 0, got {since_ms}", field="since")

        async def body(tx: JobTx) -> list[JobView]:
            records = await tx.list_jobs(
                states=[s.value for s in states], since_ms=since_ms, limit=limit or 100
            )
            counts = await tx.counts([r.id for r in records])
            return [JobView(r, load_spec(r.spec), (), counts.get(r.id, {})) for r in records]

        return await self._repo.run(body, write=False)

    async def watch(
        self, job_id: str
    ) -> AsyncGenerator[tuple[JobView, tuple[JobTargetRecord, ...]], None]:
        """(the job with every target, ()), then (the job, the targets that changed)
        whenever something changed, until the job ended."""
        if self._hub is None:
            async for item in self._watch_polling(job_id):
                yield item
            return
        with self._hub.subscribe(job_id) as news:
            # Subscribed before the read: a row committed after it is news, one before it
            # is in the read (a listener runs after its commit).
            view = await self._first_view(job_id)
            yield view, ()
            spec = view.spec
            last = {t.node_id: t for t in view.targets}
            record = view.record
            full_every = max(1, round(WATCH_FULL_READ / self._poll)) if self._poll > 0 else 1
            ticks = 0
            while not record.ended_ms:
                await asyncio.sleep(self._poll)
                ticks += 1
                now = await self._job_row(job_id)
                if now is None:
                    raise NotFound(f"job {job_id!r} does not exist")
                # A row older than one already seen is not news: a cancel hands its rows
                # over after its commit, a report's commit may land in between, and a read
                # may have seen a row whose news comes after it.
                rows = {
                    n: r
                    for n, r in news.take().items()
                    if n not in last or r.updated_ms >= last[n].updated_ms
                }
                if ticks % full_every == 0 or now.ended_ms or _shown_job(now) != _shown_job(record):
                    # The safety net, a cancel, or the end: every target as stored (rows
                    # taken so far were committed before it, so it has them or newer).
                    news.take()
                    full = await self.get(job_id)
                    now = full.record
                    rows.update((t.node_id, t) for t in full.targets)
                changed = tuple(r for n, r in rows.items() if _shown(last.get(n)) != _shown(r))
                last.update(rows)
                if changed or _shown_job(now) != _shown_job(record):
                    yield JobView(now, spec, (), _counts(last.values())), changed
                record = now

    async def _first_view(self, job_id: str) -> JobView:
        """The job with every target: its row read, its targets as this process stored and
        committed them since RunJob (`WatchHub.rows`) when it keeps them, so a watch
        does not read them back; else (and for an ended or cancelled job, whose watch
        ends at once or whose rows a cancel hands over late) as `get` reads them."""
        assert self._hub is not None
        _check_id(job_id)
        if not self._hub.keeps(job_id):
            return await self.get(job_id)
        record = await self._job_row(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        # Taken after the row's read: a commit whose listener has not run yet is news.
        rows = self._hub.rows(job_id)
        if rows is None or record.ended_ms or record.cancelled_ms:
            return await self.get(job_id)
        return JobView(record, load_spec(record.spec), rows, _counts(rows))

    async def _job_row(self, job_id: str) -> JobRecord | None:
        """The job's row alone (SQLite, in one hop)."""
        jobs = await self._repo.db.run_sqlite_read(sqlite_jobs, [job_id])
        return jobs.get(job_id)

    async def _watch_polling(
        self, job_id: str
    ) -> AsyncGenerator[tuple[JobView, tuple[JobTargetRecord, ...]], None]:
        """`watch` by re-reading the job and every target each poll (PostgreSQL: another
        replica may commit any change)."""
        view = await self.get(job_id)
        yield view, ()
        last = {t.node_id: t for t in view.targets}
        last_record = view.record
        while not view.record.ended_ms:
            await asyncio.sleep(self._poll)
            view = await self.get(job_id)
            changed = tuple(t for t in view.targets if _shown(last.get(t.node_id)) != _shown(t))
            if changed or _shown_job(view.record) != _shown_job(last_record):
                yield view, changed
                last.update((t.node_id, t) for t in changed)
                last_record = view.record

    async def read_output(
        self, job_id: str, node_id: str = "", *, offset: int = 0, follow: bool = False
    ) -> AsyncGenerator[OutputPiece, None]:
        """Stored output of one target (from `offset`) or of every target, in pieces;
        with `follow`, until the targets ended and their output was sent."""
        view = await self.get(job_id)
        if offset < 0:
            raise InvalidArgument(f"must be >= 0, got {offset}", field="offset")
        if offset and not node_id:
            raise InvalidArgument("an offset needs the target's node_id", field="offset")
        names = [t.node_id for t in view.targets]
        if node_id and node_id not in names:
            raise NotFound(f"{node_id!r} is not a target of job {job_id}")
        position = dict.fromkeys([node_id] if node_id else names, offset)
        told: set[str] = set()  # truncated already said
        while True:
            targets = {t.node_id: t for t in view.targets}
            now_ms = int(self._clock() * 1000)
            for n in list(position):
                t = targets[n]
                pos = position[n]
                while pos < t.output_stored_bytes:
                    pieces = await self._read(job_id, n, pos)
                    if not pieces:
                        break
                    for c in pieces:
                        data = c.data[max(0, pos - c.pos) :]
                        if data:
                            yield OutputPiece(n, data, pos, pos + len(data))
                            pos += len(data)
                position[n] = pos
                ended = t.state in {s.value for s in TERMINAL}
                settled = (
                    t.truncated
                    or t.output_stored_bytes >= t.output_bytes
                    or now_ms - t.updated_ms >= OUTPUT_SETTLE * 1000
                )
                if t.truncated and pos >= t.output_stored_bytes and n not in told:
                    told.add(n)
                    if not ended:
                        yield OutputPiece(n, b"", pos, pos, truncated=True)
                if ended and settled and pos >= t.output_stored_bytes:
                    yield OutputPiece(n, b"", pos, pos, truncated=t.truncated, eof=True)
                    del position[n]
            if not follow or not position:
                return
            await asyncio.sleep(self._poll)
            view = await self.get(job_id)

    async def _read(self, job_id: str, node_id: str, pos: int) -> builtins.list[OutputChunk]:
        async def body(tx: JobTx) -> builtins.list[OutputChunk]:
            return await tx.output(job_id, node_id, pos, _READ_BYTES)

        return await self._repo.run(body, write=False)

    async def read_from_node(
        self, job_id: str, node_id: str, *, offset: int = 0, follow: bool = False
    ) -> AsyncGenerator[OutputPiece, None]:
        """A target's full output as its node keeps it (past the manager's bound)."""
        if not node_id:
            raise InvalidArgument("reading from the node needs the node_id", field="node_id")
        if offset < 0:
            raise InvalidArgument(f"must be >= 0, got {offset}", field="offset")
        view = await self.get(job_id)
        if node_id not in {t.node_id for t in view.targets}:
            raise NotFound(f"{node_id!r} is not a target of job {job_id}")
        node = await self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered any more")
        stream = self._pool.read_job_output(
            node_id, node.daemon_address, job_id, offset=offset, follow=follow
        )
        async with contextlib.aclosing(stream):
            async for r in stream:
                yield OutputPiece(node_id, r.data, r.offset, r.next_offset, eof=r.eof)


def _check_id(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem:
        raise InvalidArgument(problem, field="job_id")


_SHOWN = operator.attrgetter(
    *(
        f.name
        for f in dataclasses.fields(JobTargetRecord)
        if f.name not in ("updated_ms", "attempts", "next_attempt_ms", "last_error")
    )
)


def _shown(t: JobTargetRecord | None) -> object:
    """What operators see of a target (a change in anything else is not news)."""
    return None if t is None else _SHOWN(t)


def _shown_job(r: JobRecord) -> object:
    return (r.state, r.ended_ms, r.reason, r.cancelled_ms)
