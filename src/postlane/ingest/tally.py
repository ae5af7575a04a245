"""Refusals logged as a summary: a flood of refused clients must not become a flood of log
lines, and its end must not go unlogged either.

The first refusal schedules a summary line on the event loop at once; refusals until it is
written join it; later ones join the next, written a minute after the last. Without a running
loop (a synchronous caller, a test) the line is written at once, at most once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

__all__ = ["Tally"]


class Tally:
    """Counts of refusals by kind since start (for metrics), and a summary line a minute."""

    INTERVAL = 60.0

    def __init__(
        self,
        logger: logging.Logger,
        describe: Callable[[dict[str, int]], str],
        level: int = logging.WARNING,
    ) -> None:
        """``describe`` turns the counts not yet logged into the line to log."""
        self._logger = logger
        self._level = level
        self._describe = describe
        self.counts: collections.Counter[str] = collections.Counter()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._logged_at = -self.INTERVAL
        self._pending: asyncio.TimerHandle | None = None

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n
        self._unlogged[kind] += n
        if self._pending is not None:
            return
        delay = max(0.0, self._logged_at + self.INTERVAL - time.monotonic())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if delay == 0.0:
                self.flush()
            return
        self._pending = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (nothing if nothing was)."""
        self._pending = None
        if not self._unlogged:
            return
        self._logged_at = time.monotonic()
        line = self._describe(dict(self._unlogged))
        self._unlogged.clear()
        self._logger.log(self._level, "%s", line)
