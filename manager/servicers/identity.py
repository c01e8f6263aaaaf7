"""The caller's node identity, parsed once per certificate instead of per call.

`fleet.tls.require_node` parses the peer certificate with cryptography on
every call; on the heartbeat path that parse was most of the handler's cost
(bench/manager_ingest.py: 0.5 -> 0.95 of the empty-handler rate with this
cache). The identity is a pure function of the certificate bytes and the
trust domain, and the TLS handshake already verified the chain and validity,
so caching by the PEM bytes changes no decision. Calls without a PEM in the
auth context go through `fleet.tls.require_node` unchanged, as do misses.
(Moving this memo into fleet.tls would let every server share it.)

The memo holds one entry per node, so it is kept out of the garbage
collector's way: a plain dict of bytes to strings is untracked by
the GC, where 25,000 `Identity` objects (and their `__dict__`s) would be
traversed by every full collection.

Revoked nodes (`DenyList`) are refused here too, after the identity is
known: for a name not on the list that is one more dict lookup.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from fleet.errors import PermissionDenied
from fleet.tls import identity_from_auth_context, require_node
from manager.service.deny_list import DenyList

__all__ = ["NodeIdentities", "caller_pem"]


class NodeIdentities:
    """`require_node` with a bounded per-certificate memo (oldest entry evicted first)."""

    def __init__(
        self, trust_domain: str, *, max_entries: int = 100_000, deny: DenyList | None = None
    ) -> None:
        self._td = trust_domain
        self._max = max_entries
        self._deny = deny
        self._cache: dict[bytes, str] = {}  # pem -> "role/name"
        self._not_after: dict[bytes, int] = {}  # pem -> notAfter (ms), for registrations

    def require_node(self, context: aio.ServicerContext[Any, Any], node_id: str) -> None:
        """Return if the caller is ``node/<node_id>`` with a certificate not revoked;
        else raise PermissionDenied (another identity) or Unauthenticated (revoked)."""
        auth = context.auth_context()
        pem = next(iter(auth.get("x509_pem_cert", ())), None)
        if pem is None:
            identity = require_node(context, node_id, trust_domain=self._td)
            if self._deny is not None:
                self._deny.check(identity.name, None)
            return
        entry = self._cache.get(pem)
        if entry is None:
            # Raises Unauthenticated / PermissionDenied (foreign trust domain) like require_node.
            identity = identity_from_auth_context(auth, trust_domain=self._td)
            entry = self._cache[pem] = f"{identity.role}/{identity.name}"
            if len(self._cache) > self._max:
                del self._cache[next(iter(self._cache))]
        role, _, name = entry.partition("/")
        # Same checks and messages as fleet.tls.require_role / require_node.
        if role != "node":
            raise PermissionDenied(f"{entry} may not call this; it needs a node certificate")
        if self._deny is not None:
            self._deny.check(name, pem)
        if name != node_id:
            raise PermissionDenied(f"{entry} may not speak for node {node_id}")

    def cert_not_after_ms(self, context: aio.ServicerContext[Any, Any]) -> int:
        """When the caller's certificate expires (epoch ms), memoised per certificate; 0 if
        there is none to read."""
        pem = caller_pem(context)
        if pem is None:
            return 0
        value = self._not_after.get(pem)
        if value is None:
            from cryptography import x509

            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                return 0
            value = int(cert.not_valid_after_utc.timestamp() * 1000)
            if len(self._not_after) >= self._max:
                del self._not_after[next(iter(self._not_after))]
            self._not_after[pem] = value
        return value


def caller_pem(context: aio.ServicerContext[Any, Any]) -> bytes | None:
    """The caller's certificate (PEM) as the TLS handshake verified it, or None."""
    auth = context.auth_context()
    return next(iter(auth.get("x509_pem_cert", ())), None)
