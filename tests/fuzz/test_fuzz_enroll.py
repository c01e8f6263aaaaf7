"""Fuzz EnrollmentService.Enroll (no certificate, on the enrollment port) and the CSR of
RenewCertificate, against a live manager on each backend.

Requests are generic (`proto_strategies`) or built to get deep: a real
token, a name it allows, and a CSR that is valid, has bytes flipped, asks
for fuzzed SANs, or is not a CSR at all. Properties: never UNKNOWN or
INTERNAL; a refusal issues nothing (no certificate row, every token's uses
as before, no node row); an accepted Enroll returns a certificate for the
CSR's key naming exactly the requested node, chaining to the fleet root;
the manager still enrolls afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enroll_helpers import csr
from fuzz_support import FUZZ, NEVER
from grpc import aio
from hypothesis import event, given, settings
from hypothesis import strategies as st
from live_env import (
    ENROLLEE,
    TRUST_DOMAIN,
    ModulePki,
    channels,
    live_manager,
    manager_name,
    methods,
    registration,
)
from proto_strategies import plausible_text, requests, text
from sqlalchemy import func, select

from fleet.identity import Identity
from fleet.v1 import (
    enroll_pb2,
    enroll_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
)
from manager.server import ManagerServer
from manager.servicers.enrollment import MAX_RECEIVE_BYTES
from manager.storage.schema import join_tokens, node_certificates, nodes

ENROLL = methods("EnrollmentService")[0]
RENEW = {m.name: m for m in methods("ManagerService")}["RenewCertificate"]
NODE = "n1"
"""The registered node whose certificate renews."""
PREFIX = "fz-"
"""The prefix token's names."""


@dataclass
class Env:
    """The live manager, a channel to its enrollment port, n1's mTLS channel, the tokens."""

    manager: ManagerServer
    enroll: aio.Channel
    node: aio.Channel
    tokens: tuple[str, ...]
    """Tokens for ENROLLEE (by name), for PREFIX names, and a revoked one."""
    root: bytes
    """The fleet root CA (PEM)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory, manager_database: str
) -> AsyncIterator[Env]:
    """One manager per module and backend, with its tokens made and n1 registered."""
    root: Path = tmp_path_factory.mktemp("manager")
    pki = module_pki
    fast = {"rate_per_second": 10_000.0, "burst": 100_000}  # the rate limit has its own test
    async with live_manager(pki, root, manager_database, enroll=fast) as manager:
        assert manager.enroll_port
        async with (
            channels(
                manager.port,
                {"op": pki.issue("operator", "alice"), NODE: pki.issue("node", NODE)},
                manager_name(pki),
            ) as chans,
            channels(
                manager.enroll_port,
                {"none": grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)},
                manager_name(pki),
            ) as enroll,
        ):
            op = fleet_pb2_grpc.FleetServiceStub(chans["op"])
            f = fleet_pb2
            named = await op.CreateJoinToken(
                f.FleetServiceCreateJoinTokenRequest(node_name=ENROLLEE, uses=10_000)
            )
            prefixed = await op.CreateJoinToken(
                f.FleetServiceCreateJoinTokenRequest(name_prefix=PREFIX, uses=10_000)
            )
            revoked = await op.CreateJoinToken(f.FleetServiceCreateJoinTokenRequest(uses=10))
            await op.RevokeJoinToken(f.FleetServiceRevokeJoinTokenRequest(token_id=revoked.info.id))
            await manager_pb2_grpc.ManagerServiceStub(chans[NODE]).RegisterNode(
                registration(NODE, "127.0.0.1:7444")
            )
            yield Env(
                manager,
                enroll["none"],
                chans[NODE],
                (named.token, prefixed.token, revoked.token),
                pki.ca.cert_pem,
            )


async def issued(manager: ManagerServer) -> dict[str, Any]:
    """Everything enrollment writes when it issues: certificates, token uses, nodes."""
    async with manager.db.engine.connect() as conn:
        return {
            "certificates": (
                await conn.execute(select(func.count()).select_from(node_certificates))
            ).scalar_one(),
            "uses": sorted(
                (await conn.execute(select(join_tokens.c.id, join_tokens.c.uses_left))).all()
            ),
            "nodes": sorted((await conn.execute(select(nodes.c.node_id))).scalars()),
        }


def _general_name(kind: str, value: str) -> x509.GeneralName:
    """A SAN of `kind` holding `value`, or a plain DNS name if the library refuses `value`."""
    builders = {
        "uri": x509.UniformResourceIdentifier,
        "dns": x509.DNSName,
        "email": x509.RFC822Name,
    }
    try:
        return builders[kind](value)  # type: ignore[no-any-return]
    except (ValueError, TypeError, UnicodeError):
        return x509.DNSName("refused.example")


_SAN = st.builds(
    _general_name,
    st.sampled_from(["uri", "dns", "email"]),
    st.one_of(
        text,
        plausible_text,
        st.just(f"spiffe://{TRUST_DOMAIN}/node/x"),
        st.just(f"spiffe://{TRUST_DOMAIN}/manager/m1"),
        st.just(f"manager.{TRUST_DOMAIN}"),
    ),
)


def _hostile_csr(name: str, sans: list[x509.GeneralName], ca: bool) -> bytes:
    """A CSR with the node's own URI (mostly) plus fuzzed SANs; a valid one if the library
    refuses to encode them."""
    key = ec.generate_private_key(ec.SECP256R1())
    own = x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/node/{name}")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    try:
        builder = builder.add_extension(x509.SubjectAlternativeName([own, *sans]), critical=False)
        if ca:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    except (ValueError, TypeError, UnicodeError):
        return csr(name, TRUST_DOMAIN)[1]


def _flipped(pem: bytes, positions: list[int]) -> bytes:
    data = bytearray(pem)
    for p in positions:
        data[p % len(data)] ^= 0x01
    return bytes(data)


def _usable(name: str) -> str:
    """`name` if a certificate can name it, else "x" (a CSR for another name, then)."""
    try:
        Identity("node", name, TRUST_DOMAIN)
    except ValueError:
        return "x"
    return name


@st.composite
def csr_for(draw: st.DrawFn, name: str) -> bytes:
    """A CSR for `name`: valid, flipped bits, fuzzed SANs, or not a CSR."""
    kind = draw(st.sampled_from(["valid", "valid", "flipped", "sans", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    name = _usable(name)
    valid = csr(name, TRUST_DOMAIN)[1]
    if kind == "flipped":
        return _flipped(valid, draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=3)))
    if kind == "sans":
        sans = draw(st.lists(_SAN, max_size=3))
        return _hostile_csr(name, sans, draw(st.booleans()))
    return valid


@st.composite
def deep_enroll(draw: st.DrawFn, tokens: tuple[str, ...]) -> enroll_pb2.EnrollRequest:
    """Mostly a token with a name it allows (so CSR checks and issuing run), else any mix."""
    named, prefixed = tokens[0], tokens[1]
    suffix = plausible_text.map(lambda t: t.replace(".", "").replace("_", ""))
    token, name = draw(
        st.one_of(
            st.tuples(st.just(named), st.just(ENROLLEE)),
            st.tuples(st.just(prefixed), suffix.map(lambda t: PREFIX + t)),
            st.tuples(st.one_of(st.sampled_from(tokens), text), st.one_of(plausible_text, text)),
        )
    )
    return enroll_pb2.EnrollRequest(token=token, node_name=name, csr_pem=draw(csr_for(name)))


@functools.cache
def enroll_strategy(tokens: tuple[str, ...]) -> st.SearchStrategy[enroll_pb2.EnrollRequest]:
    overrides = {
        "fleet.v1.EnrollRequest.token": st.one_of(st.sampled_from(tokens), text),
        "fleet.v1.EnrollRequest.node_name": st.one_of(st.just(ENROLLEE), text),
        "fleet.v1.EnrollRequest.csr_pem": st.one_of(csr_for(ENROLLEE), st.binary(max_size=64)),
    }
    valid = enroll_pb2.EnrollRequest(
        token=tokens[0], node_name=ENROLLEE, csr_pem=csr(ENROLLEE, TRUST_DOMAIN)[1]
    )
    return st.one_of(requests(valid, overrides), deep_enroll(tokens), deep_enroll(tokens))


def check_issued(
    request: enroll_pb2.EnrollRequest, reply: enroll_pb2.EnrollResponse, root: bytes
) -> None:
    """An accepted Enroll: the CSR's key, exactly node/<name>, chaining to the root."""
    chain = x509.load_pem_x509_certificates(reply.certificate_pem)
    leaf = chain[0]
    asked = x509.load_pem_x509_csr(request.csr_pem)
    assert leaf.public_key() == asked.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/node/{request.node_name}"
    ]
    assert san.get_values_for_type(x509.DNSName) == [f"{request.node_name}.node.{TRUST_DOMAIN}"]
    assert not san.get_values_for_type(x509.IPAddress)
    issuer = x509.load_pem_x509_certificate(root)
    chain[-1].verify_directly_issued_by(issuer)
    assert reply.ca_pem == root


async def call(
    call: Any, request: Any, *, fuzzing: bool = True
) -> tuple[Any, grpc.StatusCode, str]:
    """(reply or None, code, details), checking what every fuzz example must hold."""
    try:
        reply = await call(request, timeout=15)
    except aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if fuzzing:
            event(code.name)
        assert code not in NEVER, f"{code.name}: {details!r}\nrequest: {request!r}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer\nrequest: {request!r}"
        assert "metadata size exceeds" not in details, details
        return None, code, details
    if fuzzing:
        event("OK")
    return reply, grpc.StatusCode.OK, ""


@pytest.mark.asyncio(loop_scope="module")
@FUZZ
@given(data=st.data())
async def test_fuzz_enroll(env: Env, data: st.DataObject) -> None:
    """Any Enroll: a proper status; a refusal issues nothing; a certificate is exactly the
    one asked for."""
    request = data.draw(enroll_strategy(env.tokens), label="request")
    before = await issued(env.manager)
    stub = enroll_pb2_grpc.EnrollmentServiceStub(env.enroll)
    reply, code, _ = await call(stub.Enroll, request)
    if reply is not None:
        check_issued(request, reply, env.root)
    else:
        assert await issued(env.manager) == before, f"refused with {code.name} but issued"


@pytest.mark.asyncio(loop_scope="module")
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 2))
@given(csr_pem=st.one_of(csr_for(NODE), csr_for(ENROLLEE), st.binary(max_size=4096)))
async def test_fuzz_renew_csr(env: Env, csr_pem: bytes) -> None:
    """Any CSR in RenewCertificate from n1: a proper status; a refusal issues nothing; an
    accepted one is n1's, for the CSR's key."""
    before = await issued(env.manager)
    stub = manager_pb2_grpc.ManagerServiceStub(env.node)
    request = manager_pb2.RenewCertificateRequest(node_id=NODE, csr_pem=csr_pem)
    reply, code, _ = await call(stub.RenewCertificate, request)
    if reply is None:
        assert await issued(env.manager) == before, f"refused with {code.name} but issued"
        return
    leaf = x509.load_pem_x509_certificates(reply.certificate_pem)[0]
    assert leaf.public_key() == x509.load_pem_x509_csr(csr_pem).public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{TRUST_DOMAIN}/node/{NODE}"]


@pytest.mark.asyncio(loop_scope="module")
async def test_an_oversized_enroll_is_refused_before_any_handler(env: Env) -> None:
    """Past 16 KiB the enrollment port answers RESOURCE_EXHAUSTED and issues nothing."""
    before = await issued(env.manager)
    request = enroll_pb2.EnrollRequest(
        token=env.tokens[0], node_name=ENROLLEE, csr_pem=b"x" * MAX_RECEIVE_BYTES
    )
    stub = enroll_pb2_grpc.EnrollmentServiceStub(env.enroll)
    _, code, _ = await call(stub.Enroll, request, fuzzing=False)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await issued(env.manager) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_manager_still_enrolls_after_fuzzing(env: Env) -> None:
    """After the fuzzers a valid Enroll gets a certificate."""
    stub = enroll_pb2_grpc.EnrollmentServiceStub(env.enroll)
    request = enroll_pb2.EnrollRequest(
        token=env.tokens[0], node_name=ENROLLEE, csr_pem=csr(ENROLLEE, TRUST_DOMAIN)[1]
    )
    check_issued(request, await stub.Enroll(request, timeout=15), env.root)
