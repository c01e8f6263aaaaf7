"""Helpers for enrollment tests: an issuing CA, [enroll] settings, clients of the enrollment port.

The test client trusts the fleet root taken from the CA object directly
(the real `fleet-daemon enroll` reads it off the handshake and checks its
pinned hash; that client is not the manager's concern). The daemon's side
of the tests runs the real command (`run_enroll`) and asks a daemon's port
which certificate it serves (`served_serial`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc import aio

from fleet.enroll import make_csr
from fleet.identity import Identity
from fleet.pki import CertificateAuthority, write_file_atomic
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import enroll_pb2, enroll_pb2_grpc, fleet_pb2, manager_pb2_grpc


def issuer_files(
    ca: CertificateAuthority, directory: Path, *, intermediate: bool = True
) -> tuple[Path, Path]:
    """Write the issuing CA (an intermediate of `ca`, or `ca` itself): (cert, key) paths."""
    issuer = ca.create_intermediate() if intermediate else ca
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "issuer.pem", directory / "issuer-key.pem"
    write_file_atomic(key, issuer.key_pem, mode=0o600)
    write_file_atomic(cert, issuer.cert_pem + issuer.chain_pem, mode=0o644)
    return cert, key


def enroll_settings(
    ca: CertificateAuthority, directory: Path, *, intermediate: bool = True, **overrides: Any
) -> dict[str, Any]:
    """[enroll] keys for a test manager: enrollment on 127.0.0.1:0, an issuer, a high rate."""
    cert, key = issuer_files(ca, directory, intermediate=intermediate)
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "manager_address": "manager.example:7443",
        "issuer_cert_file": cert,
        "issuer_key_file": key,
        "rate_per_second": 1000.0,
        "burst": 1000,
    }
    settings.update(overrides)
    return settings


@asynccontextmanager
async def enroll_stub(
    ca: CertificateAuthority, port: int
) -> AsyncIterator[enroll_pb2_grpc.EnrollmentServiceStub]:
    """An EnrollmentService stub over TLS without a client certificate."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    options = [
        *channel_options(f"manager.{ca.trust_domain}"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channel = aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)
    try:
        yield enroll_pb2_grpc.EnrollmentServiceStub(channel)
    finally:
        await channel.close(None)


def csr(name: str, trust_domain: str) -> tuple[bytes, bytes]:
    """A fresh key and a well-formed CSR for node `name`: (key PEM, CSR PEM)."""
    return make_csr(Identity("node", name, trust_domain))


def enroll_request(
    token: str, name: str, trust_domain: str
) -> tuple[bytes, enroll_pb2.EnrollRequest]:
    """(key PEM, an EnrollRequest for `name` with a fresh CSR)."""
    key, request_csr = csr(name, trust_domain)
    return key, enroll_pb2.EnrollRequest(token=token, node_name=name, csr_pem=request_csr)


def write_identity(directory: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> TLSConfig:
    """Write an issued certificate as a daemon would: its TLSConfig."""
    cfg = TLSConfig(directory / "ca.pem", directory / "node.pem", directory / "node-key.pem")
    write_file_atomic(cfg.key_file, key_pem, mode=0o600)
    write_file_atomic(cfg.cert_file, cert_pem, mode=0o644)
    write_file_atomic(cfg.ca_file, ca_pem, mode=0o644)
    return cfg


@asynccontextmanager
async def manager_stub_as(
    tls: TLSConfig, port: int, trust_domain: str
) -> AsyncIterator[manager_pb2_grpc.ManagerServiceStub]:
    """A ManagerService stub presenting `tls` (its own connection)."""
    options = [
        *channel_options(f"manager.{trust_domain}"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channel = aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls), options=options)
    try:
        yield manager_pb2_grpc.ManagerServiceStub(channel)
    finally:
        await channel.close(None)


def token_request(**fields: Any) -> fleet_pb2.FleetServiceCreateJoinTokenRequest:
    """A CreateJoinToken request (one use, an hour, unless told)."""
    return fleet_pb2.FleetServiceCreateJoinTokenRequest(**fields)


# --- the daemon's side --------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def serial_of(path: Path) -> int:
    """The serial of the (first) certificate in a PEM file."""
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


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
