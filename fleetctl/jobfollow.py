"""Following a job: each target's output as it arrives, a progress line, Ctrl-C.

`follow` runs two streams side by side: WatchJob (the job and the targets
that change, until it ends) and ReadJobOutput with follow (every target's
output as the manager stores it). Output lines are printed prefixed with
their node (``web-1 | line``), or, with `group`, a target's lines together
once its output ends. While it runs, a progress line (counts by state) sits
on stderr when stderr is a terminal.

Ctrl-C while following asks whether to cancel the job or leave it running
when stdin is a terminal; without one it leaves the job running. Either
way of leaving prints the job's id and how to follow or cancel it, and
exits 130: the outcome is not known.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
import typer
from rich.live import Live
from rich.text import Text

from fleet.v1 import common_pb2, fleet_pb2, jobs_pb2
from fleetctl.joboutput import (
    TERMINAL_JOB,
    LineSplitter,
    offline_note,
    progress_line,
    truncation_marker,
    unreached_note,
)
from fleetctl.runtime import EXIT_INTERRUPTED, Cli, Stub, stdin_is_interactive
from fleetctl.views import job_view

__all__ = [
    "OUTPUT_GRACE_SECONDS",
    "JobTracker",
    "OutputPrinter",
    "follow",
    "leave_hint",
    "pending_note",
    "unreached_notes",
]

OUTPUT_GRACE_SECONDS = 10.0
"""How long the output may lag behind the end of the job."""

OFFLINE_CHECK_SECONDS = 2.0
"""Targets still PENDING this long into the follow: say which wait for an offline node
(one ListNodes; a job whose targets all started by then costs nothing)."""

_STARTED = frozenset({jobs_pb2.JOB_TARGET_STATE_QUEUED, jobs_pb2.JOB_TARGET_STATE_RUNNING})

UNREACHED_CHECK_SECONDS = 3.0
"""While following, how often to ask whether a started target's node is out of reach (a
network cut): otherwise its output just stops, with no word why."""

_PALETTE = (
    "cyan",
    "magenta",
    "blue",
    "green",
    "yellow",
    "bright_cyan",
    "bright_magenta",
    "bright_blue",
    "bright_green",
    "bright_yellow",
)


def leave_hint(job_id: str) -> str:
    """What to run to get back to a job left running."""
    return (
        f"job {job_id} keeps running; follow it: fleetctl jobs logs {job_id} -f;"
        f" see it: fleetctl jobs show {job_id}; cancel it: fleetctl jobs cancel {job_id}"
    )


class OutputPrinter:
    """Prints ReadJobOutput messages: prefixed lines, or raw bytes for one node."""

    def __init__(
        self, cli: Cli, job_id: str, node_ids: Iterable[str], *, group: bool, raw: bool = False
    ) -> None:
        self._cli = cli
        self._job_id = job_id
        self._group = group
        self._raw = raw
        self._splitter = LineSplitter()
        self._held: dict[str, list[Text]] = {}
        self._marked: set[str] = set()
        self._ended: set[str] = set()
        self._colors: dict[str, str] = {}
        self._width = 0
        self.heard: dict[str, float] = {}
        """node -> when (monotonic) its output last came."""
        self.add_nodes(node_ids)

    def add_nodes(self, node_ids: Iterable[str]) -> None:
        """Nodes whose lines may come (they set the prefix width and colours)."""
        for node in sorted(node_ids):
            if node not in self._colors:
                self._colors[node] = _PALETTE[len(self._colors) % len(_PALETTE)]
                self._width = max(self._width, len(node))

    def on_message(self, msg: fleet_pb2.FleetServiceReadJobOutputResponse) -> None:
        """One message of ReadJobOutput."""
        node = msg.node_id
        if msg.data:
            self.heard[node] = time.monotonic()
        if self._raw:
            if msg.data:
                self._cli.out.file.flush()
                out = sys.stdout.buffer
                out.write(msg.data)
                out.flush()
            if msg.truncated and node not in self._marked:
                self._marked.add(node)
                # The marker names fleetctl already: not warn's "fleetctl: [fleetctl: ...".
                self._cli.note(
                    truncation_marker(self._job_id, node, msg.next_offset), style="yellow"
                )
            return
        if node not in self._colors:
            self.add_nodes([node])
        for line in self._splitter.feed(node, msg.data):
            self._line(node, line)
        if msg.truncated and node not in self._marked:
            self._marked.add(node)
            self._end_partial(node)
            self._line(node, truncation_marker(self._job_id, node, msg.next_offset), "yellow")
        if msg.eof:
            self.end_node(node)

    def end_node(self, node: str) -> None:
        """`node`'s output ended: its last partial line, and with group its block."""
        if node in self._ended:
            return
        self._end_partial(node)  # held with the rest when grouping
        self._ended.add(node)
        for text in self._held.pop(node, []):
            self._print(text)

    def finish(self) -> None:
        """The stream ended (or we leave): print whatever is still held."""
        for node in [*self._splitter.pending(), *self._held]:
            self.end_node(node)

    def _end_partial(self, node: str) -> None:
        rest = self._splitter.flush(node)
        if rest is not None:
            self._line(node, rest)

    def _line(self, node: str, line: str, style: str = "") -> None:
        text = Text.assemble(
            (node.ljust(self._width), self._colors.get(node, "")), " | ", (line, style)
        )
        if self._group and node not in self._ended:
            self._held.setdefault(node, []).append(text)
        else:
            self._print(text)

    def _print(self, text: Text) -> None:
        self._cli.out.print(text, soft_wrap=True)


class JobTracker:
    """The job as WatchJob tells it: the job's state and counts, every target's latest."""

    def __init__(self, job: jobs_pb2.Job) -> None:
        self._head = jobs_pb2.Job()
        self._targets: dict[str, jobs_pb2.JobTarget] = {}
        self.update(job, ())

    def update(self, job: jobs_pb2.Job, changed: Iterable[jobs_pb2.JobTarget]) -> None:
        """One WatchJob message (the first carries every target in `job`)."""
        for target in [*job.targets, *changed]:
            self._targets[target.node_id] = target
        self._head.CopyFrom(job)
        del self._head.targets[:]

    @property
    def state(self) -> str:
        """The job's state name ("RUNNING")."""
        return str(job_view(self._head)["state"])

    def pending(self) -> list[str]:
        """The targets not sent to their node yet."""
        return [n for n, t in self._targets.items() if t.state == jobs_pb2.JOB_TARGET_STATE_PENDING]

    def started(self) -> list[str]:
        """The targets their node accepted and that have not ended (QUEUED, RUNNING)."""
        return [n for n, t in self._targets.items() if t.state in _STARTED]

    def view(self) -> dict[str, Any]:
        """The job with its targets, as `views.job_view`."""
        job = jobs_pb2.Job()
        job.CopyFrom(self._head)
        job.targets.extend(self._targets[n] for n in sorted(self._targets))
        return job_view(job)


class _Line:
    """A renderable that recomputes its text at each refresh (the elapsed time moves)."""

    def __init__(self, text: Callable[[], str]) -> None:
        self._text = text

    def __rich__(self) -> Text:
        return Text(self._text(), style="dim")


class _Progress:
    """The progress line on stderr, only when stderr is a terminal."""

    def __init__(self, cli: Cli, text: Callable[[], str]) -> None:
        self._live: Live | None = None
        if cli.err.is_terminal:
            self._live = Live(
                _Line(text),
                # Output lines go above the progress line only when printed through
                # the Live's own console (rich Consoles bypass its stdout redirect):
                # on a terminal stdout that is where they go anyway; a piped stdout
                # leaves the line alone on stderr.
                console=cli.out if cli.out.is_terminal else cli.err,
                transient=True,
                refresh_per_second=4,
                redirect_stdout=False,
                redirect_stderr=False,
            )

    def __enter__(self) -> _Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No progress line for a while (a prompt)."""
        if self._live is not None:
            self._live.stop()
        try:
            yield
        finally:
            if self._live is not None:
                self._live.start()


async def _ask(cli: Cli, progress: _Progress) -> str:
    """ "c" to cancel the job, "l" (or Enter, or a second Ctrl-C) to leave it running."""
    with progress.paused(), cli.ctrl_c_raises():
        try:
            while True:
                answer = (
                    str(
                        typer.prompt(
                            "cancel the job (c), or leave it running (l)?", default="l", err=True
                        )
                    )
                    .strip()
                    .lower()[:1]
                )
                if answer in ("c", "l"):
                    return answer
        except (typer.Abort, KeyboardInterrupt, EOFError):
            return "l"


async def _out_of_reach(
    stub: Stub, job: jobs_pb2.Job, deadline: float
) -> tuple[dict[str, int], dict[str, int]]:
    """The job's selected nodes the manager cannot reach, from one ListNodes: offline
    (node -> last seen, ms) and online with a lost control stream (node -> lost at, ms)."""
    reply = await stub.ListNodes(
        fleet_pb2.FleetServiceListNodesRequest(selector=job.spec.selector), timeout=deadline
    )
    offline = {
        n.node_id: n.last_heartbeat
        for n in reply.nodes
        if n.status == common_pb2.NODE_STATUS_OFFLINE
    }
    lost = {
        n.node_id: n.stream_since
        for n in reply.nodes
        if n.stream_state == fleet_pb2.CONTROL_STREAM_STATE_LOST
    }
    return offline, lost


async def pending_note(
    stub: Stub, job: jobs_pb2.Job, pending: list[str], *, deadline: float
) -> str:
    """`offline_note` for these PENDING targets of `job`, from one ListNodes ("" if no
    node of theirs is offline or without its control stream); `deadline`: the call's,
    in seconds."""
    offline, lost = await _out_of_reach(stub, job, deadline)
    return offline_note(
        pending,
        offline,
        lost=lost,
        created_ms=job.created_at,
        delivery_timeout=(
            job.spec.delivery_timeout_seconds
            if job.spec.HasField("delivery_timeout_seconds")
            else None
        ),
    )


async def unreached_notes(
    stub: Stub,
    job: jobs_pb2.Job,
    started: Callable[[], Awaitable[list[str] | None]],
    say: Callable[[str], None],
    *,
    heard: Mapping[str, float],
    deadline: float,
    every: float = UNREACHED_CHECK_SECONDS,
) -> None:
    """Until `started()` says the job ended (None), every `every` s: `say` once per outage
    which started targets' nodes the manager cannot reach (`unreached_note`). Only nodes
    whose output went quiet for `every` s (`heard`: node -> last output, monotonic) cost
    a ListNodes. Best effort: a failed call is tried again next round."""
    told: set[str] = set()
    while True:
        await asyncio.sleep(every)
        targets = await started()
        if targets is None:
            return
        now = time.monotonic()
        targets = [n for n in targets if n in told or now - heard.get(n, 0.0) >= every]
        if not targets:
            continue
        try:
            offline, lost = await _out_of_reach(stub, job, deadline)
        except grpc.RpcError:
            continue
        told &= offline.keys() | lost.keys()  # back: a later outage is said again
        fresh = [n for n in targets if n not in told]
        note = unreached_note(fresh, offline, lost)
        if note:
            say(note)
            told.update(n for n in fresh if n in offline or n in lost)


async def follow(
    cli: Cli, stub: Stub, job: jobs_pb2.Job, *, group: bool, show_output: bool = True
) -> tuple[int | None, dict[str, Any]]:
    """Follow `job` until it ends: (None, the job) then; (130, the job so far) if left."""
    job_id = job.id
    tracker = JobTracker(job)
    printer = OutputPrinter(cli, job_id, [t.node_id for t in job.targets], group=group)
    interrupt = asyncio.Event()
    started = time.monotonic()

    async def watch() -> None:
        stream = stub.WatchJob(fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id), timeout=None)
        async for msg in stream:
            tracker.update(msg.job, msg.targets)
            printer.add_nodes(t.node_id for t in [*msg.job.targets, *msg.targets])
            if tracker.state in TERMINAL_JOB:
                stream.cancel()
                return

    async def output() -> None:
        request = fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, follow=True)
        async for msg in stub.ReadJobOutput(request, timeout=None):
            printer.on_message(msg)

    async def offline() -> None:
        # Without this a target waiting for an offline node shows only as "pending"
        # until its delivery timeout, minutes later.
        await asyncio.sleep(OFFLINE_CHECK_SECONDS)
        pending = tracker.pending()
        if not pending or tracker.state in TERMINAL_JOB:
            return
        note = await pending_note(stub, job, pending, deadline=cli.config().timeout)
        if note:
            with progress.paused():
                cli.note(f"fleetctl: {note}")

    tasks: dict[asyncio.Task[Any], str] = {asyncio.create_task(watch()): "watch"}
    if show_output:
        tasks[asyncio.create_task(output())] = "output"
    cancelling = False
    cli.sigint = interrupt.set
    progress = _Progress(cli, lambda: progress_line(tracker.view(), time.monotonic() - started))
    noting = asyncio.create_task(offline())

    async def running() -> list[str] | None:
        return None if tracker.state in TERMINAL_JOB else tracker.started()

    def say(note: str) -> None:
        with progress.paused():
            cli.note(f"fleetctl: {note}")

    reaching = asyncio.create_task(
        unreached_notes(stub, job, running, say, heard=printer.heard, deadline=cli.config().timeout)
    )
    try:
        with progress:
            while tasks:
                # Once the job ended its output follows within moments; a stream the
                # manager never closes must not hold the summary back.
                grace = None if "watch" in tasks.values() else OUTPUT_GRACE_SECONDS
                waiter = asyncio.create_task(interrupt.wait())
                done, _ = await asyncio.wait(
                    [*tasks, waiter], timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if not done:
                    with progress.paused():
                        cli.warn(
                            f"the job ended but its output did not within {grace:g}s;"
                            f" see it with fleetctl jobs logs {job_id}"
                        )
                    break
                for task in done & tasks.keys():
                    kind = tasks.pop(task)
                    error = task.exception()
                    if error is None:
                        continue
                    with progress.paused():  # a line of its own, not after the progress line
                        if kind == "output" and isinstance(error, grpc.RpcError):
                            cli.warn(
                                f"the job's output stopped ({error.details() or error.code()});"
                                f" the rest: fleetctl jobs logs {job_id}"
                            )
                            continue
                        cli.warn(leave_hint(job_id))
                    raise error
                if interrupt.is_set():
                    interrupt.clear()
                    if cancelling or not stdin_is_interactive():
                        break
                    if await _ask(cli, progress) == "l":
                        break
                    await stub.CancelJob(
                        fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id),
                        timeout=cli.config().timeout,
                    )
                    cancelling = True
                    with progress.paused():
                        cli.note(f"cancelling job {job_id} (Ctrl-C again to stop waiting)")
    finally:
        cli.sigint = None
        for task in [*tasks, noting, reaching]:
            task.cancel()
        # The notes are best effort: a ListNodes that failed changes nothing.
        await asyncio.gather(*tasks, noting, reaching, return_exceptions=True)
        printer.finish()
    if tasks and "watch" in tasks.values():  # left while it runs
        cli.note(f"fleetctl: {leave_hint(job_id)}")
        return EXIT_INTERRUPTED, tracker.view()
    return None, tracker.view()
