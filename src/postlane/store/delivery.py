"""The delivery role, written once for both databases: enqueue, claim under a lease, record
results, renew and reap leases, purge what is finished (:class:`postlane.store.base.DeliveryStore`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TypeVar

from postlane.errors import IdempotencyConflict, StoreUnavailable, ValidationError
from postlane.message import FINAL_STATES, RAW_FINGERPRINT, Lane, PreparedMessage, RecipientState
from postlane.records import ClaimedMessage, Delivery, EnqueueResult, Outcome
from postlane.store import rows
from postlane.store.plans import Plan, Row, SQLRole, Statement, batch, execute, fetch, fetch_one

T = TypeVar("T")

#: a transaction lost to a concurrent enqueue's idempotency key is run again this many times
KEY_TRIES = 3
#: rows a reap or a purge handles per statement (each slice its own short write)
REAP_SLICE = 1000
PURGE_SLICE = 500


def enqueue_plan(
    messages: Sequence[PreparedMessage], now: float, notify: str | None = None
) -> Plan[list[EnqueueResult]]:
    """Store ``messages`` at ``now`` (see :func:`enqueue_calls_plan`)."""
    return (yield from _enqueue([(message, now) for message in messages], notify))


#: one enqueue call: its messages and its time
Call = tuple[Sequence[PreparedMessage], float]


def enqueue_calls_plan(
    calls: Sequence[Call], notify: str | None = None
) -> Plan[list[list[EnqueueResult]]]:
    """Several concurrent enqueue calls as one plan, each call's results apart (what the
    database runs when it combines them into one transaction: the statements are per batch, not
    per call). As if the calls ran one after the other, in order: a key repeated by a later call
    is its duplicate; a key's conflict fails the whole plan (the database then runs each call
    alone, so that only the conflicting one fails). ``notify``: the dialect's wake-up query,
    run when something new was stored."""
    entries = [(message, now) for messages, now in calls for message in messages]
    results = yield from _enqueue(entries, notify)
    split: list[list[EnqueueResult]] = []
    start = 0
    for messages, _now in calls:
        split.append(results[start : start + len(messages)])
        start += len(messages)
    return split


def _enqueue(
    entries: Sequence[tuple[PreparedMessage, float]], notify: str | None
) -> Plan[list[EnqueueResult]]:
    """Store each message at its time: a constant number of statements per batch (the
    suppression check, the message rows, the recipient rows, their ``queued`` events, and a
    look-up of existing messages when an idempotency key was already stored).

    A key belongs to its submitter. A message whose submitter already stored its key creates
    nothing and gets the first id; with a different payload (fingerprint) it is refused with
    :class:`IdempotencyConflict` and nothing of the batch is stored. The first message per key
    in the batch is the candidate; later ones repeat it. Candidates with a key go in key order,
    so two concurrent batches take their locks in the same order and never deadlock."""
    messages = [message for message, _now in entries]
    at = {message.id: now for message, now in entries}
    addresses = sorted({r.address.lower() for m in messages for r in m.recipients})
    listed: dict[str, rows.Listed] = {}
    # most queues' suppression list is empty: one cheap statement instead of the look-up
    if addresses and (yield from fetch_one("any_suppression")) is not None:
        latest = max(at.values())
        found = yield from fetch("suppressed_among", {"addresses": addresses, "now": latest})
        listed = rows.scopes_by_address(found)
    suppressed: dict[str, set[str]] = {
        m.id: {
            r.address for r in m.recipients if rows.listed_for(listed, r.address, m.sender, m.lane)
        }
        if listed
        else set()
        for m in messages
    }

    candidates: dict[tuple[str, str], PreparedMessage] = {}
    for message in messages:
        key = _key(message)
        if key is not None:
            first = candidates.setdefault(key, message)
            if first.fingerprint != message.fingerprint and _comparable(
                first.fingerprint, message.fingerprint
            ):
                raise ValidationError(
                    f"idempotency key {key[1]!r} is given to two different messages of this "
                    "batch; nothing was stored (a key names one message: give each its own)",
                    field="idempotency_key",
                )
    keyless = [m for m in messages if m.idempotency_key is None]
    pending = [candidates[key] for key in sorted(candidates)] + keyless
    stored: set[str] = set()
    existing: dict[tuple[str, str], Row] = {}
    for _ in range(KEY_TRIES):
        if not pending:
            break
        message_rows = [
            rows.message_params(m, now=at[m.id], done=len(suppressed[m.id]) == len(m.recipients))
            for m in pending
        ]
        inserted = yield from batch("insert_messages", message_rows)
        stored.update(row["id"] for row in inserted.rows)
        lost = [key for m in pending if m.id not in stored and (key := _key(m)) is not None]
        if lost:
            found_rows = yield from batch(
                "messages_by_idempotency_key", [{"scope": s, "key": k} for s, k in lost]
            )
            existing.update(
                ((row["idempotency_scope"], row["idempotency_key"]), row) for row in found_rows.rows
            )
        # a key whose row was purged between the two statements: try that message again
        pending = [m for m in pending if m.id not in stored and _key(m) not in existing]
    if pending:
        raise StoreUnavailable("an idempotency key kept changing hands; enqueue again")
    for key, row in existing.items():
        _same_payload(candidates[key], row["fingerprint"], key[1], row["id"])

    new = [m for m in messages if m.id in stored]
    yield from batch(
        "insert_deliveries",
        [
            rows.delivery_params(m, r, now=at[m.id], suppressed=r.address in suppressed[m.id])
            for m in new
            for r in m.recipients
        ],
    )
    if new:
        yield from execute("insert_enqueue_events", {"ids": [m.id for m in new]})
    results: list[EnqueueResult] = []
    seen: set[str] = set()
    for message in messages:
        key = _key(message)
        if message.id in stored and message.id not in seen:
            seen.add(message.id)
            results.append(EnqueueResult(id=message.id, duplicate=False))
        elif key is not None and candidates[key].id in stored:
            results.append(EnqueueResult(id=candidates[key].id, duplicate=True))
        elif key is not None:
            results.append(EnqueueResult(id=existing[key]["id"], duplicate=True))
    if new and notify is not None:
        yield Statement(notify)
    return results


def _key(message: PreparedMessage) -> tuple[str, str] | None:
    """A message's idempotency key with its owner, or None."""
    if message.idempotency_key is None:
        return None
    return rows.idempotency_scope(message), message.idempotency_key


def _same_payload(message: PreparedMessage, fingerprint: str | None, key: str, first: str) -> None:
    """A repeated key must come with the payload it first came with (unknown on either side,
    as for messages stored before fingerprints, or made in another way: a retry)."""
    if not _comparable(fingerprint, message.fingerprint):
        return
    if fingerprint != message.fingerprint:
        raise IdempotencyConflict(key, first)


def _comparable(first: str | None, again: str | None) -> bool:
    """Whether two fingerprints were made the same way (a raw message's changed: see
    :data:`postlane.message.RAW_FINGERPRINT`), so that they tell one payload from another."""
    if first is None or again is None:
        return False
    return first.startswith(RAW_FINGERPRINT) == again.startswith(RAW_FINGERPRINT)


class SQLDelivery(SQLRole):
    """Ingest and workers' operations."""

    async def enqueue(self, messages: Sequence[PreparedMessage], now: float) -> list[EnqueueResult]:
        results = await self.db.write_combined(self._enqueue_calls, (messages, now))
        self.db.enqueued()
        return results

    def _enqueue_calls(self, calls: list[Call]) -> Plan[list[list[EnqueueResult]]]:
        """Concurrent enqueues, combined by the database into one plan where it can."""
        return enqueue_calls_plan(calls, self.dialect.notify_query)

    async def claim_due(
        self,
        owner: str,
        quotas: Sequence[tuple[Lane, int]],
        *,
        limit: int,
        now: float,
        lease_until: float,
        reserved: Mapping[Lane, int] | None = None,
        kept: Mapping[Lane, int] | None = None,
    ) -> list[ClaimedMessage]:
        def claim() -> Plan[list[ClaimedMessage]]:
            """Each lane's quota in the order given, then fill up to ``limit`` from the lanes in
            that order, then the other due recipients of the messages reached (so one
            message's recipients go out in one transaction). Slots ``reserved`` for a lane stay
            out of the other lanes' reach until that lane is found to have nothing more due;
            slots ``kept`` for a lane, for good, beyond the other lanes' quotas (their share
            of a claim is theirs whatever is kept)."""
            params = {"owner": owner, "now": now, "lease_until": lease_until}
            leased: list[Row] = []
            held = {lane: n for lane, n in (reserved or {}).items() if n > 0}
            only = {lane: n for lane, n in (kept or {}).items() if n > 0}
            #: lanes that gave fewer than asked: nothing more is due in them (this transaction
            #: is the only writer), so filling does not ask them again
            exhausted: set[Lane] = set()

            def lease(lane: Lane, wanted: int, *, filling: bool) -> Plan[None]:
                """Up to ``wanted`` of ``lane``, short of the slots held for the others (and,
                when ``filling`` beyond the quotas, of those kept for them)."""
                nonlocal leased
                others = sum(n for other, n in held.items() if other is not lane)
                if filling:
                    others += sum(n for other, n in only.items() if other is not lane)
                wanted = min(wanted, limit - len(leased) - others)
                if wanted <= 0 or lane in exhausted:
                    return
                got = yield from fetch(
                    "claim_lane", {**params, "lane": lane.value, "limit": wanted}
                )
                leased += got
                if len(got) < wanted:
                    exhausted.add(lane)
                if lane in held:  # an exhausted lane frees the slots held for it
                    held[lane] = 0 if lane in exhausted else max(0, held[lane] - len(got))

            for lane, quota in quotas:
                yield from lease(lane, quota, filling=False)
            # the lanes still holding slots first: until they are found empty, the others
            # cannot have those slots
            order = [lane for lane, _ in quotas]
            for lane in sorted(order, key=lambda lane: held.get(lane, 0) == 0):
                if len(leased) >= limit:
                    break
                yield from lease(lane, limit - len(leased), filling=True)
            if not leased:
                return []
            queue_ids = list(dict.fromkeys(row["queue_id"] for row in leased))
            leased += yield from fetch("claim_rest_of_messages", {**params, "queue_ids": queue_ids})
            by_message: dict[str, list[Delivery]] = defaultdict(list)
            for row in leased:
                by_message[row["queue_id"]].append(rows.delivery(row))
            found = yield from fetch("claimed_messages", {"ids": list(by_message)})
            claimed = [rows.claimed_message(row, by_message[row["id"]]) for row in found]
            # started in lane order, so a destination's limit admits high mail first
            claimed.sort(key=lambda m: (m.lane.rank, m.created_at, m.queue_id))
            return claimed

        return await self.db.write(claim)

    async def record(self, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
        def record() -> Plan[int]:
            """The outcomes in one statement, then their attempts, suppressions, finished
            messages and recoveries. A delivery no longer leased by ``owner`` is skipped; one
            listed twice gets its first outcome."""
            first: dict[int, Outcome] = {}
            for outcome in outcomes:
                first.setdefault(outcome.delivery_id, outcome)
            todo = list(first.values())
            if not todo:
                return 0
            finals = [o.delivery_id for o in todo if o.state in FINAL_STATES]
            if finals and self.dialect.row_locks:
                # Two workers finishing a message's last two recipients would each still see
                # the other's pending and neither would mark it done: lock the messages first.
                yield from fetch("lock_messages_of", {"ids": finals})
            applied_rows = yield from batch(
                "record_outcomes",
                [rows.outcome_params(o) for o in todo],
                {"owner": owner, "now": now},
            )
            applied = {row["id"]: (row["queue_id"], row["address"]) for row in applied_rows.rows}
            #: requeued dead letters among them (most batches have none: two statements saved)
            revived = {row["id"] for row in applied_rows.rows if row["dead_since"] is not None}
            attempts, suppressions, done, recovered = [], [], set(), []
            for o in todo:
                if o.delivery_id not in applied:
                    continue  # no longer ours: deleted or reaped meanwhile
                queue_id, address = applied[o.delivery_id]
                if o.state in FINAL_STATES:
                    done.add(queue_id)
                if o.state is RecipientState.SENT and o.delivery_id in revived:
                    recovered.append(o.delivery_id)
                if o.attempt is not None:
                    attempts.append(rows.attempt_params(o.delivery_id, o.attempt))
                if o.suppress:
                    suppressions.append(rows.bounce_suppression(address, queue_id, o.attempt, now))
            yield from batch("insert_attempts", attempts)
            yield from batch(
                "insert_events",
                [rows.outcome_event(o, now) for o in todo if o.delivery_id in applied],
            )
            yield from batch("insert_suppression", suppressions)
            if done:
                yield from execute("mark_done", {"ids": sorted(done), "now": now})
            if recovered:  # requeued dead letters that got through: their recovery time
                yield from execute("insert_recoveries", {"ids": recovered, "now": now})
                yield from execute("clear_dead_since", {"ids": recovered})
            return len(applied)

        return await self.db.write(record)

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        params = {"owner": owner, "lease_until": lease_until}
        return await self.db.write(lambda: execute("renew_leases", params))

    async def hand_back(self, owner: str, delivery_ids: Sequence[int] | None, now: float) -> int:
        if delivery_ids is None:
            return await self.db.write(
                lambda: execute("hand_back_all", {"owner": owner, "now": now})
            )
        if not delivery_ids:
            return 0
        params = {"owner": owner, "now": now, "ids": list(delivery_ids)}
        return await self.db.write(lambda: execute("hand_back_some", params))

    async def reap_expired_leases(self, now: float, *, keep: str | None = None) -> int:
        def reap() -> Plan[int]:
            """Deliveries whose lease ran out are due again, each with an attempt of unknown
            outcome (the worker may have sent before it died)."""
            total = 0
            while True:
                expired = yield from fetch(
                    "expired_leases", {"now": now, "limit": REAP_SLICE, "keep": keep}
                )
                if expired:
                    ids = [row["id"] for row in expired]
                    reaped = yield from fetch("reap_leases", {"ids": ids, "now": now})
                    yield from batch(
                        "insert_attempts",
                        [
                            {
                                "delivery_id": row["id"],
                                "at": now,
                                "class": "temporary",
                                "code": None,
                                "enhanced": None,
                                "text": row["last_text"],
                                "relay": "",
                                "destination": row["destination"],
                                "duration_ms": 0,
                                "counted": True,
                            }
                            for row in reaped
                        ],
                    )
                    yield from batch(
                        "insert_events",
                        [
                            {
                                "type": "deferred",
                                "at": now,
                                "delivery_id": row["id"],
                                "class": "temporary",
                                "code": None,
                                "enhanced": None,
                                "text": row["last_text"],
                            }
                            for row in reaped
                        ],
                    )
                    total += len(reaped)
                if len(expired) < REAP_SLICE:
                    return total

        return await self.db.write(reap)

    async def expire_owner_leases(self, owners: Sequence[str], now: float) -> int:
        if not owners:
            return 0
        params = {"owners": list(owners), "now": now}
        return await self.db.write(lambda: execute("expire_owner_leases", params))

    async def lease_owners(self) -> list[str]:
        found = await self.db.read(lambda: fetch("lease_owners"))
        return [row["lease_owner"] for row in found]

    async def next_due_at(self) -> float | None:
        row = await self.db.read(lambda: fetch_one("next_due_at"))
        value = None if row is None else row["next_at"]
        return None if value is None else float(value)

    async def wait_for_work(self, timeout: float) -> bool:
        return await self.db.wait_for_work(timeout)

    async def expire_due(self, now: float) -> int:
        """Dead-letter the waiting deliveries whose ``expires_at`` has passed (reason
        ``expired``, event ``expired``): mail useless after a moment is never sent late, even
        when its destination was paused past the time."""

        def expire() -> Plan[int]:
            expired = yield from fetch("expire_deliveries", {"now": now, "limit": REAP_SLICE})
            if not expired:
                return 0
            yield from batch(
                "insert_events",
                [
                    {  # with its last reply, if it was tried (what the dead letter shows)
                        "type": "expired",
                        "at": now,
                        "delivery_id": row["id"],
                        "class": row["last_class"],
                        "code": row["last_code"],
                        "enhanced": row["last_enhanced"],
                        "text": "expired before it could be delivered"
                        + (f" (last reply: {row['last_text']})" if row["last_text"] else ""),
                    }
                    for row in expired
                ],
            )
            queue_ids = sorted({row["queue_id"] for row in expired})
            yield from execute("mark_done", {"ids": queue_ids, "now": now})
            return len(expired)

        total = 0
        while True:
            expired = await self.db.write(expire)
            total += expired
            if expired < REAP_SLICE:
                return total

    async def purge_finished(self, now: float, retention: float, dead_retention: float) -> int:
        params = {
            "cutoff": now - retention,
            "dead_cutoff": now - dead_retention,
            "limit": PURGE_SLICE,
        }
        total = 0
        while True:  # in slices, each its own short transaction
            removed = len(await self.db.write(lambda: fetch("purge_finished", params)))
            total += removed
            if removed < PURGE_SLICE:
                return total
