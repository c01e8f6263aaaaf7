"""The lifecycle every long-running Fleet process shares.

``start() -> wait for SIGTERM/SIGINT -> stop(grace)``, with the wait on an
asyncio Event the signal handlers set (handlers only record the signal), and
the process's previous handlers restored on the way out. gRPC servers also
get the standard health service and server reflection, both versions of it:
``grpc.reflection.v1`` (what current grpcurl, grpcui and Postman ask for
first) and ``grpc.reflection.v1alpha`` (older clients).

Related plumbing lives beside this module: `fleet.systemd.SystemdNotifier`
and `fleet.observability` (`setup_logging`, `start_metrics_http_server`),
re-exported here for convenience.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from fleet.observability import setup_logging, start_metrics_http_server
from fleet.systemd import SystemdNotifier

__all__ = [
    "REFLECTION_V1",
    "AsyncHealth",
    "SystemdNotifier",
    "add_health_and_reflection",
    "open_files_target",
    "raise_open_files_limit",
    "run_until_signalled",
    "setup_logging",
    "start_metrics_http_server",
]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""Full name of the v1 reflection service (grpcio-reflection serves only v1alpha)."""


class AsyncHealth(Protocol):
    """The typed face of grpc_health's asyncio HealthServicer (its stubs lack `aio`)."""

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set `service`'s status and wake its Watch streams."""

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on."""


def open_files_target(soft: int, hard: int) -> int:
    """The soft RLIMIT_NOFILE to ask for: the hard limit (pure).

    Every connection is a descriptor, and a manager holding 15,000 control
    streams needs that many; the default soft limit (often 1,024) would refuse
    connections long before. An unlimited hard limit is capped at 1,048,576
    (the kernel's default nr_open), which setrlimit accepts.
    """
    if soft == resource.RLIM_INFINITY:
        return soft
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(soft, hard)


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = open_files_target(soft, hard)
    if want != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:  # e.g. above nr_open: keep what we have
            logging.getLogger(__name__).warning(
                "could not raise the open files limit from %d to %d: %s", soft, want, exc
            )
            return soft
    return want


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


async def run_until_signalled(
    start: Callable[[], Awaitable[None] | None],
    stop: Callable[[float], Awaitable[None] | None],
    *,
    grace: float,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run `start()`, wait for SIGTERM or SIGINT, then run `stop(grace)`.

    `start` and `stop` may be plain or async callables. Handlers are
    installed before `start` so an early signal is not lost, and the
    previous handlers are restored on exit, even when `start` or `stop`
    fails. Setting `stop_event` (optional) stops the same way as a signal,
    for embedding and tests.
    """
    loop = asyncio.get_running_loop()
    event = asyncio.Event() if stop_event is None else stop_event
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        event.set()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        await _maybe_await(start())
        await event.wait()
        cause = received[0].name if received else "stop requested"
        log.info("%s: stopping (grace %.1fs)", cause, grace)
        await _maybe_await(stop(grace))
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            # remove_signal_handler resets to SIG_DFL, not to what was there.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> AsyncHealth:
    """Register grpc.health.v1.Health and server reflection (v1 and v1alpha) on `server`.

    Every name in `service_names` (full names, e.g. "fleet.v1.NodeService")
    and the overall "" service report SERVING. Returns the asyncio
    `grpc_health.v1.health.aio.HealthServicer`; on shutdown call
    ``await servicer.enter_graceful_shutdown()`` so probes see NOT_SERVING.
    """
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lack aio
    for name in ("", *service_names):
        # set() is async only to wake Watch streams; a new servicer has none,
        # so writing the status table directly is what set() would do.
        servicer._server_status[name] = health_pb2.HealthCheckResponse.SERVING
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    listed = (*service_names, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME)
    # aio is in the module's __all__, behind a version check mypy cannot follow.
    reflector = reflection.aio.ReflectionServicer(listed)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
    server.add_generic_rpc_handlers((_reflection_v1(reflector),))
    return cast(AsyncHealth, servicer)


def _reflection_v1(reflector: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """grpc.reflection.v1 answered by grpcio-reflection's v1alpha servicer.

    v1 is v1alpha renamed: the messages have the same fields and numbers, so
    the same bytes; only the method path differs. One implementation serves both.
    """
    info = grpc.stream_stream_rpc_method_handler(
        reflector.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info})
