"""What enrollment's two sides agree on: join tokens, the CA pin, and CSRs.

A join token is ``<id>.<secret>``: the id is public (it names the token in
``tokens list`` and ``tokens revoke``), the secret is 32 random bytes that
the manager stores only as a SHA-256 hash. A plain hash is enough because
the secret is random and long, not a password a guesser could enumerate.

The CA pin is ``sha256:<hex>`` of the CA certificate's SubjectPublicKeyInfo
(DER), as kubeadm's ``--discovery-token-ca-cert-hash``: it survives the CA
being re-issued with the same key.

A CSR asks for exactly one thing: ``spiffe://<td>/node/<name>`` (and,
optionally, the DNS name ``<name>.node.<td>``). `check_csr` refuses anything
else; the manager signs its own certificate over the CSR's key and copies
nothing else from it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.identity import Identity
from fleet.pki import common_name

__all__ = [
    "MAX_CSR_BYTES",
    "CheckedCsr",
    "JoinTokenParts",
    "ca_hash",
    "check_csr",
    "hash_secret",
    "make_csr",
    "new_token",
    "parse_ca_hash",
    "parse_token",
    "secret_matches",
]

MAX_CSR_BYTES = 8 * 1024
"""A P-256 CSR is ~500 bytes of PEM; anything far larger is not one of ours."""

_ID_RE = re.compile(r"[a-z0-9]{8}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, URL-safe base64, no padding
_CA_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class JoinTokenParts:
    """A parsed join token."""

    id: str
    """Public: names the token (8 lower-case letters and digits)."""
    secret: str
    """Private: shown once, stored only as `hash_secret(secret)`."""

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"


def new_token() -> JoinTokenParts:
    """A fresh random token."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    token_id = "".join(secrets.choice(alphabet) for _ in range(8))
    return JoinTokenParts(token_id, secrets.token_urlsafe(32))


def parse_token(text: str) -> JoinTokenParts:
    """`text` as a token; ValueError saying what is wrong (never echoing the secret)."""
    token_id, dot, secret = text.strip().partition(".")
    if not dot or not _ID_RE.fullmatch(token_id) or not _SECRET_RE.fullmatch(secret):
        raise ValueError(
            "a join token is '<id>.<secret>' as 'fleetctl tokens create' printed it"
            " (8 lower-case letters or digits, a dot, 43 URL-safe characters)"
        )
    return JoinTokenParts(token_id, secret)


def hash_secret(secret: str) -> str:
    """The stored form of a token's secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """True if `secret` hashes to `stored_hash` (constant time)."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def ca_hash(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the first certificate's SubjectPublicKeyInfo in `cert_pem`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def parse_ca_hash(text: str) -> str:
    """`text` normalised to ``sha256:<64 hex>``; ValueError if it is not one."""
    value = text.strip().lower()
    if not _CA_HASH_RE.fullmatch(value):
        raise ValueError(
            f"{text!r} is not a CA hash: expected 'sha256:' and 64 hex digits"
            " (printed by 'fleetctl tokens create')"
        )
    return value


def make_csr(identity: Identity) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR for `identity`: (key PEM, PKCS#8 unencrypted; CSR PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name(identity))]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(identity.uri),
                    x509.DNSName(identity.server_name),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed `check_csr`: who it asks to be, and the key to certify."""

    identity: Identity
    public_key: ec.EllipticCurvePublicKey


def check_csr(csr_pem: bytes, *, trust_domain: str, node_name: str) -> CheckedCsr:
    """The CSR's key if it asks for exactly ``node/<node_name>``; ValueError naming the problem.

    Refused: not a PEM CSR, a signature that does not match its key (the
    sender does not hold the key), a key other than EC P-256, a SAN URI for
    another role, name or trust domain, more than one SAN URI, any DNS name
    but ``<name>.node.<td>``, any IP, email or other SAN, and any extension
    but the SAN (a CSR cannot ask to be a CA).
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ValueError(f"the CSR is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES} are accepted")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ValueError("the CSR is not a PEM certificate signing request") from None
    # Parsed lazily by cryptography: an unknown key or signature algorithm, or a
    # malformed extension, raises here rather than at load time.
    try:
        signature_ok = csr.is_signature_valid
        key = csr.public_key()
        extensions = list(csr.extensions)
    except (UnsupportedAlgorithm, ValueError, x509.DuplicateExtension) as exc:
        raise ValueError(
            f"the CSR cannot be read ({type(exc).__name__}): it must be an EC P-256 CSR"
            " with at most a subjectAltName extension"
        ) from None
    if not signature_ok:
        raise ValueError("the CSR's signature does not match its public key")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the CSR's key must be EC P-256")
    wanted = Identity("node", node_name, trust_domain)
    sans: list[x509.GeneralName] = []
    for ext in extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            raise ValueError(  # noqa: TRY004 -- bad input, not a programming error
                f"the CSR asks for the extension {ext.oid.dotted_string};"
                " only subjectAltName is accepted"
            )
        sans = list(ext.value)
    uris = [g.value for g in sans if isinstance(g, x509.UniformResourceIdentifier)]
    if uris != [wanted.uri]:
        raise ValueError(
            f"the CSR must name exactly one SAN URI, {wanted.uri}; it names"
            f" {', '.join(uris) if uris else 'none'}"
        )
    for g in sans:
        if isinstance(g, x509.UniformResourceIdentifier):
            continue
        if isinstance(g, x509.DNSName) and g.value == wanted.server_name:
            continue
        raise ValueError(
            f"the CSR asks for {type(g).__name__} {g.value!r}; a node certificate carries"
            f" only {wanted.uri} and {wanted.server_name}"
        )
    return CheckedCsr(wanted, key)
