"""Real grpc.aio servers over mTLS: who gets in, who may call what, and live certificate reload."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from fleet.errors import ConfigError
from fleet.interceptors import ErrorMappingInterceptor
from fleet.pki import CertificateAuthority, Identity
from fleet.tls import (
    RELOAD_CHECK_SECONDS,
    TLSConfig,
    channel_credentials,
    channel_options,
    require_node,
    require_role,
    server_credentials,
)
from fleet.v1 import fleet_pb2, fleet_pb2_grpc, manager_pb2, manager_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}


class EchoFleetService(fleet_pb2_grpc.FleetServiceServicer):
    """Operator-only; GetNode echoes the caller identity it saw in a label."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    async def GetNode(
        self, request: fleet_pb2.FleetServiceGetNodeRequest, context: Any
    ) -> fleet_pb2.FleetServiceGetNodeResponse:
        caller = require_role(context, "operator", trust_domain=self.trust_domain)
        node = fleet_pb2.Node(node_id=request.node_id, labels={"caller": str(caller)})
        return fleet_pb2.FleetServiceGetNodeResponse(node=node)


class EchoManagerService(manager_pb2_grpc.ManagerServiceServicer):
    """Node-only; RegisterNode checks the node speaks for itself and echoes it."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    async def RegisterNode(
        self, request: manager_pb2.RegisterNodeRequest, context: Any
    ) -> manager_pb2.RegisterNodeResponse:
        caller = require_node(context, request.node_id, trust_domain=self.trust_domain)
        return manager_pb2.RegisterNodeResponse(success=True, message=str(caller))


@asynccontextmanager
async def serving(tls: TLSConfig) -> AsyncIterator[int]:
    """A real mTLS server on 127.0.0.1:0 with both echo services; yields its port."""
    trust_domain = tls.identity().trust_domain
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(EchoFleetService(trust_domain), server)
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(EchoManagerService(trust_domain), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


Call = Callable[[aio.Channel], Awaitable[Any]]


async def get_node(channel: aio.Channel) -> Any:
    stub = fleet_pb2_grpc.FleetServiceStub(channel)
    return await stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"), timeout=10)


def register(node_id: str) -> Call:
    async def call(channel: aio.Channel) -> Any:
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        request = manager_pb2.RegisterNodeRequest(node_id=node_id)
        return await stub.RegisterNode(request, timeout=10)

    return call


async def dial(
    port: int, creds: grpc.ChannelCredentials, server_name: str, call: Call = get_node
) -> Any:
    """Open a fresh channel (own subchannel pool: a new handshake), make one call, close."""
    options = [*channel_options(server_name), ("grpc.use_local_subchannel_pool", 1)]
    async with aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        return await call(channel)


async def refused(port: int, creds: grpc.ChannelCredentials, server_name: str) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await dial(port, creds, server_name)
    assert info.value.code() in REFUSED, info.value
    return info.value


@pytest.fixture
async def manager(pki: Any) -> AsyncIterator[int]:
    """A server holding manager/m1's certificate."""
    async with serving(pki.issue("manager", "m1")) as port:
        yield port


def manager_name(pki: Any) -> str:
    return f"manager.{pki.trust_domain}"


async def test_operator_is_accepted_and_seen(pki: Any, manager: int) -> None:
    """A valid operator certificate gets in, and the servicer sees operator/admin."""
    creds = channel_credentials(pki.issue("operator", "admin"))
    response = await dial(manager, creds, manager_name(pki))
    assert response.node.labels["caller"] == "operator/admin"


async def test_node_registers_as_itself(pki: Any, manager: int) -> None:
    """node/n1 may register node n1, and the servicer sees node/n1."""
    creds = channel_credentials(pki.issue("node", "n1"))
    response = await dial(manager, creds, manager_name(pki), register("n1"))
    assert (response.success, response.message) == (True, "node/n1")


async def test_no_client_certificate_is_refused(pki: Any, manager: int) -> None:
    """A client that trusts the CA but presents no certificate cannot call anything."""
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    await refused(manager, creds, manager_name(pki))


async def test_certificate_from_another_ca_is_refused(
    pki: Any, manager: int, tmp_path: Path
) -> None:
    """An operator certificate from a different CA (same names) is refused."""
    other = CertificateAuthority.create(pki.trust_domain).issue("operator", "admin")
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=other.key_pem,
        certificate_chain=other.cert_pem,
    )
    await refused(manager, creds, manager_name(pki))


async def test_expired_client_certificate_is_refused(pki: Any, manager: int) -> None:
    """An expired operator certificate is refused by the server (and by channel_credentials)."""
    now = dt.datetime.now(dt.UTC)
    cfg: TLSConfig = pki.issue(
        "operator",
        "late",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    with pytest.raises(ConfigError, match="expired on"):
        channel_credentials(cfg)
    creds = grpc.ssl_channel_credentials(
        root_certificates=cfg.ca_file.read_bytes(),
        private_key=cfg.key_file.read_bytes(),
        certificate_chain=cfg.cert_file.read_bytes(),
    )
    await refused(manager, creds, manager_name(pki))


async def test_foreign_trust_domain_is_refused(pki: Any, manager: int) -> None:
    """A leaf our CA key signed for another trust domain fails the CA's name constraint."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem)
    ca_key = serialization.load_pem_private_key(pki.ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://evil.example/operator/admin")]
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )
    await refused(manager, creds, manager_name(pki))


async def test_node_may_not_call_the_operator_service(pki: Any, manager: int) -> None:
    """A node certificate calling FleetService is PERMISSION_DENIED, naming it and the need."""
    creds = channel_credentials(pki.issue("node", "n1"))
    with pytest.raises(aio.AioRpcError) as info:
        await dial(manager, creds, manager_name(pki))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "node/n1 may not call this; only operator certificates may"


async def test_operator_may_not_call_the_node_service(pki: Any, manager: int) -> None:
    """An operator certificate calling ManagerService is PERMISSION_DENIED."""
    creds = channel_credentials(pki.issue("operator", "admin"))
    with pytest.raises(aio.AioRpcError) as info:
        await dial(manager, creds, manager_name(pki), register("admin"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator/admin" in (info.value.details() or "")


async def test_node_may_not_speak_for_another_node(pki: Any, manager: int) -> None:
    """node/a registering node b is PERMISSION_DENIED with a message naming both."""
    creds = channel_credentials(pki.issue("node", "a"))
    with pytest.raises(aio.AioRpcError) as info:
        await dial(manager, creds, manager_name(pki), register("b"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "node/a may not speak for node b"


async def test_client_checks_which_node_it_reached(pki: Any) -> None:
    """Dialing node x's name at a server holding node y's certificate fails the handshake."""
    creds = channel_credentials(pki.issue("operator", "admin"))
    async with serving(pki.issue("node", "y")) as port:
        await refused(port, creds, Identity("node", "x", pki.trust_domain).server_name)
        response = await dial(port, creds, Identity("node", "y", pki.trust_domain).server_name)
        assert response.node.labels["caller"] == "operator/admin"


async def test_server_picks_up_a_replaced_certificate(
    pki: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """New connections see a replaced certificate without a restart; a broken one is ignored."""
    server_tls: TLSConfig = pki.issue("manager", "m1")
    creds = channel_credentials(pki.issue("operator", "admin"))
    m1 = Identity("manager", "m1", pki.trust_domain).server_name
    m2 = Identity("manager", "m2", pki.trust_domain).server_name
    async with serving(server_tls) as port:
        assert (await dial(port, creds, m1)).node.labels["caller"] == "operator/admin"
        await refused(port, creds, m2)

        # A half-written replacement does not validate: the old certificate keeps serving.
        good_cert = server_tls.cert_file.read_bytes()
        server_tls.cert_file.write_text("-----BEGIN CERTIFICATE-----\ntrunc")
        await asyncio.sleep(RELOAD_CHECK_SECONDS + 0.05)  # the files are looked at this often
        with caplog.at_level(logging.WARNING, logger="fleet.tls"):
            assert (await dial(port, creds, m1)).node.labels["caller"] == "operator/admin"
        assert any("still serving the old" in r.getMessage() for r in caplog.records)
        server_tls.cert_file.write_bytes(good_cert)

        pki.ca.issue("manager", "m2").write(
            server_tls.cert_file.parent, stem=server_tls.cert_file.stem
        )
        await asyncio.sleep(RELOAD_CHECK_SECONDS + 0.05)
        assert (await dial(port, creds, m2)).node.labels["caller"] == "operator/admin"
        await refused(port, creds, m1)


@pytest.fixture
def script_certs(tmp_path: Path) -> Path:
    """A directory filled by scripts/generate_test_certs.sh with its defaults."""
    out = tmp_path / "certs"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate_test_certs.sh"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


async def test_script_certificates_work_end_to_end(script_certs: Path) -> None:
    """Certificates from generate_test_certs.sh carry a real mTLS call, manager.<td> included."""
    out = script_certs
    server_tls = TLSConfig(
        out / "ca.pem", out / "manager-manager.pem", out / "manager-manager-key.pem"
    )
    client_tls = TLSConfig(
        out / "ca.pem", out / "operator-admin.pem", out / "operator-admin-key.pem"
    )
    async with serving(server_tls) as port:
        response = await dial(port, channel_credentials(client_tls), "manager.fleet.local")
    assert response.node.labels["caller"] == "operator/admin"
