"""Why did the TLS handshake with the manager fail? Look at its certificate.

grpc reports a failed handshake as "CERTIFICATE_VERIFY_FAILED" or "Socket
closed". To tell the operator what is actually wrong, `probe` opens one
plain TLS connection (Python's ssl, no verification, our client certificate
presented), takes the certificate the server shows and checks it the way
grpc did: signed by our CA (directly or through an intermediate CA the
server sends with it, as an enrolled node's certificate is), within its
validity, carrying the expected name.
If all of that holds, the server must have refused *our* certificate.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fleet.tls import TLSConfig

__all__ = ["explain_server_certificate", "probe"]


def probe(address: str, tls: TLSConfig, server_name: str, *, timeout: float) -> str | None:
    """A sentence saying what is wrong with the TLS setup towards `address`, or None."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we verify below, to say *what* is wrong
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError):
        return None
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=server_name) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
            chain = _served_chain(conn)
    except ssl.SSLError as exc:
        return _alert(exc, tls)
    except (OSError, ValueError):
        return None
    if not der:
        return None
    try:
        cas = x509.load_pem_x509_certificates(tls.ca_file.read_bytes())
    except (OSError, ValueError):
        return None
    finding = explain_server_certificate(
        x509.load_der_x509_certificate(der),
        cas,
        server_name,
        now=dt.datetime.now(dt.UTC),
        intermediates=chain[1:],
    )
    if finding:
        return finding.replace("our CA", f"our CA ({tls.ca_file}); check --ca / FLEET_CA")
    return (
        f"the manager refused our certificate {tls.cert_file}: it does not trust the CA"
        f" that signed it, or the certificate is revoked or expired on its clock;"
        f" use a certificate issued by the fleet's CA"
    )


def explain_server_certificate(
    cert: x509.Certificate,
    cas: list[x509.Certificate],
    server_name: str,
    *,
    now: dt.datetime,
    intermediates: Sequence[x509.Certificate] = (),
) -> str | None:
    """What makes `cert` unacceptable as the manager's certificate, or None (pure).

    `intermediates` are the CA certificates the server sent after its own: a
    certificate signed by one of them, which one of `cas` signed, chains to
    our CA (an enrolled node's certificate is issued by the manager's
    intermediate).
    """
    if now > cert.not_valid_after_utc:
        return (
            f"the manager's certificate expired on {_fmt(cert.not_valid_after_utc)};"
            " the manager needs a new one (fleetctl pki issue manager NAME)"
        )
    if now < cert.not_valid_before_utc:
        return (
            f"the manager's certificate is not valid until {_fmt(cert.not_valid_before_utc)}"
            " (check the clocks)"
        )
    if not _chains_to(cert, cas, intermediates):
        return (
            f"unknown CA: the manager's certificate (issuer {cert.issuer.rfc4514_string()!r})"
            " is not signed by our CA"
        )
    names = _dns_names(cert)
    if server_name not in names:
        shown = ", ".join(names) or "none"
        return (
            f"name mismatch: expected a certificate for {server_name}, the server's is for"
            f" {shown}; is --manager the manager's address, and the trust domain right?"
        )
    return None


def _alert(exc: ssl.SSLError, tls: TLSConfig) -> str | None:
    reason = (exc.reason or str(exc)).upper()
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return (
            f"the manager refused our certificate {tls.cert_file} ({exc.reason});"
            " it must be issued by the fleet's CA"
        )
    if "CERTIFICATE_EXPIRED" in reason:
        return f"the manager says our certificate {tls.cert_file} expired; issue a new one"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD" in reason:
        return "the server does not speak TLS; is --manager the manager's gRPC address?"
    return None


def _served_chain(conn: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the server sent, its own first (empty if ssl cannot say).

    `get_unverified_chain` is public from Python 3.13; 3.11 and 3.12 have it
    on the socket's `_sslobj`, returning `_ssl.Certificate` objects.
    """
    getter = getattr(conn, "get_unverified_chain", None) or getattr(
        getattr(conn, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is None:
        return []
    try:
        # 3.13: DER bytes; before: objects whose public_bytes() is a PEM string.
        return [
            x509.load_der_x509_certificate(c)
            if isinstance(c, bytes)
            else x509.load_pem_x509_certificate(c.public_bytes().encode())
            for c in getter() or []
        ]
    except (ValueError, AttributeError):
        return []


def _chains_to(
    cert: x509.Certificate, cas: list[x509.Certificate], intermediates: Sequence[x509.Certificate]
) -> bool:
    """True if one of `cas` signed `cert`, directly or through `intermediates`."""
    if any(_signed_by(cert, ca) for ca in cas):
        return True
    rest = [c for c in intermediates if c != cert]
    return any(
        _signed_by(cert, mid) and _chains_to(mid, cas, [c for c in rest if c != mid])
        for mid in rest
    )


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")
