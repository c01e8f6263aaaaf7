"""What operators do about enrollment: join tokens, deleting and revoking nodes.

Every change is audited with an OPERATION event in the transaction that
makes it (`EnrollmentRepository`). Revoking a node puts it on the deny
list here at once (other replicas read it within seconds), then ends its
control stream and pooled channel on this replica through `disconnect`;
deleting a node online (with force) ends them too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from fleet.enroll import ca_hash, hash_secret, new_token
from fleet.errors import FailedPrecondition, InvalidArgument, NotFound
from fleet.labels import validate_node_id
from manager.service.deny_list import DenyList
from manager.service.enrollment import check_token_request, revocation_cutoff
from manager.storage import NodeRecord
from manager.storage.enrollment import EnrollmentRepository, JoinTokenRecord
from manager.storage.removal import RemovalRepository

__all__ = ["NOT_ENABLED", "CreatedToken", "EnrollmentAdmin"]

NOT_ENABLED = (
    "enrollment is not enabled on this manager: set enroll.listen (with"
    " enroll.issuer_cert_file and enroll.issuer_key_file) or enroll.advertise_address"
    " in its config"
)
"""FAILED_PRECONDITION for CreateJoinToken where no host could enroll."""

TOKEN_ID = re.compile(r"[a-z0-9]{8}")
"""What a token id looks like (fleet.enroll.new_token)."""

MAX_REASON = 1024
"""Longest revocation reason (characters)."""


@dataclass(frozen=True)
class CreatedToken:
    """A new join token, with what a host needs to use it."""

    token: str
    """``<id>.<secret>``: shown once, never stored."""
    info: JoinTokenRecord
    """The stored token."""
    ca_hash: str
    """``sha256:<hex>`` of the fleet CA's public key."""
    enroll_address: str
    """Where hosts enroll ("" if unknown)."""


class EnrollmentAdmin:
    """CreateJoinToken, ListJoinTokens, RevokeJoinToken, DeleteNode and RevokeNode."""

    def __init__(
        self,
        repo: EnrollmentRepository,
        removals: RemovalRepository,
        deny: DenyList,
        *,
        root_pem: bytes,
        enroll_address: Callable[[], str],
        enabled: bool,
        max_token_ttl_days: float,
        disconnect: Callable[[str, str, bool], Awaitable[int]],
        forget: Callable[[str], None] = lambda _node_id: None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._repo = repo
        self._removals = removals
        self._deny = deny
        self._root_pem = root_pem
        self._enroll_address = enroll_address
        self._enabled = enabled
        self._max_ttl_days = max_token_ttl_days
        self._disconnect = disconnect
        self._forget = forget
        self._clock = clock
        self._on_change = on_change

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def create_token(
        self,
        *,
        node_name: str,
        name_prefix: str,
        labels: Mapping[str, str],
        ttl_seconds: float,
        uses: int,
        description: str,
        actor: str,
    ) -> CreatedToken:
        """A new token (InvalidArgument naming a bad field; FailedPrecondition if enrollment
        is off here)."""
        spec = check_token_request(
            node_name=node_name,
            name_prefix=name_prefix,
            labels=labels,
            ttl_seconds=ttl_seconds,
            uses=uses,
            description=description,
            max_ttl_days=self._max_ttl_days,
        )
        if not self._enabled:
            raise FailedPrecondition(NOT_ENABLED)
        now_ms = self._now_ms()
        parts = new_token()
        record = JoinTokenRecord(
            id=parts.id,
            secret_hash=hash_secret(parts.secret),
            node_name=spec.node_name,
            name_prefix=spec.name_prefix,
            labels=dict(spec.labels),
            description=spec.description,
            created_by=actor,
            created_ms=now_ms,
            expires_ms=now_ms + spec.ttl_ms,
            uses_total=spec.uses,
            uses_left=spec.uses,
        )
        await self._repo.create_token(record)
        return CreatedToken(str(parts), record, ca_hash(self._root_pem), self._enroll_address())

    async def list_tokens(self, *, include_unusable: bool) -> list[JoinTokenRecord]:
        """Tokens, newest first (only usable ones unless `include_unusable`)."""
        usable_at = None if include_unusable else self._now_ms()
        return await self._repo.list_tokens(usable_at_ms=usable_at)

    async def revoke_token(self, token_id: str, *, actor: str) -> JoinTokenRecord:
        """Revoke a token; idempotent; NotFound for an unknown id."""
        if not TOKEN_ID.fullmatch(token_id):  # nothing else can exist: no need to ask
            raise NotFound(f"join token {token_id[:64]!r} does not exist")
        return await self._repo.revoke_token(token_id, actor=actor, now_ms=self._now_ms())

    async def delete_node(self, node_id: str, *, force: bool, actor: str) -> NodeRecord:
        """Delete a node's record (see `RemovalRepository.delete_node`); with force, an
        online node's stream and channel are closed too."""
        validate_node_id(node_id)
        deleted = await self._removals.delete_node(
            node_id, force=force, actor=actor, now_ms=self._now_ms()
        )
        self._forget(node_id)
        if deleted.status == "online":
            await self._disconnect(node_id, f"node {node_id} was deleted by {actor}", False)
        self._on_change()
        return deleted

    async def revoke_node(self, node_id: str, *, reason: str, actor: str) -> tuple[int, int]:
        """Refuse every certificate of `node_id` issued before now; (cutoff ms, connections
        closed). Any valid name may be revoked, also one with no record (a deleted node's
        certificate still works until revoked)."""
        validate_node_id(node_id)
        if len(reason) > MAX_REASON or "\x00" in reason:
            raise InvalidArgument(f"at most {MAX_REASON} characters, without NUL", field="reason")
        now_ms = self._now_ms()
        cutoff = revocation_cutoff(now_ms)
        _, went_offline = await self._removals.revoke_node(
            node_id, cutoff_ms=cutoff, now_ms=now_ms, actor=actor, reason=reason
        )
        self._deny.add(node_id, cutoff)
        closed = await self._disconnect(node_id, f"node {node_id} was revoked by {actor}", True)
        if went_offline:
            self._on_change()
        return cutoff, closed

    async def still_revoked(self) -> dict[str, int]:
        """node -> revoke time, for revoked nodes not enrolled again since."""
        return await self._removals.still_revoked()
