"""What the queue does with each verdict: the retry schedule, max attempts, max age, per lane.

A :class:`RetryPolicy` is an immutable value; :meth:`Policy.decide` is pure: given a verdict, a
delivery's history so far and the time, it returns a :class:`Decision`. Nothing here sleeps,
stores or sends. The contract's table, in code:

=============  =======================================================================
delivered      sent
temporary      retry on the schedule (uses an attempt)
throttled      defer by the destination's cool-down; uses no attempt
connection     retry with backoff; uses no attempt
soft_bounce    retry on the schedule (uses an attempt)
hard_bounce    dead-letter and suppress the address
policy_block   5xx: dead-letter (never suppress); 4xx: retry on the schedule
message_error  5xx: dead-letter; 4xx: retry on the schedule (the server said "not now")
=============  =======================================================================

Every retry is bounded by ``max_attempts`` (counted attempts) and by ``max_age``: no attempt is
ever scheduled at or after a message's expiry; it is dead-lettered instead. A wait the server
asked for (``Retry-After``) is honoured whatever the class: a retry never comes sooner.

:meth:`Decision.outcome` turns a decision into the delivery's new state as the store records it
(state, attempts and deferrals counted, next try, suppression, reason); :func:`untried` is the
new state of a delivery that gets no try at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from postlane.classify import ReplyClass, Verdict
from postlane.config import Config, format_duration
from postlane.message import Lane, RecipientState
from postlane.records import AttemptRecord, Delivery, Outcome


class Action(StrEnum):
    SEND = "sent"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]
    max_attempts: int
    max_age: float
    jitter: float = 0.0

    def delay(self, tries: int, rng: random.Random | None = None) -> float:
        """The wait after the ``tries``-th try (1-based); the last staged delay repeats."""
        base = self.delays[min(max(tries, 1), len(self.delays)) - 1]
        if self.jitter and rng is not None:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return base


@dataclass(frozen=True)
class Decision:
    action: Action
    next_attempt_at: float | None = None
    #: whether this try used up one of max_attempts
    counted: bool = True
    suppress: bool = False
    reason: str | None = None

    def outcome(self, delivery: Delivery, attempt: AttemptRecord) -> Outcome:
        """``delivery``'s new state after the try this decision follows, with its attempt."""
        return Outcome(
            delivery_id=delivery.id,
            state=_STATES[self.action],
            attempts=delivery.attempts + (1 if self.counted else 0),
            deferrals=delivery.deferrals + (0 if self.counted else 1),
            next_attempt_at=self.next_attempt_at,
            attempt=attempt,
            suppress=self.suppress,
            reason=self.reason,
        )


def untried(
    delivery: Delivery, state: RecipientState, reason: str, cls: ReplyClass | None = None
) -> Outcome:
    """``delivery``'s new state when it gets no try (dead-lettered past its limits, or on the
    suppression list): its counts stay, and its last real reply stays its last response;
    ``cls``: the class it is recorded under, its event's too (None: its last reply's)."""
    return Outcome(
        delivery_id=delivery.id,
        state=state,
        attempts=delivery.attempts,
        deferrals=delivery.deferrals,
        next_attempt_at=None,
        attempt=None,
        reason=reason,
        cls=cls,
    )


_STATES = {
    Action.SEND: RecipientState.SENT,
    Action.RETRY: RecipientState.DEFERRED,
    Action.DEAD: RecipientState.DEAD,
}
_RETRY_ON_SCHEDULE = frozenset({ReplyClass.TEMPORARY, ReplyClass.SOFT_BOUNCE})
_UNCOUNTED = frozenset({ReplyClass.THROTTLED, ReplyClass.CONNECTION})


class Policy:
    """The retry policies of the three lanes, and the decision for each verdict."""

    def __init__(self, lanes: dict[Lane, RetryPolicy], rng: random.Random | None = None) -> None:
        self._lanes = lanes
        self._rng = rng or random.Random()

    @classmethod
    def from_config(cls, config: Config, rng: random.Random | None = None) -> Policy:
        lanes = {}
        for lane in Lane:
            override = config.lanes[lane.value]
            lanes[lane] = RetryPolicy(
                delays=override.delays or config.retry.delays,
                max_attempts=override.max_attempts or config.retry.max_attempts,
                max_age=override.max_age or config.retry.max_age,
                jitter=config.retry.jitter,
            )
        return cls(lanes, rng)

    def for_lane(self, lane: Lane) -> RetryPolicy:
        return self._lanes[lane]

    def expires_at(self, lane: Lane, created_at: float) -> float:
        return created_at + self._lanes[lane].max_age

    def refuse_before_sending(
        self, lane: Lane, *, attempts: int, created_at: float, now: float
    ) -> str | None:
        """Why a claimed delivery must be dead-lettered without a try (None: go ahead).

        Covers what no retry decision caught: a lease abandoned by a dead worker, a hold released
        after expiry, a configuration that lowered the limits."""
        retry = self._lanes[lane]
        if now >= created_at + retry.max_age:
            return f"max_age {format_duration(retry.max_age)} exceeded"
        if attempts >= retry.max_attempts:
            return f"max_attempts {retry.max_attempts} reached"
        return None

    def decide(
        self,
        verdict: Verdict,
        *,
        lane: Lane,
        attempts: int,
        deferrals: int,
        created_at: float,
        now: float,
        cool_down: float | None = None,
        flushed: bool = False,
    ) -> Decision:
        """Decide what follows one try. ``attempts``/``deferrals`` are the counts before it;
        ``cool_down`` is how long the destination asked us to wait (throttling, Retry-After):
        the next try is never sooner, whatever the class. ``flushed``: an operator made the
        try due (``queue flush``), not the schedule: a failure for a while uses no attempt, so
        flushing again and again never dead-letters mail sooner (as ``postqueue -f`` never
        bounces it), and the next try waits as long as after the last try that used one."""
        cls = verdict.cls
        if cls is ReplyClass.DELIVERED:
            return Decision(Action.SEND)
        if cls is ReplyClass.HARD_BOUNCE:
            return Decision(Action.DEAD, suppress=True, reason="hard bounce")
        is_4xx = verdict.code is not None and 400 <= verdict.code < 500
        if cls in (ReplyClass.POLICY_BLOCK, ReplyClass.MESSAGE_ERROR) and not is_4xx:
            return Decision(Action.DEAD, reason=cls.value.replace("_", " "))

        retry = self._lanes[lane]
        counted = cls not in _UNCOUNTED and not flushed
        if cls not in _UNCOUNTED and flushed:
            wait = retry.delay(max(attempts, 1), self._rng)
        elif counted:
            used = attempts + 1
            if used >= retry.max_attempts:
                return Decision(Action.DEAD, reason=f"max_attempts {retry.max_attempts} reached")
            wait = retry.delay(used, self._rng)
        elif cls is ReplyClass.THROTTLED:
            wait = cool_down if cool_down is not None else retry.delay(1, self._rng)
        else:  # connection: back off over consecutive deferrals, without using attempts
            wait = retry.delay(attempts + deferrals + 1, self._rng)
        if cool_down is not None:
            wait = max(wait, cool_down)
        next_at = now + wait
        if next_at >= created_at + retry.max_age:
            return Decision(
                Action.DEAD,
                counted=counted,
                reason=f"max_age {format_duration(retry.max_age)} reached before the next try",
            )
        return Decision(Action.RETRY, next_attempt_at=next_at, counted=counted)
