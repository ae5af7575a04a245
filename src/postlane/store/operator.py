"""The operator role, written once for both databases: what the CLI, the HTTP API and the
dashboard read (messages, pages, stats, dead letters) and do (flush, hold, release, delete,
requeue, export and import) (:class:`postlane.store.base.OperatorStore`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from postlane.cursors import DeadLetterKey
from postlane.errors import NotFound
from postlane.message import FINAL_STATES, Lane, RecipientState
from postlane.records import (
    AttemptView,
    Cancelled,
    DeadGroup,
    DeadLetter,
    ExportedMessage,
    LaneStats,
    MessageView,
    SelectionCount,
    Selector,
    ShapeRow,
    Stats,
)
from postlane.store import rows
from postlane.store.base import CANCELLED_BY_APPLICATION, DELETED_BY_OPERATOR
from postlane.store.plans import (
    Plan,
    Row,
    SQLRole,
    batch,
    execute,
    fetch,
    fetch_one,
    selection,
    shown_state,
)
from postlane.triage import group_dead_letters

#: states a waiting recipient can be in (what the queue's listings show by default)
PENDING = ("queued", "sending", "deferred", "held")


class Pager:
    """Collects a page of distinct messages from delivery rows read in id order: a message
    sits at its first selected row, so one whose first selected row is at or before the page's
    cursor belongs to an earlier page and is left out (:meth:`earlier`: a message's rows are
    not always consecutive); the next page starts at the first message left out."""

    def __init__(self, limit: int, after: int) -> None:
        self.limit = limit
        self.ids: list[str] = []
        self.seen: set[str] = set()
        #: the next page's cursor, set once a message beyond this page was seen
        self.next_after: int | None = None
        #: where the next read starts
        self.last_row = after

    @property
    def chunk(self) -> int:
        return max(4 * self.limit, 200)

    def unseen(self, found: Sequence[Row]) -> list[str]:
        """The messages of a chunk of rows not met yet on this page."""
        return list(
            dict.fromkeys(str(r["queue_id"]) for r in found if r["queue_id"] not in self.seen)
        )

    def earlier(self, queue_ids: Iterable[str]) -> None:
        """These messages belong to an earlier page: their rows here are skipped."""
        self.seen.update(queue_ids)

    def feed(self, found: Sequence[Row]) -> bool:
        """Take a chunk of delivery rows (``id``, ``queue_id``); True when the page is complete
        (or the rows ran out)."""
        for row in found:
            row_id, queue_id = int(row["id"]), str(row["queue_id"])
            self.last_row = row_id
            if queue_id in self.seen:
                continue
            if len(self.ids) == self.limit:
                self.next_after = row_id - 1
                return True
            self.ids.append(queue_id)
            self.seen.add(queue_id)
        return len(found) < self.chunk


class SQLOperator(SQLRole):
    """Operators' views and actions."""

    def _selection(
        self,
        selector: Selector,
        default_states: Sequence[str],
        forced_states: Sequence[str] | None = None,
        *,
        by_row: bool = False,
    ) -> tuple[dict[str, str], dict[str, Any]]:
        where, params = selection(
            self.dialect,
            selector,
            default_states=default_states,
            forced_states=forced_states,
            by_row=by_row,
        )
        return {"selection": where}, params

    def _histories(self, delivery_ids: Sequence[int]) -> Plan[dict[int, tuple[AttemptView, ...]]]:
        """Every attempt of some deliveries, oldest first, in one query."""
        found: dict[int, list[AttemptView]] = defaultdict(list)
        if delivery_ids:
            for row in (yield from fetch("histories_of", {"ids": list(delivery_ids)})):
                found[row["delivery_id"]].append(rows.attempt_view(row))
        return {i: tuple(found[i]) for i in delivery_ids}

    def _message_views(self, ids: Sequence[str], *, history: bool) -> Plan[list[MessageView]]:
        """Messages with their recipients (and histories) in the order of ``ids``, in three
        queries whatever their number."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        messages = {row["id"]: row for row in (yield from fetch("messages", {"ids": wanted}))}
        recipients: dict[str, list[Row]] = defaultdict(list)
        for row in (yield from fetch("recipients_of", {"ids": list(messages)})):
            recipients[row["queue_id"]].append(row)
        histories = (
            (yield from self._histories([r["id"] for rs in recipients.values() for r in rs]))
            if history
            else {}
        )
        return [
            rows.message_view(
                messages[queue_id],
                [
                    rows.recipient_view(r, histories[r["id"]] if history else None)
                    for r in recipients[queue_id]
                ],
            )
            for queue_id in wanted
            if queue_id in messages
        ]

    async def get_message(self, queue_id: str, *, history: bool = False) -> MessageView:
        views = await self.db.read(lambda: self._message_views([queue_id], history=history))
        if not views:
            raise NotFound(f"no message with id {queue_id}")
        return views[0]

    async def get_content(self, queue_id: str) -> bytes:
        row = await self.db.read(lambda: fetch_one("message_content", {"id": queue_id}))
        if row is None:
            raise NotFound(f"no message with id {queue_id}")
        return bytes(row["content"])

    async def list_messages(self, selector: Selector, *, limit: int) -> list[MessageView]:
        fill, params = self._selection(selector, PENDING)

        def run() -> Plan[list[MessageView]]:
            found = yield from fetch("list_message_ids", {**params, "limit": limit}, fill=fill)
            return (yield from self._message_views([r["queue_id"] for r in found], history=False))

        return await self.db.read(run)

    async def page_messages(
        self, selector: Selector, *, after: int, limit: int
    ) -> tuple[list[MessageView], int | None]:
        """Walks the primary key and stops at the page's end: a page costs the same at any
        depth."""
        fill, params = self._selection(selector, PENDING)

        def run() -> Plan[tuple[list[MessageView], int | None]]:
            pager = Pager(limit, after)
            while True:
                found = yield from fetch(
                    "page_rows",
                    {**params, "after": pager.last_row, "limit": pager.chunk},
                    fill=fill,
                )
                candidates = pager.unseen(found) if after else []
                if candidates:
                    listed = yield from fetch(
                        "listed_before",
                        {**params, "candidates": candidates, "after": after},
                        fill=fill,
                    )
                    pager.earlier(str(r["queue_id"]) for r in listed)
                if pager.feed(found):
                    break
            views = yield from self._message_views(pager.ids, history=False)
            return views, pager.next_after

        return await self.db.read(run)

    async def stats(self, now: float) -> Stats:
        def run() -> Plan[Stats]:
            counts = yield from fetch("counts_by_lane_state", {"now": now})
            listed = yield from fetch_one("suppression_count")
            return _stats(counts, now, int(listed["n"]) if listed else 0)

        return await self.db.read(run)

    def _dead_letters(self, found: Sequence[Row], *, history: bool) -> Plan[list[DeadLetter]]:
        histories = (yield from self._histories([r["id"] for r in found])) if history else {}
        return [rows.dead_letter(r, histories[r["id"]] if history else None) for r in found]

    async def list_dead(
        self, selector: Selector, *, limit: int, after: DeadLetterKey | None = None
    ) -> list[DeadLetter]:
        fill, params = self._selection(selector, ("dead",), ("dead",))
        keyset = _dead_keyset(after)

        def run() -> Plan[list[DeadLetter]]:
            found = yield from fetch(
                "dead_letters", {**params, **keyset, "limit": limit}, fill=fill
            )
            return (yield from self._dead_letters(found, history=False))

        return await self.db.read(run)

    async def get_dead(self, queue_id: str) -> list[DeadLetter]:
        fill, params = self._selection(Selector(ids=(queue_id,)), ("dead",), ("dead",))

        def run() -> Plan[list[DeadLetter]]:
            found = sorted(
                (
                    yield from fetch(
                        "dead_letters", {**params, **_dead_keyset(None), "limit": 10**6}, fill=fill
                    )
                ),
                key=lambda row: int(row["id"]),
            )
            if not found:
                exists = yield from fetch_one("message_exists", {"id": queue_id})
                raise NotFound(
                    f"message {queue_id} has no dead recipient"
                    if exists
                    else f"no message with id {queue_id}"
                )
            return (yield from self._dead_letters(found, history=True))

        return await self.db.read(run)

    # -- operator actions --------------------------------------------------------------------------
    #
    # Bulk actions walk a selection in slices of delivery ids (select, then act on those ids):
    # a million-row delete never holds the write lock for long, can show progress, and exports
    # exactly what it deletes. Each action re-checks the state it applies to, so racing a
    # worker is safe: a delivery that moved on meanwhile is left alone.

    async def select_delivery_ids(
        self, selector: Selector, states: Sequence[str], *, after: int, limit: int
    ) -> list[int]:
        fill, params = self._selection(selector, states, states, by_row=True)
        found = await self.db.read(
            lambda: fetch(
                "select_delivery_ids", {**params, "after": after, "limit": limit}, fill=fill
            )
        )
        return [int(row["id"]) for row in found]

    async def summarize(self, selector: Selector, states: Sequence[str]) -> list[SelectionCount]:
        fill, params = self._selection(selector, states, states)
        fill = {**fill, "state": shown_state(self.dialect, selector, params)}
        found = await self.db.read(lambda: fetch("summarize", params, fill=fill))
        return [
            SelectionCount(
                Lane(r["lane"]),
                r["domain"],
                RecipientState(r["state"]),
                rows.reply_class(r["last_class"]),
                int(r["n"]),
            )
            for r in found
        ]

    async def selected_destinations(self, selector: Selector, states: Sequence[str]) -> list[str]:
        """The destinations the selected deliveries were given at enqueue (MX lookups
        included), so a flush lifts the pause its deliveries actually wait for."""
        fill, params = self._selection(selector, states, states)
        found = await self.db.read(lambda: fetch("selected_destinations", params, fill=fill))
        return [row["destination"] for row in found]

    async def export_deliveries(self, delivery_ids: Sequence[int]) -> list[ExportedMessage]:
        def run() -> Plan[list[ExportedMessage]]:
            """Full records by message, in the order of their first selected recipient."""
            if not delivery_ids:
                return []
            recipients: dict[str, list[Row]] = defaultdict(list)
            for row in (yield from fetch("export_recipients", {"ids": list(delivery_ids)})):
                recipients[row["queue_id"]].append(row)
            histories = yield from self._histories(
                [r["id"] for rs in recipients.values() for r in rs]
            )
            messages = {
                row["id"]: row
                for row in (yield from fetch("messages_with_content", {"ids": list(recipients)}))
            }
            return [
                rows.exported_message(
                    messages[queue_id],
                    [rows.exported_recipient(r, histories[r["id"]]) for r in recipients[queue_id]],
                )
                for queue_id in recipients
            ]

        return await self.db.read(run)

    async def flush(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": list(delivery_ids), "now": now}
        return await self.db.write(lambda: execute("flush", params))

    async def hold(self, delivery_ids: Sequence[int], now: float) -> tuple[int, int]:
        return await self._also_after_send("hold", "hold_after_send", delivery_ids, now)

    async def release(self, delivery_ids: Sequence[int], now: float) -> tuple[int, int]:
        return await self._also_after_send("release", "release_after_send", delivery_ids, now)

    async def _also_after_send(
        self, query: str, after_send: str, delivery_ids: Sequence[int], now: float
    ) -> tuple[int, int]:
        """An action on waiting deliveries, and the same one noted on deliveries being sent
        (applied once their try is recorded), in one transaction: how many of each."""
        params = {"ids": list(delivery_ids), "now": now}

        def run() -> Plan[tuple[int, int]]:
            waiting = yield from execute(query, params)
            return waiting, (yield from execute(after_send, params))

        return await self.db.write(run)

    async def delete_deliveries(
        self, delivery_ids: Sequence[int], states: Sequence[str], *, why: str = DELETED_BY_OPERATOR
    ) -> int:
        now = time.time()
        return await self.db.write(lambda: _delete_plan(delivery_ids, states, why, now))

    async def cancel_message(
        self, queue_id: str, *, submitter: str | None = None, now: float
    ) -> Cancelled | None:
        return await self.db.write(lambda: cancel_plan(queue_id, submitter, now))

    async def requeue_dead(self, delivery_ids: Sequence[int], now: float) -> list[float]:
        def run() -> Plan[list[float]]:
            requeued = yield from fetch("requeue_dead", {"ids": list(delivery_ids), "now": now})
            if requeued:
                queue_ids = sorted({row["queue_id"] for row in requeued})
                yield from execute("reopen_messages", {"ids": queue_ids})
                yield from batch(
                    "insert_events",
                    [
                        _queued_event(row["id"], now, "requeued from the dead-letter queue")
                        for row in requeued
                    ],
                )
            return [max(0.0, now - row["dead_at"]) for row in requeued]

        return await self.db.write(run)

    async def import_messages(self, messages: Sequence[ExportedMessage], now: float) -> int:
        return await self.db.write(lambda: _import_plan(messages, now))

    async def dead_groups(self, selector: Selector, *, limit: int) -> list[DeadGroup]:
        fill, params = self._selection(selector, ("dead",), ("dead",))
        found = await self.db.read(lambda: fetch("dead_groups", params, fill=fill))
        return group_dead_letters(
            [
                (
                    r["last_class"],
                    r["domain"],
                    r["last_code"],
                    r["last_enhanced"],
                    r["last_text"],
                    r["n"],
                    r["first_dead_at"],
                    r["last_dead_at"],
                    r["sample_id"],
                )
                for r in found
            ],
            limit,
        )

    async def shape(self, now: float, edges: Sequence[float], *, limit: int) -> list[ShapeRow]:
        """Waiting recipients by domain and age bucket: bucket 1 is [0, first edge), the last
        is past the last edge; a recipient from the future counts in the total only."""
        bounds = [float(edge) for edge in edges]
        params: dict[str, Any] = {"now": now, "limit": limit}
        cases = ["WHEN {age} < 0 THEN 0"]
        for i, bound in enumerate(bounds):
            params[f"edge{i}"] = bound
            cases.append(f"WHEN {{age}} < {self.dialect.param(f'edge{i}')} THEN {i + 1}")
        age = f"({self.dialect.param('now')} - created_at)"
        bucket = "CASE " + " ".join(cases).replace("{age}", age) + f" ELSE {len(bounds) + 1} END"
        found = await self.db.read(lambda: fetch("shape", params, fill={"bucket": bucket}))
        shaped: dict[str, list[int]] = {}
        totals: dict[str, int] = {}
        for r in found:
            counts = shaped.setdefault(r["domain"], [0] * (len(bounds) + 1))
            totals[r["domain"]] = int(r["total"])
            if r["bucket"]:
                counts[int(r["bucket"]) - 1] += int(r["n"])
        return [
            ShapeRow(domain, totals[domain], tuple(counts)) for domain, counts in shaped.items()
        ]


def _dead_keyset(after: DeadLetterKey | None) -> dict[str, Any]:
    """``dead_letters``' keyset parameters: after ``after``, or (None) from the first."""
    if after is None:
        return {"dead_at": None, "after_id": None}
    return {"dead_at": after.dead_at, "after_id": after.delivery_id}


#: what an imported recipient comes back as: waiting or being sent -> due now
_IMPORTED_STATE = {
    RecipientState.SENDING: RecipientState.QUEUED,
    RecipientState.QUEUED: RecipientState.QUEUED,
    RecipientState.DEFERRED: RecipientState.QUEUED,
}


def _queued_event(delivery_id: int, now: float, text: str) -> dict[str, object]:
    """``insert_events``' row: a recipient waiting again (requeued, imported)."""
    return {
        "type": "queued",
        "at": now,
        "delivery_id": delivery_id,
        "class": None,
        "code": None,
        "enhanced": None,
        "text": text,
    }


def _import_plan(messages: Sequence[ExportedMessage], now: float) -> Plan[int]:
    """Bring back exported messages with their ids, Message-IDs, content and histories: a
    message already stored keeps its row, a recipient already present is skipped, an
    idempotency key held by another message is dropped from the imported one."""
    restored = 0
    imported: list[dict[str, object]] = []
    for message in messages:
        found = yield from fetch_one(
            "message_or_key", {"id": message.id, "scope": "", "key": message.idempotency_key}
        )
        assert found is not None
        if not found["message_exists"]:
            yield from execute(
                "import_message",
                {
                    "id": message.id,
                    "lane": message.lane.value,
                    "sender": message.sender,
                    "subject": message.subject,
                    "message_id": message.message_id,
                    "scope": "",  # an export does not say whose key it was: a local one
                    "submitter": None,
                    "idempotency_key": None if found["key_held"] else message.idempotency_key,
                    "size": len(message.content),
                    "metadata": rows.compact_json(message.metadata),
                    "created_at": message.created_at,
                    "content": message.content,
                    "send_at": message.send_at,
                    "expires_at": message.expires_at,
                },
            )
        for r in message.recipients:
            params = {"queue_id": message.id, "address": r.address}
            if (yield from fetch_one("delivery_exists", params)) is not None:
                continue
            state = _IMPORTED_STATE.get(r.state, r.state)
            reply = r.last_response
            inserted = yield from fetch_one(
                "import_delivery",
                {
                    **params,
                    "domain": r.domain,
                    "destination": r.destination,
                    "lane": message.lane.value,
                    "created_at": r.created_at,
                    "state": state.value,
                    "attempts": r.attempts,
                    "deferrals": r.deferrals,
                    # waiting again: due now, or at its send_at while that is ahead (a
                    # campaign exported and imported the night before still goes tomorrow)
                    "next_attempt_at": (
                        max(now, message.send_at or now)
                        if state is RecipientState.QUEUED
                        else r.next_attempt_at
                    ),
                    "expires_at": r.expires_at,
                    "code": reply.code if reply else None,
                    "enhanced": reply.enhanced if reply else None,
                    "text": reply.text if reply else None,
                    "class": reply.cls.value if reply else None,
                    "reason": "imported" if state is not r.state else r.reason,
                    # a final recipient keeps its time (a dead letter's death); one waiting
                    # again starts now
                    "updated_at": (
                        r.updated_at
                        if state is r.state and state in FINAL_STATES and r.updated_at
                        else now
                    ),
                },
            )
            assert inserted is not None
            yield from batch(
                "insert_attempts", [rows.attempt_params(inserted["id"], a) for a in r.history]
            )
            if state in (RecipientState.QUEUED, RecipientState.HELD):
                # waiting again: the application, told "deleted", hears it is back
                imported.append(_queued_event(inserted["id"], now, "restored by an import"))
            restored += 1
        yield from batch("insert_events", imported)
        imported.clear()
        yield from execute("reopen_messages", {"ids": [message.id]})
        yield from execute("mark_done", {"ids": [message.id], "now": now})
    return restored


def _stats(counts: Sequence[Row], now: float, suppression_list: int) -> Stats:
    by_lane_state: dict[tuple[str, str], int] = {}
    scheduled: dict[str, int] = defaultdict(int)
    oldest: dict[str, float] = {}
    finals: dict[str, int] = defaultdict(int)
    for row in counts:
        lane, state, n, min_created = row["lane"], row["state"], row["n"], row["oldest"]
        by_lane_state[(lane, state)] = n
        if state == "queued":
            scheduled[lane] = int(row["later"] or 0)
        if state in ("queued", "deferred", "sending") and min_created is not None:
            oldest[lane] = min(oldest.get(lane, min_created), min_created)
        if state in ("sent", "dead", "suppressed", "bounced", "complained"):
            finals[state] += n
    lanes = {
        lane: LaneStats(
            ready=by_lane_state.get((lane.value, "queued"), 0) - scheduled[lane.value],
            scheduled=scheduled[lane.value],
            deferred=by_lane_state.get((lane.value, "deferred"), 0),
            held=by_lane_state.get((lane.value, "held"), 0),
            sending=by_lane_state.get((lane.value, "sending"), 0),
            oldest_age_seconds=max(0.0, now - oldest[lane.value]) if lane.value in oldest else 0.0,
        )
        for lane in Lane
    }
    return Stats(
        lanes=lanes,
        sent=finals["sent"],
        dead=finals["dead"],
        suppressed=finals["suppressed"],
        suppression_list=suppression_list,
        bounced=finals["bounced"],
        complained=finals["complained"],
    )


def _delete_plan(
    delivery_ids: Sequence[int], states: Sequence[str], why: str, now: float
) -> Plan[int]:
    """Remove deliveries still in ``states`` with a ``deleted`` event saying ``why``, and the
    messages left without any; how many went."""
    params = {"ids": list(delivery_ids), "states": list(states)}
    yield from execute("insert_deleted_events", {**params, "now": now, "why": why})
    deleted = yield from fetch("delete_deliveries", params)
    touched = sorted({row["queue_id"] for row in deleted})
    if touched:
        yield from execute("delete_empty_messages", {"ids": touched})
        # what is left of a message may now all be final
        yield from execute("mark_done", {"ids": touched, "now": now})
    return len(deleted)


#: what a cancel removes: what waits (a delivery being sent is its worker's to finish)
CANCELLABLE = ("queued", "deferred", "held")


def cancel_plan(queue_id: str, submitter: str | None, now: float) -> Plan[Cancelled | None]:
    """Cancel what of a message has not gone yet, in one transaction (the store's, or an
    application's own: the transactional outbox); None when there is no such message, or
    ``submitter`` is given and did not hand it in."""
    found = yield from fetch("messages", {"ids": [queue_id]})
    if not found or submitter not in (None, found[0]["submitter"]):
        return None
    waiting = [
        row["id"]
        for row in (yield from fetch("recipients_of", {"ids": [queue_id]}))
        if row["state"] in CANCELLABLE
    ]
    cancelled = (
        (yield from _delete_plan(waiting, CANCELLABLE, CANCELLED_BY_APPLICATION, now))
        if waiting
        else 0
    )
    left = yield from fetch("recipients_of", {"ids": [queue_id]})
    return Cancelled(
        queue_id, cancelled, tuple((row["address"], RecipientState(row["state"])) for row in left)
    )
