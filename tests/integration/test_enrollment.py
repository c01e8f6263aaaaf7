"""Enrollment over the real enrollment port: tokens, issued certificates, every refusal.

A real manager (SQLite, or both backends where the race matters) with an
issuing intermediate CA; the host side is a plain TLS client that trusts
the fleet root (taken from the CA object) and presents no certificate.
Every refusal is checked to have issued nothing: no certificate row, the
token's uses unchanged, no node row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enroll_helpers import (
    enroll_request,
    enroll_settings,
    enroll_stub,
    manager_stub_as,
    token_request,
    write_identity,
)
from fleet_harness import operator_stub
from manager_harness import FakeClock, manager_config, registration, rpc_error, running_manager
from sqlalchemy import func, select

from fleet.enroll import ca_hash
from fleet.errors import ConfigError
from fleet.pki import CertificateAuthority
from fleet.v1 import (
    common_pb2,
    enroll_pb2,
    enroll_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    manager_pb2,
)
from manager.server import ManagerServer
from manager.service.enrollment import INVALID_TOKEN
from manager.storage import AuditRecord, AuditRepository
from manager.storage.schema import join_tokens, node_certificates, nodes

TD = "fleet.local"


@dataclass
class Env:
    """A manager with enrollment on, an operator's FleetService stub, an enrollment stub."""

    manager: ManagerServer
    op: fleet_pb2_grpc.FleetServiceStub
    enroll: enroll_pb2_grpc.EnrollmentServiceStub
    pki: Any
    clock: FakeClock
    root: Path

    async def token(self, **fields: Any) -> fleet_pb2.FleetServiceCreateJoinTokenResponse:
        return await self.op.CreateJoinToken(token_request(**fields))

    async def issued(self) -> dict[str, Any]:
        """What enrollment stores: certificates, node rows, every token's uses left."""
        async with self.manager.db.engine.connect() as conn:
            return {
                "certificates": (
                    await conn.execute(select(func.count()).select_from(node_certificates))
                ).scalar_one(),
                "nodes": sorted((await conn.execute(select(nodes.c.node_id))).scalars()),
                "uses": dict(
                    (await conn.execute(select(join_tokens.c.id, join_tokens.c.uses_left))).all()
                ),
            }


@asynccontextmanager
async def enroll_env(
    pki: Any, tmp_path: Path, database_url: str = "", **enroll: Any
) -> AsyncIterator[Env]:
    """A started manager with enrollment (settings overridden by `enroll`)."""
    settings = enroll_settings(pki.ca, tmp_path / "issuer", **enroll)
    config = manager_config(
        pki,
        database_url or f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        tmp_path / "state",
        enroll=settings,
    )
    clock = FakeClock()
    async with (
        running_manager(config, clock) as manager,
        operator_stub(pki, manager.port) as op,
    ):
        assert manager.enroll_port
        async with enroll_stub(pki.ca, manager.enroll_port) as stub:
            yield Env(manager, op, stub, pki, clock, tmp_path)


async def test_enroll_issues_a_node_certificate_with_the_tokens_labels(
    pki: Any, tmp_path: Path
) -> None:
    """A token and a CSR give a node/<name> certificate chaining to the fleet root; the
    node's row carries the token's labels, and the daemon registers with it."""
    async with enroll_env(pki, tmp_path) as env:
        made = await env.token(name_prefix="web-", labels={"env": "prod"}, description="rack 4")
        assert made.ca_hash == ca_hash(pki.ca.cert_pem)
        assert made.enroll_address == f"127.0.0.1:{env.manager.enroll_port}"
        assert made.info.uses_left == 1
        assert made.info.name_prefix == "web-"
        key, req = enroll_request(made.token, "web-1", TD)
        resp = await env.enroll.Enroll(req)
        assert resp.node_id == "web-1"
        assert resp.trust_domain == TD
        assert resp.ca_pem == pki.ca.cert_pem
        assert dict(resp.labels) == {"env": "prod"}
        assert resp.manager_address == "manager.example:7443"
        chain = x509.load_pem_x509_certificates(resp.certificate_pem)
        assert len(chain) == 2, "leaf, then the issuing intermediate"
        lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
        assert dt.timedelta(days=7) <= lifetime <= dt.timedelta(days=7, minutes=6)
        assert resp.expire_time == int(chain[0].not_valid_after_utc.timestamp() * 1000)
        tls = write_identity(tmp_path / "host", key, resp.certificate_pem, resp.ca_pem)
        tls.validate()
        assert str(tls.identity()) == "node/web-1"

        node = (await env.op.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="web-1"))).node
        assert node.status == common_pb2.NODE_STATUS_OFFLINE
        assert node.registered_at == 0
        assert dict(node.operator_labels) == {"env": "prod"}
        assert node.cert_expire_time == resp.expire_time
        async with manager_stub_as(tls, env.manager.port, TD) as stub:
            reply = await stub.RegisterNode(registration("web-1", labels={"zone": "a"}))
            assert reply.message == "registered"
        node = (await env.op.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="web-1"))).node
        assert node.status == common_pb2.NODE_STATUS_ONLINE
        assert node.registered_at > 0
        assert dict(node.labels) == {"env": "prod", "zone": "a"}
        listed = (
            await env.op.ListJoinTokens(fleet_pb2.FleetServiceListJoinTokensRequest(all=True))
        ).tokens
        assert [(t.id, t.uses_left, list(t.enrolled_nodes)) for t in listed] == [
            (made.info.id, 0, ["web-1"])
        ]
        usable = await env.op.ListJoinTokens(fleet_pb2.FleetServiceListJoinTokensRequest())
        assert list(usable.tokens) == [], "a used-up token is listed only with all"


def _outcomes(manager: ManagerServer) -> dict[str, float]:
    """fleet_manager_enrollments_total by outcome."""
    return {
        s.labels["outcome"]: s.value
        for metric in manager.metrics.enrollments.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


async def _refused_events(manager: ManagerServer) -> list[dict[str, str]]:
    events = await manager.events.list_after(0, limit=1000)
    return [e.attributes for e in events if e.attributes.get("action") == "node.enroll_refused"]


async def test_unusable_tokens_are_one_message_and_issue_nothing(pki: Any, tmp_path: Path) -> None:
    """Unknown, wrong secret, expired, used up and revoked tokens: UNAUTHENTICATED with one
    message; the reason only in metrics and events; nothing issued, no use spent."""
    async with enroll_env(pki, tmp_path) as env:
        spent = await env.token()
        await env.enroll.Enroll(enroll_request(spent.token, "n0", TD)[1])
        expired = await env.token(ttl_seconds=60)
        revoked = await env.token(uses=5)
        await env.op.RevokeJoinToken(
            fleet_pb2.FleetServiceRevokeJoinTokenRequest(token_id=revoked.info.id)
        )
        live = await env.token(uses=3)
        tid, secret = live.token.split(".")
        env.clock.advance(61)
        before = await env.issued()
        cases = {
            "unknown": "zzzzzzzz." + secret,
            "wrong secret": f"{tid}.{'A' * 43}",
            "expired": expired.token,
            "used up": spent.token,
            "revoked": revoked.token,
        }
        for case, token in cases.items():
            err = await rpc_error(env.enroll.Enroll(enroll_request(token, "n1", TD)[1]))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, case
            assert err.details() == INVALID_TOKEN, case
        assert await env.issued() == before
        outcomes = _outcomes(env.manager)
        assert outcomes["token_unknown"] == 2
        assert outcomes["token_expired"] == outcomes["token_used_up"] == 1
        assert outcomes["token_revoked"] == 1
        reasons = [e["reason"] for e in await _refused_events(env.manager)]
        assert reasons == [
            "token unknown",
            "token unknown",
            "token expired",
            "token used up",
            "token revoked",
        ]
        # The live token still works: the refusals spent none of its uses.
        await env.enroll.Enroll(enroll_request(live.token, "n1", TD)[1])


async def test_malformed_token_and_name_are_invalid_argument(pki: Any, tmp_path: Path) -> None:
    """A token not shaped <id>.<secret> and a bad node name name the field; nothing issued."""
    async with enroll_env(pki, tmp_path) as env:
        made = await env.token()
        before = await env.issued()
        err = await rpc_error(env.enroll.Enroll(enroll_request("nope", "n1", TD)[1]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.details() or "").startswith("token: a join token is '<id>.<secret>'")
        _, req = enroll_request(made.token, "n1", TD)
        req.node_name = "N_1"
        err = await rpc_error(env.enroll.Enroll(req))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node_name: invalid node id 'N_1'" in (err.details() or "")
        assert await env.issued() == before


def _csr(
    sans: list[x509.GeneralName],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    signed = builder.sign(key or ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return signed.public_bytes(serialization.Encoding.PEM)


def _tampered(csr_pem: bytes) -> bytes:
    """The CSR with one byte of its signature changed (the sender does not hold the key)."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


URI = x509.UniformResourceIdentifier
DNS = x509.DNSName
ME = f"spiffe://{TD}/node/n1"


@pytest.mark.parametrize(
    ("csr_pem", "needle"),
    [
        (b"not a csr", "not a PEM certificate signing request"),
        (_tampered(_csr([URI(ME)])), "signature does not match its public key"),
        (_csr([URI(f"spiffe://{TD}/operator/n1")]), "exactly one SAN URI"),
        (_csr([URI(f"spiffe://{TD}/node/n2")]), "exactly one SAN URI"),
        (_csr([URI("spiffe://other.example/node/n1")]), "exactly one SAN URI"),
        (_csr([URI(ME), URI(f"spiffe://{TD}/node/n2")]), "exactly one SAN URI"),
        (_csr([URI(ME), DNS("evil.example")]), "DNSName 'evil.example'"),
        (_csr([URI(ME), DNS(f"manager.{TD}")]), f"DNSName 'manager.{TD}'"),
        (
            _csr([URI(ME), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
            "IPAddress",
        ),
        (_csr([]), "names none"),
        (
            _csr([URI(ME)], extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
            "only subjectAltName is accepted",
        ),
    ],
    ids=[
        "garbage",
        "mismatched key",
        "foreign role",
        "other name",
        "other trust domain",
        "extra SAN URI",
        "extra DNS name",
        "manager DNS name",
        "IP SAN",
        "no SAN",
        "asks to be a CA",
    ],
)
async def test_bad_csrs_are_refused_and_issue_nothing(
    pki: Any, tmp_path: Path, csr_pem: bytes, needle: str
) -> None:
    """Each CSR that asks for more, or other, than node/<name> is INVALID_ARGUMENT naming
    the problem; no certificate, no use spent."""
    async with enroll_env(pki, tmp_path) as env:
        made = await env.token()
        before = await env.issued()
        err = await rpc_error(
            env.enroll.Enroll(
                enroll_pb2.EnrollRequest(token=made.token, node_name="n1", csr_pem=csr_pem)
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.details() or "").startswith("csr_pem: ")
        assert needle in (err.details() or "")
        assert await env.issued() == before
        assert _outcomes(env.manager) == {"invalid_request": 1}


async def test_names_outside_the_tokens_scope_are_permission_denied(
    pki: Any, tmp_path: Path
) -> None:
    """Prefix, node-name and any-name tokens refuse names they do not allow (an existing
    node needs a --node-name token); nothing issued."""
    async with enroll_env(pki, tmp_path) as env:
        anyname = await env.token(uses=5)
        await env.enroll.Enroll(enroll_request(anyname.token, "db-1", TD)[1])
        prefix = await env.token(name_prefix="web-")
        named = await env.token(node_name="web-9")
        before = await env.issued()
        cases = [
            (prefix.token, "db-2", "enrolls only new names starting with 'web-', not db-2"),
            (named.token, "web-8", "enrolls only node web-9, not web-8"),
            (
                anyname.token,
                "db-1",
                "node db-1 already exists; enrolling it again needs a token made with"
                " `fleetctl tokens create --node-name db-1`",
            ),
        ]
        for token, name, message in cases:
            err = await rpc_error(env.enroll.Enroll(enroll_request(token, name, TD)[1]))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert (err.details() or "").endswith(message)
        assert await env.issued() == before
        refusals = await _refused_events(env.manager)
        assert [e["node_id"] for e in refusals] == ["db-2", "web-8", "db-1"]
        # A --node-name token re-enrolls the existing node, merging its labels.
        again = await env.token(node_name="db-1", labels={"rack": "4"})
        resp = await env.enroll.Enroll(enroll_request(again.token, "db-1", TD)[1])
        assert resp.node_id == "db-1"


async def test_a_flood_is_rate_limited_and_issues_nothing(pki: Any, tmp_path: Path) -> None:
    """Beyond the burst, Enroll is RESOURCE_EXHAUSTED saying when to retry, before the
    token is even looked at; nothing issued."""
    async with enroll_env(pki, tmp_path, rate_per_second=0.01, burst=10) as env:
        made = await env.token(uses=100)
        before = await env.issued()
        codes = []
        for i in range(6):
            try:
                await env.enroll.Enroll(enroll_request("nope", f"n{i}", TD)[1])
            except grpc.aio.AioRpcError as exc:
                codes.append((exc.code(), exc.details()))
        # One caller (127.0.0.1) gets a tenth of the burst: one attempt, then no more.
        assert codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT
        assert {c for c, _ in codes[1:]} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes[1][1].startswith("enrollment rate limit reached; retry in ")
        err = await rpc_error(env.enroll.Enroll(enroll_request(made.token, "n9", TD)[1]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await env.issued() == before
        assert env.manager.metrics.enroll_rate_limited._value.get() == 6


async def test_two_concurrent_enrollments_on_a_one_use_token(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Exactly one of two simultaneous enrollments spending the last use wins (each
    backend); the loser issued nothing."""
    async with enroll_env(pki, tmp_path, database_url) as env:
        for attempt in range(3):
            made = await env.token()
            names = [f"a{attempt}", f"b{attempt}"]
            results = await asyncio.gather(
                *(env.enroll.Enroll(enroll_request(made.token, n, TD)[1]) for n in names),
                return_exceptions=True,
            )
            won = [r for r in results if isinstance(r, enroll_pb2.EnrollResponse)]
            lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(won) == 1, results
            assert len(lost) == 1, results
            assert lost[0].code() == grpc.StatusCode.UNAUTHENTICATED
            state = await env.issued()
            assert state["uses"][made.info.id] == 0
            assert won[0].node_id in state["nodes"]
            assert [n for n in names if n in state["nodes"]] == [won[0].node_id]
        assert (await env.issued())["certificates"] == 3


async def test_the_enrollment_port_serves_the_root_ca_in_its_chain(
    pki: Any, tmp_path: Path
) -> None:
    """The handshake presents the manager's certificate and then the fleet root, so a host
    can check the root against its pinned hash; no client certificate is asked for."""
    async with enroll_env(pki, tmp_path) as env:
        out = await asyncio.to_thread(
            subprocess.run,
            [
                "openssl",
                "s_client",
                "-showcerts",
                "-connect",
                f"127.0.0.1:{env.manager.enroll_port}",
                "-servername",
                f"manager.{TD}",
            ],
            input=b"",
            capture_output=True,
            timeout=30,
            check=False,
        )
        text = out.stdout.decode(errors="replace")
        pems = [
            "-----BEGIN CERTIFICATE-----"
            + part.split("-----END CERTIFICATE-----")[0]
            + "-----END CERTIFICATE-----\n"
            for part in text.split("-----BEGIN CERTIFICATE-----")[1:]
        ]
        certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
        assert len(certs) == 2, text
        assert certs[-1] == x509.load_pem_x509_certificate(pki.ca.cert_pem)
        assert ca_hash(certs[-1].public_bytes(serialization.Encoding.PEM)) == ca_hash(
            pki.ca.cert_pem
        )
        assert "Acceptable client certificate CA names" not in text


async def test_the_root_itself_can_be_the_issuer(pki: Any, tmp_path: Path) -> None:
    """With the root's own key as issuer, the certificate is the leaf alone."""
    async with enroll_env(pki, tmp_path, intermediate=False) as env:
        made = await env.token()
        key, req = enroll_request(made.token, "n1", TD)
        resp = await env.enroll.Enroll(req)
        assert len(x509.load_pem_x509_certificates(resp.certificate_pem)) == 1
        write_identity(tmp_path / "host", key, resp.certificate_pem, resp.ca_pem).validate()


async def test_token_requests_are_checked(pki: Any, tmp_path: Path) -> None:
    """Bad CreateJoinToken fields are INVALID_ARGUMENT naming them; the secret is never
    stored; revoking is idempotent; an unknown id is NOT_FOUND."""
    async with enroll_env(pki, tmp_path, max_token_ttl_days=1.0) as env:
        bad = [
            ({"node_name": "a", "name_prefix": "b"}, "name_prefix"),
            ({"node_name": "UPPER"}, "node_name"),
            ({"labels": {"a": "b c"}}, "labels"),
            ({"ttl_seconds": 2 * 86400.0}, "ttl: at most 1 day ("),
            ({"uses": 10_001}, "uses"),
        ]
        for fields, needle in bad:
            err = await rpc_error(env.op.CreateJoinToken(token_request(**fields)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert needle in (err.details() or ""), err.details()
        assert (await env.issued())["uses"] == {}
        made = await env.token(uses=2, ttl_seconds=600)
        assert made.info.expire_time - made.info.create_time == 600_000
        assert made.info.created_by == "operator/alice"
        secret = made.token.split(".")[1]
        async with env.manager.db.engine.connect() as conn:
            stored = (await conn.execute(select(join_tokens))).one()
        assert secret not in repr(stored)
        req = fleet_pb2.FleetServiceRevokeJoinTokenRequest(token_id=made.info.id)
        first = (await env.op.RevokeJoinToken(req)).info
        second = (await env.op.RevokeJoinToken(req)).info
        assert first.revoke_time == second.revoke_time > 0
        err = await rpc_error(
            env.op.RevokeJoinToken(
                fleet_pb2.FleetServiceRevokeJoinTokenRequest(token_id="nosuchid")
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        audit = [a.action for a in await _audit(env.manager)]
        assert audit == ["token.created", "token.revoked"]


async def _audit(manager: ManagerServer) -> list[AuditRecord]:
    """Every audit entry, oldest first."""
    return list(reversed(await AuditRepository(manager.db).list_recent(limit=1000)))


async def test_tokens_need_enrollment_enabled(pki: Any, tmp_path: Path) -> None:
    """A manager without enroll.listen or advertise_address refuses CreateJoinToken, and
    Enroll has no port; RenewCertificate without an issuer is FAILED_PRECONDITION."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "s")
    async with running_manager(config) as manager, operator_stub(pki, manager.port) as op:
        assert manager.enroll_port is None
        err = await rpc_error(op.CreateJoinToken(token_request()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "enroll.listen" in (err.details() or "")
        tls = pki.issue("node", "n1")
        async with manager_stub_as(tls, manager.port, TD) as stub:
            err = await rpc_error(
                stub.RenewCertificate(
                    manager_pb2.RenewCertificateRequest(node_id="n1", csr_pem=b"x")
                )
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "enroll.issuer_cert_file" in (err.details() or "")


async def test_an_issuer_of_another_fleet_stops_the_start(pki: Any, tmp_path: Path) -> None:
    """An issuing CA that does not chain to tls.ca_file is a one-line ConfigError, and an
    enrollment port without an issuer is refused by the config itself."""
    foreign = CertificateAuthority.create()
    settings = enroll_settings(foreign, tmp_path / "foreign")
    config = manager_config(
        pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "s", enroll=settings
    )
    server = ManagerServer(config)
    with pytest.raises(ConfigError) as err:
        await server.start()
    assert "enroll.issuer_cert_file: CA certificate" in str(err.value)
    assert "not signed by the root CA" in str(err.value)
    assert not (tmp_path / "m.db").exists(), "nothing was created"
    with pytest.raises(ValueError, match="enrollment needs an issuing CA"):
        dataclasses.replace(config.enroll, issuer_cert_file=None, issuer_key_file=None).validate()
