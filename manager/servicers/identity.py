"""The caller's node identity, parsed once per certificate instead of per call.

`fleet.tls.require_node` parses the peer certificate with cryptography on
every call; on the heartbeat path that parse was most of the handler's cost
(bench/manager_ingest.py: 0.5 -> 0.95 of the empty-handler rate with this
cache). The identity is a pure function of the certificate bytes and the
trust domain, and the TLS handshake already verified the chain and validity,
so caching by the PEM bytes changes no decision. Calls without a PEM in the
auth context go through `fleet.tls.require_node` unchanged, as do misses.
(Moving this memo into fleet.tls would let every server share it.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from grpc import aio

from fleet.errors import PermissionDenied
from fleet.pki import Identity
from fleet.tls import identity_from_auth_context, require_node

__all__ = ["NodeIdentities"]


class NodeIdentities:
    """`require_node` with a bounded per-certificate memo (LRU)."""

    def __init__(self, trust_domain: str, *, max_entries: int = 100_000) -> None:
        self._td = trust_domain
        self._max = max_entries
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()

    def require_node(self, context: aio.ServicerContext[Any, Any], node_id: str) -> Identity:
        """The caller's Identity if it is ``node/<node_id>``, else PermissionDenied."""
        auth = context.auth_context()
        pem = next(iter(auth.get("x509_pem_cert", ())), None)
        if pem is None:
            return require_node(context, node_id, trust_domain=self._td)
        identity = self._cache.get(pem)
        if identity is None:
            # Raises Unauthenticated / PermissionDenied (foreign trust domain) like require_node.
            identity = identity_from_auth_context(auth, trust_domain=self._td)
            self._cache[pem] = identity
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        # Same checks and messages as fleet.tls.require_role / require_node.
        if identity.role != "node":
            raise PermissionDenied(f"{identity} may not call this; it needs a node certificate")
        if identity.name != node_id:
            raise PermissionDenied(f"{identity} may not speak for node {node_id}")
        return identity
