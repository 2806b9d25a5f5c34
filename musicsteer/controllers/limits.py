"""Threading model: `RateLimit` is used by one thread at a time (one connection's
reader); the constants are read from any thread.

Limits every network controller keeps: the largest message taken (OSC reads one UDP
datagram of at most MAX_MESSAGE_BYTES; the web surface refuses a WebSocket message
longer than that) and the message rate from one client (the OSC receive thread is
tested at 10,000 messages a second; a web connection is refused what goes beyond
MAX_MESSAGES_PER_S, with an error reply at most once a second). This module knows
nothing of sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_MESSAGE_BYTES = 65536  # one UDP datagram, what the OSC server reads at once
MAX_MESSAGES_PER_S = 10_000  # from one client
BURST = 1_000  # messages a client may send at once beyond the rate


class RateLimit:
    """A token bucket: `allow()` is True while the client keeps under `rate` a second
    (with `burst` at once); `warn()` is True at most once a second while it does not."""

    def __init__(self, rate: float = MAX_MESSAGES_PER_S, burst: float = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens, self.at = self.burst, clock()
        self.refused = 0
        self._warned = -1e9

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False

    def warn(self) -> bool:
        now = self.clock()
        if now - self._warned >= 1.0:
            self._warned = now
            return True
        return False
