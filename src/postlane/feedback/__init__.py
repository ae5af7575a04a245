"""Hearing back after the first hop: what a DSN, a complaint, a provider's event or an
unsubscribe says about one delivery, and the records the store keeps of it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from postlane.classify import ReplyClass
from postlane.clock import iso
from postlane.message import Lane, RecipientState


class FeedbackKind(StrEnum):
    """What was heard about a delivery after its first hop (a DSN, a complaint, an event)."""

    #: failed for good after it was sent: the recipient ends ``bounced``
    BOUNCED = "bounced"
    #: a transient failure after it was sent: counted as a soft bounce, no state changes
    SOFT_BOUNCE = "soft_bounce"
    #: a DSN with action "delayed": an event, no state changes
    DELAYED = "delayed"
    #: reported as spam: the recipient ends ``complained``
    COMPLAINED = "complained"
    #: the recipient asked to receive no more (one-click unsubscribe): an event and a
    #: suppression, no state changes
    UNSUBSCRIBED = "unsubscribed"
    #: a provider confirmed the final delivery: kept in the history, nothing else changes
    DELIVERED = "delivered"


@dataclass(frozen=True)
class Feedback:
    """Something heard about one delivery after its first hop, to record in one transaction:
    the recipient's new state, an entry in its history, an event and a suppression."""

    kind: FeedbackKind
    delivery_id: int
    at: float
    #: where it came from (dsn, arf, plain-bounce, webhook:ses, unsubscribe, ...)
    source: str
    cls: ReplyClass | None = None
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    #: add the address to the suppression list: (scope, reason, expires_at)
    suppression: tuple[str, str, float | None] | None = None
    #: the lanes that suppression stops (None: every lane; an unsubscribe: the bulk lanes)
    suppression_lanes: tuple[Lane, ...] | None = None
    #: the report's own id, when it has one (``webhook:sendgrid:<sg_event_id>``): a report
    #: whose id the recipient's history holds already is a repeat and changes nothing
    key: str | None = None


#: where a bounce or a complaint leaves a recipient for good: a repeat of either changes nothing,
#: and a delay heard after them is no news
FINAL_FEEDBACK_STATES = frozenset({RecipientState.BOUNCED, RecipientState.COMPLAINED})


@dataclass(frozen=True)
class FeedbackResult:
    """How a :class:`Feedback` was applied: the recipient's state after it (None: no such
    delivery) and whether it changed anything."""

    delivery_id: int
    state: RecipientState | None
    changed: bool
    #: the report was heard before (its :attr:`Feedback.key` is in the history)
    repeat: bool = False

    @property
    def duplicate(self) -> bool:
        """Heard before: a report by its id, or a bounce or complaint already recorded."""
        return self.repeat or (not self.changed and self.state in FINAL_FEEDBACK_STATES)


@dataclass(frozen=True)
class DeliveryRef:
    """One delivery found by what a bounce or an event names (its message and address)."""

    delivery_id: int
    queue_id: str
    address: str
    state: RecipientState
    sender: str
    lane: Lane


@dataclass(frozen=True)
class Report:
    """A report as it arrived (a bounce, a complaint, a webhook's payload), before matching."""

    #: where it came from: the bounce listener, webhook:ses, ...
    source: str
    #: what it looked like: dsn, arf, plain, auto-reply, unknown (no report), event, unreadable
    kind: str
    content: bytes
    mail_from: str | None = None
    rcpt_to: str | None = None


@dataclass(frozen=True)
class UnmatchedFeedback:
    """A report nothing could be matched to, kept for an operator to look at."""

    id: int
    received_at: float
    source: str
    kind: str
    reason: str
    mail_from: str | None
    rcpt_to: str | None
    #: bytes kept (at most the first MiB of what arrived)
    size: int
    #: the report as received (None in a listing: read one with ``get_unmatched``)
    content: bytes | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": iso(self.received_at),
            "source": self.source,
            "kind": self.kind,
            "reason": self.reason,
            "mail_from": self.mail_from,
            "rcpt_to": self.rcpt_to,
            "size": self.size,
        }
