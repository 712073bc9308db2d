"""Rate limiting for what the serving path logs."""

from __future__ import annotations

import time


class RateLimited:
    """At most ``burst`` calls per ``interval`` seconds pass; the rest are
    counted and reported with the next one that passes (as the kernel's
    printk_ratelimit).  Thread-safe enough: a lost count is harmless."""

    def __init__(self, interval: float = 5.0, burst: int = 3) -> None:
        self.interval, self.burst = interval, burst
        self._start = -interval
        self._passed = 0
        self.suppressed = 0  # calls held back since the last that passed

    def __call__(self) -> int | None:
        """None if held back, else how many were held back before this one."""
        now = time.monotonic()
        if now - self._start >= self.interval:
            self._start, self._passed = now, 0
        if self._passed >= self.burst:
            self.suppressed += 1
            return None
        self._passed += 1
        held, self.suppressed = self.suppressed, 0
        return held
