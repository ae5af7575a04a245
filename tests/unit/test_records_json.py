"""The JSON documents of the records that derive theirs from their fields (``JsonRecord``): the
keys, their order and the rendered values, exactly as the CLI and the HTTP API print them."""

from __future__ import annotations

import json
from typing import Any

from postlane.classify import ReplyClass
from postlane.feedback.providers.recorder import RecordedEvents
from postlane.message import Lane, RecipientState
from postlane.records import (
    AttemptView,
    DeadGroup,
    EnqueueResult,
    LaneStats,
    Reply,
    Sample,
    SelectionCount,
)
from postlane.webhooks.operations import WebhookTestResult
from postlane.webhooks.sender import DeliveryFailure

T0 = 1_700_000_000.1234
AT = "2023-11-14T22:13:20.123Z"


def dumped(record: Any) -> str:
    return json.dumps(record.as_json())


def test_a_reply_names_its_class_class() -> None:
    reply = Reply(550, "5.1.1", "no such user", ReplyClass.HARD_BOUNCE)
    assert dumped(reply) == (
        '{"code": 550, "enhanced": "5.1.1", "text": "no such user", "class": "hard_bounce"}'
    )


def test_an_attempt_shows_its_time_in_iso_and_every_field_in_order() -> None:
    attempt = AttemptView(
        T0, ReplyClass.TEMPORARY, 451, "4.3.0", "later", 12, "mx", "google", False
    )
    assert dumped(attempt) == (
        f'{{"at": "{AT}", "class": "temporary", "code": 451, "enhanced": "4.3.0", '
        '"text": "later", "duration_ms": 12, "relay": "mx", "destination": "google", '
        '"counted": false}'
    )


def test_lane_stats_round_the_oldest_age_to_the_millisecond() -> None:
    assert LaneStats(1, 2, 3, 4, 5.12345, 6).as_json() == {
        "ready": 1,
        "deferred": 2,
        "held": 3,
        "sending": 4,
        "oldest_age_seconds": 5.123,
        "scheduled": 6,
    }


def test_operator_views_keep_their_keys_in_order() -> None:
    assert dumped(EnqueueResult("q1", True)) == '{"id": "q1", "duplicate": true}'
    count = SelectionCount(Lane.LOW, "example.net", RecipientState.DEAD, None, 3)
    assert dumped(count) == (
        '{"lane": "low", "domain": "example.net", "state": "dead", "class": null, "count": 3}'
    )
    group = DeadGroup(
        ReplyClass.POLICY_BLOCK, "example.net", 554, "5.7.1", "spam", 2, T0, T0 + 1, "q1"
    )
    assert list(group.as_json()) == [
        "class",
        "domain",
        "code",
        "enhanced",
        "reply",
        "count",
        "first_dead_at",
        "last_dead_at",
        "sample_id",
    ]
    assert group.as_json()["first_dead_at"] == AT


def test_a_sample_renames_and_rounds_its_age_and_leaves_out_what_it_never_showed() -> None:
    sample = Sample(
        at=T0,
        lane="*",
        oldest_age=1.23456,
        sent=6,
        paused=("google",),
        deferrals=9,
        soft_bounces=10,
        misconfigured=("ses",),
        bounced=11,
        complaints=12,
    )
    assert sample.as_json() == {
        "at": AT,
        "lane": "*",
        "ready": 0,
        "deferred": 0,
        "held": 0,
        "sending": 0,
        "oldest_age_seconds": 1.235,
        "sent": 6,
        "dead": 0,
        "hard_bounces": 0,
        "deferrals": 9,
        "soft_bounces": 10,
        "paused": ["google"],
        "misconfigured": ["ses"],
    }
    assert list(sample.as_json())[-4:] == ["deferrals", "soft_bounces", "paused", "misconfigured"]
    assert sample.params()["paused"] == '["google"]'


def test_webhook_records() -> None:
    failure = DeliveryFailure(T0, "app", "evt_1", "timeout", "timed out after 10s")
    assert dumped(failure) == (
        f'{{"at": "{AT}", "endpoint": "app", "webhook_id": "evt_1", "outcome": "timeout", '
        '"error": "timed out after 10s"}'
    )
    result = WebhookTestResult("app", "evt_test", True, 204, None, 0.123456)
    assert dumped(result) == (
        '{"endpoint": "app", "webhook_id": "evt_test", "ok": true, "status": 204, '
        '"error": null, "seconds": 0.123}'
    )


def test_recorded_events_count_what_was_recorded() -> None:
    assert RecordedEvents((), 1, 2, 3, 4).as_json() == {
        "recorded": 0,
        "duplicates": 1,
        "unmatched": 2,
        "ignored": 3,
    }
