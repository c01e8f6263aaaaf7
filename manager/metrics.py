"""Prometheus collectors of one manager, in a per-server CollectorRegistry.

A registry per server (not the global one) lets a test run several managers
in one process and read each one's figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from manager.service.convergence import PassResult

__all__ = [
    "CertificateExpiry",
    "HttpMetricsMiddleware",
    "ManagerMetrics",
    "RpcMetricsInterceptor",
    "watch_loop_lag",
]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ManagerMetrics:
    """Every metric the manager exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rpc_total = Counter(
            "fleet_manager_rpc",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "fleet_manager_rpc_duration_seconds",
            "RPC handling time, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.nodes = Gauge(
            "fleet_manager_nodes", "Registered nodes by status", ["status"], registry=r
        )
        self.metric_queue_depth = Gauge(
            "fleet_manager_metric_queue_depth", "Metric batches waiting for a commit", registry=r
        )
        self.heartbeats_pending = Gauge(
            "fleet_manager_heartbeats_pending",
            "Nodes whose last heartbeat is not flushed yet",
            registry=r,
        )
        self.heartbeat_flush_seconds = Histogram(
            "fleet_manager_heartbeat_flush_seconds",
            "Time to write the last-seen map",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.metric_commit_seconds = Gauge(
            "fleet_manager_metric_commit_seconds",
            "Duration of the last metric group commit",
            registry=r,
        )
        self.sweeper_leader = Gauge(
            "fleet_sweeper_leader", "1 while this manager holds the sweeper lock", registry=r
        )
        self.loop_lag_seconds = Histogram(
            "fleet_manager_event_loop_lag_seconds",
            "How late a 0.1 s timer fires: CPU starvation or blocking code in the manager",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.nodes_marked_offline = Counter(
            "fleet_manager_nodes_marked_offline",
            "Nodes this manager's sweeper marked offline",
            registry=r,
        )

        self.desired_leader = Gauge(
            "fleet_desired_leader",
            "1 while this manager converges desired state (holds its lock)",
            registry=r,
        )
        self.jobs_leader = Gauge(
            "fleet_jobs_leader",
            "1 while this manager drives jobs (holds its lock)",
            registry=r,
        )
        self.rollouts = Gauge(
            "fleet_manager_rollouts", "Live rollouts by state (leader only)", ["state"], registry=r
        )
        self.rollouts_failed = Counter(
            "fleet_manager_rollouts_failed",
            "Rollouts that failed (a node failed, no progress, aborted)",
            registry=r,
        )
        self.nodes_undelivered = Gauge(
            "fleet_manager_nodes_undelivered",
            "Nodes whose managed set is not delivered yet (leader only)",
            registry=r,
        )
        self.control_streams = Gauge(
            "fleet_manager_control_streams",
            "Daemons' control streams open on this manager",
            registry=r,
        )
        self.control_violations = Counter(
            "fleet_manager_control_violations",
            "Control-stream protocol violations and replaced streams, by kind",
            ["kind"],
            registry=r,
        )
        self.control_refused = Counter(
            "fleet_manager_control_refused",
            "Upward control-stream messages refused (answered with an error), by kind and code",
            ["kind", "code"],
            registry=r,
        )
        self.push_errors = Counter(
            "fleet_manager_push_errors", "PushUpdate calls that failed", registry=r
        )
        self.enrollments = Counter(
            "fleet_manager_enrollments",
            "Enroll calls by outcome (issued, token_unknown, token_expired, token_used_up,"
            " token_revoked, name_not_allowed, invalid_request, rate_limited, ...)",
            ["outcome"],
            registry=r,
        )
        self.renewals = Counter(
            "fleet_manager_certificate_renewals",
            "RenewCertificate calls by outcome (issued, invalid_request, ...)",
            ["outcome"],
            registry=r,
        )
        self.revoked_refused = Counter(
            "fleet_manager_revoked_refused",
            "Calls refused because the caller's node certificate was revoked (the deny list)",
            registry=r,
        )
        self.enroll_rate_limited = Counter(
            "fleet_manager_enroll_rate_limited",
            "Enroll calls refused by the rate limit (RESOURCE_EXHAUSTED)",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "fleet_manager_certificate_expiry_timestamp_seconds",
            "When the manager's own certificate (tls.cert_file) expires, Unix seconds",
            registry=r,
        )
        self.relayed_commands = Counter(
            "fleet_manager_relayed_commands",
            "Commands forwarded to the replica holding the node's control stream, by code",
            ["code"],
            registry=r,
        )
        self.stream_directory_writes = Gauge(
            "fleet_manager_stream_directory_writes",
            "Transactions this replica wrote to record streams opened and closed",
            registry=r,
        )
        self.http_requests = Counter(
            "fleet_manager_http_requests",
            "JSON/HTTP API requests, by method (unknown: no such route) and HTTP status code",
            ["method", "code"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "fleet_manager_http_request_duration_seconds",
            "JSON/HTTP API handling time, by method: until a unary answer is written,"
            " until a server stream's status and headers are sent",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_streams = Gauge(
            "fleet_manager_http_streams",
            "JSON/HTTP API server streams open (answered 200, not ended yet), by method",
            ["method"],
            registry=r,
        )

    def observe_enrollment(self, outcome: str) -> None:
        """Count one Enroll by outcome (rate-limited ones also on their own counter)."""
        self.enrollments.labels(outcome).inc()
        if outcome == "rate_limited":
            self.enroll_rate_limited.inc()

    def observe_convergence(self, result: PassResult) -> None:
        """Record one desired-state pass."""
        for state in ("PENDING", "RUNNING", "PAUSED", "AWAITING_PROMOTION", "REVERTING"):
            self.rollouts.labels(state).set(result.live_rollouts.get(state, 0))
        self.rollouts_failed.inc(result.failed_rollouts)
        self.nodes_undelivered.set(result.undelivered)
        self.push_errors.inc(len(result.push_failed))

    def set_node_counts(self, online: int, offline: int) -> None:
        """Update the nodes-by-status gauge."""
        self.nodes.labels("online").set(online)
        self.nodes.labels("offline").set(offline)

    def observe_flush(self, seconds: float, _nodes: int) -> None:
        """Record one heartbeat flush."""
        self.heartbeat_flush_seconds.observe(seconds)


class CertificateExpiry:
    """notAfter (Unix seconds) of the certificate in a file, re-read when the file changes.

    A gauge's function: a scrape costs a stat; a rotated certificate shows at once.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._value = 0.0

    def __call__(self) -> float:
        try:
            st = os.stat(self._path)
        except OSError:
            return self._value
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            from cryptography import x509

            try:
                cert = x509.load_pem_x509_certificate(self._path.read_bytes())
            except (OSError, ValueError):
                return self._value  # half-written: keep the last value
            self._stamp = stamp
            self._value = cert.not_valid_after_utc.timestamp()
        return self._value


async def watch_loop_lag(histogram: Histogram, interval: float = 0.1) -> None:
    """Observe how late a periodic timer fires, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - started - interval))


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class RpcMetricsInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts unary RPCs by method and status code and times them.

    Must be outside (before) the ErrorMappingInterceptor so it sees the
    status the error was mapped to. The wrapped handler is built once per
    method and reused: grpc.aio runs the interceptor chain on every call,
    and rebuilding handlers per call was a measurable share of a heartbeat.
    Only stateless interceptors may sit inside this one.
    """

    def __init__(self, metrics: ManagerMetrics) -> None:
        self._m = metrics
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method_path = handler_call_details.method
        cached = self._handlers.get(method_path)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrap(handler, _short(method_path))
        self._handlers[method_path] = wrapped
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        inner = handler.unary_unary
        m = self._m
        seconds = m.rpc_seconds.labels(method)
        counters: dict[str, Any] = {}

        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except aio.AbortError:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                counter = counters.get(code)
                if counter is None:
                    counter = counters[code] = m.rpc_total.labels(method, code)
                counter.inc()
                seconds.observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


UNKNOWN_ROUTE = "unknown"
"""The method label of a request whose path is no route (404): one value for every such path."""


class HttpMetricsMiddleware:
    """ASGI middleware counting and timing the JSON/HTTP API's requests.

    Every request is counted by method and the HTTP status it was answered
    with, refusals included: a wrong role (403), a body over the limit (413)
    or of the wrong type (400) are answered before the body is read, and show
    as their status. The method label is the RPC's name for its route and
    `UNKNOWN_ROUTE` for any other path, so the label values are the
    descriptor's methods plus one, whatever clients send. A TLS handshake that
    fails is no request and is not counted.

    The duration of a unary call runs until its answer is written. A server
    stream's runs until its status and headers are sent (its first message,
    an error, or half a second without either, `manager.httpapi.app.FIRST_WAIT`):
    its time to first byte, since a followed stream's whole life says how long
    the operator watched, not how fast the manager answered. From then until it
    ends it counts as open; its request is counted when it ends.
    """

    def __init__(
        self,
        app: Callable[[Any, Any, Any], Awaitable[None]],
        metrics: ManagerMetrics,
        routes: Mapping[str, tuple[str, bool]],
    ) -> None:
        """`routes`: HTTP path -> (method name, whether it is a server stream)."""
        self._app = app
        self._m = metrics
        self._routes = dict(routes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        method, streaming = self._routes.get(scope["path"], (UNKNOWN_ROUTE, False))
        m = self._m
        started = time.perf_counter()
        # What uvicorn answers when the app fails before sending a response.
        status = 500
        timed = opened = False

        async def observed(message: Any) -> None:
            nonlocal status, timed, opened
            if message["type"] == "http.response.start":
                status = message["status"]
                if streaming:
                    m.http_seconds.labels(method).observe(time.perf_counter() - started)
                    timed = True
                    if status == 200:
                        m.http_streams.labels(method).inc()
                        opened = True
            await send(message)

        try:
            await self._app(scope, receive, observed)
        finally:
            if opened:
                m.http_streams.labels(method).dec()
            if not timed:
                m.http_seconds.labels(method).observe(time.perf_counter() - started)
            m.http_requests.labels(method, str(status)).inc()
