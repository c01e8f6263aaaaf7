"""FleetService's join-token RPCs. Translation only.

Mixed into `FleetServicer` (`manager/servicers/fleet_service.py`), which
provides the caller's identity check (`_operator`): only operators reach
them. The decisions are in `manager.service.enroll_admin`.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from fleet.v1 import enroll_pb2, fleet_pb2
from manager.service.enroll_admin import EnrollmentAdmin
from manager.servicers.fleet_desired import OperatorCalls
from manager.storage.enrollment import JoinTokenRecord

__all__ = ["TokenRpcs", "token_message"]

_Context = aio.ServicerContext[Any, Any]


def token_message(t: JoinTokenRecord) -> enroll_pb2.JoinToken:
    """A stored token as its message (no secret: the manager has only its hash)."""
    return enroll_pb2.JoinToken(
        id=t.id,
        node_name=t.node_name,
        name_prefix=t.name_prefix,
        labels=t.labels,
        create_time=t.created_ms,
        expire_time=t.expires_ms,
        uses_left=t.uses_left,
        uses_total=t.uses_total,
        created_by=t.created_by,
        revoke_time=t.revoked_ms,
        description=t.description,
        enrolled_nodes=list(t.enrolled_nodes),
    )


class TokenRpcs(OperatorCalls):
    """CreateJoinToken, ListJoinTokens and RevokeJoinToken (callers are operators)."""

    _admin: EnrollmentAdmin
    """The service (set by FleetServicer)."""

    async def CreateJoinToken(
        self, request: fleet_pb2.FleetServiceCreateJoinTokenRequest, context: _Context
    ) -> fleet_pb2.FleetServiceCreateJoinTokenResponse:
        actor = self._operator(context)
        created = await self._admin.create_token(
            node_name=request.node_name,
            name_prefix=request.name_prefix,
            labels=dict(request.labels),
            ttl_seconds=request.ttl_seconds,
            uses=request.uses,
            description=request.description,
            actor=actor,
        )
        return fleet_pb2.FleetServiceCreateJoinTokenResponse(
            token=created.token,
            info=token_message(created.info),
            ca_hash=created.ca_hash,
            enroll_address=created.enroll_address,
        )

    async def ListJoinTokens(
        self, request: fleet_pb2.FleetServiceListJoinTokensRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListJoinTokensResponse:
        self._operator(context)
        tokens = await self._admin.list_tokens(include_unusable=request.all)
        return fleet_pb2.FleetServiceListJoinTokensResponse(
            tokens=[token_message(t) for t in tokens]
        )

    async def RevokeJoinToken(
        self, request: fleet_pb2.FleetServiceRevokeJoinTokenRequest, context: _Context
    ) -> fleet_pb2.FleetServiceRevokeJoinTokenResponse:
        actor = self._operator(context)
        token = await self._admin.revoke_token(request.token_id, actor=actor)
        return fleet_pb2.FleetServiceRevokeJoinTokenResponse(info=token_message(token))
