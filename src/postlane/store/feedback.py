"""The feedback role, written once for both databases: what is heard about a delivery after its
first hop (DSNs, complaints, provider events, unsubscribes) recorded in one transaction with its
state change, history entry, event and suppression; reports nothing matched, kept for review
(:class:`postlane.store.base.FeedbackStore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from postlane.errors import NotFound
from postlane.feedback import (
    FINAL_FEEDBACK_STATES,
    DeliveryRef,
    Feedback,
    FeedbackKind,
    FeedbackResult,
    Report,
    UnmatchedFeedback,
)
from postlane.message import Lane, RecipientState
from postlane.store import rows
from postlane.store.plans import Plan, Row, SQLRole, batch, execute, fetch, fetch_one

#: the state a kind of feedback moves a recipient to, from the states it may leave
_MOVES: dict[FeedbackKind, tuple[RecipientState, frozenset[RecipientState]]] = {
    FeedbackKind.BOUNCED: (RecipientState.BOUNCED, frozenset({RecipientState.SENT})),
    FeedbackKind.COMPLAINED: (
        RecipientState.COMPLAINED,
        frozenset({RecipientState.SENT, RecipientState.BOUNCED}),
    ),
}
#: the event each kind is told as (None: history only)
_EVENTS = {
    FeedbackKind.BOUNCED: "bounced",
    FeedbackKind.COMPLAINED: "complained",
    FeedbackKind.UNSUBSCRIBED: "unsubscribed",
    FeedbackKind.SOFT_BOUNCE: "deferred",
    FeedbackKind.DELAYED: "deferred",
    FeedbackKind.DELIVERED: None,
}
#: the most kept of an unmatched report's content
UNMATCHED_CONTENT_LIMIT = 256 * 1024


class SQLFeedback(SQLRole):
    """Feedback after the first hop."""

    #: unmatched reports kept at most, in bytes of content (each counted 512 bytes more for
    #: its row): the oldest beyond it are forgotten, so whoever may send to the bounce domain
    #: (anybody, at a report address or a return path of theirs) cannot fill the disk
    unmatched_limit = 64 * 1024 * 1024
    #: the limit is enforced at every this many-th report kept (the sum is a scan)
    unmatched_trim_every = 50

    async def delivery_refs(self, delivery_ids: Sequence[int]) -> list[DeliveryRef]:
        """The deliveries with these ids that exist (a token names one by id)."""
        found = await self.db.read(lambda: fetch("deliveries_by_id", {"ids": list(delivery_ids)}))
        return [rows.delivery_ref(row) for row in found]

    async def find_deliveries(
        self, address: str, *, queue_id: str | None = None, message_id: str | None = None
    ) -> list[DeliveryRef]:
        """The deliveries to ``address`` of the message with postlane's id ``queue_id``, or
        with the Message-ID header ``message_id`` (a bounce quoting the original's headers)."""
        params = {"address": address.lower(), "queue_id": queue_id, "message_id": message_id}
        if queue_id is not None:
            found = await self.db.read(lambda: fetch("deliveries_of_message_to", params))
        elif message_id is not None:
            found = await self.db.read(lambda: fetch("deliveries_of_message_id_to", params))
        else:
            return []
        return [rows.delivery_ref(row) for row in found]

    async def sole_deliveries(self, address: str, message_id: str) -> list[DeliveryRef]:
        params = {"address": address.lower(), "message_id": message_id}
        found = await self.db.read(lambda: fetch("sole_deliveries_of_message_id_to", params))
        return [rows.delivery_ref(row) for row in found]

    async def record_feedback(self, items: Sequence[Feedback], now: float) -> list[FeedbackResult]:
        """Apply each item in one transaction: a bounce moves a sent recipient to ``bounced``
        and a complaint to ``complained`` (a repeat of either changes nothing), each item with
        a history entry, its event and its suppression. An unsubscribe whose address is already
        suppressed in its scope for its lanes (a second click) changes nothing: no event, no
        entry. A delivery that does not exist gets a result with no state."""
        return await self.db.write(lambda: _feedback_plan(items, now))

    async def record_unmatched(self, report: Report, reason: str, now: float) -> int:
        """Keep a report nothing matched (or nothing could read) for the operator, saying
        why; returns its id. The content is kept up to :data:`UNMATCHED_CONTENT_LIMIT` bytes,
        and the reports kept up to :attr:`unmatched_limit` bytes in all (the oldest go)."""
        params = {
            "received_at": now,
            "source": report.source,
            "kind": report.kind,
            "reason": reason,
            "mail_from": report.mail_from,
            "rcpt_to": report.rcpt_to,
            "content": report.content[:UNMATCHED_CONTENT_LIMIT],
        }
        trim_every, limit = self.unmatched_trim_every, self.unmatched_limit

        def run() -> Plan[int]:
            row = yield from fetch_one("insert_unmatched", params)
            assert row is not None
            kept = int(row["id"])
            if kept % trim_every == 0:
                yield from execute("trim_unmatched", {"max_bytes": limit})
            return kept

        return await self.db.write(run)

    async def list_unmatched(self, *, limit: int) -> list[UnmatchedFeedback]:
        """Unmatched reports, newest first (without their contents)."""
        found = await self.db.read(lambda: fetch("unmatched", {"limit": limit}))
        return [rows.unmatched_feedback(row) for row in found]

    async def get_unmatched(self, report_id: int) -> UnmatchedFeedback:
        """One unmatched report with what was received; raises :class:`NotFound`."""
        row = await self.db.read(lambda: fetch_one("unmatched_report", {"id": report_id}))
        if row is None:
            raise NotFound(f"no unmatched report {report_id} (purged after [bounces] "
                           "unmatched_retention, or never kept)")  # fmt: skip
        return rows.unmatched_feedback(row)

    async def purge_unmatched(self, before: float) -> int:
        return await self.db.write(lambda: execute("purge_unmatched", {"before": before}))

    async def delete_unmatched(self, report_id: int) -> bool:
        return bool(await self.db.write(lambda: execute("delete_unmatched", {"id": report_id})))


def _unsubscribed(
    items: Sequence[Feedback], current: dict[int, Row], now: float
) -> Plan[dict[tuple[str, str], frozenset[Lane] | None]]:
    """The (address, scope) unsubscribes on the suppression list (active) that the batch's
    unsubscribes would add to, with the lanes each stops: an unsubscribe whose lanes its entry
    already stops is a repeat. Entries for other reasons do not count: an unsubscribe after a
    hard bounce is kept, so that removing the bounce (a mistake) leaves it."""
    addresses = sorted(
        {
            current[item.delivery_id]["address"].lower()
            for item in items
            if item.kind is FeedbackKind.UNSUBSCRIBED and item.delivery_id in current
        }
    )
    if not addresses:
        return {}
    found = yield from fetch("suppressed_among", {"addresses": addresses, "now": now})
    unsubscribes = [row for row in found if row["reason"] == "unsubscribe"]
    return {
        (address, scope): lanes
        for address, scopes in rows.scopes_by_address(unsubscribes).items()
        for scope, lanes in scopes.items()
    }


def _report_keys(items: Sequence[Feedback]) -> Plan[set[tuple[int, str]]]:
    """(delivery id, report id) of the reports the batch's deliveries' histories hold."""
    ids = sorted({item.delivery_id for item in items if item.key is not None})
    if not ids:
        return set()
    found = yield from fetch("report_keys", {"ids": ids})
    return {(row["delivery_id"], row["report_key"]) for row in found}


def _feedback_plan(items: Sequence[Feedback], now: float) -> Plan[list[FeedbackResult]]:
    if not items:
        return []
    ids = sorted({item.delivery_id for item in items})
    current: dict[int, Row] = {
        row["id"]: row for row in (yield from fetch("deliveries_for_feedback", {"ids": ids}))
    }
    states = {i: RecipientState(row["state"]) for i, row in current.items()}
    listed = yield from _unsubscribed(items, current, now)
    heard = yield from _report_keys(items)
    results: list[FeedbackResult] = []
    moves: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    suppressions: list[dict[str, Any]] = []
    for item in items:
        row = current.get(item.delivery_id)
        if row is None:
            results.append(FeedbackResult(item.delivery_id, None, False))
            continue
        state = states[item.delivery_id]
        if item.key is not None:
            if (item.delivery_id, item.key) in heard:  # sent again (at least once)
                results.append(FeedbackResult(item.delivery_id, state, False, repeat=True))
                continue
            heard.add((item.delivery_id, item.key))
        if item.kind is FeedbackKind.UNSUBSCRIBED and item.suppression is not None:
            entry = (row["address"].lower(), item.suppression[0].lower())
            asked = item.suppression_lanes
            if entry in listed and rows.covers(listed[entry], asked):
                # a repeat: the address is already off this scope's list for these lanes
                results.append(FeedbackResult(item.delivery_id, state, False))
                continue
            held = listed.get(entry, frozenset())
            # what the insert leaves: the entry widened to these lanes too (or every lane)
            listed[entry] = None if asked is None or held is None else held.union(asked)
        move = _MOVES.get(item.kind)
        if move is not None:
            target, leaves = move
            if state not in leaves:  # a repeat, or a recipient never sent: nothing changes
                results.append(FeedbackResult(item.delivery_id, state, False))
                continue
            moves.append(
                {
                    "id": item.delivery_id,
                    "state": target.value,
                    "code": item.code,
                    "enhanced": item.enhanced,
                    "text": item.text,
                    "class": item.cls.value if item.cls else None,
                    "reason": f"{item.kind.value} ({item.source})",
                }
            )
            states[item.delivery_id] = state = target
        if item.cls is not None:  # the report in the recipient's history
            attempts.append(
                {
                    "delivery_id": item.delivery_id,
                    "at": item.at,
                    "class": item.cls.value,
                    "code": item.code,
                    "enhanced": item.enhanced,
                    "text": item.text or "",
                    "relay": item.source,
                    "destination": row["destination"],
                    "duration_ms": 0,
                    "counted": False,
                    "report_key": item.key,
                }
            )
        if item.suppression is not None:
            scope, reason, expires_at = item.suppression
            suppressions.append(
                {
                    "address": row["address"].lower(),
                    "scope": scope.lower(),
                    "reason": reason,
                    "created_at": now,
                    "expires_at": expires_at,
                    "detail": item.text,
                    "source": item.source,
                    "code": item.code,
                    "enhanced": item.enhanced,
                    "text": item.text,
                    "queue_id": row["queue_id"],
                    "lanes": rows.lanes_column(item.suppression_lanes),
                }
            )
        event = _EVENTS[item.kind]
        if event == "deferred" and state in FINAL_FEEDBACK_STATES:
            # a delay heard after the recipient bounced or complained (reports come out of
            # order): its history has it, but the application is not told it is still trying
            event = None
        if event is not None:
            events.append(
                {
                    "type": event,
                    "at": item.at,
                    "delivery_id": item.delivery_id,
                    "class": item.cls.value if item.cls else None,
                    "code": item.code,
                    "enhanced": item.enhanced,
                    "text": item.text,
                }
            )
        results.append(FeedbackResult(item.delivery_id, state, True))
    yield from batch("feedback_state", moves, {"now": now})
    yield from batch("insert_reports", attempts)
    yield from batch("insert_events", events)
    yield from batch("insert_suppression", suppressions)
    return results
