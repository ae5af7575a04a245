"""Lane scheduling: high first, while normal and low keep a guaranteed share.

Each claim asks the store for a quota per lane and then fills what is left in lane order. The
quotas come from credits: every claim of ``n`` slots gives normal and low ``n * share`` credit,
whole credits become quota, fractions carry over. With one free slot at a time, normal still gets
one claim in four (share 0.25) while high is busy. A lane with nothing due loses its credit, so an
idle lane does not bank a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator, Mapping

from postlane.config import Config
from postlane.message import Lane

DEFAULT_SHARES: Mapping[Lane, float] = {Lane.NORMAL: 0.25, Lane.LOW: 0.1}


class LaneScheduler:
    def __init__(self, shares: Mapping[Lane, float] | None = None) -> None:
        self.shares = dict(DEFAULT_SHARES if shares is None else shares)
        self._credit = {lane: 0.0 for lane in self.shares}

    @classmethod
    def from_config(cls, config: Config) -> LaneScheduler:
        shares = dict(DEFAULT_SHARES)
        for lane in (Lane.NORMAL, Lane.LOW):
            share = config.lanes[lane.value].share
            if share is not None:
                shares[lane] = share
        return cls(shares)

    def quotas(self, slots: int) -> list[tuple[Lane, int]]:
        """Per-lane quotas for a claim of ``slots``: high first, then normal, then low."""
        reserved: dict[Lane, int] = {}
        left = slots
        for lane in (Lane.NORMAL, Lane.LOW):
            self._credit[lane] += slots * self.shares.get(lane, 0.0)
            whole = min(int(self._credit[lane]), left)
            reserved[lane] = whole
            left -= whole
        return [
            (Lane.HIGH, left),
            (Lane.NORMAL, reserved[Lane.NORMAL]),
            (Lane.LOW, reserved[Lane.LOW]),
        ]

    def claimed(self, quotas: list[tuple[Lane, int]], got: Mapping[Lane, int]) -> None:
        """Spend the credit of what each lane got; a lane that got less than its quota had nothing
        more due, so its credit is dropped."""
        for lane, quota in quotas:
            if lane not in self._credit:
                continue
            taken = got.get(lane, 0)
            if taken < quota:
                self._credit[lane] = 0.0
            else:
                self._credit[lane] = max(0.0, self._credit[lane] - quota)


class HighDemand:
    """The in-flight slots the normal and low lanes may never take, sized to the high lane's
    recent traffic: the most high-lane sends in flight at once over the last ``window``
    seconds, plus one spare while the worker has 10 slots or more (so the next password reset
    finds a slot free instead of waiting for a newsletter's send to finish); at most half of
    the slots.

    ``[delivery] high_reserve`` is another thing: slots the other lanes may borrow while no high
    mail is due. Borrowed, they are busy with low sends when a reset comes; these are not."""

    def __init__(self, concurrency: int, window: float = 60.0) -> None:
        self.window = window
        self._spare = 1 if concurrency >= 10 else 0
        self._ceiling = concurrency // 2
        #: (time, in flight) of the rises that may still be the window's peak, decreasing
        self._peaks: deque[tuple[float, int]] = deque()

    def started(self, in_flight: int, now: float) -> None:
        """High-lane sends in flight rose to ``in_flight``."""
        while self._peaks and self._peaks[-1][1] <= in_flight:
            self._peaks.pop()
        self._peaks.append((now, in_flight))

    def kept(self, now: float) -> int:
        """Slots kept for the high lane now (in flight or free)."""
        while self._peaks and self._peaks[0][0] < now - self.window:
            self._peaks.popleft()
        peak = self._peaks[0][1] if self._peaks else 0
        return min(self._ceiling, peak + self._spare)


#: the order waiters are served in: high, normal, low (unknown lanes as normal)
LANE_RANK: Mapping[str, int] = {lane.value: lane.rank for lane in Lane}


class LaneSlots:
    """A semaphore whose waiters are served by lane (high, normal, low), first come first
    served within a lane: a password reset waiting for one of a relay's connections goes
    before the newsletter that was waiting for it first."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, lane: str) -> AsyncIterator[None]:
        await self.acquire(lane)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, lane: str) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (LANE_RANK.get(lane, 1), next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot came as the waiter was cancelled: pass it on
            raise

    def waiting(self, lane: str) -> int:
        """How many of ``lane``'s sends wait for a slot now."""
        rank = LANE_RANK.get(lane, 1)
        return sum(1 for r, _, granted in self._waiters if r == rank and not granted.done())

    def release(self) -> None:
        while self._waiters:
            _, _, granted = heapq.heappop(self._waiters)
            if not granted.done():  # (a cancelled waiter's future is done: skip it)
                granted.set_result(None)
                return
        self._free += 1
