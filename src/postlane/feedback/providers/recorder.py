"""Provider events become feedback on one delivery, or are kept for the operator, as the bounce
listener's reports are (:mod:`postlane.feedback.inbound`).

1. **Match.** The deliveries to the event's recipient of the message its ``postlane_queue_id``
   names (``store.find_deliveries(address, queue_id=...)``); else of the message with its
   Message-ID header, when only one message to that recipient has it (an application that
   sent the same Message-ID twice: the event is kept, applied to neither).
2. **Classify.** A failure, a delay or a delivery is read as a DSN's recipient block would be
   and goes through :func:`~postlane.feedback.inbound.feedback_for`: the same
   :func:`postlane.classify.classify`, the same table (a hard bounce is ``bounced`` and
   suppressed everywhere; another failure is ``bounced`` without suppression; a delay is a
   ``deferred`` event; a delivery is history). A complaint is ``complained`` and suppressed for
   the sender's domain (or everywhere, with ``[bounces] complaint_scope = "global"``).
3. **Record** everything a request carried in one ``record_feedback`` transaction.

Kept unmatched (``store.record_unmatched``, source ``webhook:<provider>``, kind ``event``, the
event's JSON as content): failures, delays and complaints nothing matches, complaints that are
none (``not-spam``), and events about a recipient that was never sent. A delivery nothing matches
is only counted (the provider's account may send more than postlane's mail). A repeat changes
nothing and is counted as a duplicate: a bounce or complaint already recorded, or an event whose
id (``sg_event_id``, Mailgun's ``id``, ...) the recipient's history already holds. An event
about a delivery still being sent (the provider's event can beat the worker's own record of
``sent``) is waited for a few seconds; if it is still being sent, nothing of the request is
recorded and the caller asks the provider to send it again later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postlane.clock import Clock
from postlane.feedback import DeliveryRef, Feedback, FeedbackKind, Report
from postlane.feedback.inbound import ComplaintScope, feedback_for
from postlane.feedback.providers import Heard, ProviderEvent
from postlane.feedback.reports import COMPLAINT_TYPES
from postlane.message import RecipientState
from postlane.store.base import FeedbackStore

__all__ = ["EventRecorder", "RecordedEvents"]

#: what an event about a recipient in these states may apply to (it was handed on)
_SENT_STATES = frozenset({RecipientState.SENT, RecipientState.BOUNCED, RecipientState.COMPLAINED})
#: the kind an unmatched provider event is kept as
UNMATCHED_KIND = "event"


@dataclass(frozen=True)
class RecordedEvents:
    """What became of the events of one request."""

    #: feedback that changed its delivery or added to its history
    recorded: tuple[Feedback, ...] = ()
    #: repeats of a bounce or complaint already recorded
    duplicates: int = 0
    #: kept for the operator
    unmatched: int = 0
    #: deliveries nothing matched, and events postlane does not take
    ignored: int = 0
    #: deliveries still being sent: nothing was recorded, the request is to be sent again
    pending: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "recorded": len(self.recorded),
            "duplicates": self.duplicates,
            "unmatched": self.unmatched,
            "ignored": self.ignored,
        }


@dataclass
class _Matched:
    event: ProviderEvent
    ref: DeliveryRef


class EventRecorder:
    """Matches provider events to deliveries and records them (see the module docstring)."""

    def __init__(
        self,
        store: FeedbackStore,
        clock: Clock,
        *,
        complaint_scope: ComplaintScope = ComplaintScope.SENDER_DOMAIN,
        in_flight_wait: float = 5.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.store = store
        self.clock = clock
        self.complaint_scope = ComplaintScope(complaint_scope)
        self.in_flight_wait = in_flight_wait
        self.poll_interval = poll_interval

    async def record(self, events: Sequence[ProviderEvent]) -> RecordedEvents:
        """Match, classify and record ``events``. Raises what the store raises."""
        ignored = 0
        matched: list[_Matched] = []
        kept: list[tuple[ProviderEvent, str]] = []
        for event in events:
            if event.heard is Heard.COMPLAINED and event.complaint_type not in COMPLAINT_TYPES:
                kept.append((event, f"a {event.complaint_type} feedback report, not a complaint"))
                continue
            refs = await self._find(event)
            if len({ref.queue_id for ref in refs}) > 1:
                kept.append((event, _ambiguous_note(event, refs)))
            elif refs:
                matched.extend(_Matched(event, ref) for ref in refs)
            elif event.heard is Heard.DELIVERED and event.queue_id is None:
                ignored += 1  # another sender's mail through the same account
            else:
                kept.append((event, _unmatched_note(event)))
        matched = await self._settled(matched)
        pending = sum(1 for m in matched if m.ref.state is RecipientState.SENDING)
        if pending:
            return RecordedEvents(pending=pending)
        now = self.clock.now()
        items: list[tuple[ProviderEvent, Feedback]] = []
        for match in matched:
            if match.ref.state in _SENT_STATES:
                items.append((match.event, self._feedback(match, now)))
            else:
                note = (
                    f"{match.ref.address} (delivery {match.ref.delivery_id}) is "
                    f"{match.ref.state}: it was never sent, so the event cannot apply"
                )
                kept.append((match.event, note))
        results = (
            await self.store.record_feedback([item for _, item in items], now) if items else []
        )
        recorded: list[Feedback] = []
        duplicates = 0
        for (event, item), applied in zip(items, results, strict=True):
            if applied.changed:
                recorded.append(item)
            elif applied.duplicate:
                duplicates += 1
            else:
                state = applied.state or "gone"
                kept.append((event, f"delivery {item.delivery_id} is {state}: it was not sent"))
        for event, reason in kept:
            report = Report(event.source, UNMATCHED_KIND, event.content(), rcpt_to=event.recipient)
            await self.store.record_unmatched(report, f"{event.describe()}: {reason}", now)
        return RecordedEvents(tuple(recorded), duplicates, len(kept), ignored)

    async def _find(self, event: ProviderEvent) -> list[DeliveryRef]:
        if event.queue_id is not None:
            found = await self.store.find_deliveries(event.recipient, queue_id=event.queue_id)
            if found:
                return found
        if event.message_id is not None:
            return await self.store.find_deliveries(event.recipient, message_id=event.message_id)
        return []

    async def _settled(self, matched: list[_Matched]) -> list[_Matched]:
        """``matched`` with deliveries still being sent read again until they are not, or the
        wait is over (a provider's event can beat the worker's record of ``sent``)."""
        deadline = time.monotonic() + self.in_flight_wait
        while True:
            sending = [m for m in matched if m.ref.state is RecipientState.SENDING]
            if not sending or time.monotonic() >= deadline:
                return matched
            await asyncio.sleep(self.poll_interval)
            fresh = {
                ref.delivery_id: ref
                for ref in await self.store.delivery_refs([m.ref.delivery_id for m in sending])
            }
            for match in sending:
                match.ref = fresh.get(match.ref.delivery_id, match.ref)

    def _feedback(self, match: _Matched, now: float) -> Feedback:
        event = match.event
        if event.heard is not Heard.COMPLAINED:
            item, _ = feedback_for(event.recipient_status(), match.ref, source=event.source, at=now)
            return dataclasses.replace(item, key=event.key)
        return Feedback(
            FeedbackKind.COMPLAINED,
            match.ref.delivery_id,
            now,
            event.source,
            text=event.describe(),
            suppression=self.complaint_scope.complaint_suppression(match.ref),
            key=event.key,
        )


def _ambiguous_note(event: ProviderEvent, refs: Sequence[DeliveryRef]) -> str:
    """Why an event its Message-ID matches to several messages is kept, not applied: it
    speaks of one of them (an application sent the same Message-ID twice), and which one
    cannot be told; applied to all, one bounce would bounce them all."""
    messages = sorted({ref.queue_id for ref in refs})
    return (
        f"Message-ID {event.message_id} names {len(messages)} messages to {event.recipient} "
        f"({', '.join(messages[:5])}{', ...' if len(messages) > 5 else ''}): "
        "which one the event is about cannot be told, so it was applied to none"
    )


def _unmatched_note(event: ProviderEvent) -> str:
    named = []
    if event.queue_id:
        named.append(f"postlane_queue_id {event.queue_id}")
    if event.message_id:
        named.append(f"Message-ID {event.message_id}")
    by = "; ".join(named) or "no postlane_queue_id or Message-ID"
    return f"no delivery matches {event.recipient} ({by})"
