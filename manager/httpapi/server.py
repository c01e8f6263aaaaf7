"""The HTTPS listener of the JSON/HTTP API: uvicorn in the manager's event loop.

Client certificates are required and verified against the fleet CA during
the handshake (`ssl.CERT_REQUIRED`), as on the gRPC port; a client without
one never reaches the application. The caller's identity must then reach
the app: neither uvicorn nor hypercorn fills the ASGI TLS extension
(``scope["extensions"]["tls"]``, ``client_cert_chain``), so a subclass of
uvicorn's h11 protocol (its documented ``http=`` hook) reads the verified
certificate off the connection's SSL object once per connection and puts
gRPC's auth context for it into the connection's ASGI ``state``.

Replaced certificate, key or CA files are picked up at the next handshake
(an SNI callback, called for every ClientHello, swaps in a new context when
the files changed and validate), as `fleet.tls` does for gRPC.

uvicorn's `Server.serve` installs signal handlers and polls a flag; the
manager owns both, so this calls its `startup` and `shutdown` directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from fleet.errors import ConfigError
from fleet.listen import listen_sockets
from fleet.tls import TLSConfig
from manager.httpapi.app import AUTH_STATE_KEY, FleetHttpApp
from manager.httpapi.context import auth_context_from_peercert

__all__ = ["HttpServer", "server_ssl_context"]

log = logging.getLogger(__name__)


def _context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # gRPC's floor too
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(cfg.ca_file))
    ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Reloading:
    """The current SSL context for `cfg`'s files, rebuilt when they change and validate."""

    def __init__(self, cfg: TLSConfig) -> None:
        self._cfg = cfg
        cfg.validate()
        self._stamp = self._stat()
        self.current = _context(cfg)
        self.current.sni_callback = self._on_hello
        self._rejected: object = None

    def _stat(self) -> tuple[tuple[int, ...], ...]:
        out: list[tuple[int, ...]] = []
        for path in (self._cfg.ca_file, self._cfg.cert_file, self._cfg.key_file):
            try:
                st = os.stat(path)
            except OSError:
                out.append((-1,))
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _on_hello(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            stamp = self._stat()
            if stamp in (self._stamp, self._rejected):
                sock.context = self.current
                return
            try:
                self._cfg.validate()
                fresh = _context(self._cfg)
            except (ConfigError, ssl.SSLError, OSError) as exc:
                log.warning(
                    "HTTP API: TLS files changed but are unusable, still serving the old: %s", exc
                )
                self._rejected = stamp
                sock.context = self.current
                return
            fresh.sni_callback = self._on_hello
            self.current, self._stamp = fresh, stamp
            sock.context = fresh
            log.info("HTTP API: TLS certificate reloaded (%s)", self._cfg.cert_file)
        except Exception:  # never fail a handshake for the reload's sake
            log.exception("HTTP API: TLS reload failed; still serving the old certificate")


def server_ssl_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The HTTPS server context: `cfg`'s certificate, client certificates required by its CA."""
    return _Reloading(cfg).current


_FLUSH_SECONDS = 0.5
"""How long the last response of a connection may take to leave at shutdown."""


class _PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the verified client certificate in each request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = der = None
        if ssl_object is not None:
            cert = ssl_object.getpeercert()
            der = ssl_object.getpeercert(binary_form=True)
        # app_state is copied into every request's scope["state"]; this connection's own copy.
        self.app_state = {**self.app_state, AUTH_STATE_KEY: auth_context_from_peercert(cert, der)}

    # At shutdown uvicorn closes each connection once idle and waits until every one is
    # gone. Closing TLS waits for the peer's close_notify, which a client keeping the
    # connection idle in its pool never sends, so the manager's stop would wait out its
    # whole grace. Once the last response is written (and had a moment to flush), the
    # connection is dropped instead.

    _stopping = False

    def shutdown(self) -> None:
        self._stopping = True
        super().shutdown()
        if self.transport.is_closing():  # it was idle: nothing left to send
            self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._stopping and self.transport.is_closing():
            self.loop.call_later(_FLUSH_SECONDS, self.transport.abort)


class HttpServer:
    """The JSON/HTTP API's listener: `start()` binds and serves, `stop(grace)` drains."""

    def __init__(self, app: FleetHttpApp, listen: str, tls: TLSConfig) -> None:
        self.app = app
        self._listen = listen
        self._tls = tls
        self._sockets: list[socket.socket] = []
        self._server: uvicorn.Server | None = None
        self.port = 0
        """The bound port (after start)."""

    async def start(self) -> None:
        """Bind `listen` and serve; ConfigError (one line) if it cannot."""
        context = server_ssl_context(self._tls)
        config = uvicorn.Config(
            self.app,
            http=_PeerCertProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ssl_context_factory=lambda _config, _default: context,
            # A request line and headers over this are refused by h11 (bodies: max_body_bytes).
            h11_max_incomplete_event_size=64 * 1024,
        )
        config.load()
        self._sockets = listen_sockets("http.listen", self._listen)
        for sock in self._sockets:
            sock.setblocking(False)
        self.port = self._sockets[0].getsockname()[1]
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=self._sockets)
        except BaseException:
            for sock in self._sockets:
                sock.close()
            raise
        self._server = server

    async def stop(self, grace: float) -> None:
        """Refuse new calls, end open streams, and give calls in flight `grace` seconds."""
        self.app.stopping.set()
        server, self._server = self._server, None
        if server is None:
            return
        # uvicorn waits this long for calls in flight, then cancels them.
        server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        await server.shutdown(sockets=self._sockets)
        self._sockets = []
