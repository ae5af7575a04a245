"""What the sending providers tell by webhook after they accepted a message: Amazon SES (through
SNS), SendGrid, Postmark and Mailgun each post bounces, complaints, delays and deliveries, signed
or authenticated their own way.

Each provider's module checks a request's proof and reads its payload into
:class:`ProviderEvent` values, in the provider's own terms translated to a DSN's
(:class:`~postlane.feedback.reports.Action`, an enhanced status, a diagnostic), so that
:class:`~postlane.feedback.providers.recorder.EventRecorder` can classify and record them the
way the bounce listener records a DSN or an ARF complaint: the same
:func:`~postlane.feedback.inbound.feedback_for`, the same
:meth:`~postlane.store.base.FeedbackStore.record_feedback` transaction, the same events,
suppressions and metrics.

=================== ==================================================================
module              what
=================== ==================================================================
``config``          ``[webhooks.ses]``, ``[webhooks.sendgrid]``, ... (the keys)
``sns``             SNS message signatures (SignatureVersion 1 and 2), the signing
                    certificates, subscription confirmation
``ses``             SES event JSON (Bounce, Complaint, Delivery, DeliveryDelay) in SNS
``sendgrid``        the signed Event Webhook (ECDSA P-256 over timestamp + body)
``postmark``        Bounce, SpamComplaint and Delivery webhooks behind basic auth
``mailgun``         webhooks signed with HMAC-SHA256 over timestamp + token, replays refused
``recorder``        matching events to deliveries and recording them
=================== ==================================================================

Matching uses what postlane's transports attach to each message: its queue id as the SES tag,
SendGrid custom arg and Postmark metadata ``postlane_queue_id`` and the Mailgun user variable
``postlane-queue-id``, with the event's recipient; else the message's ``Message-ID`` header,
when the event repeats it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from postlane.feedback.reports import Action, RecipientStatus

__all__ = [
    "Heard",
    "Malformed",
    "ProviderEvent",
    "Received",
    "Unverified",
    "check_timestamp",
    "message_id_header",
    "read_json",
]


class Unverified(Exception):
    """The request does not prove it comes from the provider (HTTP 401; nothing changes)."""


class Malformed(Exception):
    """The request is not what the provider sends: not JSON, or not its shape (HTTP 400)."""


class Heard(StrEnum):
    """What a provider's event says about one recipient, in a DSN's terms."""

    #: the provider gave up: the recipient ends ``bounced`` (suppressed if the address is bad)
    FAILED = "failed"
    #: a transient failure or a delay: an event, no state change
    DELAYED = "delayed"
    #: the receiving server took it: kept in the history
    DELIVERED = "delivered"
    #: the recipient reported it as spam
    COMPLAINED = "complained"


_ACTIONS = {Heard.FAILED: Action.FAILED, Heard.DELAYED: Action.DELAYED}


@dataclass(frozen=True)
class ProviderEvent:
    """One provider event about one recipient of one message."""

    #: ses, sendgrid, postmark, mailgun
    provider: str
    heard: Heard
    recipient: str
    #: postlane's id of the message, from the tag, custom arg or metadata the transport attached
    queue_id: str | None = None
    #: the message's Message-ID header (with its angle brackets), when the event repeats it
    message_id: str | None = None
    #: the enhanced status code (``5.1.1``), when the provider gives or implies one
    status: str | None = None
    #: the remote server's reply or the provider's explanation
    diagnostic: str | None = None
    #: for a complaint: its feedback type (``abuse``; ``not-spam`` is no complaint)
    complaint_type: str | None = None
    #: the provider's own words for the event (``Bounce/Permanent/General``), for the records
    label: str = ""
    #: the provider's id of the event (SendGrid's ``sg_event_id``, Mailgun's ``id``, ...), the
    #: same when the provider sends it again: a repeat of it changes nothing
    event_id: str | None = None
    #: the event as the provider sent it, kept when nothing matches it
    raw: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        """Where it came from (``Feedback.source``, the history's relay, a metric label)."""
        return f"webhook:{self.provider}"

    @property
    def key(self) -> str | None:
        """The event's id among every report's (``Feedback.key``), when it has one."""
        return None if self.event_id is None else f"{self.source}:{self.event_id}"

    def recipient_status(self) -> RecipientStatus:
        """The event as a DSN's per-recipient block (not for complaints)."""
        action = _ACTIONS.get(self.heard, Action.DELIVERED)
        return RecipientStatus(
            action,
            recipient=self.recipient.lower(),
            status=self.status,
            diagnostic=_without_type(self.diagnostic),
        )

    def describe(self) -> str:
        """A few words for the history and the records: ``sendgrid spamreport``."""
        words = [self.provider, self.label or self.heard.value]
        if self.complaint_type:
            words.append(f"({self.complaint_type})")
        return " ".join(words)

    def content(self) -> bytes:
        """The event as JSON, kept with an unmatched report."""
        return json.dumps(self.raw, ensure_ascii=False, sort_keys=True, default=str).encode()


@dataclass(frozen=True)
class Received:
    """What one verified request carried, and how to take back what verifying it claimed (a
    replay token) when it could not be recorded and the provider is to send it again."""

    events: list[ProviderEvent]
    release: Callable[[], None] | None = None


def read_json(body: bytes) -> Any:
    """The body as JSON, or :class:`Malformed`."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Malformed(f"the body is not valid JSON: {exc}") from None


def check_timestamp(timestamp: str, now: float, max_age: float, name: str) -> None:
    """Refuse (:class:`Unverified`) a signed timestamp, called ``name`` in the error, that is not
    Unix seconds or is older (or further ahead) than ``max_age`` seconds."""
    # past 18 digits it is no time (and past 4,300 Python's int() refuses it: a 500)
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 18:
        raise Unverified(f"{name} is not Unix seconds")
    if abs(now - int(timestamp)) > max_age:
        raise Unverified(f"{name} is outside max_age")


def message_id_header(value: Any) -> str | None:
    """A Message-ID as postlane stores it (``<id@host>``), from however an event writes it."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    return text


def _without_type(diagnostic: str | None) -> str | None:
    """``smtp; 550 5.1.1 ...`` -> ``550 5.1.1 ...`` (a DSN's diagnostic type, RFC 3464 2.3.6)."""
    if diagnostic is None:
        return None
    kind, sep, rest = diagnostic.partition(";")
    if sep and kind.strip().lower() in ("smtp", "x-postfix", "x-unix"):
        return rest.strip()
    return diagnostic.strip()


def text_of(value: Any) -> str | None:
    """A JSON value as text (None for nothing, an empty string or a structure)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None
