"""EnrollmentService on its own port: TLS without client certificates, nothing else served.

Enrollment has a port of its own because grpcio decides whether a client
certificate is required per port, not per RPC: the mTLS port cannot let a
host without a certificate reach one RPC and no other. This server serves
EnrollmentService only (no health, no reflection), accepts requests of at
most `MAX_RECEIVE_BYTES`, and presents the manager's certificate followed
by the fleet CA, so an enrolling host can check the CA against the hash it
pinned before it sends its token.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from grpc import aio

from fleet.errors import ConfigError
from fleet.interceptors import ErrorMappingInterceptor
from fleet.tls import TLSConfig, enrollment_server_credentials
from fleet.v1 import enroll_pb2, enroll_pb2_grpc
from manager.metrics import ManagerMetrics, RpcMetricsInterceptor
from manager.service.certificates import Certificates

__all__ = ["MAX_RECEIVE_BYTES", "SERVICE_NAME", "EnrollmentServicer", "peer_ip", "start_server"]

SERVICE_NAME: str = enroll_pb2.DESCRIPTOR.services_by_name["EnrollmentService"].full_name
"""Full name of the service."""

MAX_RECEIVE_BYTES = 16 * 1024
"""Largest request: a token, a name and a CSR of ~0.5 KiB fit many times over."""

_Context = aio.ServicerContext[Any, Any]


def peer_ip(peer: str) -> str:
    """The IP of a gRPC peer string (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``), else it."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
        try:
            return str(ipaddress.ip_address(host.split("%")[0]))
        except ValueError:
            return host
    return peer


class EnrollmentServicer(enroll_pb2_grpc.EnrollmentServiceServicer):
    """Enroll, for callers without a certificate (the token is what authorises them)."""

    def __init__(self, certificates: Certificates, *, trust_domain: str, manager_address: str):
        self._certs = certificates
        self._td = trust_domain
        self._manager_address = manager_address

    async def Enroll(
        self, request: enroll_pb2.EnrollRequest, context: _Context
    ) -> enroll_pb2.EnrollResponse:
        issued = await self._certs.enroll(
            request.token, request.node_name, request.csr_pem, peer=peer_ip(context.peer())
        )
        return enroll_pb2.EnrollResponse(
            node_id=issued.node_id,
            trust_domain=self._td,
            certificate_pem=issued.cert_pem,
            ca_pem=issued.ca_pem,
            expire_time=issued.not_after_ms,
            labels=issued.labels,
            manager_address=self._manager_address,
        )


async def start_server(
    servicer: EnrollmentServicer, listen: str, tls: TLSConfig, metrics: ManagerMetrics
) -> tuple[aio.Server, int]:
    """Serve `servicer` on `listen`; (the started server, its bound port)."""
    server = aio.server(
        interceptors=[RpcMetricsInterceptor(metrics), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024),
            ("grpc.so_reuseport", 0),
            # Few calls per connection are legitimate: one Enroll.
            ("grpc.max_concurrent_streams", 4),
        ],
    )
    enroll_pb2_grpc.add_EnrollmentServiceServicer_to_server(servicer, server)
    try:
        port = server.add_secure_port(listen, enrollment_server_credentials(tls))
    except RuntimeError as exc:
        raise ConfigError(f"enroll.listen {listen!r}: cannot listen: {exc}") from None
    await server.start()
    return server, port
