"""A private CA for one fleet, and the certificates it issues.

Every certificate carries its identity as a SAN URI
``spiffe://<trust-domain>/<role>/<name>`` plus the DNS name
``<name>.<role>.<trust-domain>`` that clients use for the TLS hostname check
(so a client proves it reached the identity it meant to dial). The CA is
name-constrained to its trust domain's URIs, so the TLS layer itself refuses
a leaf claiming another trust domain.

Tests mint a fresh CA per test with this module; operators can use it or
``scripts/generate_test_certs.sh`` (openssl), which makes the same layout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.errors import ConfigError
from fleet.files import write_file_atomic
from fleet.identity import ROLES, Identity, Role, check_trust_domain

if TYPE_CHECKING:
    from fleet.tls import TLSConfig

__all__ = [
    "ROLES",
    "CertificateAuthority",
    "Identity",
    "IssuedCertificate",
    "Role",
    "SignedCertificate",
    "ca_trust_domain",
    "check_trust_domain",
    "common_name",
    "write_file_atomic",
]

# Leaves start a little in the past so a peer with a slightly slow clock accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def common_name(identity: Identity) -> str:
    """The subject CN of `identity`'s certificate: its DNS name, or its bare name when the
    DNS name is past X.509's 64-character CN limit (a long node id). Only informational:
    the SAN is what is checked."""
    return identity.server_name if len(identity.server_name) <= 64 else identity.name


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class SignedCertificate:
    """A leaf signed for a key the CA never saw (enrollment, renewal)."""

    identity: Identity
    cert_pem: bytes
    """The leaf, then the issuing intermediate CA's chain if any (serve as is)."""
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate, its private key and the CA that signed it (all PEM)."""

    identity: Identity
    """The identity in the certificate's SAN URI."""
    cert_pem: bytes
    """The leaf certificate."""
    key_pem: bytes
    """The leaf's unencrypted PKCS#8 private key; keep it 0600."""
    ca_pem: bytes
    """The fleet's root CA certificate, which peers must trust."""

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed leaf (serial, validity, extensions)."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, directory: str | Path, stem: str | None = None) -> TLSConfig:
        """Write ``<stem>.pem``, ``<stem>-key.pem`` (0600) and ``ca.pem`` into `directory`.

        `stem` defaults to ``<role>-<name>``. Each file is replaced atomically,
        so a server reloading its files never sees a half-written one.
        """
        from fleet.tls import TLSConfig  # here: fleet.tls imports this module

        directory = Path(directory)
        stem = stem or f"{self.identity.role}-{self.identity.name}"
        cfg = TLSConfig(
            ca_file=directory / "ca.pem",
            cert_file=directory / f"{stem}.pem",
            key_file=directory / f"{stem}-key.pem",
        )
        # Key first: a reader pairing the new key with the old cert fails
        # validation and keeps its old pair until the cert lands too.
        write_file_atomic(cfg.key_file, self.key_pem, mode=0o600)
        write_file_atomic(cfg.cert_file, self.cert_pem, mode=0o644)
        write_file_atomic(cfg.ca_file, self.ca_pem, mode=0o644)
        return cfg


class CertificateAuthority:
    """One fleet's private CA: signs every manager, node and operator certificate."""

    def __init__(
        self,
        trust_domain: str,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        chain_pem: bytes = b"",
        root_pem: bytes | None = None,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.cert_pem = cert_pem
        """This CA's own certificate (the root's, or an intermediate's)."""
        self.key_pem = key_pem
        self.chain_pem = chain_pem
        """Certificates between this CA and the root (intermediates only), leaf-side first."""
        self.root_pem = root_pem if root_pem is not None else cert_pem
        """The fleet CA peers trust (`ca.pem`): this CA itself unless it is an intermediate."""
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the CA key must be an EC key")
        self._key = key

    @property
    def is_intermediate(self) -> bool:
        """True if this CA is signed by another (the root's key can stay offline)."""
        return self.root_pem != self.cert_pem

    @classmethod
    def create(
        cls,
        trust_domain: str = "fleet.local",
        *,
        common_name: str = "Fleet CA",
        valid_days: int = 3650,
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """Make a new root CA (EC P-256) for `trust_domain`, valid from `now` for `valid_days`.

        pathlen 1: it may sign one level of intermediate CA (`create_intermediate`),
        which the manager holds to issue node certificates while this key stays offline.
        """
        check_trust_domain(trust_domain)
        now = now or _utcnow()
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        builder = _ca_builder(
            trust_domain, name, key, not_before=now - _CLOCK_SKEW, valid_days=valid_days
        )
        cert = (
            builder.issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def create_intermediate(
        self,
        *,
        common_name: str = "Fleet issuing CA",
        valid_days: int = 365,
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A CA signed by this root for the manager to issue node certificates with.

        The manager then holds only the intermediate's key; the root's key can
        stay offline. pathlen 0: it signs leaves only.
        """
        if self.is_intermediate:
            raise ValueError("an intermediate CA cannot sign another intermediate")
        constraints = self._cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.path_length == 0:
            raise ValueError(
                "this root CA is pathlen 0 (made before issuing CAs existed) and may sign"
                " leaves only: give the manager the root's own key as its issuer, or make"
                " a new root with 'fleetctl pki init'"
            )
        now = now or _utcnow()
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            _ca_builder(
                self.trust_domain, name, key, not_before=now - _CLOCK_SKEW, valid_days=valid_days
            )
            .issuer_name(self._cert.subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return CertificateAuthority(
            self.trust_domain,
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
            root_pem=self.cert_pem,
        )

    @classmethod
    def load(
        cls, cert_path: str | Path, key_path: str | Path, *, root_path: str | Path | None = None
    ) -> CertificateAuthority:
        """Load a CA written by `write` or the openssl script; one-line ConfigError if unusable.

        For an intermediate CA, `cert_path` holds its certificate (then any
        certificates between it and the root) and `root_path` the fleet's root
        CA certificate, which must have signed the chain.
        """
        cert_path, key_path = Path(cert_path), Path(key_path)
        file_pem = _read(cert_path, "CA certificate")
        key_pem = _read(key_path, "CA key")
        try:
            certs = x509.load_pem_x509_certificates(file_pem)
        except ValueError:
            raise ConfigError(f"CA certificate {cert_path}: not a PEM certificate") from None
        cert = certs[0]
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:])
        root_pem: bytes | None = None
        if root_path is not None:
            root_path = Path(root_path)
            root_pem = _read(root_path, "root CA certificate")
            try:
                root = x509.load_pem_x509_certificate(root_pem)
            except ValueError:
                raise ConfigError(
                    f"root CA certificate {root_path}: not a PEM certificate"
                ) from None
            chain = [*certs, root]
            for lower, upper in itertools.pairwise(chain):
                try:
                    lower.verify_directly_issued_by(upper)
                except Exception:
                    raise ConfigError(
                        f"CA certificate {cert_path}: not signed by the root CA in {root_path}"
                    ) from None
            if root.public_bytes(serialization.Encoding.PEM) == cert_pem:
                root_pem = None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"CA key {key_path}: not an unencrypted PEM key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key {key_path}: not an EC key")
        if key.public_key() != cert.public_key():
            raise ConfigError(f"CA key {key_path}: does not match the certificate {cert_path}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ConfigError(f"CA certificate {cert_path}: not a CA (basicConstraints CA:false)")
        trust_domain = ca_trust_domain(cert)
        if trust_domain is None:
            raise ConfigError(
                f"CA certificate {cert_path}: names no trust domain (no spiffe://<td> SAN URI)"
            )
        return cls(trust_domain, cert_pem, key_pem, chain_pem=chain_pem, root_pem=root_pem)

    def issue(
        self,
        role: Role,
        name: str,
        *,
        hostnames: Iterable[str] = (),
        ips: Iterable[str] = (),
        valid_days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a leaf for ``<role>/<name>`` in this CA's trust domain.

        The SAN holds the SPIFFE URI, ``<name>.<role>.<td>``, ``manager.<td>``
        for managers, and the given `hostnames` and `ips`. `not_before` /
        `not_after` override the validity (tests use them for expired and
        not-yet-valid certificates).
        """
        start = not_before or (_utcnow() - _CLOCK_SKEW)
        end = not_after or (start + _CLOCK_SKEW + dt.timedelta(days=valid_days))
        key = _new_key()
        signed = self.sign(
            role,
            name,
            key.public_key(),
            not_before=start,
            not_after=end,
            hostnames=hostnames,
            ips=ips,
        )
        return IssuedCertificate(
            identity=signed.identity,
            cert_pem=signed.cert_pem,
            key_pem=_key_pem(key),
            ca_pem=self.root_pem,
        )

    def sign(
        self,
        role: Role,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        hostnames: Iterable[str] = (),
        ips: Iterable[str] = (),
    ) -> SignedCertificate:
        """Sign a leaf for ``<role>/<name>`` over `public_key` (a key held elsewhere, e.g. a CSR's).

        The returned PEM is the leaf followed by this CA's certificate and
        chain when this CA is an intermediate, ready to be served.
        """
        identity = Identity(role, name, self.trust_domain)
        dns = [identity.server_name]
        if role == "manager":
            dns.append(f"manager.{self.trust_domain}")
        dns.extend(h for h in hostnames if h not in dns)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        sans.extend(x509.DNSName(h) for h in dns)
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name(identity)),
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = self.cert_pem + self.chain_pem if self.is_intermediate else b""
        return SignedCertificate(
            identity=identity,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM) + chain,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def write(self, directory: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``ca.pem`` and ``ca-key.pem`` (0600); refuse to replace a CA key unless told.

        Replacing a CA invalidates every certificate it issued, hence the guard.
        """
        directory = Path(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
        if not overwrite and key_path.exists():
            raise FileExistsError(
                f"{key_path} exists; refusing to replace the CA (pass overwrite=True)"
            )
        write_file_atomic(key_path, self.key_pem, mode=0o600)
        write_file_atomic(cert_path, self.cert_pem + self.chain_pem, mode=0o644)
        return cert_path, key_path


def _ca_builder(
    trust_domain: str,
    name: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    not_before: dt.datetime,
    valid_days: int,
) -> x509.CertificateBuilder:
    """What root and intermediate CAs share: validity, key usage, SPIFFE ID, name constraints."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _CLOCK_SKEW + dt.timedelta(days=valid_days))
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # The CA's own SPIFFE ID names its trust domain (read back by load()).
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        # Only URIs are constrained: leaves may carry any DNS name or IP.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None


def ca_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain a CA names: its spiffe://<td> SAN URI, else its URI name constraint."""
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
                return uri[len("spiffe://") :]
    with contextlib.suppress(x509.ExtensionNotFound):
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        for sub in nc.permitted_subtrees or ():
            if isinstance(sub, x509.UniformResourceIdentifier):
                return sub.value
    return None
