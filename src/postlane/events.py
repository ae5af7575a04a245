"""The event log: what happened to each recipient, in commit order, as ``/v1/events``, outbound
webhooks and in-process subscribers tell it; and each webhook endpoint's place in it."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from postlane.classify import ReplyClass
from postlane.clock import iso
from postlane.errors import ValidationError
from postlane.message import Lane
from postlane.toml_values import is_decimal

#: the event types, in the order a recipient can meet them
EVENT_TYPES = (
    "queued",
    "sent",
    "deferred",
    "bounced",
    "complained",
    "unsubscribed",
    "dead",
    "suppressed",
    "expired",
    "deleted",
)


@dataclass(frozen=True)
class Event:
    """What happened to one recipient, as the event log keeps it (``/v1/events``, webhooks)."""

    id: int
    type: str
    at: float
    #: postlane's id of the message
    queue_id: str
    recipient: str | None
    lane: Lane
    cls: ReplyClass | None
    code: int | None
    enhanced: str | None
    text: str | None
    #: the message's own metadata
    metadata: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": self.type,
            "at": iso(self.at),
            "message_id": self.queue_id,
            "recipient": self.recipient,
            "lane": self.lane,
            "class": self.cls,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class WebhookEndpointState:
    """Where an outbound webhook endpoint is in the event log, and how it fares."""

    name: str
    cursor: int
    failures: int
    paused_until: float | None
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None
    delivered: int
    lease_owner: str | None
    lease_expires_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cursor": str(self.cursor),
            "failures": self.failures,
            "paused_until": iso(self.paused_until) if self.paused_until else None,
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at) if self.last_error_at else None,
            "last_success_at": iso(self.last_success_at) if self.last_success_at else None,
            "delivered": self.delivered,
        }


def event_cursor(value: Any) -> int:
    """An event id given as a cursor (``after``): decimal digits, else a
    :class:`ValidationError` naming ``after`` (the HTTP API, the CLI and the Python API alike)."""
    text = str(value)
    if isinstance(value, bool) or not is_decimal(text) or len(text) > 19:
        raise ValidationError(f"after must be an event id, got {value!r}", field="after")
    return int(text)


class EventLog(Protocol):
    """What reading the log needs of a store."""

    async def events_after(
        self, after: int | None, *, limit: int, types: Sequence[str] = ()
    ) -> list[Event]: ...


#: events looked at, at most, for one page of a reader of some types only
SCAN_LIMIT = 10_000


async def read_events(
    log: EventLog, after: int | None, *, limit: int, types: Collection[str] = ()
) -> tuple[list[Event], int | None]:
    """Up to ``limit`` events after ``after`` (of ``types``, default all), and the cursor to
    read on from: the last event looked at, whether it matched or not, so that a reader of
    rare types moves on with the log (instead of reading it all again at each poll, and
    being told retention removed its cursor while it had missed nothing). At most
    :data:`SCAN_LIMIT` events are looked at for one page. Raises
    :class:`~postlane.errors.NotFound` for a cursor that is not kept."""
    wanted = frozenset(types)
    if not wanted:
        found = await log.events_after(after, limit=limit)
        return found, (found[-1].id if found else after)
    matched: list[Event] = []
    cursor, scanned, batch = after, 0, max(limit, 500)
    while scanned < SCAN_LIMIT:
        events = await log.events_after(cursor, limit=batch)
        for event in events:
            cursor = event.id
            if event.type in wanted:
                matched.append(event)
                if len(matched) == limit:
                    return matched, cursor
        scanned += len(events)
        if len(events) < batch:
            break
    return matched, cursor
