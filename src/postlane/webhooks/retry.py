"""When a failing webhook endpoint is tried again: exponential backoff with full jitter.

After the ``n``-th failure in a row the endpoint waits a random time between 0 and
``min(cap, first * factor ** (n - 1))``: about a second after the first failure, a minute after
the seventh, then up to ``cap`` (an hour) once it has failed for a while. Full jitter (a
uniform draw from zero) spreads the retries of many senders best (AWS Architecture Blog,
"Exponential Backoff And Jitter"). A recovered endpoint is therefore found within seconds of a
short outage and within the cap of a long one; an operator can always try at once
(``replay``/``resume``).

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
    #: the longest delay
    cap: float = 3600.0
    #: failures in a row after which the endpoint counts as paused (and alerts)
    pause_after: int = 10

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failures in a row."""
        exponent = max(0, failures - 1)
        if exponent > 64:  # past any cap; avoids an overflow
            return self.cap
        return min(self.cap, self.first * self.factor**exponent)

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
