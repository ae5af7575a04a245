"""Reading the providers' events (pure): what each says, in a DSN's terms, and the class the
classifier gives it; which SNS certificate URLs are Amazon's; and that each transport attaches
what its provider's webhook events are matched by."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from postlane.classify import ReplyClass
from postlane.feedback import DeliveryRef, FeedbackKind
from postlane.feedback.inbound import feedback_for
from postlane.feedback.providers import Heard, ProviderEvent, Unverified, check_timestamp
from postlane.feedback.providers.mailgun import SeenTokens, mailgun_events
from postlane.feedback.providers.postmark import postmark_events
from postlane.feedback.providers.sendgrid import sendgrid_events
from postlane.feedback.providers.ses import ses_events
from postlane.feedback.providers.sns import aws_sns_url
from postlane.message import Lane, RecipientState

DATA = Path(__file__).parent.parent / "data" / "provider_webhooks"
VALUES = {
    "recipient": "ada@example.net",
    "queue_id": "01JQUEUEID",
    "message_id": "<m1@shop.example>",
    "bare_message_id": "m1@shop.example",
    "timestamp": "1800000000",
    "token": "t",
    "signature": "s",
}
REF = DeliveryRef(
    7, "01JQUEUEID", "ada@example.net", RecipientState.SENT, "news@shop.example", Lane.NORMAL
)


def sample(name: str) -> Any:
    text = (DATA / name).read_text()
    for key, value in VALUES.items():
        text = text.replace("{{" + key + "}}", value)
    return json.loads(text)


def classified(event: ProviderEvent) -> tuple[FeedbackKind, ReplyClass | None, bool]:
    item, _ = feedback_for(event.recipient_status(), REF, source=event.source, at=0.0)
    return item.kind, item.cls, item.suppression is not None


def test_an_ses_permanent_bounce_is_a_hard_bounce_matched_by_its_tag() -> None:
    [event] = ses_events(sample("ses-bounce.json"))
    assert (event.heard, event.recipient, event.queue_id, event.message_id) == (
        Heard.FAILED,
        "ada@example.net",
        "01JQUEUEID",
        "<m1@shop.example>",
    )
    assert classified(event) == (FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, True)


def test_an_ses_transient_bounce_and_a_delay_are_events_only() -> None:
    data = sample("ses-bounce.json")
    data["bounce"]["bounceType"] = "Transient"
    data["bounce"]["bounceSubType"] = "MailboxFull"
    data["bounce"]["bouncedRecipients"][0].update(
        status="4.2.2", diagnosticCode="smtp; 452 4.2.2 mailbox full"
    )
    [transient] = ses_events(data)
    assert transient.heard is Heard.DELAYED
    assert classified(transient)[0] in (FeedbackKind.SOFT_BOUNCE, FeedbackKind.DELAYED)
    [delay] = ses_events(sample("ses-delivery-delay.json"))
    assert (delay.heard, classified(delay)[2]) == (Heard.DELAYED, False)


def test_an_ses_policy_block_bounces_without_suppressing() -> None:
    data = sample("ses-bounce.json")
    data["bounce"]["bouncedRecipients"][0].update(
        status="5.7.1", diagnosticCode="smtp; 550 5.7.1 Message rejected due to local policy"
    )
    [event] = ses_events(data)
    kind, cls, suppressed = classified(event)
    assert (kind, suppressed) == (FeedbackKind.BOUNCED, False)
    assert cls is not ReplyClass.HARD_BOUNCE


def test_ses_identity_notifications_and_other_messages() -> None:
    [delivery] = ses_events(sample("ses-delivery.json"))
    assert (delivery.heard, delivery.queue_id, delivery.message_id) == (
        Heard.DELIVERED,
        None,
        "<m1@shop.example>",
    )
    assert ses_events({"eventType": "Open", "mail": {}}) == []
    assert ses_events("Successfully validated SNS topic") == []
    [complaint] = ses_events(sample("ses-complaint.json"))
    assert (complaint.heard, complaint.complaint_type) == (Heard.COMPLAINED, "abuse")


def test_sendgrid_events() -> None:
    events = [e for item in sample("sendgrid-events.json") for e in sendgrid_events(item)]
    assert [e.heard for e in events] == [Heard.DELAYED, Heard.FAILED]
    assert all(e.queue_id == "01JQUEUEID" for e in events)
    blocked = sendgrid_events(
        {
            "email": "a@b.example",
            "event": "bounce",
            "type": "blocked",
            "reason": "421 try later",
            "status": "4.0.0",
        }
    )
    assert blocked[0].heard is Heard.DELAYED
    dropped = sendgrid_events(
        {"email": "a@b.example", "event": "dropped", "reason": "Bounced Address"}
    )
    assert classified(dropped[0])[1:] == (ReplyClass.HARD_BOUNCE, True)
    unsubscribed = sendgrid_events(
        {"email": "a@b.example", "event": "dropped", "reason": "Unsubscribed Address"}
    )
    assert classified(unsubscribed[0])[0::2] == (FeedbackKind.BOUNCED, False)
    assert sendgrid_events({"email": "a@b.example", "event": "click"}) == []
    assert sendgrid_events("not an event") == []


def test_postmark_records() -> None:
    [bounce] = postmark_events(sample("postmark-bounce.json"))
    assert classified(bounce) == (FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, True)
    soft = {**sample("postmark-bounce.json"), "Type": "SoftBounce", "Details": "mailbox full"}
    assert postmark_events(soft)[0].heard is Heard.DELAYED
    assert postmark_events({**soft, "Type": "AutoResponder"}) == []
    [complaint] = postmark_events(sample("postmark-spam-complaint.json"))
    assert complaint.heard is Heard.COMPLAINED
    [delivery] = postmark_events(sample("postmark-delivery.json"))
    assert (delivery.heard, delivery.queue_id) == (Heard.DELIVERED, "01JQUEUEID")
    assert postmark_events({"RecordType": "Open", "Recipient": "a@b.example"}) == []


def test_mailgun_events() -> None:
    data = sample("mailgun-failed-permanent.json")["event-data"]
    [failed] = mailgun_events(data)
    assert (failed.queue_id, failed.message_id) == ("01JQUEUEID", "<m1@shop.example>")
    assert classified(failed) == (FeedbackKind.BOUNCED, ReplyClass.HARD_BOUNCE, True)
    temporary = {
        **data,
        "severity": "temporary",
        "reason": "generic",
        "delivery-status": {"code": 452, "message": "4.2.2 Mailbox full"},
    }
    assert mailgun_events(temporary)[0].heard is Heard.DELAYED
    suppressed = {
        **data,
        "reason": "suppress-bounce",
        "delivery-status": {"code": 605, "message": "Not delivering to previously bounced address"},
    }
    assert classified(mailgun_events(suppressed)[0])[1:] == (ReplyClass.HARD_BOUNCE, True)
    [complaint] = mailgun_events(sample("mailgun-complained.json")["event-data"])
    assert complaint.heard is Heard.COMPLAINED
    assert mailgun_events({**data, "event": "opened"}) == []


def test_each_event_carries_the_providers_id_of_it() -> None:
    """What a repeat of an event is known by (a provider delivers at least once): its id, or,
    for the deliveries and delays of providers that give them none, the message and time."""
    [ses_bounce] = ses_events(sample("ses-bounce.json"))
    assert ses_bounce.key == (
        "webhook:ses:Bounce/0100017b2f5a2b61-c1f2b1e3-0c2c-4a6b-9b4e-5e7d0a8c3f21-000000"
    )
    [ses_delay] = ses_events(sample("ses-delivery-delay.json"))
    [ses_delivery] = ses_events(sample("ses-delivery.json"))
    for event, kind in ((ses_delay, "DeliveryDelay"), (ses_delivery, "Delivery")):
        assert event.event_id is not None and event.event_id.startswith(f"{kind}/")
        assert event.event_id.count("/") == 2  # SES's message id, then the time
    keys = [e.key for e in sendgrid_events_of(sample("sendgrid-events.json"))]
    assert keys == [
        "webhook:sendgrid:rbtnWrG1DVDGGGFHFyun0A==",
        "webhook:sendgrid:6g4ZI7SA-xmRDv57GoPIPw==",
    ]
    [failed] = mailgun_events(sample("mailgun-failed-permanent.json")["event-data"])
    assert failed.key == "webhook:mailgun:G9Bn5sl1TC6nu79C8C0bwg"
    [bounce] = postmark_events(sample("postmark-bounce.json"))
    assert bounce.key == "webhook:postmark:Bounce/4323372036854775807"
    [delivered] = postmark_events(sample("postmark-delivery.json"))
    assert delivered.key == (
        "webhook:postmark:Delivery/00000000-0000-0000-0000-000000000000/2021-02-21T16:34:52Z"
    )
    assert ProviderEvent("sendgrid", Heard.DELAYED, "a@example.net").key is None


def sendgrid_events_of(items: list[Any]) -> list[ProviderEvent]:
    return [event for item in items for event in sendgrid_events(item)]


def test_mailgun_tokens_are_taken_once_until_they_expire() -> None:
    seen = SeenTokens(max_age=300)
    assert seen.claim("a", 0.0)
    assert not seen.claim("a", 10.0)
    seen.release("a")
    assert seen.claim("a", 20.0)
    assert seen.claim("a", 20.0 + 601)  # expired: long past any timestamp max_age accepts
    small = SeenTokens(max_age=300, limit=2)
    assert small.claim("x", 0) and small.claim("y", 0) and small.claim("z", 0)


@pytest.mark.parametrize(
    ("timestamp", "error"),
    [
        ("1000", None),
        ("1300", None),  # exactly max_age ahead
        ("700", None),  # exactly max_age old
        ("1301", "X-Timestamp is outside max_age"),
        ("699", "X-Timestamp is outside max_age"),
        ("-1000", "X-Timestamp is not Unix seconds"),
        ("1e3", "X-Timestamp is not Unix seconds"),
        ("\u0661\u0662", "X-Timestamp is not Unix seconds"),  # digits, but not ASCII ones
        ("9" * 5000, "X-Timestamp is not Unix seconds"),  # more digits than int() takes
        ("0" * 19, "X-Timestamp is not Unix seconds"),
    ],
)
def test_a_signed_timestamp_is_unix_seconds_within_max_age(
    timestamp: str, error: str | None
) -> None:
    if error is None:
        check_timestamp(timestamp, 1000.0, 300.0, "X-Timestamp")
        return
    with pytest.raises(Unverified, match=f"^{re.escape(error)}$"):
        check_timestamp(timestamp, 1000.0, 300.0, "X-Timestamp")


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
        ("https://sns.us-east-1.amazonaws.com:443/x.pem", True),
        ("http://sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com.evil.example/x.pem", False),
        ("https://evil.example/sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com@evil.example/x.pem", False),
        ("https://user@sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com:8443/x.pem", False),
        ("https://s3.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com:bad/x.pem", False),
    ],
)
def test_only_amazons_sns_hosts_sign(url: str, allowed: bool) -> None:
    assert aws_sns_url(url) is allowed


# -- what the transports attach is what the events are matched by --------------------------------

CONTENT = (
    b"From: Shop <news@shop.example>\r\nTo: ada@example.net\r\nSubject: Deals\r\n"
    b"Message-ID: <m1@shop.example>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nHalf price.\r\n"
)


def sent_request(transport: Any) -> Any:
    from postlane.transports.base import Envelope

    envelope = Envelope(
        "01JQUEUEID", "news@shop.example", ("ada@example.net",), CONTENT, "<m1@shop.example>"
    )
    [call] = transport.calls(envelope, ["ada@example.net"])
    return call.request


def test_each_transports_tag_comes_back_in_its_providers_events() -> None:
    from postlane.transports.mailgun import MailgunTransport
    from postlane.transports.postmark import PostmarkTransport
    from postlane.transports.sendgrid import SendGridTransport
    from postlane.transports.ses import SESTransport

    # SES: EmailTags come back in mail.tags as {name: [value]}
    ses = json.loads(sent_request(SESTransport("AKID", "secret", "us-east-1")).content)
    tags = {tag["Name"]: [tag["Value"]] for tag in ses["EmailTags"]}
    data = sample("ses-bounce.json")
    data["mail"]["tags"] = tags
    assert ses_events(data)[0].queue_id == "01JQUEUEID"
    # SendGrid: custom_args come back at the top level of each event
    sendgrid = json.loads(sent_request(SendGridTransport("SG.key")).content)
    event = {"email": "ada@example.net", "event": "delivered", **sendgrid["custom_args"]}
    assert sendgrid_events(event)[0].queue_id == "01JQUEUEID"
    # Postmark: Metadata comes back as Metadata
    postmark = json.loads(sent_request(PostmarkTransport("token")).content)
    record = {**sample("postmark-delivery.json"), "Metadata": postmark["Metadata"]}
    assert postmark_events(record)[0].queue_id == "01JQUEUEID"
    # Mailgun: v:NAME form fields come back in user-variables as NAME
    request = sent_request(MailgunTransport("key", "mg.shop.example"))
    body = request.read().decode("latin-1")
    fields = dict(re.findall(r'name="v:([^"]+)"\r\n\r\n([^\r]*)\r\n', body))
    data = {**sample("mailgun-complained.json")["event-data"], "user-variables": fields}
    assert mailgun_events(data)[0].queue_id == "01JQUEUEID"
