"""What a servicer sees of an HTTP call: a stand-in for `grpc.aio.ServicerContext`.

The HTTP API runs the very servicer object the gRPC server serves, so each
call hands it a context. FleetService's handlers read the caller's identity
(`auth_context`, via `fleet.tls.require_role`) and the deadline
(`time_remaining`); the error interceptor aborts with a code, details and
trailing metadata. Those behave as grpc's do. The rest answers as grpc
would for a unary call whose client sent no metadata of that kind; `read`
and `write` are for handlers the HTTP API does not serve that way
(client streams, handlers that write instead of yielding), so they refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from grpc import aio

__all__ = ["HttpContext", "auth_context_from_peercert"]

_Metadata = Any
"""grpc's metadata argument (a Metadata or pairs)."""


def auth_context_from_peercert(
    cert: Mapping[str, Any] | None, der: bytes | None
) -> dict[str, list[bytes]]:
    """gRPC's auth context for the verified client certificate `ssl.getpeercert()` returned.

    The keys `fleet.tls.identity_from_auth_context` reads, filled as grpc
    fills them: ``peer_uri`` the URI SANs, ``x509_subject`` the subject
    (its presence says a certificate was verified). Empty when there was none.
    """
    if not cert:
        return {}
    sans = cert.get("subjectAltName", ())
    subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    auth: dict[str, list[bytes]] = {
        "transport_security_type": [b"ssl"],
        "x509_subject": [subject.encode()],
        "peer_uri": [value.encode() for kind, value in sans if kind == "URI"],
    }
    if der is not None:
        import ssl

        auth["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode()]
    return auth


class HttpContext(aio.ServicerContext[Any, Any]):
    """One HTTP call's context, as a servicer and `fleet.interceptors` use it."""

    def __init__(
        self,
        auth: Mapping[str, Iterable[bytes]],
        *,
        peer: str,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self._peer = peer
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._clock = clock
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._cancelled = False
        self._done = False
        self._callbacks: list[Callable[[Any], None]] = []

    # What the servicers and the interceptor use.

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth

    def time_remaining(self) -> float:
        if self._deadline is None:
            # grpc answers None for a call without a deadline (its stubs say float).
            return None  # type: ignore[return-value]
        return max(0.0, self._deadline - self._clock())

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: _Metadata = (),
    ) -> NoReturn:
        """As grpc's: records the status, then raises AbortError (which the interceptor passes)."""
        if code == grpc.StatusCode.OK:
            raise ValueError("abort needs a status other than OK")
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise aio.AbortError(details)

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code  # type: ignore[return-value]  # None until set, as grpc's

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: _Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._trailing

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> Iterable[bytes] | None:
        return list(self._auth.get("peer_uri", ())) or None

    def peer_identity_key(self) -> str | None:
        return "peer_uri" if self._auth.get("peer_uri") else None

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def finish(self, *, cancelled: bool = False) -> None:
        """The HTTP exchange ended (the response was sent, or the client went away)."""
        if self._done:
            return
        self._done, self._cancelled = True, cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    # Nothing the HTTP API carries.

    async def read(self) -> Any:
        raise NotImplementedError("the HTTP API serves no client-streaming call")

    async def write(self, message: Any) -> None:
        raise NotImplementedError("the HTTP API runs handlers that yield their messages")

    async def send_initial_metadata(self, initial_metadata: _Metadata) -> None:
        return None

    def set_compression(self, compression: grpc.Compression) -> None:
        return None

    def disable_next_message_compression(self) -> None:
        return None
