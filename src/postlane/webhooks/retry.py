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

The policy is an immutable value that returns decisions (as procrastinate's ``retry.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
