"""What each recipient status of a report is recorded as (docs/bounces.md's table): the class
comes from classify(), the kind and the suppression from the action and the class."""

from __future__ import annotations

import pytest

from postlane.classify import ReplyClass
from postlane.feedback import DeliveryRef, FeedbackKind
from postlane.feedback.inbound import feedback_for
from postlane.feedback.reports import Action, RecipientStatus
from postlane.message import Lane, RecipientState

REF = DeliveryRef(42, "q1", "ada@example.net", RecipientState.SENT, "app@shop.example", Lane.NORMAL)
HARD = ("*", "hard_bounce", None)


@pytest.mark.parametrize(
    ("action", "status", "diagnostic", "kind", "cls", "suppression"),
    [
        (Action.FAILED, "5.1.1", "550 5.1.1 <ada@example.net>: user unknown",
         FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, HARD),
        (Action.FAILED, "5.7.1", "554 5.7.1 Service unavailable; blocked using zen.spamhaus.org",
         FeedbackKind.BOUNCED, ReplyClass.POLICY_BLOCK, None),
        (Action.FAILED, "5.3.4", "552 5.3.4 Message size exceeds fixed limit",
         FeedbackKind.BOUNCED, ReplyClass.MESSAGE_ERROR, None),
        (Action.FAILED, "4.2.2", "452 4.2.2 Mailbox full",
         FeedbackKind.BOUNCED, ReplyClass.SOFT_BOUNCE, None),
        (Action.FAILED, "4.4.1", "X-Postfix; connect to mx.example.net: Connection timed out",
         FeedbackKind.BOUNCED, ReplyClass.TEMPORARY, None),
        (Action.FAILED, "5.1.1", "250 2.0.0 Ok",  # the relay's last 2xx, with a failure status
         FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, HARD),
        (Action.FAILED, None, None,
         FeedbackKind.BOUNCED, ReplyClass.POLICY_BLOCK, None),
        (Action.DELAYED, "4.2.2", "452 4.2.2 Mailbox full",
         FeedbackKind.SOFT_BOUNCE, ReplyClass.SOFT_BOUNCE, None),
        (Action.DELAYED, "4.4.1", "451 4.4.1 Connection timed out",
         FeedbackKind.DELAYED, ReplyClass.TEMPORARY, None),
        (Action.DELAYED, None, "451 4.7.1 Rate limit exceeded",
         FeedbackKind.DELAYED, ReplyClass.THROTTLED, None),
        (Action.DELIVERED, "2.0.0", "250 2.0.0 OK",
         FeedbackKind.DELIVERED, ReplyClass.DELIVERED, None),
        (Action.RELAYED, "2.0.0", None,
         FeedbackKind.DELIVERED, ReplyClass.DELIVERED, None),
        (Action.EXPANDED, None, None,
         FeedbackKind.DELIVERED, ReplyClass.DELIVERED, None),
    ],
)  # fmt: skip
def test_each_action_and_class_is_recorded_as_the_table_says(
    action: Action,
    status: str | None,
    diagnostic: str | None,
    kind: FeedbackKind,
    cls: ReplyClass,
    suppression: tuple[str, str, None] | None,
) -> None:
    report = RecipientStatus(action, "ada@example.net", status=status, diagnostic=diagnostic)
    item, verdict = feedback_for(report, REF, source="dsn", at=1.0)
    assert (item.kind, item.cls, item.suppression) == (kind, cls, suppression)
    assert (item.delivery_id, item.source, item.at) == (42, "dsn", 1.0)
    assert item.cls is verdict.cls and item.code == verdict.code


def test_the_recorded_text_is_the_reply_as_classified() -> None:
    report = RecipientStatus(
        Action.FAILED, status="5.1.1", diagnostic="550 <ada@example.net>: Recipient rejected"
    )
    item, _ = feedback_for(report, REF, source="plain-bounce", at=0.0)
    assert item.text == "550 5.1.1 <ada@example.net>: Recipient rejected"
    assert (item.code, item.enhanced) == (550, "5.1.1")
