"""Rows to records and records to parameters, by column name, in one place for both databases.

Every query names its columns (aggregates carry an alias), so a record is built from
``row["column"]`` whatever the database, and a change of columns is made here once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from postlane.classify import ReplyClass
from postlane.destinations import destination_for
from postlane.events import Event, WebhookEndpointState
from postlane.feedback import DeliveryRef, UnmatchedFeedback
from postlane.message import Lane, PreparedMessage, Recipient, RecipientState, in_lane_order
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

R = TypeVar("R")


_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _field_names(record: type[Any]) -> tuple[str, ...]:
    names = _FIELDS.get(record)
    if names is None:
        names = _FIELDS[record] = tuple(f.name for f in dataclasses.fields(record))
    return names


def build(record: type[R], row: Row, /, **given: Any) -> R:
    """A record whose every field is the row's column of the same name, but those ``given``
    (converted values, or fields that are not columns). A missing column is a KeyError: a
    query and its record must agree."""
    names = _field_names(record)
    return record(**{name: row[name] for name in names if name not in given}, **given)


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
    return build(
        Delivery, row, last_class=reply_class(row["last_class"]), flushed=bool(row["flushed"])
    )


def claimed_message(row: Row, deliveries: Sequence[Delivery]) -> ClaimedMessage:
    return build(
        ClaimedMessage,
        row,
        queue_id=row["id"],
        lane=Lane(row["lane"]),
        content=bytes(row["content"]),
        deliveries=tuple(sorted(deliveries, key=lambda d: d.id)),
    )


def attempt_view(row: Row) -> AttemptView:
    return build(AttemptView, row, cls=ReplyClass(row["class"]), counted=bool(row["counted"]))


def recipient_view(row: Row, history: tuple[AttemptView, ...] | None) -> RecipientView:
    return _recipient(RecipientView, row, history)


def exported_recipient(row: Row, history: tuple[AttemptView, ...]) -> ExportedRecipient:
    return _recipient(ExportedRecipient, row, history)


def _recipient(record: type[R], row: Row, history: tuple[AttemptView, ...] | None) -> R:
    """A recipient as the read side shows it or an export carries it (the same columns)."""
    return build(
        record,
        row,
        state=RecipientState(row["state"]),
        last_response=last_reply(row),
        history=history,
    )


def message_view(row: Row, recipients: Sequence[RecipientView]) -> MessageView:
    return _message(MessageView, row, recipients)


def exported_message(row: Row, recipients: Sequence[ExportedRecipient]) -> ExportedMessage:
    return _message(ExportedMessage, row, recipients, content=bytes(row["content"]))


def _message(record: type[R], row: Row, recipients: Sequence[Any], **given: Any) -> R:
    """A message as the read side shows it or an export carries it."""
    return build(
        record,
        row,
        lane=Lane(row["lane"]),
        metadata=json_value(row["metadata"]),
        recipients=tuple(recipients),
        **given,
    )


def dead_letter(row: Row, history: tuple[AttemptView, ...] | None) -> DeadLetter:
    return build(
        DeadLetter,
        row,
        id=row["queue_id"],
        lane=Lane(row["lane"]),
        cls=ReplyClass(row["last_class"]) if row["last_class"] else ReplyClass.TEMPORARY,
        dead_at=row["updated_at"],
        last_response=last_reply(row),
        relay=row["relay"] or "",
        history=history,
        delivery_id=row["id"],
    )


def suppression(row: Row) -> Suppression:
    return build(Suppression, row, lanes=suppression_lanes(row["lanes"]))


def suppression_lanes(value: Any) -> tuple[Lane, ...] | None:
    """A suppression's ``lanes`` column: None (NULL: every lane) or the lanes it names, in lane
    order."""
    if value is None:
        return None
    return in_lane_order(Lane(name) for name in json_value(value))


def delivery_ref(row: Row) -> DeliveryRef:
    return build(
        DeliveryRef,
        row,
        delivery_id=row["id"],
        state=RecipientState(row["state"]),
        lane=Lane(row["lane"]),
    )


def unmatched_feedback(row: Row) -> UnmatchedFeedback:
    content = row["content"] if "content" in row.keys() else None  # noqa: SIM118 (sqlite3.Row)
    return build(
        UnmatchedFeedback,
        row,
        size=int(row["size"]),
        content=None if content is None else bytes(content),
    )


def webhook_endpoint(row: Row) -> WebhookEndpointState:
    return build(WebhookEndpointState, row)


def destination_status(row: Row, in_flight: int) -> DestinationStatus:
    return build(
        DestinationStatus, row, configured_rate=None, in_flight=in_flight, concurrency=None
    )


def event(row: Row) -> Event:
    return build(
        Event,
        row,
        lane=Lane(row["lane"]),
        cls=reply_class(row["class"]),
        metadata=json_value(row["metadata"]),
    )


def sample(row: Row) -> Sample:
    return build(
        Sample,
        row,
        paused=tuple(json_value(row["paused"])),
        misconfigured=tuple(json_value(row["misconfigured"])),
    )


# -- records to parameters -------------------------------------------------------------------------


def compact_json(value: Mapping[str, Any]) -> str:
    if not value:
        return "{}"  # most messages carry no metadata: no encoder for them
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
    ``send_at`` (or suppressed, never attempted). Scheduled, it joins the queue at its
    ``send_at``: its age (the queue-age metrics and alerts) and ``max_age`` count from there,
    not from the day it was handed over."""
    scheduled = message.send_at is not None and message.send_at > now
    reason = "scheduled" if scheduled else None
    return {
        "queue_id": message.id,
        "address": recipient.address,
        "domain": recipient.domain,
        "destination": recipient.destination or destination_for(recipient.domain),
        "lane": message.lane.value,
        "created_at": message.send_at if scheduled else now,
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
        "class": a.cls.value if a else (outcome.cls.value if outcome.cls else None),
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
        "class": a.cls.value if a else (outcome.cls.value if outcome.cls else None),
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


def lanes_column(lanes: Iterable[Lane | str] | None) -> str | None:
    """Lanes as a suppression's ``lanes`` column keeps them: NULL for every lane (None, or all
    of them: one way to say it, so that the insert's widening rule compares like with like),
    else a JSON array of lane names in lane order (a JSON array, as ``metric_samples`` keeps
    its lists: text in SQLite, jsonb in PostgreSQL)."""
    if lanes is None:
        return None
    chosen = {Lane(lane) for lane in lanes}
    if not chosen:
        raise ValueError("a suppression stops at least one lane (None: every lane)")
    if chosen == set(Lane):
        return None
    return json.dumps([lane.value for lane in in_lane_order(chosen)])


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
        "lanes": lanes_column(s.lanes),
    }


def bounce_suppression(
    address: str, queue_id: str, attempt: AttemptRecord | None, now: float
) -> dict[str, Any]:
    """The suppression a hard bounce adds, for every sender and every lane (first reason
    wins, but it widens an entry for fewer lanes: see ``insert_suppression``)."""
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
        "lanes": None,
    }


def sender_domain(sender: str) -> str:
    """The domain of an envelope sender (a suppression's scope), lower-cased; '' for <>."""
    return sender.rpartition("@")[2].lower()


#: an address's active suppressions: scope -> the lanes its entry stops (None: every lane)
Listed = dict[str, frozenset[Lane] | None]


def scopes_by_address(found: Sequence[Row]) -> dict[str, Listed]:
    """Active suppressions (``suppressed_among`` rows) as address -> scope -> the lanes they
    stop (the entries of an address and scope, one per reason, together: None when one stops
    every lane)."""
    listed: dict[str, Listed] = {}
    for row in found:
        lanes = stopped_lanes(row)
        scopes = listed.setdefault(row["address"], {})
        held = scopes.get(row["scope"], frozenset())
        scopes[row["scope"]] = None if lanes is None or held is None else held | lanes
    return listed


def stopped_lanes(row: Row) -> frozenset[Lane] | None:
    """The lanes a suppression row stops (None: every lane)."""
    lanes = suppression_lanes(row["lanes"])
    return None if lanes is None else frozenset(lanes)


def stops(lanes: frozenset[Lane] | None, lane: Lane | None) -> bool:
    """Whether an entry for ``lanes`` (None: every lane) stops mail of ``lane``; a caller that
    names no lane asks about mail of any lane, so every entry counts (the cautious answer)."""
    return lanes is None or lane is None or lane in lanes


def covers(held: frozenset[Lane] | None, asked: Iterable[Lane] | None) -> bool:
    """Whether an entry for ``held`` lanes already stops every lane of ``asked`` (None: every
    lane), so that a new entry for ``asked`` in its scope changes nothing."""
    if held is None:
        return True
    return asked is not None and held.issuperset(asked)


def listed_for(
    listed: Mapping[str, Listed], address: str, sender: str, lane: Lane | None = None
) -> bool:
    """Whether mail of ``lane`` from ``sender`` to ``address`` is suppressed: by an entry for
    every sender or for the sender's domain, that stops every lane or ``lane``."""
    scopes = listed.get(address.lower(), {})
    return any(
        scope in scopes and stops(scopes[scope], lane) for scope in ("*", sender_domain(sender))
    )
