"""Time, injectable: policy, scheduling and leases ask a :class:`Clock`, never ``time.time()``;
and times as people write them (:func:`when`, :func:`iso`, :func:`parse_when`).

:class:`SystemClock` is real time. :class:`FakeClock` only moves when a test calls
:meth:`FakeClock.advance`, and wakes whoever sleeps on it, so retry and lease tests need not sleep.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import UTC, datetime
from typing import Protocol

from postlane.errors import ValidationError, quoted


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
    return _utc(ts).strftime("%Y-%m-%d %H:%M:%S")


def _utc(ts: float) -> datetime:
    """``ts`` as an aware UTC datetime; a time past the year 9999 (stored before
    :func:`parse_when` refused them) as the last second of 9999, so that one such row cannot
    break a listing."""
    return datetime.fromtimestamp(min(ts, LATEST), UTC)


def when_utc(ts: float | None) -> str:
    """:func:`when` saying its zone, for a time written among other words (``next 2026-11-29
    09:27:54 UTC``); a table says it once, in its heading."""
    return "-" if ts is None else when(ts) + " UTC"


def iso(ts: float | None) -> str | None:
    """An epoch time as an ISO 8601 UTC string (the contract's JSON time format)."""
    if ts is None:
        return None
    return _utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_when(value: datetime | str | float | None, what: str) -> float | None:
    """Epoch seconds of ``value``: an aware datetime, ISO 8601 text with a zone
    (``2026-12-02T09:30:00+01:00``, ``...Z``), or Unix seconds (a number or its text).
    A time without a zone is refused: whose 9:30 would it be?"""
    if value is None:
        return None
    if isinstance(value, str) and not value.strip():  # a blank template value: not "now"
        raise ValidationError(f"{what} is empty: give a time, or leave it out", field=what)
    if isinstance(value, bool):
        raise ValidationError(f"{what} must be a time, not {value!r}", field=what)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float: far past the year 9999
            seconds = math.inf
    elif isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(
                f"{what} has no time zone; give an aware datetime (e.g. tzinfo=UTC)", field=what
            )
        seconds = value.timestamp()
    elif isinstance(value, str):
        text = value.strip()
        if _UNIX_SECONDS.fullmatch(text):
            seconds = float(text)
        else:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValidationError(
                    f"{what} must be ISO 8601 with a time zone (2026-12-02T09:30:00Z) or Unix "
                    f"seconds, got {value!r}",
                    field=what,
                ) from None
            if parsed.tzinfo is None or parsed.utcoffset() is None:
                raise ValidationError(
                    f"{what} has no time zone (whose {text} would it be?): add one, as in "
                    "2026-12-02T09:30:00Z or 2026-12-02T09:30:00+01:00",
                    field=what,
                )
            seconds = parsed.timestamp()
    else:
        raise ValidationError(f"{what} must be a time, not {type(value).__name__}", field=what)
    if math.isnan(seconds) or seconds < 0:
        shown = value.isoformat() if isinstance(value, datetime) else value
        raise ValidationError(f"{what} must be a time after 1970, got {quoted(shown)}", field=what)
    if seconds > LATEST:
        raise ValidationError(
            f"{what} must be a time before the year 10000, got {quoted(value)}", field=what
        )
    return seconds


#: the latest time a ``send_at``, ``expires_at`` or suppression's expiry may name
#: (9999-12-31T23:59:59Z): what every time shown, ISO 8601 or in a table, can still write
LATEST = 253402300799.0


#: Unix seconds as text: ASCII digits, perhaps a fraction (not float()'s "1_700", "inf", "1e9")
_UNIX_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
