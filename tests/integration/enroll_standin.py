"""A stand-in for the manager's certificate issuing, for the daemon's enrollment and renewal tests.

The real EnrollmentService and RenewCertificate are built in parallel (the
manager side of issue 16); until they land these tests run the daemon
against this: real grpc.aio servers on 127.0.0.1 signing real CSRs with a
`fleet.pki.CertificateAuthority`, served as the manager will serve them.

- `EnrollStandIn` serves EnrollmentService on its own port with server TLS
  only: the manager certificate's chain (certificate + root CA appended), no
  client certificate required. Tokens are plain strings mapped to what they
  allow; the refusals use the codes and messages of enroll.proto.
- `RenewingManager` is the Connect stand-in of connect_helpers plus
  RenewCertificate, and records the serial of the client certificate each
  connection (stream or RegisterNode) was made with.

Plus the client side these tests share: `run_enroll` (the real command as a
child process) and `served_serial` (which certificate a port serves now).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from connect_helpers import ConnectManager
from cryptography import x509
from grpc import aio

from fleet.enroll import check_csr, parse_token
from fleet.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from fleet.interceptors import ErrorMappingInterceptor
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig, require_node
from fleet.v1 import enroll_pb2, enroll_pb2_grpc, manager_pb2

REFUSED_TOKEN = "unknown, expired, used-up or revoked join token"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Token:
    """What one join token allows."""

    node_name: str = ""
    """Only this name ('' = any)."""
    labels: dict[str, str] = field(default_factory=dict)
    uses: int = 1


def sign_node(ca: CertificateAuthority, name: str, csr_pem: bytes, lifetime: float) -> bytes:
    """A node certificate for `csr_pem` valid from 1 s ago for `lifetime` seconds (leaf + chain)."""
    try:
        checked = check_csr(csr_pem, trust_domain=ca.trust_domain, node_name=name)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    now = dt.datetime.now(dt.UTC)
    signed = ca.sign(
        "node",
        name,
        checked.public_key,
        not_before=now - dt.timedelta(seconds=1),
        not_after=now + dt.timedelta(seconds=lifetime),
    )
    return signed.cert_pem


class EnrollStandIn(enroll_pb2_grpc.EnrollmentServiceServicer):
    """EnrollmentService signing with `issuer` (the root CA or an intermediate)."""

    def __init__(
        self,
        issuer: CertificateAuthority,
        *,
        manager_address: str = "",
        lifetime: float = 3600.0,
    ) -> None:
        self.issuer = issuer
        self.manager_address = manager_address
        self.lifetime = lifetime
        self.tokens: dict[str, Token] = {}
        self.requests: list[enroll_pb2.EnrollRequest] = []

    async def Enroll(self, request: Any, context: Any) -> enroll_pb2.EnrollResponse:
        self.requests.append(request)
        try:
            parse_token(request.token)
        except ValueError:
            raise Unauthenticated(REFUSED_TOKEN) from None
        token = self.tokens.get(request.token)
        if token is None or token.uses < 1:
            raise Unauthenticated(REFUSED_TOKEN)
        if token.node_name and request.node_name != token.node_name:
            raise PermissionDenied(
                f"this token enrolls only node {token.node_name!r}, not {request.node_name!r}"
            )
        cert_pem = sign_node(self.issuer, request.node_name, request.csr_pem, self.lifetime)
        token.uses -= 1
        leaf = x509.load_pem_x509_certificate(cert_pem)
        return enroll_pb2.EnrollResponse(
            node_id=request.node_name,
            trust_domain=self.issuer.trust_domain,
            certificate_pem=cert_pem,
            ca_pem=self.issuer.root_pem,
            expire_time=int(leaf.not_valid_after_utc.timestamp() * 1000),
            labels=token.labels,
            manager_address=self.manager_address,
        )


async def serve_enrollment(
    manager_tls: TLSConfig, servicer: EnrollStandIn
) -> tuple[aio.Server, int]:
    """`servicer` on 127.0.0.1:<any> with the manager's certificate + root CA, no client auth."""
    chain = manager_tls.cert_file.read_bytes() + manager_tls.ca_file.read_bytes()
    creds = grpc.ssl_server_credentials(
        [(manager_tls.key_file.read_bytes(), chain)], require_client_auth=False
    )
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    enroll_pb2_grpc.add_EnrollmentServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


def _serial(context: Any) -> int:
    pem = context.auth_context()["x509_pem_cert"][0]
    return int(x509.load_pem_x509_certificate(pem).serial_number)


class RenewingManager(ConnectManager):
    """ConnectManager with RenewCertificate; `refuse_renewal` answers as a manager without a CA."""

    def __init__(self, issuer: CertificateAuthority, *, lifetime: float) -> None:
        super().__init__()
        self.issuer = issuer
        self.lifetime = lifetime
        self.refuse_renewal = False
        self.renewals: list[int] = []
        """Serials of the certificates issued by RenewCertificate, in order."""
        self.renewal_calls = 0
        self.connected_with: list[int] = []
        """Client certificate serial of each Connect stream and RegisterNode, in order."""

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[manager_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[manager_pb2.ConnectResponse]:
        self.connected_with.append(_serial(context))
        async for message in super().Connect(request_iterator, context):
            yield message

    async def RegisterNode(self, request: Any, context: Any) -> manager_pb2.RegisterNodeResponse:
        self.connected_with.append(_serial(context))
        return await super().RegisterNode(request, context)

    async def RenewCertificate(
        self, request: Any, context: Any
    ) -> manager_pb2.RenewCertificateResponse:
        self.renewal_calls += 1
        identity = require_node(context, request.node_id)
        if self.refuse_renewal:
            raise FailedPrecondition("this manager issues no certificates")
        cert_pem = sign_node(self.issuer, identity.name, request.csr_pem, self.lifetime)
        leaf = x509.load_pem_x509_certificate(cert_pem)
        self.renewals.append(int(leaf.serial_number))
        self.changed.set()
        return manager_pb2.RenewCertificateResponse(
            certificate_pem=cert_pem,
            ca_pem=self.issuer.root_pem,
            expire_time=int(leaf.not_valid_after_utc.timestamp() * 1000),
        )


def serial_of(path: Any) -> int:
    """The serial of the (first) certificate in a PEM file."""
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


@dataclass
class Run:
    """One finished `fleet-daemon enroll`."""

    code: int
    out: str
    err: str


async def run_enroll(*args: str) -> Run:
    """`fleet-daemon enroll ARGS` as a child process (the event loop keeps serving)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli",
        "enroll",
        *args,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def served_serial(port: int, client: TLSConfig) -> int:
    """The serial of the certificate the daemon's port serves now (a new handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(client.ca_file)
    context.load_cert_chain(client.cert_file, client.key_file)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)
