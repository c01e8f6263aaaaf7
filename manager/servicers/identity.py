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
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from fleet.errors import PermissionDenied
from fleet.tls import identity_from_auth_context, require_node

__all__ = ["NodeIdentities"]


class NodeIdentities:
    """`require_node` with a bounded per-certificate memo (oldest entry evicted first)."""

    def __init__(self, trust_domain: str, *, max_entries: int = 100_000) -> None:
        self._td = trust_domain
        self._max = max_entries
        self._cache: dict[bytes, str] = {}  # pem -> "role/name"

    def require_node(self, context: aio.ServicerContext[Any, Any], node_id: str) -> None:
        """Return if the caller is ``node/<node_id>``, else raise PermissionDenied."""
        auth = context.auth_context()
        pem = next(iter(auth.get("x509_pem_cert", ())), None)
        if pem is None:
            require_node(context, node_id, trust_domain=self._td)
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
        if name != node_id:
            raise PermissionDenied(f"{entry} may not speak for node {node_id}")
