"""When a failing webhook endpoint is tried again: exponential backoff with full jitter.

After the ``n``-th failure in a row the endpoint waits a random time between 0 and a ceiling
that doubles from ``first`` (a second after the first failure) up to ``plateau`` (30 s), stays
there while the outage is young (``young`` failures, about six minutes), then doubles again up
to ``cap`` (an hour). Full jitter (a uniform draw from zero) spreads the retries of many senders
best (AWS Architecture Blog, "Exponential Backoff And Jitter"). A recovered endpoint is
therefore found within seconds of a short outage, within ``plateau`` of one of a few minutes
(the contract: its backlog within a minute), and within the cap of a long one; an operator can
always try at once (``replay``/``resume``).

After ``pause_after`` failures in a row an endpoint counts as *paused*: it is still retried on
the schedule, but an alert fires and ``postlane webhooks list`` says so.

The policy is an immutable value that returns decisions (as procrastinate's ``retry.py``);
:class:`EndpointHealth` applies it to one endpoint as its requests succeed and fail (the
failures in a row, the time of the next try, the one probe while it fails), shared by that
endpoint's request lanes in :mod:`postlane.webhooks.sender`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from postlane.clock import Clock
from postlane.waits import first_of

#: HTTP 410 Gone: the receiver asks to stop (the specification: disable the endpoint)
GONE = 410


@dataclass(frozen=True)
class RetrySchedule:
    #: the ceiling of the first delay, in seconds
    first: float = 1.0
    factor: float = 2.0
    #: the longest delay while the outage is young: a recovered endpoint is found within it
    plateau: float = 30.0
    #: failures in a row while the outage counts as young (about 6 minutes at the plateau)
    young: int = 30
    #: the longest delay
    cap: float = 3600.0
    #: failures in a row after which the endpoint counts as paused (and alerts)
    pause_after: int = 10

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failures in a row."""
        if failures <= self.young:
            exponent = min(max(0, failures - 1), 64)  # past any plateau; avoids an overflow
            return min(self.cap, self.plateau, self.first * self.factor**exponent)
        exponent = min(failures - self.young, 64)
        return min(self.cap, max(self.plateau, self.first) * self.factor**exponent)

    def delay(
        self,
        failures: int,
        rng: random.Random,
        *,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> float:
        """Seconds to wait after ``failures`` failures in a row. A ``Retry-After`` from the
        receiver is honoured (up to the cap); a 410 Gone waits the cap at once."""
        if status == GONE:
            return self.cap
        wait = rng.uniform(0.0, self.ceiling(failures))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cap))
        return wait

    def paused(self, failures: int) -> bool:
        return failures >= self.pause_after


class Ended(Exception):
    """The tenure is over: stop sending."""


class EndpointHealth:
    """The endpoint's failures in a row and the time of the next try, shared by its request
    lanes. While it fails, one request (the probe) goes at a time."""

    def __init__(
        self,
        clock: Clock,
        retry: RetrySchedule,
        rng: random.Random,
        failures: int,
        paused_until: float | None,
    ) -> None:
        self.clock = clock
        self.retry = retry
        self.rng = rng
        self.failures = failures
        self.paused_until = paused_until
        #: increases whenever failures or the pause change: a request admitted before a
        #: failure was counted does not count its own failure again
        self.generation = 0
        self.probing = False
        #: requests acknowledged so far
        self.acknowledged = 0
        #: requests waiting to go whose message never failed (while the endpoint fails, one of
        #: them probes it before a message that failed: that one may be all that fails)
        self.fresh = 0
        #: the messages whose failures make the current run of failures
        self.culprits: set[str | None] = set()
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def admit(self, ended: asyncio.Event, *, suspect: bool = False) -> int:
        """Wait until a request may go; its generation. A ``suspect`` request (its message
        failed before) probes a failing endpoint only when no other message is waiting to; a
        request of another message does not wait for a pause that one message's failures
        alone made (that message may be all the endpoint refuses)."""
        if not suspect:
            self.fresh += 1
        try:
            while True:
                if ended.is_set():
                    raise Ended
                changed = self._changed
                now = self.clock.now()
                alone = not suspect and len(self.culprits) == 1
                if self.paused_until is not None and now < self.paused_until and not alone:
                    await first_of(
                        changed.wait(),
                        ended.wait(),
                        self.clock.sleep(self.paused_until - now),
                        timeout=None,
                    )
                    continue
                if self.failures == 0:
                    return self.generation
                if not self.probing and not (suspect and self.fresh):
                    self.probing = True
                    return self.generation
                await first_of(changed.wait(), ended.wait(), timeout=None)
        finally:
            if not suspect:
                self.fresh -= 1
                if self.failures:  # a suspect may wait for no other message to be waiting
                    self._notify()

    def succeeded(self) -> bool:
        """A 2xx: the endpoint works. True when it was failing."""
        self.acknowledged += 1
        if self.failures == 0 and self.paused_until is None:
            return False
        self.failures = 0
        self.paused_until = None
        self.probing = False
        self.culprits.clear()
        self.generation += 1
        self._notify()
        return True

    def failed(
        self,
        generation: int,
        message: str | None,
        *,
        retry_after: float | None,
        status: int | None,
    ) -> float | None:
        """A failure of a request of ``message`` admitted at ``generation``; the time of the
        next try, or None when a failure since then was counted already."""
        if generation != self.generation:
            return None
        self.culprits.add(message)
        self.failures += 1
        self.generation += 1
        self.probing = False
        delay = self.retry.delay(self.failures, self.rng, retry_after=retry_after, status=status)
        self.paused_until = self.clock.now() + delay
        self._notify()
        return self.paused_until
