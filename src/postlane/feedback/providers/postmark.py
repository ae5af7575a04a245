"""Postmark's webhooks at ``POST /v1/webhooks/postmark``, behind HTTP basic auth.

Postmark does not sign its webhooks; it sends the credentials written in the webhook's URL
(``https://USER:PASSWORD@mail.example.com/v1/webhooks/postmark``,
https://postmarkapp.com/developer/webhooks/webhooks-overview), compared here in constant time
with ``[webhooks.postmark] username`` and ``password``.

One JSON object per request (https://postmarkapp.com/developer/webhooks/bounce-webhook,
.../spam-complaint-webhook, .../delivery-webhook), naming its recipient (``Email``,
``Recipient``) and carrying the transport's ``Metadata`` (``postlane_queue_id``):

================= ============================================== ==============================
``RecordType``    what postlane reads                            heard as
================= ============================================== ==============================
``Bounce``        ``Type`` ``HardBounce``, ``BadEmailAddress``,  failed (a bad address unless
                  ``Blocked``, ``SpamNotification``, ...        the reply says otherwise)
                  ``Details``, ``Description``
``Bounce``        ``Type`` ``SoftBounce``, ``Transient``,        delayed: an event only
                  ``DnsError``, ...
``SpamComplaint`` -                                              complained
``Delivery``      ``Details``                                    delivered (history only)
================= ============================================== ==============================

Bounce types that are no failure of the message (``AutoResponder``, ``Subscribe``,
``Unsubscribe``, ``AddressChange``, ...) and other record types (``Open``, ``Click``,
``SubscriptionChange``) are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from functools import partial
from typing import Any

from postlane.feedback.providers import (
    Heard,
    Malformed,
    ProviderEvent,
    Received,
    Unverified,
    read_json,
    text_of,
)
from postlane.feedback.providers.config import PostmarkWebhook

__all__ = ["PostmarkReceiver", "postmark_events"]

PROVIDER = "postmark"
#: bounce types that are a permanent failure, with the status they imply
_FAILED = {
    "HardBounce": "5.1.1",
    "BadEmailAddress": "5.1.1",
    "ManuallyDeactivated": "5.1.1",
    "Blocked": "5.7.1",
    "SpamNotification": "5.7.1",
    "ContentRelated": "5.6.0",
    "VirusNotification": "5.7.1",
}
#: bounce types that are a transient failure
_DELAYED = frozenset(
    {"SoftBounce", "Transient", "DnsError", "SMTPApiError", "ChallengeVerification", "Unknown"}
)


class PostmarkReceiver:
    """Reads ``POST /v1/webhooks/postmark`` (see the module docstring)."""

    provider = PROVIDER

    def __init__(self, settings: PostmarkWebhook) -> None:
        self.settings = settings

    async def receive(self, headers: Mapping[str, str], body: bytes, now: float) -> Received:
        self.verify(headers)
        data = read_json(body)
        if not isinstance(data, dict):
            raise Malformed("expected a JSON object with a RecordType")
        return Received(postmark_events(data))

    def verify(self, headers: Mapping[str, str]) -> None:
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise Unverified("no basic auth credentials")
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise Unverified("the basic auth credentials are not base64") from None
        # both compared, whatever the first says: the time taken tells nothing
        right_user = hmac.compare_digest(user, self.settings.username.encode())
        right_password = hmac.compare_digest(password, self.settings.password.encode())
        if not (sep and right_user and right_password):
            raise Unverified("wrong basic auth credentials")


def _event_id(record: str | None, data: Mapping[str, Any]) -> str | None:
    """Postmark's id of a bounce or a complaint (``ID``); a delivery has none, so its message
    and time stand for one."""
    found = text_of(data.get("ID"))
    if found is not None:
        return f"{record}/{found}"
    message, at = text_of(data.get("MessageID")), text_of(data.get("DeliveredAt"))
    return f"{record}/{message}/{at}" if record == "Delivery" and message and at else None


def postmark_events(data: Mapping[str, Any]) -> list[ProviderEvent]:
    """The event one Postmark webhook tells (none for what postlane does not take)."""
    record = text_of(data.get("RecordType"))
    # a delivery names its recipient ``Recipient``, a bounce and a complaint ``Email``
    recipient = text_of(data.get("Recipient" if record == "Delivery" else "Email"))
    if recipient is None:
        return []
    metadata = data.get("Metadata")
    event = partial(
        ProviderEvent,
        PROVIDER,
        recipient=recipient,
        queue_id=text_of(metadata.get("postlane_queue_id")) if isinstance(metadata, dict) else None,
        event_id=_event_id(record, data),
        raw=data,
    )
    if record == "Bounce":
        kind = text_of(data.get("Type")) or "Unknown"
        details = text_of(data.get("Details")) or text_of(data.get("Description"))
        if kind in _FAILED:
            heard, status = Heard.FAILED, _FAILED[kind]
        elif kind in _DELAYED:
            heard, status = Heard.DELAYED, "4.0.0"
        else:
            return []
        diagnostic = details or f"Postmark {kind}"
        return [event(heard, status=status, diagnostic=diagnostic, label=f"Bounce/{kind}")]
    if record == "SpamComplaint":
        return [event(Heard.COMPLAINED, complaint_type="abuse", label=record)]
    if record == "Delivery":
        details = text_of(data.get("Details"))
        return [event(Heard.DELIVERED, status="2.0.0", diagnostic=details, label=record)]
    return []
