"""Enrollment's tables: join tokens and the certificates issued to nodes.

`issue` is the one transaction that spends a token: it re-checks the token
and decrements its uses with a conditional UPDATE (two concurrent
enrollments cannot both spend the last use: on PostgreSQL the second waits
for the first's row lock and then finds nothing to update), records the
certificate, creates or updates the node's row and writes the event. Every
operator change writes its audit entry and OPERATION event in its own
transaction (atomically with the change), as `OperationLog` does.

Rows made by enrollment for a new node are offline with registered and
last-seen 0 and empty host fields, until its daemon registers. The deny list
and deleting nodes are `manager.storage.removal`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import NotFound
from manager.storage.db import Database
from manager.storage.events import dump_map, event_row, insert_events, load_map
from manager.storage.nodes import effective_labels, labels_event, node_from_row
from manager.storage.operation_log import insert_operation
from manager.storage.schema import join_tokens, node_certificates, node_revocations, nodes
from manager.storage.sqlhelp import chunks, dialect_insert

__all__ = [
    "EnrollmentRepository",
    "IssuedCertificate",
    "JoinTokenRecord",
    "NodeExists",
    "TokenSpent",
]


@dataclass(frozen=True)
class JoinTokenRecord:
    """A stored join token (its secret only as a hash)."""

    id: str
    """Public id."""
    secret_hash: str
    """Hex SHA-256 of the secret."""
    node_name: str
    """The one name it enrolls, or ""."""
    name_prefix: str
    """The prefix new names must have, or ""."""
    labels: dict[str, str]
    """Granted as operator labels."""
    description: str
    """Free text."""
    created_by: str
    """The operator who made it."""
    created_ms: int
    """When."""
    expires_ms: int
    """Valid until."""
    uses_total: int
    """Enrollments it allowed at creation."""
    uses_left: int
    """Enrollments left."""
    revoked_ms: int = 0
    """When it was revoked; 0: not revoked."""
    enrolled_nodes: tuple[str, ...] = ()
    """Nodes enrolled with it, oldest first (filled by list/get)."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the manager issued to a node."""

    serial: str
    """Hex serial number."""
    node_id: str
    """The node."""
    token_id: str
    """The join token spent for it; "" for a renewal."""
    issued_ms: int
    """When it was signed."""
    not_before_ms: int
    """Its notBefore."""
    not_after_ms: int
    """Its notAfter."""


class TokenSpent(Exception):
    """The token was used up, revoked or expired by the time `issue` ran (a lost race)."""


class NodeExists(Exception):
    """A name-prefix or any-name token met a node record or revocation of the name."""


def _token(row: Any, enrolled: tuple[str, ...] = ()) -> JoinTokenRecord:
    return JoinTokenRecord(
        id=row.id,
        secret_hash=row.secret_hash,
        node_name=row.node_name,
        name_prefix=row.name_prefix,
        labels=load_map(row.labels),
        description=row.description,
        created_by=row.created_by,
        created_ms=row.created_ms,
        expires_ms=row.expires_ms,
        uses_total=row.uses_total,
        uses_left=row.uses_left,
        revoked_ms=row.revoked_ms,
        enrolled_nodes=enrolled,
    )


class EnrollmentRepository:
    """Join tokens and node certificates."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- tokens -------------------------------------------------------------------------

    async def create_token(self, token: JoinTokenRecord) -> None:
        """Store a new token, audited (`token.created`; the secret is never written)."""

        async def body(conn: AsyncConnection) -> None:
            row = {f.name: getattr(token, f.name) for f in dataclasses.fields(token)}
            row.pop("enrolled_nodes")
            row["labels"] = dump_map(token.labels)
            await conn.execute(insert(join_tokens), [row])
            scope = (
                f"node {token.node_name}"
                if token.node_name
                else f"new names starting with {token.name_prefix!r}"
                if token.name_prefix
                else "any new name"
            )
            await insert_operation(
                conn,
                actor=token.created_by,
                action="token.created",
                target=f"token/{token.id}",
                detail={
                    "token_id": token.id,
                    "node_name": token.node_name,
                    "name_prefix": token.name_prefix,
                    "labels": dump_map(token.labels),
                    "uses": str(token.uses_total),
                    "expires_ms": str(token.expires_ms),
                },
                message=f"{token.created_by} created join token {token.id} for {scope}"
                f" ({token.uses_total} use(s))",
                now_ms=token.created_ms,
            )

        await self._db.run(body)

    async def get_token(self, token_id: str) -> JoinTokenRecord | None:
        """The token (with the nodes enrolled with it), or None."""
        found = await self._tokens(token_id=token_id)
        return found[0] if found else None

    async def list_tokens(
        self, *, usable_at_ms: int | None = None, token_id: str | None = None
    ) -> list[JoinTokenRecord]:
        """Tokens, newest first; with `usable_at_ms`, only those usable then."""
        return await self._tokens(token_id=token_id, usable_at_ms=usable_at_ms)

    async def _tokens(
        self, *, token_id: str | None = None, usable_at_ms: int | None = None
    ) -> list[JoinTokenRecord]:
        query = select(join_tokens).order_by(join_tokens.c.created_ms.desc(), join_tokens.c.id)
        if token_id is not None:
            query = query.where(join_tokens.c.id == token_id)
        if usable_at_ms is not None:
            query = query.where(
                join_tokens.c.revoked_ms == 0,
                join_tokens.c.uses_left > 0,
                join_tokens.c.expires_ms > usable_at_ms,
            )

        async def body(conn: AsyncConnection) -> list[JoinTokenRecord]:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            ids = [r.id for r in rows]
            enrolled: dict[str, list[str]] = {}
            for part in chunks(ids):
                certs = await conn.execute(
                    select(node_certificates.c.token_id, node_certificates.c.node_id)
                    .where(node_certificates.c.token_id.in_(part))
                    .order_by(node_certificates.c.issued_ms, node_certificates.c.serial)
                )
                for tid, nid in certs:
                    names = enrolled.setdefault(tid, [])
                    if nid not in names:
                        names.append(nid)
            return [_token(r, tuple(enrolled.get(r.id, ()))) for r in rows]

        return await self._db.run(body, write=False)

    async def revoke_token(self, token_id: str, *, actor: str, now_ms: int) -> JoinTokenRecord:
        """Revoke a token (audited, `token.revoked`); one already revoked is returned as is.

        NotFound for an unknown id.
        """

        async def body(conn: AsyncConnection) -> str:
            row = (
                await conn.execute(
                    select(join_tokens).where(join_tokens.c.id == token_id).with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(f"join token {token_id!r} does not exist")
            if row.revoked_ms:
                return token_id
            await conn.execute(
                update(join_tokens).where(join_tokens.c.id == token_id).values(revoked_ms=now_ms)
            )
            await insert_operation(
                conn,
                actor=actor,
                action="token.revoked",
                target=f"token/{token_id}",
                detail={"token_id": token_id, "uses_left": str(row.uses_left)},
                message=f"{actor} revoked join token {token_id}",
                now_ms=now_ms,
            )
            return token_id

        await self._db.run(body)
        token = await self.get_token(token_id)
        assert token is not None
        return token

    # --- issuing ------------------------------------------------------------------------

    async def issue(
        self,
        cert: IssuedCertificate,
        *,
        labels: Mapping[str, str],
        new_node_only: bool,
        peer: str,
    ) -> None:
        """Spend a use of `cert.token_id` and record `cert` for its node, in one transaction.

        TokenSpent if the token is no longer usable at `cert.issued_ms`;
        NodeExists if `new_node_only` and the node has a record or a
        revocation. A new node's row is made offline and never registered,
        with `labels` as its operator labels; an existing node's operator
        labels gain `labels`. Writes the `node.enrolled` audit entry and event.
        """
        now_ms = cert.issued_ms
        actor = f"token/{cert.token_id}"

        async def body(conn: AsyncConnection) -> None:
            spent = (
                await conn.execute(
                    update(join_tokens)
                    .where(
                        join_tokens.c.id == cert.token_id,
                        join_tokens.c.uses_left > 0,
                        join_tokens.c.revoked_ms == 0,
                        join_tokens.c.expires_ms > now_ms,
                    )
                    .values(uses_left=join_tokens.c.uses_left - 1)
                    .returning(join_tokens.c.uses_left)
                )
            ).first()
            if spent is None:
                raise TokenSpent(cert.token_id)
            row = await self._lock_node(conn, cert.node_id)
            if new_node_only:
                revoked = await conn.scalar(
                    select(exists().where(node_revocations.c.node_id == cert.node_id))
                )
                if row is not None or revoked:
                    raise NodeExists(cert.node_id)
            events: list[dict[str, Any]] = []
            if row is None:
                inserted = await conn.scalar(
                    dialect_insert(self._db.dialect, nodes)
                    .on_conflict_do_nothing(index_elements=[nodes.c.node_id])
                    .values(_enrolled_row(cert, labels))
                    .returning(nodes.c.node_id)
                )
                if inserted is None:  # registered or enrolled elsewhere meanwhile
                    if new_node_only:
                        raise NodeExists(cert.node_id)
                    row = await self._lock_node(conn, cert.node_id)
            if row is not None:
                old = node_from_row(row)
                operator = {**old.operator_labels, **labels}
                effective = effective_labels(old.daemon_labels, operator)
                await conn.execute(
                    update(nodes)
                    .where(nodes.c.node_id == cert.node_id)
                    .values(
                        labels=dump_map(effective),
                        operator_labels=dump_map(operator),
                        cert_not_after_ms=cert.not_after_ms,
                    )
                )
                if effective != old.labels:
                    events.append(
                        labels_event(
                            cert.node_id, old.labels, effective, actor=actor, now_ms=now_ms,
                            why=f"granted by join token {cert.token_id}",
                        )
                    )  # fmt: skip
            await self._insert_cert(conn, cert)
            if events:
                await insert_events(conn, events)
            await insert_operation(
                conn,
                actor=actor,
                action="node.enrolled",
                target=f"node/{cert.node_id}",
                detail={
                    "token_id": cert.token_id,
                    "node_id": cert.node_id,
                    "peer": peer,
                    "serial": cert.serial,
                    "not_after_ms": str(cert.not_after_ms),
                    "labels": dump_map(labels),
                    "new": "false" if row is not None else "true",
                },
                message=f"node {cert.node_id} enrolled from {peer} with join token"
                f" {cert.token_id} ({'new' if row is None else 'existing'} node)",
                now_ms=now_ms,
                node_id=cert.node_id,
            )

        await self._db.run(body)

    async def record_refusal(
        self, *, peer: str, token_id: str, node_id: str, reason: str, now_ms: int
    ) -> None:
        """A `node.enroll_refused` event (no audit entry: nothing changed)."""
        event = event_row(
            "OPERATION",
            now_ms=now_ms,
            node_id=node_id,
            actor=f"token/{token_id}",
            message=f"enrollment of {node_id} from {peer} refused: {reason}",
            attributes={
                "action": "node.enroll_refused",
                "outcome": "refused",
                "token_id": token_id,
                "node_id": node_id,
                "peer": peer,
                "reason": reason,
            },
        )

        async def body(conn: AsyncConnection) -> None:
            await insert_events(conn, [event])

        await self._db.run(body)

    async def record_renewal(self, cert: IssuedCertificate) -> None:
        """Record a renewed certificate and the node's new expiry (`node.cert_renewed`)."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(
                update(nodes)
                .where(nodes.c.node_id == cert.node_id)
                .values(cert_not_after_ms=cert.not_after_ms)
            )
            await self._insert_cert(conn, cert)
            actor = f"node/{cert.node_id}"
            await insert_operation(
                conn,
                actor=actor,
                action="node.cert_renewed",
                target=actor,
                detail={
                    "node_id": cert.node_id,
                    "serial": cert.serial,
                    "not_after_ms": str(cert.not_after_ms),
                },
                message=f"node {cert.node_id} renewed its certificate",
                now_ms=cert.issued_ms,
                node_id=cert.node_id,
            )

        await self._db.run(body)

    async def _lock_node(self, conn: AsyncConnection, node_id: str) -> Any:
        return (
            await conn.execute(select(nodes).where(nodes.c.node_id == node_id).with_for_update())
        ).first()

    async def _insert_cert(self, conn: AsyncConnection, cert: IssuedCertificate) -> None:
        await conn.execute(insert(node_certificates), [dataclasses.asdict(cert)])

    async def certificates(self, node_id: str) -> list[IssuedCertificate]:
        """The certificates issued to `node_id`, oldest first."""

        async def body(conn: AsyncConnection) -> list[IssuedCertificate]:
            rows = await conn.execute(
                select(node_certificates)
                .where(node_certificates.c.node_id == node_id)
                .order_by(node_certificates.c.issued_ms, node_certificates.c.serial)
            )
            return [IssuedCertificate(**r._mapping) for r in rows]

        return await self._db.run(body, write=False)


def _enrolled_row(cert: IssuedCertificate, labels: Mapping[str, str]) -> dict[str, Any]:
    """A node row made by enrollment: offline, never registered, no host facts yet."""
    text = dump_map(labels)
    return {
        "node_id": cert.node_id,
        "hostname": "",
        "ip": "",
        "os": "",
        "arch": "",
        "labels": text,
        "daemon_labels": "{}",
        "operator_labels": text,
        "daemon_version": "",
        "agent_version": "",
        "daemon_address": "",
        "status": "offline",
        "last_seen_ms": 0,
        "registered_at_ms": 0,
        "jobs_disabled": False,
        "cert_not_after_ms": cert.not_after_ms,
    }
