"""The retry policy is pure: every decision here is computed with explicit times, no sleeping."""

from __future__ import annotations

import random

import pytest

from postlane.classify import ReplyClass, Verdict
from postlane.config import config_from_dict
from postlane.message import Lane, RecipientState
from postlane.policy import Action, Policy, RetryPolicy, untried
from postlane.records import AttemptRecord, Delivery, Outcome

T0 = 1_800_000_000.0
DELAYS = (60.0, 300.0, 900.0)


def policy(max_attempts: int = 5, max_age: float = 86400.0, jitter: float = 0.0) -> Policy:
    retry = RetryPolicy(DELAYS, max_attempts, max_age, jitter)
    return Policy({lane: retry for lane in Lane}, random.Random(7))


def verdict(cls: ReplyClass, code: int | None = 450) -> Verdict:
    return Verdict(cls, code, None, "text")


def decide(
    p: Policy, v: Verdict, attempts: int = 0, deferrals: int = 0, now: float = T0, **kw: float
):
    return p.decide(
        v, lane=Lane.NORMAL, attempts=attempts, deferrals=deferrals, created_at=T0, now=now, **kw
    )


def test_delivered_is_sent() -> None:
    assert decide(policy(), verdict(ReplyClass.DELIVERED, 250)).action is Action.SEND


@pytest.mark.parametrize("cls", [ReplyClass.TEMPORARY, ReplyClass.SOFT_BOUNCE])
def test_retry_follows_the_staged_schedule_and_the_last_delay_repeats(cls: ReplyClass) -> None:
    p = policy(max_attempts=10)
    waits = []
    now = T0
    for attempts in range(5):
        d = decide(p, verdict(cls), attempts=attempts, now=now)
        assert d.action is Action.RETRY and d.counted
        assert d.next_attempt_at is not None
        waits.append(d.next_attempt_at - now)
        now = d.next_attempt_at
    assert waits == [60, 300, 900, 900, 900]


def test_max_attempts_dead_letters() -> None:
    p = policy(max_attempts=3)
    assert decide(p, verdict(ReplyClass.TEMPORARY), attempts=1).action is Action.RETRY
    d = decide(p, verdict(ReplyClass.TEMPORARY), attempts=2)
    assert d.action is Action.DEAD and "max_attempts 3" in (d.reason or "")


@pytest.mark.parametrize("cls", [ReplyClass.TEMPORARY, ReplyClass.SOFT_BOUNCE])
def test_a_flushed_try_that_fails_for_a_while_uses_no_attempt(cls: ReplyClass) -> None:
    """An operator audit: seven flushes in twelve seconds dead-lettered a message with its
    two days of max_age ahead (max_attempts reached). A try an operator made due uses none."""
    p = policy(max_attempts=5)
    d = decide(p, verdict(cls), attempts=4, flushed=True)
    assert d.action is Action.RETRY and not d.counted
    assert d.next_attempt_at == T0 + DELAYS[-1]  # as long as after the last counted try
    assert decide(p, verdict(cls), attempts=0, flushed=True).next_attempt_at == T0 + DELAYS[0]
    # the schedule's own try counts, and the fifth dead-letters as before
    assert decide(p, verdict(cls), attempts=4).action is Action.DEAD
    # a flushed try's permanent failure is as final as any, and max_age still bounds it
    assert decide(p, verdict(ReplyClass.HARD_BOUNCE, 550), flushed=True).action is Action.DEAD
    late = decide(p, verdict(cls), attempts=1, now=T0 + 86400 - 30, flushed=True)
    assert late.action is Action.DEAD


@pytest.mark.parametrize("cls", [ReplyClass.THROTTLED, ReplyClass.CONNECTION])
def test_throttled_and_connection_use_no_attempt(cls: ReplyClass) -> None:
    p = policy(max_attempts=2)
    d = decide(p, verdict(cls, 421), attempts=1, deferrals=40)
    assert d.action is Action.RETRY
    assert d.counted is False


def test_421_defers_by_the_destination_cool_down() -> None:
    d = decide(policy(), verdict(ReplyClass.THROTTLED, 421), cool_down=17.0)
    assert d.next_attempt_at == T0 + 17.0


def test_connection_failures_back_off_over_deferrals() -> None:
    p = policy()
    first = decide(p, verdict(ReplyClass.CONNECTION, None), deferrals=0)
    third = decide(p, verdict(ReplyClass.CONNECTION, None), deferrals=2)
    assert first.next_attempt_at == T0 + 60
    assert third.next_attempt_at == T0 + 900


def test_hard_bounce_dead_letters_and_suppresses() -> None:
    d = decide(policy(), verdict(ReplyClass.HARD_BOUNCE, 550))
    assert d.action is Action.DEAD and d.suppress


@pytest.mark.parametrize("cls", [ReplyClass.POLICY_BLOCK, ReplyClass.MESSAGE_ERROR])
def test_5xx_policy_and_message_errors_dead_letter_without_suppressing(cls: ReplyClass) -> None:
    d = decide(policy(), verdict(cls, 554))
    assert d.action is Action.DEAD and not d.suppress


@pytest.mark.parametrize("cls", [ReplyClass.POLICY_BLOCK, ReplyClass.MESSAGE_ERROR])
def test_4xx_policy_and_message_errors_retry(cls: ReplyClass) -> None:
    d = decide(policy(), verdict(cls, 451))
    assert d.action is Action.RETRY and d.counted and not d.suppress


def test_max_age_dead_letters_when_the_next_try_would_be_too_late() -> None:
    p = policy(max_age=3600)
    d = decide(p, verdict(ReplyClass.TEMPORARY), attempts=2, now=T0 + 3000)
    assert d.action is Action.DEAD and "max_age" in (d.reason or "")


def test_max_age_bounds_uncounted_deferrals_too() -> None:
    p = policy(max_age=600)
    d = decide(p, verdict(ReplyClass.THROTTLED, 421), now=T0 + 590, cool_down=30)
    assert d.action is Action.DEAD and d.counted is False


def test_refuse_before_sending_covers_abandoned_leases_and_lowered_limits() -> None:
    p = policy(max_attempts=3, max_age=3600)
    assert p.refuse_before_sending(Lane.NORMAL, attempts=0, created_at=T0, now=T0 + 10) is None
    assert "max_age" in (
        p.refuse_before_sending(Lane.NORMAL, attempts=0, created_at=T0, now=T0 + 3600) or ""
    )
    assert "max_attempts" in (
        p.refuse_before_sending(Lane.NORMAL, attempts=3, created_at=T0, now=T0) or ""
    )


def test_jitter_spreads_within_bounds() -> None:
    p = policy(jitter=0.1, max_attempts=100)
    waits = {decide(p, verdict(ReplyClass.TEMPORARY)).next_attempt_at - T0 for _ in range(200)}  # type: ignore[operator]
    assert min(waits) >= 54 and max(waits) <= 66 and len(waits) > 50


def test_per_lane_overrides_come_from_config() -> None:
    config = config_from_dict(
        {
            "retry": {"delays": ["1m"], "max_attempts": 8, "max_age": "2d"},
            "lanes": {"high": {"max_age": "1h", "max_attempts": 3}, "low": {"delays": ["1h"]}},
        }
    )
    p = Policy.from_config(config)
    assert p.for_lane(Lane.HIGH).max_age == 3600
    assert p.for_lane(Lane.HIGH).max_attempts == 3
    assert p.for_lane(Lane.NORMAL).max_age == 172800
    assert p.for_lane(Lane.LOW).delays == (3600,)
    assert p.for_lane(Lane.NORMAL).delays == (60,)


# -- a server's Retry-After ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (ReplyClass.TEMPORARY, 503),  # a provider API's 503 with Retry-After
        (ReplyClass.SOFT_BOUNCE, 452),
        (ReplyClass.POLICY_BLOCK, 451),
        (ReplyClass.MESSAGE_ERROR, 451),
    ],
)
def test_a_counted_retry_waits_for_the_servers_retry_after(cls: ReplyClass, code: int) -> None:
    # the schedule says 60 s; the server asked for 10 minutes
    d = decide(policy(), verdict(cls, code), cool_down=600.0)
    assert d.action is Action.RETRY and d.counted
    assert d.next_attempt_at == T0 + 600


def test_a_short_retry_after_never_brings_a_counted_retry_before_the_schedule() -> None:
    d = decide(policy(), verdict(ReplyClass.TEMPORARY, 503), attempts=1, cool_down=5.0)
    assert d.next_attempt_at == T0 + 300  # the second delay, not 5 s


def test_a_connection_deferral_waits_for_the_servers_retry_after() -> None:
    d = decide(policy(), verdict(ReplyClass.CONNECTION, None), cool_down=600.0)
    assert d.action is Action.RETRY and not d.counted
    assert d.next_attempt_at == T0 + 600


# -- max_age, at its boundary ------------------------------------------------------------------


def test_a_retry_due_exactly_at_expiry_is_dead_lettered_instead() -> None:
    p = policy(max_age=3600)
    # the next try would be at T0 + 3600: the message's expiry itself
    d = decide(p, verdict(ReplyClass.TEMPORARY), now=T0 + 3540)
    assert d.action is Action.DEAD and "max_age 1h" in (d.reason or "")
    # a second earlier, it is the last try allowed
    d = decide(p, verdict(ReplyClass.TEMPORARY), now=T0 + 3539)
    assert d.action is Action.RETRY and d.next_attempt_at == T0 + 3599


def test_an_uncounted_deferral_due_exactly_at_expiry_is_dead_lettered_instead() -> None:
    p = policy(max_age=3600)
    d = decide(p, verdict(ReplyClass.THROTTLED, 421), now=T0 + 3570, cool_down=30.0)
    assert d.action is Action.DEAD and d.counted is False
    d = decide(p, verdict(ReplyClass.THROTTLED, 421), now=T0 + 3569, cool_down=30.0)
    assert d.action is Action.RETRY and d.next_attempt_at == T0 + 3599


def test_a_delivery_claimed_exactly_at_expiry_is_refused_without_a_try() -> None:
    p = policy(max_age=3600)
    at_expiry = p.refuse_before_sending(Lane.NORMAL, attempts=0, created_at=T0, now=T0 + 3600)
    assert at_expiry == "max_age 1h exceeded"
    just_before = p.refuse_before_sending(Lane.NORMAL, attempts=0, created_at=T0, now=T0 + 3599.999)
    assert just_before is None


# -- from a decision to the delivery's new state ----------------------------------------------


def delivery(attempts: int = 2, deferrals: int = 3) -> Delivery:
    return Delivery(7, "ada@example.net", "example.net", "example.net", attempts, deferrals, T0)


def attempt_record(cls: ReplyClass, counted: bool = True) -> AttemptRecord:
    return AttemptRecord(T0, cls, 450, None, "text", "smtp://relay", "example.net", 12, counted)


def test_a_counted_retry_uses_an_attempt_and_waits_deferred() -> None:
    d = decide(policy(), verdict(ReplyClass.TEMPORARY), attempts=2, deferrals=3)
    attempt = attempt_record(ReplyClass.TEMPORARY)
    outcome = d.outcome(delivery(), attempt)
    assert outcome == Outcome(
        delivery_id=7,
        state=RecipientState.DEFERRED,
        attempts=3,
        deferrals=3,
        next_attempt_at=T0 + 900,
        attempt=attempt,
    )


def test_an_uncounted_deferral_counts_a_deferral_not_an_attempt() -> None:
    d = decide(policy(), verdict(ReplyClass.THROTTLED, 421), cool_down=60.0)
    outcome = d.outcome(delivery(), attempt_record(ReplyClass.THROTTLED, counted=False))
    assert (outcome.state, outcome.attempts, outcome.deferrals) == (RecipientState.DEFERRED, 2, 4)
    assert outcome.next_attempt_at == T0 + 60


def test_a_hard_bounce_becomes_a_suppressed_dead_letter_with_its_reason() -> None:
    d = decide(policy(), verdict(ReplyClass.HARD_BOUNCE, 550))
    outcome = d.outcome(delivery(), attempt_record(ReplyClass.HARD_BOUNCE))
    assert (outcome.state, outcome.attempts, outcome.next_attempt_at) == (
        RecipientState.DEAD,
        3,
        None,
    )
    assert outcome.suppress and outcome.reason == "hard bounce"


def test_a_delivered_reply_is_sent() -> None:
    d = decide(policy(), verdict(ReplyClass.DELIVERED, 250))
    outcome = d.outcome(delivery(), attempt_record(ReplyClass.DELIVERED))
    assert (outcome.state, outcome.attempts, outcome.suppress) == (RecipientState.SENT, 3, False)


def test_an_untried_delivery_keeps_its_counts_and_last_reply() -> None:
    outcome = untried(delivery(), RecipientState.DEAD, "max_age 1h exceeded")
    assert outcome == Outcome(
        delivery_id=7,
        state=RecipientState.DEAD,
        attempts=2,
        deferrals=3,
        next_attempt_at=None,
        attempt=None,  # the last real reply stays the dead letter's last response
        reason="max_age 1h exceeded",
    )
