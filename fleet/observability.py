"""Logs and metrics every Fleet server shares: one-line/JSON logging, /metrics over HTTP."""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from fleet.errors import ConfigError

if TYPE_CHECKING:
    import prometheus_client

__all__ = ["JsonFormatter", "PlainFormatter", "setup_logging", "start_metrics_http_server"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
_LEVELS = ("debug", "info", "warning", "error", "critical")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return record.stack_info or None


def _plain_value(value: Any) -> str:
    if isinstance(value, bool | int | float) or value is None:
        return jsonlib.dumps(value)
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return jsonlib.dumps(text)


class PlainFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message> key=value ...`` on exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record`; newlines (and a traceback) are escaped to keep one line."""
        message = record.getMessage().replace("\n", "\\n")
        parts = [f"{_timestamp(record)} {record.levelname} {record.name}: {message}"]
        parts += [f"{k}={_plain_value(v)}" for k, v in _extras(record).items()]
        exc = _exception_text(record)
        if exc is not None:
            parts.append(f"exc_info={jsonlib.dumps(exc)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, extras, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as compact JSON; non-JSON extras are stringified."""
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj[f"extra_{key}" if key in obj else key] = value
        exc = _exception_text(record)
        if exc is not None:
            obj["exc_info"] = exc
        return jsonlib.dumps(obj, default=str, ensure_ascii=False)


class _FleetHandler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(level: str, json: bool, *, stream: TextIO | None = None) -> None:
    """Log `level` and above from every logger to `stream` (stderr), one line per event.

    Calling it again replaces the handler it installed earlier; handlers
    installed by others (pytest, embedding applications) are left alone.
    """
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FleetHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _FleetHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json else PlainFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def _split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"metrics address {addr!r}: expected host:port, e.g. 127.0.0.1:9100")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9100
    return host or "0.0.0.0", int(port_text)  # noqa: S104  # ":9100" means every interface


def start_metrics_http_server(
    addr: str, registry: prometheus_client.CollectorRegistry
) -> tuple[Callable[[], None], int]:
    """Serve `registry` at http://<addr>/metrics from a daemon thread.

    `addr` is host:port (port 0 picks a free one). Returns a `stop` callable
    that shuts the server down and closes its socket (it blocks for up to
    half a second: call it via asyncio.to_thread from async code), and the
    bound port. A bad address or a port in use is a ConfigError.
    """
    import prometheus_client  # here: a process with no /metrics never loads it (~4 MiB)

    host, port = _split_host_port(addr)
    try:
        server, thread = prometheus_client.start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError(
            f"metrics address {addr!r}: cannot listen: {exc.strerror or exc}"
        ) from None
    bound_port: int = server.server_address[1]
    lock = threading.Lock()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        with lock:
            if stopped:
                return
            stopped = True
        server.shutdown()
        server.server_close()
        thread.join()

    return stop, bound_port
