"""Mutual TLS for every Fleet gRPC connection, and the caller's identity.

(One exception: the manager's enrollment port is TLS without client
certificates, `enrollment_server_credentials`, since an enrolling host has none.)

Servers require and verify client certificates against the fleet CA, and
pick up replaced certificate, key or CA files within a second, from the next
handshake after they look (no restart). Clients check the server's identity
through the TLS hostname check: `channel_options(identity.server_name)` makes
the handshake fail unless the peer holds that identity's certificate.

The TLS version floor is TLS 1.2, gRPC's own default (BoringSSL); grpcio
offers no knob for it, so there is none here.

cryptography is imported only where a certificate file is checked or a bare
PEM must be parsed, not by importing this module: gRPC's auth context already
carries the peer's URI SANs, and the daemon checks its files in a child
process (daemon.tlsfiles) to keep that library out of its long-lived process.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fleet.errors import ConfigError, FileSettingError, PermissionDenied, Unauthenticated
from fleet.identity import Identity, Role

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "RELOAD_CHECK_SECONDS",
    "TLSConfig",
    "TLSFileError",
    "channel_credentials",
    "channel_options",
    "enrollment_server_credentials",
    "identity_from_auth_context",
    "peer_identity",
    "require_node",
    "require_role",
    "server_credentials",
]

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0
"""How often, at most, server credentials look whether their files were replaced."""


@dataclass(frozen=True)
class TLSConfig:
    """Where a process finds its certificate, key and the fleet CA."""

    ca_file: Path
    """PEM certificate(s) of the fleet CA; peers must be signed by it."""
    cert_file: Path
    """PEM certificate of this process (first entry the leaf, intermediates after)."""
    key_file: Path
    """PEM private key of `cert_file`, unencrypted, mode 0600."""

    def validate(self, *, now: dt.datetime | None = None) -> None:
        """Check the three files are usable together; ConfigError with one line if not."""
        self._load(now=now)

    def identity(self) -> Identity:
        """The Fleet identity in this certificate's SAN URI (validates the files first)."""
        return self._load(now=None).identity

    def leaf_validity(self) -> tuple[dt.datetime, dt.datetime]:
        """(not before, not after) of this certificate; validates the files first (ConfigError)."""
        _, _, not_before, not_after = self._load(now=None).validity[0]
        return not_before, not_after

    def _load(self, *, now: dt.datetime | None) -> _Loaded:
        ca_pem = _read(self.ca_file, "CA")
        cert_pem = _read(self.cert_file, "certificate")
        key_pem = _read(self.key_file, "key")
        return self._check(ca_pem, cert_pem, key_pem, now=now)

    def _check(
        self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, now: dt.datetime | None
    ) -> _Loaded:
        """`_load`'s checks on contents that are not (yet) in the files; messages name the files.

        Lets a new bundle (enrollment, renewal) be checked before it replaces good files.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

        now = now or dt.datetime.now(dt.UTC)
        cas = _parse_certs(self.ca_file, ca_pem, "CA")
        chain = _parse_certs(self.cert_file, cert_pem, "certificate")
        leaf = chain[0]
        try:
            key: PrivateKeyTypes = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise TLSFileError(
                "key", self.key_file, "the key is encrypted; Fleet needs it unencrypted"
            ) from None
        except ValueError:
            raise TLSFileError("key", self.key_file, "not a PEM private key") from None
        if _public_der(key.public_key()) != _public_der(leaf.public_key()):
            raise TLSFileError(
                "key", self.key_file, f"does not match the certificate {self.cert_file}"
            )
        validity = tuple(
            (
                path,
                "CA" if path == self.ca_file else "certificate",
                c.not_valid_before_utc,
                c.not_valid_after_utc,
            )
            for path, c in [(self.cert_file, leaf), *((self.ca_file, ca) for ca in cas)]
        )
        check_validity(validity, now)
        if not _chains_to(chain, cas):
            issuer = leaf.issuer.rfc4514_string()
            # Every `fleetctl pki init` names its CA alike: equal names are another
            # fleet's CA, which '(issuer X, CA X)' would leave the reader to work out.
            why = (
                f"issued by another CA named {issuer!r} (same name, different key),"
                " e.g. another fleet's or one made again with fleetctl pki init"
                if any(issuer == ca.subject.rfc4514_string() for ca in cas)
                else f"issuer {issuer!r}, CA {cas[0].subject.rfc4514_string()!r}"
            )
            raise TLSFileError(
                "certificate", self.cert_file, f"not signed by the CA in {self.ca_file} ({why})"
            )
        try:
            identity = _identity_of(leaf)
        except ValueError as exc:
            raise TLSFileError("certificate", self.cert_file, str(exc)) from None
        return _Loaded(ca_pem, cert_pem, key_pem, identity, validity)


Validity = tuple[tuple[Path, str, dt.datetime, dt.datetime], ...]
"""(file, "certificate" or "CA", not before, not after) of each certificate, in check order."""


@dataclass(frozen=True)
class _Loaded:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: Identity
    validity: Validity


_LABELS = {"CA": "TLS CA file", "certificate": "TLS certificate file", "key": "TLS key file"}
_FIELDS = {"CA": "ca_file", "certificate": "cert_file", "key": "key_file"}


class TLSFileError(FileSettingError):
    """A ConfigError about one of a `TLSConfig`'s files.

    The message names the file by kind ("TLS key file /x: not a PEM private
    key"); `field` ("ca_file", "cert_file", "key_file") lets a process at
    start-up name its own config key instead (`in_setting`, fleet.config).
    """

    def __init__(self, what: str, path: Path, problem: str) -> None:
        super().__init__(
            f"{_LABELS[what]} {path}: {problem}", field=_FIELDS[what], path=path, problem=problem
        )
        self.what = what


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(what, path, "no such file") from None
    except IsADirectoryError:
        raise TLSFileError(what, path, "is a directory, not a file") from None
    except OSError as exc:
        raise TLSFileError(what, path, f"cannot read it ({exc.strerror})") from None


def _parse_certs(path: Path, pem: bytes, what: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise TLSFileError(what, path, "not a PEM certificate")
    return certs


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_validity(validity: Validity, now: dt.datetime) -> None:
    """ConfigError naming the first certificate that is not valid at `now`."""
    for path, what, not_before, not_after in validity:
        if now > not_after:
            raise TLSFileError(
                what, path, f"expired on {_fmt(not_after)} (now {_fmt(now)}); issue a new one"
            )
        if now < not_before:
            raise TLSFileError(
                what,
                path,
                f"not valid until {_fmt(not_before)} (now {_fmt(now)}); check this host's clock",
            )


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains_to(chain: list[x509.Certificate], cas: list[x509.Certificate]) -> bool:
    """True if chain[0] is signed by chain[1] ... and some link is signed by a CA."""
    for i, cert in enumerate(chain):
        if any(_signed_by(cert, ca) for ca in cas):
            return all(_signed_by(chain[j], chain[j + 1]) for j in range(i))
    return False


def _identity_of(cert: x509.Certificate) -> Identity:
    """The one spiffe:// SAN URI of `cert` as an Identity; ValueError if none or several."""
    return _one_identity(_cert_uris(cert))


def _cert_uris(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _pem_uris(pem: bytes) -> list[str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Unauthenticated("the client certificate could not be parsed") from None
    return _cert_uris(cert)


def _one_identity(uris: Sequence[str]) -> Identity:
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        found = "no" if not spiffe else f"{len(spiffe)}"
        raise ValueError(
            f"the certificate carries {found} spiffe:// SAN URIs;"
            " Fleet needs exactly one spiffe://<trust-domain>/<role>/<name>"
        )
    return Identity.from_uri(spiffe[0])


class _Reloader:
    """Serves the files' current contents; grpc asks before every handshake.

    Files are re-read only when their (mtime, size, inode) change, and looked at
    (three `stat`s under the GIL, from gRPC's thread) at most every `check_interval`
    seconds: a reconnecting fleet makes thousands of handshakes a second, and a
    renewed certificate served within a second is soon enough. New files that do
    not validate (half-written, expired, wrong CA) are ignored with a warning, and
    the last good ones keep serving.
    """

    def __init__(
        self,
        cfg: TLSConfig,
        *,
        serve_ca: bool = False,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._serve_ca = serve_ca
        self._interval = check_interval
        self._clock = clock
        self._checked = clock()
        self._stamp = self._stat()
        loaded = cfg._load(now=None)
        self.initial = self._config(loaded)
        self._rejected: tuple[tuple[int, ...], ...] | None = None

    def _stat(self) -> tuple[tuple[int, ...], ...]:
        stamps: list[tuple[int, ...]] = []
        for path in (self._cfg.ca_file, self._cfg.cert_file, self._cfg.key_file):
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((-1,))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _config(self, loaded: _Loaded) -> Any:
        if self._serve_ca:  # no client certificates; the chain ends with the fleet CA
            chain = loaded.cert_pem.rstrip(b"\n") + b"\n" + loaded.ca_pem
            return grpc.ssl_server_certificate_configuration([(loaded.key_pem, chain)])
        return grpc.ssl_server_certificate_configuration(
            [(loaded.key_pem, loaded.cert_pem)], root_certificates=loaded.ca_pem
        )

    def fetch(self) -> Any:
        """Return a new configuration if the files changed and validate, else None."""
        try:
            now = self._clock()
            if now - self._checked < self._interval:
                return None
            self._checked = now
            stamp = self._stat()
            if stamp in (self._stamp, self._rejected):
                return None
            try:
                loaded = self._cfg._load(now=None)
            except ConfigError as exc:
                log.warning("TLS files changed but are unusable, still serving the old: %s", exc)
                self._rejected = stamp  # warn once per change, not once per handshake
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded: %s (%s)", loaded.identity, self._cfg.cert_file)
            return self._config(loaded)
        except Exception:  # an exception must never escape into grpc's handshake
            log.exception("TLS reload failed; still serving the old certificate")
            return None


def server_credentials(cfg: TLSConfig) -> grpc.ServerCredentials:
    """mTLS server credentials: client certificates required and verified by the CA.

    Validates the files first (ConfigError). Replaced files are used for new
    handshakes within `RELOAD_CHECK_SECONDS`; established connections keep their session.
    """
    reloader = _Reloader(cfg)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader.fetch, require_client_authentication=True
    )


def enrollment_server_credentials(cfg: TLSConfig) -> grpc.ServerCredentials:
    """TLS server credentials for the enrollment port: no client certificate asked for.

    The served chain is the certificate file followed by the CA file, so a
    host without the CA can read it off the handshake and check it against
    the hash it pinned. Replaced files are picked up as `server_credentials`.
    """
    reloader = _Reloader(cfg, serve_ca=True)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader.fetch, require_client_authentication=False
    )


def channel_credentials(cfg: TLSConfig) -> grpc.ChannelCredentials:
    """mTLS client credentials from `cfg`; validates the files first (ConfigError)."""
    loaded = cfg._load(now=None)
    return grpc.ssl_channel_credentials(
        root_certificates=loaded.ca_pem,
        private_key=loaded.key_pem,
        certificate_chain=loaded.cert_pem,
    )


def channel_options(server_name: str) -> list[tuple[str, Any]]:
    """Channel options that make the TLS hostname check expect `server_name`.

    Pass `Identity(...).server_name` (or ``manager.<td>``): the handshake then
    fails unless the server's certificate carries that DNS SAN, i.e. unless the
    peer is the identity the caller meant to reach, whatever address it dialed.
    """
    return [("grpc.ssl_target_name_override", server_name)]


def identity_from_auth_context(
    auth: Mapping[str, Iterable[bytes]], *, trust_domain: str | None = None
) -> Identity:
    """The peer's Identity from a gRPC auth context (plain mapping); Unauthenticated if none.

    gRPC records a verified peer certificate's subject (``x509_subject``)
    and lists its URI SANs as ``peer_uri``; those decide, no parsing needed.
    A mapping with only the PEM is parsed with cryptography, one with only
    the SAN list uses that. With `trust_domain`, an identity from
    another trust domain is PermissionDenied.
    """
    if "peer_uri" in auth or "x509_subject" in auth:
        # gRPC's own record of a verified certificate: no peer_uri means no URI SAN.
        uris = [v.decode("utf-8", "replace") for v in auth.get("peer_uri", ())]
    elif pems := list(auth.get("x509_pem_cert", ())):
        uris = _pem_uris(pems[0])
    else:
        uris = [v.decode("utf-8", "replace") for v in auth.get("x509_subject_alternative_name", [])]
        if not uris:
            raise Unauthenticated("no client certificate was presented; Fleet requires mTLS")
    try:
        identity = _one_identity(uris)
    except ValueError as exc:
        raise Unauthenticated(f"client certificate: {exc}") from None
    if trust_domain is not None and identity.trust_domain != trust_domain:
        raise PermissionDenied(
            f"{identity} belongs to trust domain {identity.trust_domain!r};"
            f" this server serves {trust_domain!r}"
        )
    return identity


def peer_identity(
    context: grpc.aio.ServicerContext[Any, Any], *, trust_domain: str | None = None
) -> Identity:
    """The calling peer's Identity (Unauthenticated if it presented none).

    Fleet CAs are name-constrained to their trust domain, so the handshake
    already refuses foreign identities; pass `trust_domain` to check it here
    too (needed with a CA that has no name constraint).
    """
    auth = context.auth_context()
    return identity_from_auth_context(auth, trust_domain=trust_domain)


def require_role(
    context: grpc.aio.ServicerContext[Any, Any], *roles: Role, trust_domain: str | None = None
) -> Identity:
    """The caller's Identity if its role is one of `roles`, else PermissionDenied."""
    identity = peer_identity(context, trust_domain=trust_domain)
    if identity.role not in roles:
        needed = " or ".join(roles)
        raise PermissionDenied(f"{identity} may not call this; only {needed} certificates may")
    return identity


def require_node(
    context: grpc.aio.ServicerContext[Any, Any], node_id: str, *, trust_domain: str | None = None
) -> Identity:
    """The caller's Identity if it is ``node/<node_id>``; a node may only speak for itself."""
    identity = require_role(context, "node", trust_domain=trust_domain)
    if identity.name != node_id:
        raise PermissionDenied(f"{identity} may not speak for node {node_id}")
    return identity
