"""Revoking, renewing and deleting nodes, against a real manager over real mTLS.

Nodes get their certificates by enrolling over the real enrollment port
(`enroll_helpers`); then they register, open control streams and renew as
a daemon would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from daemon_helpers import eventually
from enroll_helpers import (
    csr,
    enroll_request,
    enroll_settings,
    enroll_stub,
    manager_stub_as,
    token_request,
    write_identity,
)
from fleet_harness import operator_stub
from grpc import aio
from manager_harness import FakeClock, manager_config, registration, rpc_error, running_manager

from fleet.pki import CertificateAuthority, write_file_atomic
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, fleet_pb2, manager_pb2, manager_pb2_grpc
from manager.config import TLSFiles
from manager.server import ManagerServer
from manager.storage.enrollment import EnrollmentRepository

TD = "fleet.local"


async def enroll(
    manager: ManagerServer, op: Any, pki: Any, name: str, directory: Path, **token: Any
) -> TLSConfig:
    """Enroll `name` with a fresh token (fields `token`); its written TLS files."""
    made = await op.CreateJoinToken(token_request(**token))
    assert manager.enroll_port
    async with enroll_stub(pki.ca, manager.enroll_port) as stub:
        key, req = enroll_request(made.token, name, TD)
        resp = await stub.Enroll(req)
    return write_identity(directory, key, resp.certificate_pem, resp.ca_pem)


async def not_before_passed(tls: TLSConfig) -> None:
    """Wait until the certificate is valid by the real clock (a re-enrolled node's starts
    at its revocation cutoff, up to a second ahead)."""
    cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    await asyncio.sleep(max(0.0, cert.not_valid_before_utc.timestamp() - time.time() + 0.05))


@asynccontextmanager
async def stream(stub: manager_pb2_grpc.ManagerServiceStub, node: str) -> AsyncIterator[Any]:
    """An open Connect stream whose hello was answered with a welcome."""
    call = stub.Connect()
    await call.write(manager_pb2.ConnectRequest(id=1, hello=registration(node)))
    first = await call.read()
    assert first.WhichOneof("body") == "welcome", first
    try:
        yield call
    finally:
        call.cancel()


async def ended_with(call: Any) -> grpc.StatusCode:
    """Read the stream to its end; its status code."""
    async with asyncio.timeout(10):
        try:
            while await call.read() is not aio.EOF:
                pass
        except aio.AioRpcError as exc:
            return exc.code()
    code: grpc.StatusCode = await call.code()
    return code


async def node(op: Any, node_id: str) -> fleet_pb2.Node:
    """GetNode's node."""
    return (await op.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id=node_id))).node


@asynccontextmanager
async def env(pki: Any, tmp_path: Path, database_url: str = "") -> AsyncIterator[Any]:
    """(a started manager with enrollment on, an operator's FleetService stub)."""
    settings = enroll_settings(pki.ca, tmp_path / "issuer")
    config = manager_config(
        pki,
        database_url or f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        tmp_path / "state",
        enroll=settings,
    )
    async with (
        running_manager(config, FakeClock()) as manager,
        operator_stub(pki, manager.port) as op,
    ):
        yield manager, op


def _refused(manager: Any) -> float:
    """fleet_manager_revoked_refused_total."""
    return float(manager.metrics.revoked_refused._value.get())


async def test_a_revoked_node_is_refused_until_it_enrolls_again(pki: Any, tmp_path: Path) -> None:
    """RevokeNode closes the node's stream and marks it offline; its certificate is then
    UNAUTHENTICATED on RegisterNode and Connect; a --node-name token enrolls it again with
    a certificate that works while the old one stays refused."""
    async with env(pki, tmp_path) as (manager, op):
        old = await enroll(manager, op, pki, "n1", tmp_path / "old")
        async with manager_stub_as(old, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
            async with stream(stub, "n1") as call:
                revoked = await op.RevokeNode(
                    fleet_pb2.FleetServiceRevokeNodeRequest(node_id="n1", reason="disk stolen")
                )
                assert revoked.connections_closed == 1
                assert revoked.revoke_time % 1000 == 0
                assert await ended_with(call) == grpc.StatusCode.UNAUTHENTICATED
            shown = await node(op, "n1")
            assert shown.status == common_pb2.NODE_STATUS_OFFLINE
            assert shown.revoke_time > 0
            err = await rpc_error(stub.RegisterNode(registration("n1")))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (err.details() or "").startswith("the certificate of node/n1 was revoked at ")
            assert (err.details() or "").endswith("; enroll the host again")
            call = stub.Connect()
            await call.write(manager_pb2.ConnectRequest(id=1, hello=registration("n1")))
            assert await ended_with(call) == grpc.StatusCode.UNAUTHENTICATED
            err = await rpc_error(
                stub.RenewCertificate(
                    manager_pb2.RenewCertificateRequest(node_id="n1", csr_pem=csr("n1", TD)[1])
                )
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _refused(manager) == 3, "RegisterNode, Connect's hello, RenewCertificate"
            # Nor does the manager call it: a dialled daemon's certificate is checked by
            # name only, so a revoked node is not dialled at all.
            listing = await op.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(node_id="n1", live=True)
            )
            [error] = listing.errors
            assert error.node_id == "n1"
            assert "node/n1 was revoked at " in error.message
            assert "does not call it" in error.message

        new = await enroll(manager, op, pki, "n1", tmp_path / "new", node_name="n1")
        await not_before_passed(new)
        async with manager_stub_as(new, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
        assert (await node(op, "n1")).revoke_time == 0, "enrolled again since"
        assert manager.deny_list.dial_refusal("n1") is None, "called in with the new certificate"
        async with manager_stub_as(old, manager.port, TD) as stub:
            err = await rpc_error(stub.RegisterNode(registration("n1")))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _refused(manager) == 4, "the new certificate passed, uncounted"
        actions = [
            e.attributes.get("action") for e in await manager.events.list_after(0, limit=500)
        ]
        assert "node.revoked" in actions


async def test_revocation_on_another_replica(pki: Any, tmp_path: Path, database_url: str) -> None:
    """Two replicas on one database: a node revoked on one is refused by the other after
    its deny-list refresh, which also ends the node's control stream there."""
    if database_url.startswith("sqlite"):
        pytest.skip("several replicas need PostgreSQL")
    async with (
        env(pki, tmp_path / "a", database_url) as (first, op),
        env(pki, tmp_path / "b", database_url) as (second, _),
    ):
        tls = await enroll(first, op, pki, "n1", tmp_path / "n1")
        async with manager_stub_as(tls, second.port, TD) as stub:
            async with stream(stub, "n1") as call:
                await op.RevokeNode(fleet_pb2.FleetServiceRevokeNodeRequest(node_id="n1"))
                assert await second.deny_list.refresh() == ["n1"]
                assert await ended_with(call) == grpc.StatusCode.UNAUTHENTICATED
            err = await rpc_error(stub.RegisterNode(registration("n1")))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_renewal_rotates_the_key_and_records_the_expiry(pki: Any, tmp_path: Path) -> None:
    """RenewCertificate gives the calling node a certificate for a new key; the node's
    expiry follows; the same key, another name or another node's request are refused."""
    async with env(pki, tmp_path) as (manager, op):
        tls = await enroll(manager, op, pki, "n1", tmp_path / "n1")
        async with manager_stub_as(tls, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
            before = (await node(op, "n1")).cert_expire_time
            assert before > 0
            key, request_csr = csr("n1", TD)
            resp = await stub.RenewCertificate(
                manager_pb2.RenewCertificateRequest(node_id="n1", csr_pem=request_csr)
            )
            assert resp.ca_pem == pki.ca.cert_pem
            renewed = write_identity(tmp_path / "renewed", key, resp.certificate_pem, resp.ca_pem)
            renewed.validate()
            assert (await node(op, "n1")).cert_expire_time == resp.expire_time

            reused = _csr_with_key("n1", tls.key_file.read_bytes())
            err = await rpc_error(
                stub.RenewCertificate(
                    manager_pb2.RenewCertificateRequest(node_id="n1", csr_pem=reused)
                )
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "renewal needs a new key" in (err.details() or "")

            err = await rpc_error(
                stub.RenewCertificate(
                    manager_pb2.RenewCertificateRequest(node_id="n1", csr_pem=csr("n2", TD)[1])
                )
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "spiffe://fleet.local/node/n1" in (err.details() or "")
            err = await rpc_error(
                stub.RenewCertificate(
                    manager_pb2.RenewCertificateRequest(node_id="n2", csr_pem=csr("n2", TD)[1])
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "node/n1 may not speak for node n2" in (err.details() or "")
        async with manager_stub_as(renewed, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
        counts = {
            s.labels["outcome"]: s.value
            for m in manager.metrics.renewals.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert counts == {"issued": 1, "invalid_request": 2}
        certs = await EnrollmentRepository(manager.db).certificates("n1")
        assert sorted(c.token_id == "" for c in certs) == [False, True]  # enrolled, renewed


def _csr_with_key(name: str, key_pem: bytes) -> bytes:
    """A well-formed CSR for `name` over an existing key (the one in use)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/{name}")]
    )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(san, critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_registering_records_the_presented_certificates_expiry(
    pki: Any, tmp_path: Path
) -> None:
    """A node registering with a hand-made certificate shows that certificate's expiry."""
    async with env(pki, tmp_path) as (manager, op):
        tls = pki.issue("node", "n1", valid_days=30)
        expiry = x509.load_pem_x509_certificate(tls.cert_file.read_bytes()).not_valid_after_utc
        async with manager_stub_as(tls, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
        assert (await node(op, "n1")).cert_expire_time == int(expiry.timestamp() * 1000)


async def test_deleting_a_node(pki: Any, tmp_path: Path) -> None:
    """An online node is refused without force; with force its stream ends and its record
    goes; its daemon's next heartbeat is NOT_FOUND and it registers afresh."""
    async with env(pki, tmp_path) as (manager, op):
        tls = pki.issue("node", "n1")
        async with manager_stub_as(tls, manager.port, TD) as stub:
            await stub.RegisterNode(registration("n1"))
            err = await rpc_error(
                op.DeleteNode(fleet_pb2.FleetServiceDeleteNodeRequest(node_id="n1"))
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "n1 is online" in (err.details() or "")
            async with stream(stub, "n1") as call:
                gone = await op.DeleteNode(
                    fleet_pb2.FleetServiceDeleteNodeRequest(node_id="n1", force=True)
                )
                assert gone.node.node_id == "n1"
                assert gone.node.status == common_pb2.NODE_STATUS_ONLINE, "as it was"
                assert await ended_with(call) == grpc.StatusCode.UNAVAILABLE
            err = await rpc_error(op.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1")))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            err = await rpc_error(
                stub.Heartbeat(
                    manager_pb2.HeartbeatRequest(node_id="n1", timestamp=int(time.time() * 1000))
                )
            )
            assert err.code() == grpc.StatusCode.NOT_FOUND
            reply = await stub.RegisterNode(registration("n1"))
            assert reply.message == "registered"
        err = await rpc_error(op.DeleteNode(fleet_pb2.FleetServiceDeleteNodeRequest(node_id="zz")))
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_the_manager_renews_its_own_certificate_from_the_issuer(
    pki: Any, tmp_path: Path
) -> None:
    """A manager certificate the issuer signed, two thirds through its life, is replaced
    with a new key and the same identity, names and lifetime, and served within a
    second."""
    settings = enroll_settings(pki.ca, tmp_path / "issuer")
    root = tmp_path / "root.pem"
    write_file_atomic(root, pki.ca.cert_pem, mode=0o644)
    issuer = CertificateAuthority.load(
        settings["issuer_cert_file"], settings["issuer_key_file"], root_path=root
    )
    now = dt.datetime.now(dt.UTC)
    old = issuer.issue(
        "manager",
        "m1",
        hostnames=["localhost"],
        ips=["127.0.0.1"],
        not_before=now - dt.timedelta(hours=2),
        not_after=now + dt.timedelta(minutes=30),
    )
    tls = old.write(tmp_path / "m1")
    write_file_atomic(tls.ca_file, pki.ca.cert_pem, mode=0o644)  # peers trust the root
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "s")
    config = dataclasses.replace(
        config,
        enroll=dataclasses.replace(config.enroll, **{k: settings[k] for k in ISSUER}),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
    )
    async with running_manager(config, FakeClock()) as manager:

        async def current() -> bytes:
            return tls.cert_file.read_bytes()

        await eventually(current, lambda pem: pem != old.cert_pem, within=10)
        tls.validate()
        new = x509.load_pem_x509_certificates(tls.cert_file.read_bytes())
        before = old.certificate
        assert new[0].serial_number != before.serial_number
        assert new[0].public_key() != before.public_key()
        assert len(new) == 2, "leaf, then the issuing intermediate"
        lifetime = new[0].not_valid_after_utc - new[0].not_valid_before_utc
        assert lifetime == before.not_valid_after_utc - before.not_valid_before_utc
        names = x509.SubjectAlternativeName
        assert new[0].extensions.get_extension_for_class(names).value == (
            before.extensions.get_extension_for_class(names).value
        )
        (gauge,) = manager.metrics.certificate_expiry.collect()
        assert gauge.samples[0].value == new[0].not_valid_after_utc.timestamp()
        # Served from a handshake after the reloader's next look (at most a second).
        client = pki.issue("operator", "o")
        await eventually(
            lambda: asyncio.to_thread(_served_leaf, manager.port, client),
            lambda served: served.serial_number == new[0].serial_number,
            within=10,
        )
        assert not await manager.self_renewal.run_once(), "not due again"


ISSUER = ("issuer_cert_file", "issuer_key_file")


def _served_leaf(port: int, client: TLSConfig) -> x509.Certificate:
    """The certificate the server presents to a new handshake (openssl s_client)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(client.cert_file),
         "-key", str(client.key_file), "-servername", f"manager.{TD}"],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return x509.load_pem_x509_certificate(out.stdout)
