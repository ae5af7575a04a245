"""The retry policy is pure: every decision here is computed with explicit times, no sleeping."""

from __future__ import annotations

import random

import pytest

from postlane.classify import ReplyClass, Verdict
from postlane.config import config_from_dict
from postlane.message import Lane
from postlane.policy import Action, Policy, RetryPolicy

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
