"""SendGrid's Event Webhook, signed, at ``POST /v1/webhooks/sendgrid``.

With signing turned on (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/
getting-started-event-webhook-security-features), each POST carries
``X-Twilio-Email-Event-Webhook-Signature`` (base64 of a DER ECDSA signature) and
``X-Twilio-Email-Event-Webhook-Timestamp``; the signature is over the timestamp followed by the
body's bytes, SHA-256, with the P-256 key whose public half is ``[webhooks.sendgrid]
verification_key``. A timestamp older (or further ahead) than ``max_age`` is refused.

The body is a JSON array of events; each names its recipient (``email``), the message's
``smtp-id`` (its Message-ID) and the custom args the transport set (``postlane_queue_id``):

================ ============================================ =================================
event            what postlane reads                          heard as
================ ============================================ =================================
``bounce``       ``type`` ``bounce``, ``status``, ``reason``   failed
``bounce``       ``type`` ``blocked`` (a soft bounce)          delayed: an event only
``dropped``      ``reason`` (``Bounced Address``, ...)         failed (``Bounced Address`` and
                                                              ``Invalid`` as a bad address)
``deferred``     ``response``                                 delayed
``delivered``    ``response``                                 delivered (history only)
``spamreport``   -                                            complained
================ ============================================ =================================

Other events (processed, open, click, unsubscribe, ...) are ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from functools import partial
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from postlane.feedback.providers import (
    Heard,
    Malformed,
    ProviderEvent,
    Received,
    Unverified,
    check_timestamp,
    message_id_header,
    read_json,
    text_of,
)
from postlane.feedback.providers.config import SendGridWebhook

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "SendGridReceiver", "sendgrid_events"]

PROVIDER = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
#: ``dropped`` reasons that say the address itself is bad
_BAD_ADDRESS_DROPS = ("bounced address", "invalid")


class SendGridReceiver:
    """Reads ``POST /v1/webhooks/sendgrid`` (see the module docstring)."""

    provider = PROVIDER

    def __init__(self, settings: SendGridWebhook) -> None:
        self.settings = settings

    async def receive(self, headers: Mapping[str, str], body: bytes, now: float) -> Received:
        self.verify(headers, body, now)
        events = read_json(body)
        if not isinstance(events, list):
            raise Malformed("expected a JSON array of events")
        return Received([e for item in events for e in sendgrid_events(item)])

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        signature_text = headers.get(SIGNATURE_HEADER.lower(), "")
        timestamp = headers.get(TIMESTAMP_HEADER.lower(), "")
        if not signature_text or not timestamp:
            raise Unverified(f"no {SIGNATURE_HEADER} and {TIMESTAMP_HEADER}")
        check_timestamp(timestamp, now, self.settings.max_age, TIMESTAMP_HEADER)
        try:
            signature = base64.b64decode(signature_text, validate=True)
        except (binascii.Error, ValueError):
            raise Unverified(f"{SIGNATURE_HEADER} is not base64") from None
        try:
            self.settings.public_key.verify(
                signature, timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise Unverified("the signature does not match") from None


def sendgrid_events(item: Any) -> list[ProviderEvent]:
    """The event one item of SendGrid's array tells (none for events postlane does not take)."""
    if not isinstance(item, dict):
        return []
    recipient = text_of(item.get("email"))
    kind = text_of(item.get("event"))
    if recipient is None or kind is None:
        return []
    event = partial(
        ProviderEvent,
        PROVIDER,
        recipient=recipient,
        queue_id=text_of(item.get("postlane_queue_id")),
        message_id=message_id_header(item.get("smtp-id")),
        event_id=text_of(item.get("sg_event_id")),
        raw=item,
    )
    reason = text_of(item.get("reason"))
    response = text_of(item.get("response"))
    if kind == "bounce":
        blocked = text_of(item.get("type")) == "blocked"
        return [
            event(
                Heard.DELAYED if blocked else Heard.FAILED,
                status=text_of(item.get("status")) or ("4.0.0" if blocked else "5.0.0"),
                diagnostic=reason,
                label=f"bounce/{'blocked' if blocked else 'bounce'}",
            )
        ]
    if kind == "dropped":
        status = "5.1.1" if (reason or "").lower() in _BAD_ADDRESS_DROPS else "5.0.0"
        diagnostic = f"dropped by SendGrid: {reason or 'no reason given'}"
        return [event(Heard.FAILED, status=status, diagnostic=diagnostic, label="dropped")]
    if kind == "deferred":
        return [event(Heard.DELAYED, status="4.0.0", diagnostic=response or reason, label=kind)]
    if kind == "delivered":
        return [event(Heard.DELIVERED, status="2.0.0", diagnostic=response, label=kind)]
    if kind == "spamreport":
        return [event(Heard.COMPLAINED, complaint_type="abuse", label=kind)]
    return []
