"""The agent socket's front door: who is on the other end (SO_PEERCRED).

gRPC Python does not expose the peer credentials of a Unix-socket call:
`context.peer()` is just "unix:" and the auth context of
`grpc.local_server_credentials(LocalConnectionType.UDS)` carries only
`transport_security_type=local` (checked with grpcio 1.85). So the daemon
accepts agent connections itself:

1. The public socket (`<run_dir>/agent.sock`, mode 0660) is an asyncio Unix
   server. On accept it reads SO_PEERCRED (pid, uid, gid) from the kernel and
   the peer's process create time (so a pid reused later is not trusted).
2. It opens a connection to the real gRPC server, which listens on a socket
   in a 0700 directory only the daemon can enter, after binding that
   connection to a fresh abstract address `@fleet-agent-<random>`. gRPC
   reports exactly that address as `context.peer()`
   ("unix-abstract:fleet-agent-<random>"), and `PeerRegistry.lookup` maps it
   back to the credentials read in step 1.
3. Bytes are copied both ways until either side closes; then the mapping is
   dropped *before* the upstream socket is closed, so a freed name can never
   be re-bound by someone else while it still maps to a pid.

Costs one extra copy of agent traffic through the daemon, which is small
(registration, heartbeats, config, custom metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["PeerCredProxy", "PeerInfo"]

log = logging.getLogger(__name__)

_CRED = struct.Struct("3i")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class PeerInfo:
    """The process on the far end of one agent-socket connection."""

    pid: int
    """Process id the kernel reported when the connection was made."""
    uid: int
    """Its effective user id."""
    create_time: float
    """psutil create time of `pid` at accept time (0.0 if it was already gone)."""

    def still_same_process(self) -> bool:
        """True while `pid` is still the process that connected (not a reused pid)."""
        try:
            return psutil.Process(self.pid).create_time() == self.create_time
        except psutil.Error:
            return False


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


class PeerCredProxy:
    """Accepts agents on `public_path` and forwards them to gRPC on `upstream_path`."""

    def __init__(self, public_path: Path, upstream_path: Path) -> None:
        self.public_path = public_path
        self.upstream_path = upstream_path
        self._peers: dict[str, PeerInfo] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefix = f"fleet-agent-{secrets.token_hex(8)}-"
        self._count = 0

    async def start(self) -> None:
        """Bind the public socket (replacing a stale one) with mode 0660."""
        with contextlib.suppress(FileNotFoundError):
            self.public_path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.public_path))
        os.chmod(self.public_path, 0o660)

    async def stop(self) -> None:
        """Close the public socket (removing its file) and every proxied connection.

        A proxy that never started removes nothing: the file may be another
        daemon's live socket (the reason a start was refused).
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(FileNotFoundError):
                self.public_path.unlink()

    def lookup(self, grpc_peer: str) -> PeerInfo | None:
        """The credentials behind a gRPC `context.peer()` string, if it came through us."""
        prefix = "unix-abstract:"
        if not grpc_peer.startswith(prefix):
            return None
        return self._peers.get(grpc_peer[len(prefix) :])

    @property
    def connections(self) -> int:
        """Agent connections open right now."""
        return len(self._peers)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        name = ""
        up_writer: asyncio.StreamWriter | None = None
        try:
            pid, uid, _gid = _peer_cred(writer.get_extra_info("socket"))
            try:
                created = psutil.Process(pid).create_time()
            except psutil.Error:
                created = 0.0
            self._count += 1
            name = f"{self._prefix}{self._count}"
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.bind("\0" + name)
                up.setblocking(False)
                await asyncio.get_running_loop().sock_connect(up, str(self.upstream_path))
            except OSError:
                up.close()
                raise
            self._peers[name] = PeerInfo(pid=pid, uid=uid, create_time=created)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except OSError as exc:
            log.warning("agent connection failed: %s", exc)
        except asyncio.CancelledError:
            # Only stop() cancels us. Ending quietly matters: asyncio's stream
            # server logs a cancelled handler task as "Exception in callback".
            pass
        finally:
            self._peers.pop(name, None)  # before the name is freed by closing
            for w in (up_writer, writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._tasks.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()
