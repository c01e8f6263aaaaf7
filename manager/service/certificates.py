"""Issuing node certificates: Enroll (a join token and a CSR) and RenewCertificate.

The rules are `manager.service.enrollment`'s pure functions; this module
does the I/O around them: the rate limit, the token and node lookups,
signing with the issuing CA, and one storage transaction that spends the
token and records the certificate (`EnrollmentRepository.issue`). Nothing
is stored, and no use spent, unless a certificate is returned.

An unusable token is one UNAUTHENTICATED message for the caller; the
precise reason is logged, counted (`on_enroll(outcome)`) and written as a
`node.enroll_refused` event, as are scope refusals. Malformed requests and
rate-limited attempts are only counted: they could be sent in bulk.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.enroll import check_csr, parse_token, secret_matches
from fleet.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from fleet.labels import validate_node_id
from fleet.pki import CertificateAuthority
from manager.service.deny_list import DenyList
from manager.service.enrollment import (
    INVALID_TOKEN,
    EnrollLimiter,
    TokenFacts,
    check_new_key,
    check_scope,
    new_not_before,
    reenroll_refusal,
    token_problem,
)
from manager.storage import NodeRepository
from manager.storage.enrollment import (
    EnrollmentRepository,
    IssuedCertificate,
    NodeExists,
    TokenSpent,
)
from manager.storage.removal import RemovalRepository

__all__ = ["NO_ISSUER", "Certificates", "Issued"]

log = logging.getLogger(__name__)

NO_ISSUER = (
    "this manager has no issuing CA: set enroll.issuer_cert_file and enroll.issuer_key_file"
    " in its config (docs/certificates.md)"
)
"""FAILED_PRECONDITION for Enroll and RenewCertificate without an issuer."""


@dataclass(frozen=True)
class Issued:
    """A certificate issued to a node."""

    node_id: str
    """Its name."""
    cert_pem: bytes
    """The leaf, then the issuing intermediate if any."""
    ca_pem: bytes
    """The fleet root CA."""
    not_after_ms: int
    """When it expires."""
    labels: dict[str, str]
    """The labels the join token granted (enrollment only)."""


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _time(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Certificates:
    """Enroll and RenewCertificate on top of the issuing CA, the tokens and the deny list."""

    def __init__(
        self,
        repo: EnrollmentRepository,
        removals: RemovalRepository,
        nodes: NodeRepository,
        deny: DenyList,
        issuer: CertificateAuthority | None,
        *,
        trust_domain: str,
        node_cert_days: float,
        limiter: EnrollLimiter,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_enroll: Callable[[str], None] = lambda _outcome: None,
        on_renew: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self._repo = repo
        self._removals = removals
        self._nodes = nodes
        self._deny = deny
        self._issuer = issuer
        self._td = trust_domain
        self._lifetime_ms = round(node_cert_days * 86400 * 1000)
        self._limiter = limiter
        self._clock = clock
        self._monotonic = monotonic
        self._on_enroll = on_enroll
        self._on_renew = on_renew

    def _require_issuer(self) -> CertificateAuthority:
        if self._issuer is None:
            raise FailedPrecondition(NO_ISSUER)
        return self._issuer

    async def enroll(self, token: str, node_name: str, csr_pem: bytes, *, peer: str) -> Issued:
        """A certificate for `node_name` in exchange for a use of `token` (see module doc)."""
        try:
            return await self._enroll(token, node_name, csr_pem, peer)
        except FleetError as exc:
            self._on_enroll(_outcome(exc))
            raise

    async def _enroll(self, text: str, node_name: str, csr_pem: bytes, peer: str) -> Issued:
        wait = self._limiter.admit(peer, self._monotonic())
        if wait > 0:
            raise ResourceExhausted(
                f"enrollment rate limit reached; retry in {max(1, round(wait + 0.5))} s"
            )
        issuer = self._require_issuer()
        try:
            parts = parse_token(text)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="token") from None
        validate_node_id(node_name, field="node_name")
        try:
            checked = check_csr(csr_pem, trust_domain=self._td, node_name=node_name)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="csr_pem") from None
        now_ms = int(self._clock() * 1000)
        stored = await self._repo.get_token(parts.id)
        facts = (
            TokenFacts(stored.expires_ms, stored.uses_left, stored.revoked_ms) if stored else None
        )
        secret_ok = stored is not None and secret_matches(parts.secret, stored.secret_hash)
        problem = token_problem(facts, secret_ok=secret_ok, now_ms=now_ms)
        if problem is not None or stored is None:
            await self._refused(peer, parts.id, node_name, f"token {problem}", now_ms)
            raise _TokenRefused(problem or "unknown")
        revocation = await self._removals.revocation(node_name)
        exists = await self._nodes.get(node_name) is not None
        try:
            check_scope(
                node_name=stored.node_name,
                name_prefix=stored.name_prefix,
                name=node_name,
                exists=exists,
                revoked=revocation is not None,
            )
        except PermissionDenied as exc:
            await self._refused(peer, parts.id, node_name, exc.message, now_ms)
            raise
        cutoff = revocation.not_before_ms if revocation is not None else 0
        cert = self._sign(issuer, node_name, checked.public_key, now_ms, cutoff, parts.id)
        try:
            await self._repo.issue(
                cert.record,
                labels=stored.labels,
                new_node_only=not stored.node_name,
                peer=peer,
            )
        except TokenSpent:
            await self._refused(peer, parts.id, node_name, "token used up or revoked", now_ms)
            raise _TokenRefused("used up") from None
        except NodeExists:
            message = reenroll_refusal(node_name, "already exists")
            await self._refused(peer, parts.id, node_name, message, now_ms)
            raise PermissionDenied(message) from None
        log.info(
            "node %s enrolled from %s with join token %s (serial %s, expires %s)",
            node_name,
            peer,
            parts.id,
            cert.record.serial,
            _time(cert.record.not_after_ms).isoformat(),
        )
        self._on_enroll("issued")
        return Issued(node_name, cert.pem, issuer.root_pem, cert.record.not_after_ms, stored.labels)

    async def _refused(
        self, peer: str, token_id: str, node_name: str, why: str, now_ms: int
    ) -> None:
        log.warning(
            "enrollment of %s from %s with join token %s refused: %s",
            node_name,
            peer,
            token_id,
            why,
        )
        try:
            await self._repo.record_refusal(
                peer=peer, token_id=token_id, node_id=node_name, reason=why, now_ms=now_ms
            )
        except FleetError as exc:  # never turn a refusal into another error
            log.warning("could not record the refused enrollment: %s", exc)

    async def renew(self, node_id: str, csr_pem: bytes, current_pem: bytes | None) -> Issued:
        """A new certificate for the calling node `node_id` (identity checked by the caller).

        The CSR must ask for `node_id` with a key other than the one of
        `current_pem`, the certificate the caller presented.
        """
        try:
            issued = await self._renew(node_id, csr_pem, current_pem)
        except FleetError as exc:
            self._on_renew(_outcome(exc))
            raise
        self._on_renew("issued")
        return issued

    async def _renew(self, node_id: str, csr_pem: bytes, current_pem: bytes | None) -> Issued:
        issuer = self._require_issuer()
        try:
            checked = check_csr(csr_pem, trust_domain=self._td, node_name=node_id)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="csr_pem") from None
        if current_pem is not None:
            from cryptography import x509

            current = x509.load_pem_x509_certificate(current_pem).public_key()
            if isinstance(current, ec.EllipticCurvePublicKey):
                check_new_key(_der(checked.public_key), _der(current))
        now_ms = int(self._clock() * 1000)
        cert = self._sign(
            issuer, node_id, checked.public_key, now_ms, self._deny.cutoff(node_id), ""
        )
        await self._repo.record_renewal(cert.record)
        log.info(
            "node %s renewed its certificate (serial %s, expires %s)",
            node_id,
            cert.record.serial,
            _time(cert.record.not_after_ms).isoformat(),
        )
        return Issued(node_id, cert.pem, issuer.root_pem, cert.record.not_after_ms, {})

    def _sign(
        self,
        issuer: CertificateAuthority,
        node_id: str,
        key: ec.EllipticCurvePublicKey,
        now_ms: int,
        cutoff_ms: int,
        token_id: str,
    ) -> _Signed:
        not_before = new_not_before(now_ms, cutoff_ms, lifetime_ms=self._lifetime_ms)
        signed = issuer.sign(
            "node",
            node_id,
            key,
            not_before=_time(not_before),
            not_after=_time(now_ms + self._lifetime_ms),
        )
        record = IssuedCertificate(
            serial=format(signed.serial, "x"),
            node_id=node_id,
            token_id=token_id,
            issued_ms=now_ms,
            not_before_ms=_ms(signed.not_before),
            not_after_ms=_ms(signed.not_after),
        )
        return _Signed(signed.cert_pem, record)


@dataclass(frozen=True)
class _Signed:
    pem: bytes
    record: IssuedCertificate


class _TokenRefused(Unauthenticated):
    """An unusable token: the caller gets INVALID_TOKEN; `reason` is for metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(INVALID_TOKEN)
        self.reason = reason


def _outcome(exc: FleetError) -> str:
    """The metrics label of a refusal."""
    if isinstance(exc, _TokenRefused):
        return "token_" + exc.reason.replace(" ", "_")
    return {
        "RESOURCE_EXHAUSTED": "rate_limited",
        "INVALID_ARGUMENT": "invalid_request",
        "PERMISSION_DENIED": "name_not_allowed",
        "FAILED_PRECONDITION": "no_issuer",
    }.get(exc.code.name, exc.code.name.lower())
