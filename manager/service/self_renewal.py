"""The manager renews its own certificate from the issuing CA, as daemons renew theirs.

Only when the issuer signed the certificate in `tls.cert_file` (otherwise
it was made elsewhere, and is renewed there). At two thirds of its lifetime
(`renewal_due`, pure) the manager makes a new key and a certificate for the
same identity, host names and IPs, for the same lifetime, and writes the
key then the certificate atomically: the server's reloader serves them
within a second, as for a rotation by hand. A failure (e.g. the
files are not writable under a hardened unit) is logged and tried again at
the next check; `fleet_manager_certificate_expiry_timestamp_seconds` shows
the expiry either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.pki import CertificateAuthority, write_file_atomic
from fleet.tls import TLSConfig

__all__ = ["SelfRenewal", "renewal_due"]

log = logging.getLogger(__name__)

_SKEW = dt.timedelta(minutes=5)


def renewal_due(not_before: float, not_after: float, now: float) -> bool:
    """True once two thirds of the lifetime [not_before, not_after] (seconds) passed."""
    return now >= not_before + (not_after - not_before) * 2 / 3


class SelfRenewal:
    """Checks the manager's certificate every `interval` seconds and renews it when due."""

    def __init__(
        self,
        tls: TLSConfig,
        issuer: CertificateAuthority,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tls = tls
        self._issuer = issuer
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def _signed_by_issuer(self, cert: x509.Certificate) -> bool:
        issuer_cert = x509.load_pem_x509_certificate(self._issuer.cert_pem)
        try:
            cert.verify_directly_issued_by(issuer_cert)
        except Exception:  # another CA, or a signature that does not verify
            return False
        return True

    async def run_once(self) -> bool:
        """Renew now if due and ours to renew; True if the files were replaced."""
        cert = x509.load_pem_x509_certificates(
            await asyncio.to_thread(self._tls.cert_file.read_bytes)
        )[0]
        start = cert.not_valid_before_utc
        end = cert.not_valid_after_utc
        if not renewal_due(start.timestamp(), end.timestamp(), self._clock()):
            return False
        if not self._signed_by_issuer(cert):
            log.debug("the manager's certificate is not the issuer's; not renewing it")
            return False
        identity = self._tls.identity()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        signed = self._issuer.sign(
            identity.role,
            identity.name,
            key.public_key(),
            not_before=now - _SKEW,
            not_after=now - _SKEW + (end - start),
            hostnames=san.get_values_for_type(x509.DNSName),
            ips=[str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

        def write() -> None:
            # Key first: a reload between the two sees a mismatch and keeps the old pair.
            write_file_atomic(self._tls.key_file, key_pem, mode=0o600)
            write_file_atomic(self._tls.cert_file, signed.cert_pem, mode=0o644)

        await asyncio.to_thread(write)
        log.info(
            "renewed the manager's certificate %s (serial %x, expires %s)",
            self._tls.cert_file,
            signed.serial,
            signed.not_after.isoformat(),
        )
        return True

    def start(self) -> None:
        """Check every `interval` seconds until `stop`."""
        self._task = asyncio.create_task(self._run(), name="self-renewal")

    async def stop(self) -> None:
        """Stop checking."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # unwritable files, a bad file: say so, try again later
                log.warning("could not renew the manager's certificate: %s", exc)
            await asyncio.sleep(self._interval)
