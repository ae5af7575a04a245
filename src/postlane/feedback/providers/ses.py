"""Amazon SES events, delivered by SNS to ``POST /v1/webhooks/ses``.

SES publishes either identity notifications (``notificationType``) or a configuration set's
event publishing (``eventType``, https://docs.aws.amazon.com/ses/latest/dg/
event-publishing-retrieving-sns-contents.html); both carry the same objects:

=================== ========================================= ==================================
SES                 what postlane reads                       heard as
=================== ========================================= ==================================
``Bounce``          ``bounceType`` ``Permanent``              failed (suppressed if the reply
                    (``Undetermined`` too)                    says the address is bad)
``Bounce``          ``bounceType`` ``Transient``              delayed: an event only
``Complaint``       ``complainedRecipients``,                 complained (``not-spam`` is kept
                    ``complaintFeedbackType``                 unmatched: it is no complaint)
``DeliveryDelay``   ``delayedRecipients``                     delayed
``Delivery``        ``recipients``, ``smtpResponse``          delivered (history only)
=================== ========================================= ==================================

Each recipient's ``status`` and ``diagnosticCode`` are read as a DSN's. The message is found by
the tag ``postlane_queue_id`` (``mail.tags``, event publishing only) with the recipient, else by
its Message-ID (``mail.commonHeaders.messageId``). Other SNS messages on the topic (the test
notification SES sends when a topic is set up, other event types) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import httpx

from postlane.feedback.providers import (
    Heard,
    Malformed,
    ProviderEvent,
    Received,
    Unverified,
    message_id_header,
    read_json,
    text_of,
)
from postlane.feedback.providers.config import SESWebhook
from postlane.feedback.providers.sns import SigningCertificates, SNSMessage

__all__ = ["SESReceiver", "ses_events"]

log = logging.getLogger("postlane.webhooks.ses")

PROVIDER = "ses"


class SESReceiver:
    """Reads ``POST /v1/webhooks/ses``: an SNS message, verified, then the SES event in it."""

    provider = PROVIDER

    def __init__(self, settings: SESWebhook, certificates: SigningCertificates) -> None:
        self.settings = settings
        self.certificates = certificates

    async def receive(self, headers: Mapping[str, str], body: bytes, now: float) -> Received:
        message = SNSMessage.parse(read_json(body))
        await message.verify(self.settings.topic_arns, self.certificates, now)
        if message.type == "SubscriptionConfirmation":
            try:
                await message.confirm(self.certificates)
            except httpx.HTTPError as exc:
                # not confirmed: SNS sends the confirmation again, or the operator confirms it
                log.warning(
                    "could not confirm the SNS subscription to %s: %s", message.topic_arn, exc
                )
                raise Unverified(f"the subscription could not be confirmed: {exc}") from None
            log.info("confirmed the SNS subscription to %s", message.topic_arn)
            return Received([])
        if message.type != "Notification":
            return Received([])  # UnsubscribeConfirmation: nothing to do
        try:
            event = read_json(message.message.encode("utf-8"))
        except Malformed:
            return Received([])  # SES's test notification is plain text
        return Received(ses_events(event))


def ses_events(event: Any) -> list[ProviderEvent]:
    """The recipients' events in one SES event (an empty list for events postlane does not
    take, or that are not SES's)."""
    if not isinstance(event, dict):
        return []
    kind = event.get("eventType") or event.get("notificationType")
    mail = _mapping(event.get("mail"))
    tags = _mapping(mail.get("tags"))
    queue_ids = tags.get("postlane_queue_id")
    queue_id = text_of(queue_ids[0]) if isinstance(queue_ids, list) and queue_ids else None
    provider_event = partial(
        ProviderEvent,
        PROVIDER,
        queue_id=queue_id,
        message_id=message_id_header(_mapping(mail.get("commonHeaders")).get("messageId")),
        event_id=_event_id(kind, event, mail),
        raw=event,
    )
    if kind == "Bounce":
        return _bounce(_mapping(event.get("bounce")), provider_event)
    if kind == "Complaint":
        complaint = _mapping(event.get("complaint"))
        complaint_type = text_of(complaint.get("complaintFeedbackType")) or "abuse"
        return [
            provider_event(
                Heard.COMPLAINED, recipient=address, complaint_type=complaint_type, label=kind
            )
            for address in _addresses(complaint.get("complainedRecipients"))
        ]
    if kind == "DeliveryDelay":
        delay = _mapping(event.get("deliveryDelay"))
        label = f"DeliveryDelay/{text_of(delay.get('delayType')) or 'Undetermined'}"
        return [
            provider_event(
                Heard.DELAYED,
                recipient=address,
                status=text_of(item.get("status")) or "4.0.0",
                diagnostic=text_of(item.get("diagnosticCode")),
                label=label,
            )
            for address, item in _recipients(delay.get("delayedRecipients"))
        ]
    if kind == "Delivery":
        delivery = _mapping(event.get("delivery"))
        reply = text_of(delivery.get("smtpResponse"))
        return [
            provider_event(
                Heard.DELIVERED, recipient=address, status="2.0.0", diagnostic=reply, label=kind
            )
            for address in _plain_addresses(delivery.get("recipients"))
        ]
    return []


#: each SES event's part that holds its feedback id or its time
_EVENT_PARTS = {
    "Bounce": "bounce",
    "Complaint": "complaint",
    "Delivery": "delivery",
    "DeliveryDelay": "deliveryDelay",
}


def _event_id(kind: Any, event: Mapping[str, Any], mail: Mapping[str, Any]) -> str | None:
    """SES's id of a bounce or a complaint (``feedbackId``); a delivery or a delay has none,
    so its message (SES's ``messageId``) and time stand for one."""
    part = _mapping(event.get(_EVENT_PARTS.get(text_of(kind) or "", "")))
    found = text_of(part.get("feedbackId"))
    if found is not None:
        return f"{kind}/{found}"
    message, at = text_of(mail.get("messageId")), text_of(part.get("timestamp"))
    return f"{kind}/{message}/{at}" if message and at else None


def _bounce(
    bounce: Mapping[str, Any], provider_event: partial[ProviderEvent]
) -> list[ProviderEvent]:
    kind = text_of(bounce.get("bounceType")) or "Undetermined"
    subtype = text_of(bounce.get("bounceSubType")) or "General"
    heard = Heard.DELAYED if kind == "Transient" else Heard.FAILED
    # what SES's subtypes say when a recipient has no status of its own
    if heard is Heard.DELAYED:
        default = "4.0.0"
    elif kind == "Permanent" and subtype in (
        "General",
        "NoEmail",
        "Suppressed",
        "OnAccountSuppressionList",
    ):
        default = "5.1.1"
    else:
        default = "5.0.0"
    return [
        provider_event(
            heard,
            recipient=address,
            status=text_of(item.get("status")) or default,
            diagnostic=text_of(item.get("diagnosticCode")) or f"SES bounce {kind}/{subtype}",
            label=f"Bounce/{kind}/{subtype}",
        )
        for address, item in _recipients(bounce.get("bouncedRecipients"))
    ]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _recipients(items: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """``[{"emailAddress": ..., ...}]`` -> (address, item) pairs."""
    if not isinstance(items, list):
        return []
    return [
        (address, item)
        for item in items
        if isinstance(item, dict) and (address := text_of(item.get("emailAddress")))
    ]


def _addresses(items: Any) -> list[str]:
    return [address for address, _ in _recipients(items)]


def _plain_addresses(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [address for item in items if (address := text_of(item))]
