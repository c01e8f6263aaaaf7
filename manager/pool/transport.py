"""How the pool reaches a daemon: one small interface, two implementations.

`Transport` is the seam (httpx's transport idea): the pool picks one per
call. `DialledTransport` dials the daemon's DaemonService through the
pool's channels (retries, deadlines and error translation as the pool's
docstring describes); `StreamTransport` sends the call over the node's own
control stream (`manager.pool.stream`). Both take the DaemonService method's
name and its request message and raise `fleet.errors`.

Over a stream nothing is retried: the daemon reconnects by itself, and the
next call goes over the new stream (or is dialled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator
from typing import Protocol

from google.protobuf.message import Message
from grpc import aio

from fleet.errors import FleetError, Unavailable
from manager.pool.channel import DaemonChannel, NodeRecord, WrongDaemonIdentity, translate_error
from manager.pool.channels import Channels
from manager.pool.config import PoolConfig
from manager.pool.policy import retry_delay
from manager.pool.stream import ControlSession

__all__ = [
    "DialledTransport",
    "StreamTransport",
    "Transport",
    "cancelled_by_caller",
    "stream_budget",
]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Runs one DaemonService call on a node."""

    async def unary(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> Message:
        """A unary call; `call_timeout` None means the pool's default."""
        ...

    def stream(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        follow: bool,
        call_timeout: float | None,
    ) -> AsyncGenerator[Message, None]:
        """A server-streaming call; a followed one has no deadline unless given one."""
        ...


def stream_budget(config: PoolConfig, *, follow: bool, call_timeout: float | None) -> float | None:
    """A server stream's deadline in seconds: the caller's, else none for a follow,
    else the pool's call timeout."""
    if call_timeout is not None:
        return call_timeout
    return None if follow else config.call_timeout


def cancelled_by_caller() -> bool:
    """True if the running task itself is being cancelled.

    grpc.aio also raises CancelledError for a call the pool cancelled by
    closing its channel; that one becomes `_cut_off` so callers can tell.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _cut_off(node_id: str) -> Unavailable:
    return Unavailable(
        f"{node_id}: the call was cut off: its channel was closed "
        "(pool closed, node forgotten or moved)"
    )


class StreamTransport:
    """Calls over one node's control stream."""

    def __init__(self, session: ControlSession, config: PoolConfig, record: NodeRecord) -> None:
        self._session = session
        self._config = config
        self._record = record

    async def unary(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> Message:
        budget = self._config.call_timeout if call_timeout is None else call_timeout
        self._record.calls += 1
        try:
            return await self._session.call(method, request, budget)
        except FleetError:
            self._record.failures += 1
            raise

    async def stream(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        follow: bool,
        call_timeout: float | None,
    ) -> AsyncGenerator[Message, None]:
        budget = stream_budget(self._config, follow=follow, call_timeout=call_timeout)
        self._record.calls += 1
        try:
            # aclosing: a reader that leaves cancels the command on the node at once.
            async with contextlib.aclosing(self._session.stream(method, request, budget)) as rs:
                async for response in rs:
                    yield response
        except FleetError:
            self._record.failures += 1
            raise


class DialledTransport:
    """Calls over a channel the pool dials to the daemon's listen address."""

    def __init__(self, channels: Channels, config: PoolConfig, rng: random.Random) -> None:
        self._channels = channels
        self._config = config
        self._rng = rng

    async def unary(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> Message:
        loop = asyncio.get_running_loop()
        budget = self._config.call_timeout if call_timeout is None else call_timeout
        deadline = loop.time() + budget
        record = self._channels.record(node_id)
        record.calls += 1
        attempt = 0
        try:
            while True:
                channel = await self._channels.acquire(node_id, address, deadline)
                try:
                    call = getattr(channel.stub, method)
                    response: Message = await call(request, timeout=deadline - loop.time())
                except aio.AioRpcError as exc:
                    error = translate_error(exc, node_id=node_id, address=address, budget=budget)
                except asyncio.CancelledError:
                    if cancelled_by_caller():
                        raise
                    error = _cut_off(node_id)
                else:
                    return response
                finally:
                    self._channels.release(channel)
                await self._before_retry(
                    record, channel, error, attempt, idempotent=idempotent, deadline=deadline
                )
                attempt += 1
        except FleetError:
            record.failures += 1
            raise

    async def stream(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        follow: bool,
        call_timeout: float | None,
    ) -> AsyncGenerator[Message, None]:
        """A server stream whose start is retried on UNAVAILABLE until the first response."""
        loop = asyncio.get_running_loop()
        budget = stream_budget(self._config, follow=follow, call_timeout=call_timeout)
        start_deadline = loop.time() + (budget or self._config.call_timeout)
        record = self._channels.record(node_id)
        record.calls += 1
        attempt = 0
        try:
            while True:
                channel = await self._channels.acquire(node_id, address, start_deadline)
                call = getattr(channel.stub, method)(
                    request, timeout=None if budget is None else start_deadline - loop.time()
                )
                started = False
                try:
                    async for response in call:
                        started = True
                        yield response
                except aio.AioRpcError as exc:
                    error = translate_error(exc, node_id=node_id, address=address, budget=budget)
                    if started:
                        raise error from exc
                except asyncio.CancelledError:
                    if cancelled_by_caller():
                        raise
                    error = _cut_off(node_id)
                    if started:
                        raise error from None
                else:
                    return
                finally:
                    call.cancel()  # no-op when finished; ends the stream if the reader left
                    self._channels.release(channel)
                await self._before_retry(
                    record, channel, error, attempt, idempotent=True, deadline=start_deadline
                )
                attempt += 1
        except FleetError:
            record.failures += 1
            raise

    async def _before_retry(
        self,
        record: NodeRecord,
        channel: DaemonChannel,
        error: FleetError,
        attempt: int,
        *,
        idempotent: bool,
        deadline: float,
    ) -> None:
        """Sleep before the next attempt, or raise `error` if there is none."""
        wrong_daemon = isinstance(error, WrongDaemonIdentity)
        unavailable = isinstance(error, Unavailable) and not wrong_daemon
        delay = retry_delay(
            retryable=idempotent and unavailable,
            attempt=attempt,
            max_attempts=self._config.max_attempts,
            backoff=self._config.retry,
            remaining=deadline - asyncio.get_running_loop().time(),
            rng=self._rng,
        )
        if delay is None:
            if (idempotent and unavailable) or wrong_daemon:
                self._channels.give_up(channel)
            raise error
        record.retries += 1
        log.debug("%s unavailable; attempt %d in %.3f s", record.node_id, attempt + 2, delay)
        await asyncio.sleep(delay)
