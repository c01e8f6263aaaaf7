"""A hello refused by the manager's ceiling is retried on the same connection;
a slow TLS handshake is waited for, not abandoned; a hello the manager makes wait
longer than a call's deadline is waited for, not sent again.

Real manager (its `[control] max_hellos_per_second` tiny, no wait), real
ManagerLinks with mTLS, and an in-test TCP proxy between them that counts the
connections it accepts (and can hold each one back before forwarding it): a
refused daemon comes back after its backoff with a new stream on the
connection it holds, not a new TLS handshake; a connection slower than the
hello's deadline still carries the hello, since that deadline starts once the
connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from manager_harness import manager_config, running_manager

from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo, _Reconnect, keep_for_retry
from fleet import errors
from fleet.retry import Backoff

NODES = 4


class CountingProxy:
    """A TCP proxy to `target` that counts the connections it accepted."""

    def __init__(self, target: int, *, hold: float | None = 0.0) -> None:
        self.target = target
        self.hold = hold
        """Seconds each accepted connection waits before it is forwarded (None: never)."""
        self.accepted = 0
        self.accepting = asyncio.Event()
        """Set at each accepted connection."""
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.accepting.set()
        # As a manager too busy to start the handshake: the daemon's bytes wait.
        if self.hold is None:
            await reader.read()  # until the daemon gives up and closes
            writer.close()
            return
        await asyncio.sleep(self.hold)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
            self._pipes.discard(task)
        for w in (writer, up_writer):
            w.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def _links(
    pki: Any,
    port: int,
    root: Path,
    all_connected: asyncio.Event,
    *,
    nodes: int = NODES,
    rpc_timeout: float = 5.0,
    welcome_timeout: float = 30.0,
    connect_timeout: float = 20.0,
) -> AsyncIterator[list[ManagerLink]]:
    links: list[ManagerLink] = []

    def on_state(_state: str, _address: str) -> None:
        if all(link.state == "connected" for link in links):
            all_connected.set()

    for i in range(nodes):
        state = root / f"n{i}"
        state.mkdir()
        links.append(
            ManagerLink(
                ManagerLinkConfig(
                    addresses=(f"127.0.0.1:{port}",),
                    rpc_timeout_seconds=rpc_timeout,
                    welcome_timeout_seconds=welcome_timeout,
                    connect_timeout_seconds=connect_timeout,
                    reconnect=Backoff(initial=0.2, maximum=0.6),
                ),
                tls=pki.issue("node", f"n{i}"),
                trust_domain=pki.trust_domain,
                node=NodeInfo(f"n{i}", "", {}),
                state_dir=state,
                collect=list,
                snapshot=list,
                rng=random.Random(i),
                on_state=on_state,
            )
        )
    try:
        yield links
    finally:
        for link in links:
            await link.stop()


async def test_a_refused_hello_is_retried_on_the_same_connection(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Four daemons at once against a ceiling of 1 hello a second with no wait: all but
    one are refused RESOURCE_EXHAUSTED, each told its slot (1, 2, 3 s: past the links'
    0.6 s backoff cap), and come back then until welcomed -- each over the one TCP
    connection (one TLS handshake) it opened first (19 without the reuse), and each
    refused about once (back at its slot, not every <= 0.6 s)."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "state",
        control={"max_hellos_per_second": 1.0, "max_hello_wait_seconds": 0.0},
    )
    async with running_manager(config) as server:
        proxy = CountingProxy(server.port)
        port = await proxy.start()
        try:
            all_connected = asyncio.Event()
            async with _links(pki, port, tmp_path, all_connected) as links:
                for link in links:
                    await link.start()
                async with asyncio.timeout(30):
                    await all_connected.wait()
                refused = server.metrics.registry.get_sample_value(
                    "fleet_manager_control_refused_total",
                    {"kind": "hello", "code": "RESOURCE_EXHAUSTED"},
                )
                # At least one refused (on a busy machine the handshakes may spread out).
                assert refused is not None
                assert refused >= 1
                assert sum(link.reconnects for link in links) >= refused
                # Once, or twice if back a hair before its slot (the hint is in ms).
                assert max(link.reconnects for link in links) <= 2
                assert all(link.mode == "stream" for link in links)
                assert proxy.accepted == NODES
        finally:
            await proxy.stop()


async def test_a_hello_kept_waiting_past_the_call_deadline_is_welcomed_once(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Four daemons at once against a ceiling of 1 hello a second that lets a hello wait
    up to 5 s for its slot: past the first, each hello waits about 1, 2, 3 s, longer than
    the links' 0.5 s call deadline but within their welcome timeout, so every daemon is
    welcomed on its first hello (no retry, none refused, one connection each). With the
    hello held to the call deadline the later ones were given up and sent again."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "state",
        control={"max_hellos_per_second": 1.0, "max_hello_wait_seconds": 5.0},
    )
    async with running_manager(config) as server:
        proxy = CountingProxy(server.port)
        port = await proxy.start()
        try:
            all_connected = asyncio.Event()
            async with _links(
                pki, port, tmp_path, all_connected, rpc_timeout=0.5, welcome_timeout=20.0
            ) as links:
                for link in links:
                    await link.start()
                async with asyncio.timeout(30):
                    await all_connected.wait()
                refused = server.metrics.registry.get_sample_value(
                    "fleet_manager_control_refused_total",
                    {"kind": "hello", "code": "RESOURCE_EXHAUSTED"},
                )
                assert not refused
                assert [link.reconnects for link in links] == [0] * NODES
                assert all(link.mode == "stream" for link in links)
                assert proxy.accepted == NODES
        finally:
            await proxy.stop()


async def test_a_handshake_slower_than_the_hello_deadline_is_waited_for(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Each connection held back 1.5 s before its TLS handshake can start, a hello deadline
    of 1 s: the daemon connects over its first connection (the deadline starts once the
    connection is up). Counting the handshake, every hello expired and every connection
    was abandoned for another."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with running_manager(config) as server:
        proxy = CountingProxy(server.port, hold=1.5)
        port = await proxy.start()
        try:
            connected = asyncio.Event()
            async with _links(pki, port, tmp_path, connected, nodes=1, rpc_timeout=1.0) as links:
                await links[0].start()
                async with asyncio.timeout(20):
                    await connected.wait()
                assert links[0].mode == "stream"
                assert links[0].reconnects == 0
                assert proxy.accepted == 1
        finally:
            await proxy.stop()


async def test_a_connection_not_up_within_the_connect_timeout_is_dialled_again(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """A connection that never gets its handshake is given up after connect_timeout and
    dialled again after the backoff: no hello is sent on it."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with running_manager(config) as server:
        proxy = CountingProxy(server.port, hold=None)
        port = await proxy.start()
        try:
            never = asyncio.Event()
            async with _links(pki, port, tmp_path, never, nodes=1, connect_timeout=0.5) as links:
                await links[0].start()
                async with asyncio.timeout(20):
                    while proxy.accepted < 3:
                        proxy.accepting.clear()
                        await proxy.accepting.wait()
                assert links[0].state != "connected"
                assert links[0].reconnects >= 2
                assert links[0].registrations == 0
        finally:
            await proxy.stop()


def test_only_a_slow_or_cut_hello_over_a_ready_connection_keeps_it() -> None:
    """RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED before the welcome on a READY channel keeps
    it, and so does the hello's stream cancelled (CANCELLED, INTERNAL) while the connection
    stands; after the welcome, on a channel that never connected, or any other error: not."""
    ready, connecting = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING
    busy, late = errors.ResourceExhausted("busy"), errors.DeadlineExceeded("late")
    assert keep_for_retry(busy, welcomed=False, state=ready)
    assert keep_for_retry(late, welcomed=False, state=ready)
    assert not keep_for_retry(late, welcomed=False, state=connecting)
    assert not keep_for_retry(
        busy, welcomed=False, state=grpc.ChannelConnectivity.TRANSIENT_FAILURE
    )
    assert not keep_for_retry(busy, welcomed=True, state=ready)
    assert not keep_for_retry(errors.Unavailable("gone"), welcomed=False, state=ready)
    assert not keep_for_retry(errors.Internal("bug"), welcomed=False, state=ready)
    assert not keep_for_retry(OSError("refused"), welcomed=False, state=ready)
    cut = _Reconnect("CANCELLED: CANCELLED", grpc.StatusCode.CANCELLED)
    assert keep_for_retry(cut, welcomed=False, state=ready)
    assert keep_for_retry(
        _Reconnect("INTERNAL: x", grpc.StatusCode.INTERNAL), welcomed=False, state=ready
    )
    assert not keep_for_retry(cut, welcomed=True, state=ready)
    assert not keep_for_retry(cut, welcomed=False, state=grpc.ChannelConnectivity.IDLE)
    gone = _Reconnect("UNAVAILABLE: Socket closed", grpc.StatusCode.UNAVAILABLE)
    assert not keep_for_retry(gone, welcomed=False, state=ready)
    assert not keep_for_retry(_Reconnect("no connection"), welcomed=False, state=connecting)
