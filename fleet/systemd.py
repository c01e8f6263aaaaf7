"""systemd readiness and watchdog notifications (the sd_notify protocol).

Under ``Type=notify`` systemd passes a datagram socket in ``NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace) and, with ``WatchdogSec=``,
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process meant). Each message is
one datagram of newline-separated ``KEY=value`` lines. Without the socket
every method is a no-op, so services call them unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends READY=1, STOPPING=1, STATUS= and WATCHDOG=1 to systemd, if it listens."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID from `environ` (default os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace: a leading NUL on the wire.
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        elif address:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or @abstract name", address)
        self._watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET names a socket to notify."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None if no watchdog."""
        return self._watchdog_interval if self.enabled else None

    def ready(self) -> None:
        """Tell systemd start-up is complete (the unit becomes 'active')."""
        self.notify("READY=1")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by `systemctl status`."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog_ping(self) -> None:
        """Reset the watchdog timer."""
        self.notify("WATCHDOG=1")

    def notify(self, *assignments: str) -> None:
        """Send `KEY=value` lines as one datagram; failures are logged, never raised.

        A service must not die because its supervisor's socket is full or
        gone; systemd will notice the missing notification itself.
        """
        if self._address is None:
            return
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # never stall the event loop on a full queue
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning("systemd notification %r failed: %s", assignments, exc)

    async def watchdog_loop(self) -> None:
        """Ping every half WATCHDOG_USEC until cancelled; returns at once without a watchdog."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog_ping()
            await asyncio.sleep(interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent)
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
