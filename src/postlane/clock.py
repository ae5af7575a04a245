"""Time, injectable: policy, scheduling and leases ask a :class:`Clock`, never ``time.time()``.

:class:`SystemClock` is real time. :class:`FakeClock` only moves when a test calls
:meth:`FakeClock.advance`, and wakes whoever sleeps on it, so retry and lease tests need not sleep.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for tests: starts at ``start`` and moves only on :meth:`advance`."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._moved = asyncio.Condition()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= deadline)

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        async with self._moved:
            self._moved.notify_all()

    def set(self, when: float) -> None:
        self._now = when


def when(ts: float | None) -> str:
    """A time for people: ``2026-11-29 09:27:54`` (UTC), or ``-`` for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def when_utc(ts: float | None) -> str:
    """:func:`when` saying its zone, for a time written among other words (``next 2026-11-29
    09:27:54 UTC``); a table says it once, in its heading."""
    return "-" if ts is None else when(ts) + " UTC"


def iso(ts: float | None) -> str | None:
    """An epoch time as an ISO 8601 UTC string (the contract's JSON time format)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
