"""The security matrix's HTTP rows: FleetService's JSON/HTTP routes against every identity.

The same callers as the gRPC columns (`bad_credentials` claims the allowed
role with a wrong certificate), as HTTPS clients. A cell is the HTTP status
and the code in the JSON error body, or "handshake refused" when the TLS
handshake (or the connection right after it, TLS 1.3) failed, so no status
was ever sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from google.protobuf import json_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from live_env import ModulePki

from fleet.pki import CertificateAuthority, Role
from fleet.tls import TLSConfig

__all__ = ["HttpOutcome", "http_clients", "http_invoke"]

REFUSED = "handshake refused"


@dataclass(frozen=True)
class HttpOutcome:
    """What one HTTP call came back with."""

    status: int
    """The HTTP status; 0 when none was sent (the handshake was refused)."""
    code: str
    """The gRPC code of the error body or of a stream's error line; "OK" otherwise."""
    message: str
    """The error message, empty for OK."""

    @property
    def cell(self) -> str:
        if self.status == 0:
            return REFUSED
        return f"{self.status}" if self.code == "OK" else f"{self.status} {self.code}"

    @property
    def category(self) -> Literal["refused", "denied", "allowed", "bug"]:
        """As the gRPC matrix's `category`."""
        if self.status in (0, 401):
            return "refused"
        if self.status == 403:
            return "denied"
        if self.status >= 500 and self.status != 501 and self.code != "UNAVAILABLE":
            return "bug"
        return "allowed"


def _context(ca_file: Path, cert: TLSConfig | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    return ctx


def http_clients(
    pki: ModulePki, port: int, role: Role, name: str, good: dict[str, TLSConfig], root: Path
) -> dict[str, httpx.AsyncClient]:
    """One HTTPS client per identity: the four bad ones claim <role>/<name>, then `good`."""
    now = dt.datetime.now(dt.UTC)
    ca_file = next(iter(good.values())).ca_file
    foreign = CertificateAuthority.create(pki.trust_domain).issue(role, name)
    expired = pki.ca.issue(
        role, name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    early = pki.ca.issue(
        role, name, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
    )
    certs: dict[str, TLSConfig | None] = {
        "none": None,
        "other CA": foreign.write(root / "http-other-ca"),
        "expired": expired.write(root / "http-expired"),
        "not yet valid": early.write(root / "http-early"),
        **good,
    }
    return {
        identity: httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{port}",
            verify=_context(ca_file, cert),
            timeout=httpx.Timeout(15.0),
        )
        for identity, cert in certs.items()
    }


async def http_invoke(
    client: httpx.AsyncClient, method: MethodDescriptor, request: Message, *, idle: float = 0.6
) -> HttpOutcome:
    """POST `request` as JSON to the method's route; a stream is read until it ends or idles."""
    path = f"/v1/{method.containing_service.full_name}/{method.name}"
    body = json.dumps(json_format.MessageToDict(request))
    headers = {"content-type": "application/json"}
    try:
        async with client.stream("POST", path, content=body, headers=headers) as r:
            if r.status_code != 200:
                error = json.loads(await r.aread())
                return HttpOutcome(r.status_code, error["code"], error["message"])
            if not method.server_streaming:
                await r.aread()
                return HttpOutcome(200, "OK", "")
            return await _read_stream(r, idle)
    except httpx.TransportError:
        return HttpOutcome(0, "", "")


async def _read_stream(r: httpx.Response, idle: float) -> HttpOutcome:
    lines = r.aiter_lines()
    for _ in range(20):
        try:
            line = await asyncio.wait_for(anext(lines), idle)
        except (StopAsyncIteration, TimeoutError):
            break  # ended, or a following stream stays open by design: OK
        item: dict[str, Any] = json.loads(line)
        if "error" in item:
            return HttpOutcome(200, item["error"]["code"], item["error"]["message"])
    return HttpOutcome(200, "OK", "")
