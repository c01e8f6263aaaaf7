"""Sending custom metrics: the flush task around the pure `MetricBuffer`.

Samples are validated when recorded (a bad name is the caller's bug and
raises at once), buffered, and sent in batches when `MetricBuffer.due`
says so. While the daemon is unreachable the batch stays in the buffer;
when the buffer is full the oldest samples are dropped (logged once per
outage). A batch the daemon refuses as invalid is dropped with a log line,
since sending it again would fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from agent_runtime._client import AgentClient, now_ms
from agent_runtime._metrics import MetricBuffer, Sample
from fleet.errors import FleetError, InvalidArgument, Unavailable

__all__ = ["MetricReporter"]

log = logging.getLogger("agent_runtime")


class MetricReporter:
    """Buffers samples and sends them through whatever client is current."""

    def __init__(
        self,
        buffer: MetricBuffer,
        *,
        client: Callable[[], AgentClient | None],
        clock: Callable[[], float],
    ) -> None:
        self.buffer = buffer
        """The samples waiting to be sent."""
        self._client = client
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._dropping = False
        self._closing = False

    def record(self, type: str, values: Mapping[str, float]) -> None:
        """Validate and queue one sample (ValueError for bad names or values)."""
        sample = Sample.checked(type, values, now_ms())
        if self.buffer.add(sample) and not self._dropping:
            self._dropping = True
            log.warning(
                "metric buffer full (%d samples, daemon unreachable?): dropping the oldest",
                self.buffer.limit,
            )
        if len(self.buffer) >= self.buffer.batch_size:
            self._wakeup.set()

    async def flush(self) -> None:
        """Send everything now; Unavailable (samples kept) while disconnected."""
        while len(self.buffer):
            await self._send_batch(raise_errors=True)

    def close_soon(self) -> None:
        """Make `run` send what is left and return."""
        self._closing = True
        self._wakeup.set()

    async def _send_batch(self, *, raise_errors: bool = False) -> bool:
        """Send one batch; False (batch kept) if the daemon is unreachable."""
        client = self._client()
        if client is None:
            if raise_errors:
                raise Unavailable("not connected to the daemon (reconnecting); metrics kept")
            return False
        batch = self.buffer.take(self._clock())
        try:
            await client.report_metrics(batch)
        except InvalidArgument as exc:
            log.error("daemon refused %d metric samples: %s", len(batch), exc)  # noqa: TRY400
            return True
        except asyncio.CancelledError:
            self.buffer.put_back(batch)
            raise
        except FleetError:
            self.buffer.put_back(batch)
            if raise_errors:
                raise
            return False
        self._dropping = False
        return True

    async def run(self) -> None:
        """Flush when due until `close_soon`, then send what is left (best effort)."""
        while True:
            if self._closing:
                while len(self.buffer) and await self._send_batch():
                    pass
                return
            try:
                if self.buffer.due(self._clock()):
                    if not await self._send_batch():
                        await asyncio.sleep(min(1.0, self.buffer.interval))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end metric reporting for good
                log.exception("sending metrics failed")
                await asyncio.sleep(self.buffer.interval)
                continue
            self._wakeup.clear()
            delay = self.buffer.next_due(self._clock()) or self.buffer.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)
