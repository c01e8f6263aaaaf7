"""ManagerService.Connect: a daemon's control stream, served.

The first message must be the hello; it is `RegisterNode`, run by the unary
handler itself with the stream's context, so the identity rule (the caller
is ``node/<hello.node_id>``, with a certificate not revoked: the deny list
is checked there), the validation and the registration (with the
certificate's expiry) are the unary path's. After the welcome, upward
messages go to the unary handlers the same way (`SyncAgentStates`,
`ReportMetrics`, ...) and are answered with `reply_to` = their id; one the
handler refuses is answered with `error` (its code, message and the
`Resource` the unary call would send as trailing metadata) and the stream
goes on. Command results go to the node's `ControlSession`.

New streams are admitted by `manager.service.admission.HelloPacer`: at most
`control.max_hellos_per_second` (after a burst of as many), a hello past the
ceiling waiting for its slot; and no more in progress than finish within
`control.max_hello_wait_seconds` at the rate hellos have been finishing. A
hello past either is refused RESOURCE_EXHAUSTED at once, before anything is
done for it, with when to come back (`fleet.control.RETRY_AFTER`, in the
error answer's and the status's trailing metadata): the daemon comes back
then, over the same connection.

Upward messages are handled concurrently, at most
`control.max_pending_answers` at once per stream; at that many the handler
stops reading, which is the daemon's backpressure. Protocol violations
(a second hello, ids not increasing, results for requests never sent,
oversized results) are refused, counted, and change nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from fleet.control import retry_after_metadata
from fleet.errors import DeadlineExceeded, FleetError, InvalidArgument
from fleet.interceptors import bounded
from fleet.v1 import manager_pb2
from manager.pool.config import ControlConfig
from manager.pool.stream import STREAM_ENDED, ControlSession, ControlStreams
from manager.service.admission import HelloPacer, Refused

__all__ = ["ControlChannel"]

log = logging.getLogger(__name__)

_Context = aio.ServicerContext[Any, Any]

# Upward message kind -> the unary handler that serves it.
_HANDLERS = {
    "agent_states": "SyncAgentStates",
    "metrics": "ReportMetrics",
    "job_status": "ReportJobStatus",
    "job_output": "UploadJobOutput",
}


class ControlChannel:
    """Serves Connect with `unary`'s handlers (a ManagerServicer) and this replica's streams."""

    def __init__(
        self,
        unary: Any,
        streams: ControlStreams,
        config: ControlConfig,
        *,
        on_violation: Callable[[str], None] = lambda _: None,
        on_refused: Callable[[str, str], None] = lambda _k, _c: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._unary = unary
        self._streams = streams
        self._config = config
        self._clock = clock
        rate = config.max_hellos_per_second
        self._pacer = HelloPacer(rate, rate, config.max_hello_wait_seconds)
        self._on_violation = on_violation
        self._on_refused = on_refused

    async def serve(
        self, requests: AsyncIterator[manager_pb2.ConnectRequest], context: _Context
    ) -> None:
        """Run one stream until the daemon ends it, or it is replaced or broken."""
        it = aiter(requests)
        try:
            async with asyncio.timeout(self._config.hello_timeout_seconds):
                first = await anext(it)
        except TimeoutError:
            self._on_violation("no_hello")
            raise DeadlineExceeded(
                f"no hello within {self._config.hello_timeout_seconds:g} s; "
                "the first message on the control stream must be hello"
            ) from None
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            self._on_violation("no_hello")
            raise InvalidArgument(
                "the first message on the control stream must be hello (as RegisterNode), "
                f"got {first.WhichOneof('body') or 'an empty message'}"
            )
        wait = await self._admit(first, context)
        if wait is None:
            return
        try:  # in progress (HelloPacer) until the welcome is queued or the hello failed
            if wait > 0:
                await asyncio.sleep(wait)
            # Identity (node/<hello.node_id>), validation and registration: RegisterNode's own.
            welcome = await self._unary.RegisterNode(first.hello, context)
            session = ControlSession(
                first.hello.node_id, self._config, on_violation=self._on_violation
            )
            if self._streams.attach(session):
                self._on_violation(
                    "replaced_stream"
                )  # two daemons with one certificate, or a zombie
            await session.send_answer(
                manager_pb2.ConnectResponse(reply_to=first.id, welcome=welcome)
            )
        finally:
            self._pacer.done(self._clock())
        log.info("%s: control stream open", session.node_id)
        writer = asyncio.create_task(self._write(session, context), name="control-write")
        reader = asyncio.create_task(
            self._read(session, it, context, first.id), name="control-read"
        )
        try:
            await session.ended.wait()
        finally:
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._streams.detach(session)
            log.info("%s: control stream closed: %s", session.node_id, session.close_reason)
        if session.end_status is not None and not context.done():
            code, message = session.end_status
            try:
                await context.abort(code, message)
            except aio.AbortError:
                raise
            except Exception as exc:  # the call went meanwhile (shutdown, the daemon left)
                log.debug("%s: could not end the stream with %s: %r", session.node_id, code, exc)

    async def _admit(self, first: manager_pb2.ConnectRequest, context: _Context) -> float | None:
        """Seconds until this hello's slot; or None: the hello was refused RESOURCE_EXHAUSTED,
        with when to come back (`fleet.control.RETRY_AFTER`) in the answer and the status."""
        decision = self._pacer.admit(self._clock(), first.hello.node_id)
        if not isinstance(decision, Refused):
            return decision
        self._on_refused("hello", "RESOURCE_EXHAUSTED")
        wait = self._config.max_hello_wait_seconds
        if decision.why == "rate":
            rate = self._config.max_hellos_per_second
            why = (
                f"the manager admits at most {rate:g} new control streams per second "
                f"([control] max_hellos_per_second) and this one would wait more than {wait:g} s"
            )
        else:
            why = (
                f"the manager is busy with {self._pacer.in_flight} hellos, more than it "
                f"finishes in {wait:g} s ([control] max_hello_wait_seconds)"
            )
        text = f"{why}; its turn is in {decision.retry_after:.1f} s: come back then"
        about = retry_after_metadata(decision.retry_after)
        # The answer (a daemon reads the hint from it) and the status both carry the hint.
        error = manager_pb2.ConnectError(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=text, trailing_metadata=about
        )
        try:
            await context.write(manager_pb2.ConnectResponse(reply_to=first.id, error=error))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, text, trailing_metadata=tuple(about.items())
            )
        except aio.AbortError:
            raise
        except Exception as exc:  # the daemon read the answer and left: done
            log.debug("%s: refused hello: the stream went first: %r", first.hello.node_id, exc)
        return None

    async def _write(self, session: ControlSession, context: _Context) -> None:
        try:
            while (msg := await session.next_outgoing()) is not None:
                await context.write(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport broke (gRPC says how); the stream is over
            session.close(f"writing to the daemon failed: {exc}")

    async def _read(
        self,
        session: ControlSession,
        it: AsyncIterator[manager_pb2.ConnectRequest],
        context: _Context,
        last_id: int,
    ) -> None:
        room = asyncio.Semaphore(self._config.max_pending_answers)
        pending: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            pending.discard(task)
            room.release()

        try:
            async for req in it:
                kind = req.WhichOneof("body")
                if kind == "result":
                    session.deliver(req.result)
                    continue
                if kind is None or req.id <= last_id:
                    why = "empty_message" if kind is None else "id_not_increasing"
                    await self._refuse(
                        session,
                        req.id,
                        why,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "a message without a body"
                        if kind is None
                        else f"message id {req.id} is not above the previous {last_id}; "
                        "ids must increase on the stream",
                    )
                    continue
                last_id = req.id
                if kind == "hello":
                    await self._refuse(
                        session,
                        req.id,
                        "second_hello",
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "hello was already sent on this stream; open a new stream to register anew",
                    )
                    continue
                await room.acquire()  # at the bound: stop reading (backpressure)
                task = asyncio.create_task(self._answer(session, req, kind, context))
                pending.add(task)
                task.add_done_callback(done)
            # The requests ended: the daemon closed its side, or gRPC lost the connection
            # (a cut link's unanswered keepalive ends them the same way). Finish what it sent.
            await asyncio.gather(*pending)
            session.close(STREAM_ENDED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # gRPC: the connection broke (keepalive, reset, ...)
            session.close(f"the stream broke: {exc}")
        finally:
            for task in list(pending):
                task.cancel()

    async def _refuse(
        self, session: ControlSession, req_id: int, kind: str, code: grpc.StatusCode, text: str
    ) -> None:
        self._on_violation(kind)
        log.warning("%s: control stream: %s", session.node_id, text)
        error = manager_pb2.ConnectError(code=code.value[0], message=text)
        # Waits for room like any answer: a daemon flooding bad messages is not read faster.
        await session.send_answer(manager_pb2.ConnectResponse(reply_to=req_id, error=error))

    async def _answer(
        self,
        session: ControlSession,
        req: manager_pb2.ConnectRequest,
        kind: str,
        context: _Context,
    ) -> None:
        try:
            handler = getattr(self._unary, _HANDLERS[kind])
            body = await handler(getattr(req, kind), context)
            answer = manager_pb2.ConnectResponse(reply_to=req.id, **{kind: body})
        except FleetError as exc:
            self._on_refused(kind, exc.code.name)
            # What the unary call's interceptor sends as trailing metadata (the Resource).
            about = exc.resource.metadata() if exc.resource is not None else ()
            answer = manager_pb2.ConnectResponse(
                reply_to=req.id,
                error=manager_pb2.ConnectError(
                    code=exc.code.value[0],
                    message=bounded(exc.message),
                    trailing_metadata=dict(about),
                ),
            )
        except Exception:
            log.exception("%s: unhandled error answering %s", session.node_id, kind)
            self._on_refused(kind, "INTERNAL")
            answer = manager_pb2.ConnectResponse(
                reply_to=req.id,
                error=manager_pb2.ConnectError(
                    code=grpc.StatusCode.INTERNAL.value[0],
                    message=f"internal error handling {kind}; see the manager's log",
                ),
            )
        await session.send_answer(answer)
