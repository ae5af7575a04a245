"""Rows to records and records to parameters, by column name, in one place for both databases.

Every query names its columns (aggregates carry an alias), so a record is built from
``row["column"]`` whatever the database, and a change of columns is made here once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from postlane.classify import ReplyClass
from postlane.destinations import destination_for
from postlane.events import Event, WebhookEndpointState
from postlane.feedback import DeliveryRef, UnmatchedFeedback
from postlane.message import Lane, PreparedMessage, Recipient, RecipientState
from postlane.records import (
    AttemptRecord,
    AttemptView,
    ClaimedMessage,
    DeadLetter,
    Delivery,
    DestinationStatus,
    ExportedMessage,
    ExportedRecipient,
    MessageView,
    Outcome,
    RecipientView,
    Reply,
    Sample,
    Suppression,
)
from postlane.store.plans import Row

# -- rows to records -------------------------------------------------------------------------------


def json_value(value: Any) -> Any:
    """A JSON column: text in SQLite, already decoded from PostgreSQL's jsonb."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def reply_class(value: Any) -> ReplyClass | None:
    return ReplyClass(value) if value else None


def last_reply(row: Row) -> Reply | None:
    """A delivery's last reply (None before any try)."""
    if row["last_class"] is None:
        return None
    return Reply(
        code=row["last_code"],
        enhanced=row["last_enhanced"],
        text=row["last_text"] or "",
        cls=ReplyClass(row["last_class"]),
    )


def delivery(row: Row) -> Delivery:
    return Delivery(
        id=row["id"],
        address=row["address"],
        domain=row["domain"],
        destination=row["destination"],
        attempts=row["attempts"],
        deferrals=row["deferrals"],
        created_at=row["created_at"],
        last_class=reply_class(row["last_class"]),
        expires_at=row["expires_at"],
    )


def claimed_message(row: Row, deliveries: Sequence[Delivery]) -> ClaimedMessage:
    return ClaimedMessage(
        queue_id=row["id"],
        lane=Lane(row["lane"]),
        sender=row["sender"],
        message_id=row["message_id"],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        content=bytes(row["content"]),
        deliveries=tuple(sorted(deliveries, key=lambda d: d.id)),
    )


def attempt_view(row: Row) -> AttemptView:
    return AttemptView(
        at=row["at"],
        cls=ReplyClass(row["class"]),
        code=row["code"],
        enhanced=row["enhanced"],
        text=row["text"],
        duration_ms=row["duration_ms"],
        relay=row["relay"],
        destination=row["destination"],
        counted=bool(row["counted"]),
    )


def recipient_view(row: Row, history: tuple[AttemptView, ...] | None) -> RecipientView:
    return RecipientView(
        address=row["address"],
        domain=row["domain"],
        destination=row["destination"],
        state=RecipientState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_response=last_reply(row),
        updated_at=row["updated_at"],
        reason=row["reason"],
        history=history,
    )


def message_view(row: Row, recipients: Sequence[RecipientView]) -> MessageView:
    return MessageView(
        id=row["id"],
        lane=Lane(row["lane"]),
        created_at=row["created_at"],
        sender=row["sender"],
        subject=row["subject"],
        size=row["size"],
        message_id=row["message_id"],
        idempotency_key=row["idempotency_key"],
        metadata=json_value(row["metadata"]),
        recipients=tuple(recipients),
        submitter=row["submitter"],
        send_at=row["send_at"],
        expires_at=row["expires_at"],
    )


def dead_letter(row: Row, history: tuple[AttemptView, ...] | None) -> DeadLetter:
    cls = ReplyClass(row["last_class"]) if row["last_class"] else ReplyClass.TEMPORARY
    last = last_reply(row)
    return DeadLetter(
        id=row["queue_id"],
        address=row["address"],
        domain=row["domain"],
        destination=row["destination"],
        lane=Lane(row["lane"]),
        attempts=row["attempts"],
        cls=cls,
        dead_at=row["updated_at"],
        last_response=last,
        relay=row["relay"] or "",
        reason=row["reason"],
        sender=row["sender"],
        subject=row["subject"],
        history=history,
        delivery_id=row["id"],
    )


def exported_recipient(row: Row, history: tuple[AttemptView, ...]) -> ExportedRecipient:
    return ExportedRecipient(
        address=row["address"],
        domain=row["domain"],
        destination=row["destination"],
        state=RecipientState(row["state"]),
        attempts=row["attempts"],
        deferrals=row["deferrals"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        last_response=last_reply(row),
        reason=row["reason"],
        history=history,
    )


def exported_message(row: Row, recipients: Sequence[ExportedRecipient]) -> ExportedMessage:
    return ExportedMessage(
        id=row["id"],
        lane=Lane(row["lane"]),
        sender=row["sender"],
        subject=row["subject"],
        message_id=row["message_id"],
        idempotency_key=row["idempotency_key"],
        metadata=json_value(row["metadata"]),
        created_at=row["created_at"],
        content=bytes(row["content"]),
        recipients=tuple(recipients),
    )


def suppression(row: Row) -> Suppression:
    return Suppression(
        address=row["address"],
        created_at=row["created_at"],
        source=row["source"],
        reason=row["reason"],
        code=row["code"],
        enhanced=row["enhanced"],
        text=row["text"],
        queue_id=row["queue_id"],
        scope=row["scope"],
        expires_at=row["expires_at"],
        detail=row["detail"],
    )


def delivery_ref(row: Row) -> DeliveryRef:
    return DeliveryRef(
        delivery_id=row["id"],
        queue_id=row["queue_id"],
        address=row["address"],
        state=RecipientState(row["state"]),
        sender=row["sender"],
        lane=Lane(row["lane"]),
    )


def unmatched_feedback(row: Row) -> UnmatchedFeedback:
    return UnmatchedFeedback(
        id=int(row["id"]),
        received_at=row["received_at"],
        source=row["source"],
        kind=row["kind"],
        reason=row["reason"],
        mail_from=row["mail_from"],
        rcpt_to=row["rcpt_to"],
        content=bytes(row["content"]),
    )


def webhook_endpoint(row: Row) -> WebhookEndpointState:
    return WebhookEndpointState(
        name=row["name"],
        cursor=int(row["cursor"]),
        failures=int(row["failures"]),
        paused_until=row["paused_until"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        last_success_at=row["last_success_at"],
        delivered=int(row["delivered"]),
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
    )


def destination_status(row: Row, in_flight: int) -> DestinationStatus:
    return DestinationStatus(
        destination=row["destination"],
        rate=row["rate"],
        configured_rate=None,
        paused_until=row["paused_until"],
        reason=row["reason"],
        in_flight=in_flight,
        concurrency=None,
        updated_at=row["updated_at"],
    )


def event(row: Row) -> Event:
    return Event(
        id=int(row["id"]),
        type=row["type"],
        at=row["at"],
        queue_id=row["queue_id"],
        recipient=row["recipient"],
        lane=Lane(row["lane"]),
        cls=reply_class(row["class"]),
        code=row["code"],
        enhanced=row["enhanced"],
        text=row["text"],
        metadata=json_value(row["metadata"]),
    )


def sample(row: Row) -> Sample:
    return Sample(
        at=float(row["at"]),
        lane=str(row["lane"]),
        ready=int(row["ready"]),
        deferred=int(row["deferred"]),
        held=int(row["held"]),
        sending=int(row["sending"]),
        oldest_age=float(row["oldest_age"]),
        sent=int(row["sent"]),
        dead=int(row["dead"]),
        hard_bounces=int(row["hard_bounces"]),
        paused=tuple(json_value(row["paused"])),
        deferrals=int(row["deferrals"]),
        soft_bounces=int(row["soft_bounces"]),
    )


# -- records to parameters -------------------------------------------------------------------------


def compact_json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"))


def message_params(message: PreparedMessage, *, now: float, done: bool) -> dict[str, Any]:
    """``insert_messages``'s row for a new message (``done``: every recipient suppressed)."""
    return {
        "id": message.id,
        "lane": message.lane.value,
        "sender": message.sender,
        "subject": message.subject,
        "message_id": message.message_id,
        "idempotency_scope": idempotency_scope(message),
        "idempotency_key": message.idempotency_key,
        "fingerprint": message.fingerprint,
        "size": message.size,
        "metadata": compact_json(message.metadata),
        "created_at": now,
        "send_at": message.send_at,
        "expires_at": message.expires_at,
        "done_at": now if done else None,
        "submitter": message.submitter,
        "content": message.content,
    }


def idempotency_scope(message: PreparedMessage) -> str:
    """Whose key it is: its submitter's (a token, an SMTP user), '' for local callers."""
    return message.submitter or ""


def delivery_params(
    message: PreparedMessage, recipient: Recipient, *, now: float, suppressed: bool
) -> dict[str, Any]:
    """``insert_deliveries``'s row: one recipient of a new message, due at once or at its
    ``send_at`` (or suppressed, never attempted)."""
    scheduled = message.send_at is not None and message.send_at > now
    reason = "scheduled" if scheduled else None
    return {
        "queue_id": message.id,
        "address": recipient.address,
        "domain": recipient.domain,
        "destination": recipient.destination or destination_for(recipient.domain),
        "lane": message.lane.value,
        "created_at": now,
        "next_attempt_at": message.send_at if scheduled else now,
        "expires_at": message.expires_at,
        "state": "suppressed" if suppressed else "queued",
        "reason": "on the suppression list" if suppressed else reason,
    }


#: the event a recipient's new state is told as
EVENT_OF_STATE = {
    RecipientState.SENT: "sent",
    RecipientState.DEFERRED: "deferred",
    RecipientState.DEAD: "dead",
    RecipientState.SUPPRESSED: "suppressed",
    RecipientState.QUEUED: "queued",
    RecipientState.HELD: "deferred",
}


def outcome_event(outcome: Outcome, now: float) -> dict[str, Any]:
    """``insert_events``'s row for a recorded outcome (its attempt's reply, if it had one)."""
    a = outcome.attempt
    return {
        "type": outcome.event or EVENT_OF_STATE[outcome.state],
        "at": a.at if a else now,
        "delivery_id": outcome.delivery_id,
        "class": a.cls.value if a else None,
        "code": a.code if a else None,
        "enhanced": a.enhanced if a else None,
        "text": a.text if a else outcome.reason,
    }


def outcome_params(outcome: Outcome) -> dict[str, Any]:
    """``record_outcomes``'s row: an outcome without an attempt keeps the previous reply."""
    a = outcome.attempt
    return {
        "id": outcome.delivery_id,
        "state": outcome.state.value,
        "attempts": outcome.attempts,
        "deferrals": outcome.deferrals,
        "next_attempt_at": outcome.next_attempt_at,
        "code": a.code if a else None,
        "enhanced": a.enhanced if a else None,
        "text": a.text if a else None,
        "class": a.cls.value if a else None,
        "reason": outcome.reason,
    }


def attempt_params(delivery_id: int, attempt: AttemptRecord | AttemptView) -> dict[str, Any]:
    """``insert_attempts``'s row (a new try, or one of an imported history)."""
    return {
        "delivery_id": delivery_id,
        "at": attempt.at,
        "class": attempt.cls.value,
        "code": attempt.code,
        "enhanced": attempt.enhanced,
        "text": attempt.text,
        "relay": attempt.relay,
        "destination": attempt.destination,
        "duration_ms": attempt.duration_ms,
        "counted": bool(attempt.counted),
    }


def suppression_params(s: Suppression) -> dict[str, Any]:
    return {
        "address": s.address.lower(),
        "scope": s.scope.lower(),
        "reason": s.reason or "manual",
        "created_at": s.created_at,
        "expires_at": s.expires_at,
        "detail": s.detail,
        "source": s.source,
        "code": s.code,
        "enhanced": s.enhanced,
        "text": s.text,
        "queue_id": s.queue_id,
    }


def bounce_suppression(
    address: str, queue_id: str, attempt: AttemptRecord | None, now: float
) -> dict[str, Any]:
    """The suppression a hard bounce adds, for every sender (first reason wins)."""
    return {
        "address": address.lower(),
        "scope": "*",
        "reason": "hard_bounce",
        "created_at": now,
        "expires_at": None,
        "detail": attempt.text if attempt else None,
        "source": "bounce",
        "code": attempt.code if attempt else None,
        "enhanced": attempt.enhanced if attempt else None,
        "text": attempt.text if attempt else None,
        "queue_id": queue_id,
    }


def sender_domain(sender: str) -> str:
    """The domain of an envelope sender (a suppression's scope), lower-cased; '' for <>."""
    return sender.rpartition("@")[2].lower()


def scopes_by_address(found: Sequence[Row]) -> dict[str, set[str]]:
    """Active suppressions (``suppressed_among`` rows) as address -> scopes."""
    listed: dict[str, set[str]] = {}
    for row in found:
        listed.setdefault(row["address"], set()).add(row["scope"])
    return listed


def listed_for(listed: Mapping[str, set[str]], address: str, sender: str) -> bool:
    """Whether mail from ``sender`` to ``address`` is suppressed: for every sender, or for
    the sender's domain."""
    scopes = listed.get(address.lower(), set())
    return "*" in scopes or sender_domain(sender) in scopes
