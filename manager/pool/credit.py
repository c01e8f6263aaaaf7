"""Flow control of one streaming command on the control channel, as plain numbers.

The daemon may send a streaming command's result messages only within the
credit the manager granted (`Command.credit`). The manager grants a window
up front and tops it up as the caller takes messages, so at most `window`
messages are ever buffered for a slow caller, and a fast one never waits for
a grant (the top-up goes out when half the window is used).
"""

from __future__ import annotations

__all__ = ["CreditWindow"]


class CreditWindow:
    """Credit of one streaming call: granted, received and consumed message counts."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.granted = window
        """Messages the daemon may send in all (the first piece carries `window`)."""
        self.received = 0
        """Messages the daemon sent."""
        self.consumed = 0
        """Messages the caller took."""

    @property
    def buffered(self) -> int:
        """Messages received and not taken yet (never more than `window`)."""
        return self.received - self.consumed

    def receive(self) -> bool:
        """Count a message from the daemon; False if it was beyond its credit."""
        if self.received >= self.granted:
            return False
        self.received += 1
        return True

    def consume(self) -> int:
        """Count a message the caller took; the credit to grant now (0: none yet)."""
        if self.consumed >= self.received:
            raise ValueError("consumed a message that was not received")
        self.consumed += 1
        outstanding = self.granted - self.consumed  # may still arrive, or wait in the buffer
        if outstanding > self.window // 2:
            return 0
        grant = self.window - outstanding
        self.granted += grant
        return grant
