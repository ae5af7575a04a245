"""The store contract: one body per behaviour, run against every backend (the `store` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from postlane.classify import ReplyClass
from postlane.cursors import DeadLetterKey, SuppressionKey
from postlane.errors import IdempotencyConflict, NotFound, ValidationError
from postlane.message import Lane, Message, PreparedMessage, RecipientState, prepare
from postlane.records import (
    WAITING_FOR_DESTINATION,
    AttemptRecord,
    Deferral,
    DestinationStatus,
    ExportedMessage,
    Outcome,
    ProbeTurn,
    Selector,
    Suppression,
)
from postlane.throttle import LIFTED

T0 = 1_800_000_000.0
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


def msg(
    *to: str,
    lane: str = "normal",
    key: str | None = None,
    sender: str = "app@example.com",
    metadata: dict[str, Any] | None = None,
) -> PreparedMessage:
    return prepare(
        Message(
            sender=sender,
            to=list(to or ["ada@example.net"]),
            subject="s",
            text="body",
            lane=lane,
            idempotency_key=key,
            metadata=metadata,
        ),
        max_size=1_000_000,
        now=T0,
    )


def attempt(
    cls: ReplyClass, code: int | None = 250, now: float = T0, counted: bool = True
) -> AttemptRecord:
    return AttemptRecord(
        now, cls, code, None, f"{code} reply", "smtp://relay:25", "example.net", 12, counted
    )


async def claim(
    store: Any, now: float = T0, limit: int = 100, owner: str = "w1", lease: float = 60
) -> list[Any]:
    return await store.claim_due(owner, ALL_LANES, limit=limit, now=now, lease_until=now + lease)


async def read_events(
    store: Any,
    expect: Callable[[list[Any]], bool],
    limit: int = 100,
    *,
    after: int | None = None,
    types: Sequence[str] = (),
) -> list[Any]:
    """``events_after(after)``, read again until ``expect`` holds (at most 10 s). PostgreSQL
    shows a transaction's events once every write transaction of the database begun before it
    has ended, so they may show up a moment late while another one runs (docs/events.md; the
    other test workers' databases' transactions count while they cannot be placed)."""
    deadline = time.monotonic() + 10
    while True:
        events = await store.events_after(after, limit=limit, types=types)
        if expect(events) or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)


def last_type(events: list[Any]) -> str | None:
    return events[-1].type if events else None


def deliveries(claimed: list[Any]) -> list[Any]:
    return [d for m in claimed for d in m.deliveries]


async def test_enqueue_then_read_back(store: Any) -> None:
    prepared = msg("ada@example.net", "bob@gmail.com", metadata={"user": 42})
    [result] = await store.enqueue([prepared], T0)
    assert result.id == prepared.id and not result.duplicate
    view = await store.get_message(prepared.id)
    assert view.state is RecipientState.QUEUED
    assert view.message_id == prepared.message_id
    assert view.size == len(prepared.content)
    assert view.metadata == {"user": 42}
    assert [(r.address, r.destination) for r in view.recipients] == [
        ("ada@example.net", "example.net"),
        ("bob@gmail.com", "google"),
    ]
    assert await store.get_content(prepared.id) == prepared.content


async def test_unknown_ids_are_not_found(store: Any) -> None:
    with pytest.raises(NotFound):
        await store.get_message("nope")
    with pytest.raises(NotFound):
        await store.get_content("nope")
    with pytest.raises(NotFound):
        await store.get_dead("nope")


async def test_same_idempotency_key_returns_the_first_id(store: Any) -> None:
    first = msg(key="signup-42")
    again = msg(key="signup-42")  # a retry: the same payload, another attempt to store it
    [a] = await store.enqueue([first], T0)
    [b] = await store.enqueue([again], T0 + 1)
    assert (a.id, a.duplicate) == (first.id, False)
    assert (b.id, b.duplicate) == (first.id, True)
    with pytest.raises(NotFound):
        await store.get_message(again.id)


async def test_idempotency_holds_under_concurrent_enqueues(store: Any) -> None:
    candidates = [msg(key="race") for _ in range(50)]
    results = await asyncio.gather(*(store.enqueue([m], T0) for m in candidates))
    flat = [r for batch in results for r in batch]
    assert sum(not r.duplicate for r in flat) == 1
    assert len({r.id for r in flat}) == 1
    listed = await store.list_messages(Selector(), limit=100)
    assert len(listed) == 1


async def test_a_batch_with_a_repeated_key_stores_one(store: Any) -> None:
    results = await store.enqueue([msg(key="k"), msg(key="k")], T0)
    assert [r.duplicate for r in results] == [False, True]
    assert results[0].id == results[1].id


async def test_suppressed_recipients_are_never_claimed(store: Any) -> None:
    await store.add_suppression(Suppression("Gone@Example.net", T0, "operator", "test"))
    prepared = msg("gone@example.net", "here@example.net")
    await store.enqueue([prepared], T0)
    view = await store.get_message(prepared.id)
    assert {r.address: r.state for r in view.recipients} == {
        "gone@example.net": RecipientState.SUPPRESSED,
        "here@example.net": RecipientState.QUEUED,
    }
    assert [d.address for d in deliveries(await claim(store))] == ["here@example.net"]


async def test_a_message_whose_recipients_are_all_suppressed_is_finished(store: Any) -> None:
    await store.add_suppression(Suppression("gone@example.net", T0, "operator", None))
    prepared = msg("gone@example.net")
    await store.enqueue([prepared], T0)
    assert (await store.get_message(prepared.id)).state is RecipientState.SUPPRESSED
    assert await claim(store) == []


async def test_claims_take_the_high_lane_first(store: Any) -> None:
    low, normal, high = msg(lane="low"), msg(lane="normal"), msg(lane="high")
    await store.enqueue([low, normal, high], T0)
    claimed = await store.claim_due("w", ALL_LANES, limit=1, now=T0, lease_until=T0 + 60)
    assert [m.queue_id for m in claimed] == [high.id]
    claimed = await store.claim_due(
        "w", [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 1)], limit=1, now=T0, lease_until=T0 + 60
    )
    assert [m.queue_id for m in claimed] == [low.id]


async def test_a_claimed_delivery_is_leased_and_not_claimed_twice(store: Any) -> None:
    prepared = msg("a@example.net", "b@example.net")
    await store.enqueue([prepared], T0)
    first = await claim(store, owner="w1")
    assert len(first) == 1 and len(first[0].deliveries) == 2
    assert first[0].content == prepared.content
    assert first[0].sender == "app@example.com"
    assert await claim(store, owner="w2") == []
    view = await store.get_message(prepared.id)
    assert {r.state for r in view.recipients} == {RecipientState.SENDING}


async def test_slots_reserved_for_a_lane_are_borrowed_only_while_it_is_empty(store: Any) -> None:
    lows = [msg(lane="low") for _ in range(6)]
    await store.enqueue(lows, T0)
    # the low lane's own quota first: it may not take the 2 slots held for high, but once
    # high is found empty (it is asked next, in the fill), low borrows them
    quotas = [(Lane.LOW, 4), (Lane.HIGH, 0), (Lane.NORMAL, 0)]
    first = await store.claim_due(
        "w", quotas, limit=4, now=T0, lease_until=T0 + 60, reserved={Lane.HIGH: 2}
    )
    assert len(first) == 4
    high = msg(lane="high")
    await store.enqueue([high], T0)
    # high has mail now: of 2 slots held for it, it uses 1 and the other stays held
    second = await store.claim_due(
        "w", quotas, limit=2, now=T0, lease_until=T0 + 60, reserved={Lane.HIGH: 2}
    )
    assert [m.lane for m in second] == [Lane.HIGH, Lane.LOW]
    assert second[0].queue_id == high.id


async def test_slots_kept_for_a_lane_stay_free_beyond_the_other_lanes_quotas(store: Any) -> None:
    await store.enqueue([msg(lane="low") for _ in range(6)], T0)
    quotas = [(Lane.HIGH, 3), (Lane.NORMAL, 0), (Lane.LOW, 1)]
    # high is empty, but its 2 kept slots stay free: low gets its quota (1) and fills only to 3
    first = await store.claim_due(
        "w", quotas, limit=5, now=T0, lease_until=T0 + 60, kept={Lane.HIGH: 2}
    )
    assert [m.lane for m in first] == [Lane.LOW] * 3
    high = [msg(lane="high") for _ in range(3)]
    await store.enqueue(high, T0)
    # high takes its kept slots and more; low still gets its quota, its share of every claim
    second = await store.claim_due(
        "w", quotas, limit=4, now=T0, lease_until=T0 + 60, kept={Lane.HIGH: 2}
    )
    assert [m.lane for m in second] == [Lane.HIGH] * 3 + [Lane.LOW]


async def test_claimed_messages_come_back_in_lane_order(store: Any) -> None:
    low = msg(lane="low")
    await store.enqueue([low], T0)
    high = msg(lane="high")
    await store.enqueue([high], T0 + 1)  # younger, but it starts first
    claimed = await store.claim_due(
        "w",
        [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 1)],
        limit=2,
        now=T0 + 2,
        lease_until=T0 + 60,
    )
    assert [m.queue_id for m in claimed] == [high.id, low.id]


async def test_claim_respects_the_limit(store: Any) -> None:
    await store.enqueue([msg() for _ in range(10)], T0)
    assert len(deliveries(await claim(store, limit=4))) == 4
    assert len(deliveries(await claim(store, limit=100))) == 6


async def test_recording_sent_and_dead_writes_attempts_and_suppresses(store: Any) -> None:
    prepared = msg("ok@example.net", "gone@example.net")
    await store.enqueue([prepared], T0)
    ok, gone = deliveries(await claim(store))
    applied = await store.record(
        "w1",
        [
            Outcome(ok.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED, 250)),
            Outcome(
                gone.id,
                RecipientState.DEAD,
                1,
                0,
                None,
                attempt(ReplyClass.HARD_BOUNCE, 550),
                suppress=True,
                reason="hard bounce",
            ),
        ],
        T0 + 1,
    )
    assert applied == 2
    view = await store.get_message(prepared.id, history=True)
    by_address = {r.address: r for r in view.recipients}
    assert by_address["ok@example.net"].state is RecipientState.SENT
    assert by_address["gone@example.net"].state is RecipientState.DEAD
    assert by_address["gone@example.net"].last_response.code == 550  # type: ignore[union-attr]
    assert [a.cls for a in by_address["gone@example.net"].history or ()] == [ReplyClass.HARD_BOUNCE]
    assert view.state is RecipientState.DEAD
    suppressed = await store.is_suppressed(["GONE@example.net", "ok@example.net"])
    assert suppressed == {"GONE@example.net": True, "ok@example.net": False}
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.source, entry.code, entry.queue_id) == ("bounce", 550, prepared.id)
    [dead] = await store.get_dead(prepared.id)
    assert dead.address == "gone@example.net" and dead.cls is ReplyClass.HARD_BOUNCE
    assert dead.relay == "smtp://relay:25" and dead.reason == "hard bounce"
    assert [a.code for a in dead.history or ()] == [550]


async def test_a_result_from_a_worker_that_lost_its_lease_is_ignored(store: Any) -> None:
    await store.enqueue([msg()], T0)
    [d] = deliveries(await claim(store, owner="w1"))
    applied = await store.record(
        "intruder",
        [Outcome(d.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED))],
        T0,
    )
    assert applied == 0


async def test_a_deferred_delivery_comes_due_at_its_time(store: Any) -> None:
    prepared = msg()
    await store.enqueue([prepared], T0)
    [d] = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(
                d.id, RecipientState.DEFERRED, 1, 0, T0 + 300, attempt(ReplyClass.TEMPORARY, 451)
            )
        ],
        T0,
    )
    view = await store.get_message(prepared.id)
    assert view.recipients[0].state is RecipientState.DEFERRED
    assert view.recipients[0].next_attempt_at == T0 + 300
    assert await store.next_due_at() == T0 + 300
    assert await claim(store, now=T0 + 299) == []
    [again] = deliveries(await claim(store, now=T0 + 300))
    assert again.attempts == 1


async def test_hand_back_returns_deliveries_unattempted(store: Any) -> None:
    prepared = msg("a@example.net", "b@example.net")
    await store.enqueue([prepared], T0)
    await claim(store, owner="w1")
    assert await store.hand_back("w1", None, T0 + 1) == 2
    view = await store.get_message(prepared.id, history=True)
    assert all(
        r.state is RecipientState.QUEUED and r.attempts == 0 and not r.history
        for r in view.recipients
    )
    assert len(deliveries(await claim(store, owner="w2", now=T0 + 1))) == 2


async def test_an_expired_lease_is_reaped_with_an_attempt(store: Any) -> None:
    prepared = msg()
    await store.enqueue([prepared], T0)
    await claim(store, owner="dead-worker", lease=60)
    assert await store.reap_expired_leases(T0 + 59) == 0
    await store.renew_leases("dead-worker", T0 + 120)
    assert await store.reap_expired_leases(T0 + 100) == 0
    assert await store.reap_expired_leases(T0 + 120) == 1
    view = await store.get_message(prepared.id, history=True)
    recipient = view.recipients[0]
    assert recipient.state is RecipientState.QUEUED and recipient.attempts == 1
    assert "lease expired" in (recipient.history or ())[0].text
    [d] = deliveries(await claim(store, owner="w2", now=T0 + 120))
    assert d.attempts == 1


async def test_a_reaper_keeps_its_own_expired_leases_and_records_on_them(store: Any) -> None:
    """A durability audit: a live worker's leases ran out while the store could not answer
    (longer than the lease), its own housekeeping made them due again, and what the remote
    server had taken was sent a second time. The reaper's own leases are its to record."""
    prepared = msg()
    await store.enqueue([prepared], T0)
    [d] = deliveries(await claim(store, owner="w1", lease=60))
    assert await store.reap_expired_leases(T0 + 120, keep="w1") == 0  # its own: kept
    outcome = Outcome(d.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED))
    await store.record("w1", [outcome], T0 + 121)  # the outage over: the send is recorded
    view = await store.get_message(prepared.id, history=True)
    assert view.recipients[0].state is RecipientState.SENT
    assert [a.cls for a in view.recipients[0].history or ()] == [ReplyClass.DELIVERED]
    await store.enqueue([msg()], T0)
    await claim(store, owner="w1", lease=60)
    assert await store.reap_expired_leases(T0 + 120, keep="w2") == 1  # another's: reaped


async def test_leases_of_dead_owners_can_be_ended_at_once(store: Any) -> None:
    await store.enqueue([msg(), msg()], T0)
    await claim(store, owner="host/1/1/a", limit=1)
    await claim(store, owner="host/2/2/b", limit=1)
    assert sorted(await store.lease_owners()) == ["host/1/1/a", "host/2/2/b"]
    assert await store.expire_owner_leases(["host/1/1/a"], T0 + 1) == 1
    assert await store.reap_expired_leases(T0 + 1) == 1
    assert await store.lease_owners() == ["host/2/2/b"]


async def test_stats_count_by_lane_and_state(store: Any) -> None:
    await store.enqueue([msg(lane="high"), msg("a@example.net", "b@example.net", lane="low")], T0)
    await store.enqueue([msg(lane="low")], T0 + 50)
    stats = await store.stats(T0 + 100)
    assert stats.lanes[Lane.HIGH].ready == 1
    assert stats.lanes[Lane.LOW].ready == 3
    assert stats.lanes[Lane.LOW].oldest_age_seconds == pytest.approx(100)
    assert stats.lanes[Lane.NORMAL].oldest_age_seconds == 0
    assert stats.as_json()["lanes"]["high"] == {
        "ready": 1,
        "deferred": 0,
        "held": 0,
        "sending": 0,
        "oldest_age_seconds": 100.0,
        "scheduled": 0,
    }
    claimed = deliveries(await claim(store, now=T0 + 100, limit=1))
    await store.record(
        "w1",
        [Outcome(claimed[0].id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED))],
        T0 + 100,
    )
    stats = await store.stats(T0 + 100)
    assert stats.sent == 1 and stats.lanes[Lane.HIGH].ready == 0


async def test_list_messages_selects_by_lane_domain_state_sender_and_metadata(store: Any) -> None:
    a = msg("x@gmail.com", lane="high", metadata={"tenant": "t1"})
    b = msg("y@example.net", lane="low", sender="news@example.com")
    await store.enqueue([a, b], T0)

    async def ids(**kw: Any) -> list[str]:
        return [m.id for m in await store.list_messages(Selector(**kw), limit=10)]

    assert await ids() == [a.id, b.id]
    assert await ids(lanes=(Lane.LOW,)) == [b.id]
    assert await ids(domains=("gmail.com",)) == [a.id]
    assert await ids(sender="NEWS@example.com") == [b.id]
    assert await ids(recipient="x@gmail.com") == [a.id]
    assert await ids(metadata={"tenant": "t1"}) == [a.id]
    assert await ids(ids=(b.id,)) == [b.id]
    assert await ids(states=(RecipientState.SENT,)) == []


async def test_message_pages_follow_arrival_order_and_never_repeat(store: Any) -> None:
    # 25 messages of 1 to 3 recipients; a few are delivered (outside the default selection)
    prepared = [
        msg(*[f"r{i}-{j}@{'gmail.com' if i % 2 else 'example.net'}" for j in range(1 + i % 3)])
        for i in range(25)
    ]
    await store.enqueue(prepared, T0)
    first = deliveries(await claim(store, limit=3))  # message 0's one recipient, message 1's two
    await store.record(
        "w1",
        [
            Outcome(d.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED))
            for d in first
        ],
        T0 + 1,
    )
    expected = [p.id for p in prepared[2:]]

    async def walk(selector: Selector, size: int) -> list[str]:
        seen: list[str] = []
        after: int | None = 0
        while after is not None:
            page, after = await store.page_messages(selector, after=after, limit=size)
            assert len(page) <= size
            seen += [m.id for m in page]
        return seen

    for size in (1, 4, 7, 23, 100):
        assert await walk(Selector(), size) == expected
    gmail = [p.id for i, p in enumerate(prepared) if i % 2 and i >= 2]
    assert await walk(Selector(domains=("gmail.com",)), 5) == gmail
    page, after = await store.page_messages(Selector(), after=0, limit=4)
    assert [len(m.recipients) for m in page] == [1 + i % 3 for i in range(2, 6)]  # all recipients
    assert after is not None
    page, last = await store.page_messages(Selector(), after=0, limit=23)
    assert len(page) == 23 and last is None


async def test_a_message_whose_recipients_are_not_consecutive_rows_is_on_one_page(
    store: Any,
) -> None:
    # a recipient added to message a after b arrived (here an import; on PostgreSQL, also two
    # enqueue transactions taking row ids in turns): a's rows are 1 and 3, b's is 2
    a, b = msg("a1@example.net"), msg("b1@example.net")
    await store.enqueue([a], T0)
    await store.enqueue([b], T0)
    [row] = await store.select_delivery_ids(Selector(ids=(a.id,)), ["queued"], after=0, limit=5)
    [exported] = await store.export_deliveries([row])
    added = dataclasses.replace(exported.recipients[0], address="a2@example.net")
    assert await store.import_messages([dataclasses.replace(exported, recipients=(added,))], T0)
    for size in (1, 2, 3):
        seen: list[str] = []
        after: int | None = 0
        while after is not None:
            page, after = await store.page_messages(Selector(), after=after, limit=size)
            seen += [m.id for m in page]
        assert seen == [a.id, b.id], size
    page, _ = await store.page_messages(Selector(), after=0, limit=1)
    assert [r.address for r in page[0].recipients] == ["a1@example.net", "a2@example.net"]


async def test_dead_letters_and_suppressions_page_on_a_keyset(store: Any) -> None:
    # 10 dead letters dying in batches (shared death times), newest first, then by row
    await store.enqueue([msg(f"d{i}@example.net") for i in range(10)], T0)
    queued = deliveries(await claim(store))

    def dead(d: Any) -> Outcome:
        return Outcome(d.id, RecipientState.DEAD, 1, 0, None, attempt(ReplyClass.HARD_BOUNCE, 550))

    for batch, when in ((queued[:4], T0 + 1), (queued[4:7], T0 + 2), (queued[7:], T0 + 2.5)):
        await store.record("w1", [dead(d) for d in batch], when)
    everything = await store.list_dead(Selector(), limit=100)
    assert len(everything) == 10
    assert [x.dead_at for x in everything] == sorted((x.dead_at for x in everything), reverse=True)
    walked: list[Any] = []
    key = None
    while True:
        page = await store.list_dead(Selector(), limit=3, after=key)
        walked += page
        if len(page) < 3:
            break
        key = DeadLetterKey(page[-1].dead_at, page[-1].delivery_id)
        # a death after the walk began is newer than every cursor: not listed on a later page
        await store.enqueue([msg(f"late{len(walked)}@example.net")], T0)
        [late] = deliveries(await claim(store))  # the others are dead
        await store.record("w1", [dead(late)], T0 + 10)
    assert walked == everything
    narrowed = Selector(classes=(ReplyClass.POLICY_BLOCK,))
    assert await store.list_dead(narrowed, limit=3, after=key) == []

    # the suppression list: newest first, then address and scope (one address, two scopes)
    for i in range(8):
        await store.add_suppression(
            Suppression(f"s{i % 6}@example.net", T0 + i // 3, "operator", "manual",
                        scope="*" if i < 6 else "shop.example")
        )  # fmt: skip
    listed = await store.list_suppressions(limit=100)
    assert len(listed) == 8
    paged: list[Suppression] = []
    after = None
    while True:
        chunk = await store.list_suppressions(limit=3, after=after)
        paged += chunk
        if len(chunk) < 3:
            break
        last = chunk[-1]
        after = SuppressionKey(last.created_at, last.address, last.scope, last.reason or "")
        await store.add_suppression(
            Suppression(f"new{len(paged)}@example.net", T0 + 100, "operator", "manual")
        )
    assert paged == listed


async def test_attempts_are_counted_by_minute_class_and_destination(store: Any) -> None:
    await store.enqueue([msg("a@example.net", "b@example.net", "c@example.net")], T0)
    a, b, c = deliveries(await claim(store))
    deferred = RecipientState.DEFERRED
    await store.record(
        "w1",
        [
            Outcome(a.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED, now=T0)),
            Outcome(b.id, deferred, 1, 0, T0 + 99, attempt(ReplyClass.TEMPORARY, 451, T0 + 5)),
            Outcome(c.id, deferred, 1, 0, T0 + 99, attempt(ReplyClass.SOFT_BOUNCE, 452, T0 + 70)),
        ],
        T0 + 70,
    )
    assert await store.attempt_classes_between(T0, T0 + 60) == {"delivered": 1, "temporary": 1}
    assert await store.attempt_classes_between(T0 + 60, T0 + 120) == {"soft_bounce": 1}
    replies = sorted(await store.destination_replies(T0 + 1))
    assert replies == [("example.net", "soft_bounce", 1), ("example.net", "temporary", 1)]


async def test_selected_destinations_are_the_ones_stored_at_enqueue(store: Any) -> None:
    a = msg("x@gmail.com", "y@example.net")
    b = msg("z@corp.example")
    await store.enqueue([a, b], T0)
    waiting = ("queued", "deferred", "sending")
    assert await store.selected_destinations(Selector(), waiting) == [
        "corp.example",
        "example.net",
        "google",
    ]
    only_a = Selector(ids=(a.id,))
    assert await store.selected_destinations(only_a, waiting) == ["example.net", "google"]
    assert await store.selected_destinations(Selector(domains=("gmail.com",)), waiting) == [
        "google"
    ]
    assert await store.selected_destinations(Selector(), ("dead",)) == []


async def test_alert_transitions_are_recorded_once_for_every_process(store: Any) -> None:
    assert await store.alerts_firing() == []
    assert await store.alert_transition("NoDeliveries", True, T0) is True  # this one notifies
    assert await store.alert_transition("NoDeliveries", True, T0 + 60) is False  # no change
    assert await store.alert_transition("Growing{lane=low}", True, T0 + 60) is True
    assert sorted(await store.alerts_firing()) == [("Growing{lane=low}", T0 + 60),
                                                   ("NoDeliveries", T0)]  # fmt: skip
    assert await store.alert_transition("NoDeliveries", False, T0 + 120) is True  # resolved
    assert await store.alert_transition("NoDeliveries", False, T0 + 180) is False
    assert await store.alerts_firing() == [("Growing{lane=low}", T0 + 60)]


async def test_destination_states_are_shared_and_lifted(store: Any) -> None:
    from postlane.records import DestinationStatus

    await store.enqueue([msg("a@gmail.com")], T0)
    await store.save_destination_states(
        [
            DestinationStatus("google", 2.0, 10.0, T0 + 600, "421 4.7.28 rate limited",
                              updated_at=T0),
            DestinationStatus("example.net", 5.0, None, None, "throttled", updated_at=T0),
        ]
    )  # fmt: skip
    states = {d.destination: d for d in await store.destination_states()}
    assert states["google"].paused_until == T0 + 600 and states["google"].rate == 2.0
    assert states["google"].reason == "421 4.7.28 rate limited"
    assert states["example.net"].paused_until is None and states["example.net"].rate == 5.0
    await store.lift_destinations(["google"], T0 + 1)
    states = {d.destination: d for d in await store.destination_states()}
    assert not states.get("google") or not states["google"].paused_until
    assert states["example.net"].rate == 5.0  # only the lifted one changed


async def test_a_pause_in_force_outlives_another_processs_record_until_lifted(store: Any) -> None:
    """One process records a pause; another, slowed down by the same server, records its
    rate without the pause (it records only pauses it began): the pause stays, with its
    reason, and only a longer pause or an operator's lift replaces it."""
    paused = DestinationStatus("relay", 20.0, 40.0, T0 + 30, "shaping rule 1", updated_at=T0)
    await store.save_destination_states([paused])
    slower = DestinationStatus("relay", 5.0, 40.0, None, "throttled: 421", updated_at=T0 + 1)
    await store.save_destination_states([slower])
    [state] = await store.destination_states()
    assert (state.paused_until, state.reason, state.rate) == (T0 + 30, "shaping rule 1", 5.0)
    assert state.updated_at == T0 + 1
    shorter = DestinationStatus("relay", 5.0, 40.0, T0 + 10, "shorter", updated_at=T0 + 2)
    await store.save_destination_states([shorter])
    [state] = await store.destination_states()
    assert (state.paused_until, state.reason) == (T0 + 30, "shaping rule 1")
    longer = DestinationStatus("relay", 5.0, 40.0, T0 + 90, "longer", updated_at=T0 + 3)
    await store.save_destination_states([longer])
    [state] = await store.destination_states()
    assert (state.paused_until, state.reason) == (T0 + 90, "longer")
    # once the pause is over, a record without one is the state again
    await store.save_destination_states([dataclasses.replace(slower, updated_at=T0 + 91)])
    [state] = await store.destination_states()
    assert (state.paused_until, state.reason) == (None, "throttled: 421")
    await store.save_destination_states([dataclasses.replace(longer, paused_until=T0 + 200)])
    await store.lift_destinations(["relay"], T0 + 100)
    await store.save_destination_states([dataclasses.replace(slower, updated_at=T0 + 101)])
    [state] = await store.destination_states()
    assert state.paused_until is None  # lifted: nothing keeps it


async def test_pauses_and_lifts_are_news_for_the_processes_that_wait_for_them(store: Any) -> None:
    assert await store.wait_for_destination_news(0.0) is False
    await store.save_destination_states(
        [DestinationStatus("relay", 5.0, 40.0, None, "throttled", updated_at=T0)]
    )
    assert await store.wait_for_destination_news(0.0) is False  # a rate is no news
    await store.save_destination_states(
        [DestinationStatus("relay", 5.0, 40.0, T0 + 30, "paused", updated_at=T0 + 1)]
    )
    assert await store.wait_for_destination_news(5.0) is True
    assert await store.wait_for_destination_news(0.0) is False  # heard once
    await store.lift_destinations(None, T0 + 2)
    assert await store.wait_for_destination_news(5.0) is True


async def test_dead_letters_list_with_selectors(store: Any) -> None:
    prepared = msg("gone@example.net")
    await store.enqueue([prepared], T0)
    [d] = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(
                d.id,
                RecipientState.DEAD,
                1,
                0,
                None,
                attempt(ReplyClass.POLICY_BLOCK, 554),
                reason="policy block",
            )
        ],
        T0,
    )
    [letter] = await store.list_dead(Selector(), limit=10)
    assert letter.id == prepared.id and letter.cls is ReplyClass.POLICY_BLOCK
    assert letter.as_json()["last_response"] == {"code": 554, "enhanced": None, "text": "554 reply"}
    assert await store.list_dead(Selector(classes=(ReplyClass.HARD_BOUNCE,)), limit=10) == []
    assert len(await store.list_dead(Selector(domains=("example.net",)), limit=10)) == 1


async def test_suppression_list_add_and_remove(store: Any) -> None:
    assert await store.add_suppression(Suppression("a@example.net", T0, "operator", "manual"))
    assert not await store.add_suppression(Suppression("A@example.net", T0, "operator", "manual"))
    assert [s.address for s in await store.list_suppressions(limit=10)] == ["a@example.net"]
    assert await store.remove_suppression("A@EXAMPLE.NET")
    assert not await store.remove_suppression("a@example.net")
    assert await store.list_suppressions(limit=10) == []


async def test_finished_messages_are_purged_after_retention_dead_ones_later(store: Any) -> None:
    sent, dead, pending = msg(), msg(), msg()
    await store.enqueue([sent, dead, pending], T0)
    by_message = {m.queue_id: m.deliveries[0] for m in await claim(store)}
    await store.record(
        "w1",
        [
            Outcome(
                by_message[sent.id].id,
                RecipientState.SENT,
                1,
                0,
                None,
                attempt(ReplyClass.DELIVERED),
            ),
            Outcome(
                by_message[dead.id].id,
                RecipientState.DEAD,
                1,
                0,
                None,
                attempt(ReplyClass.HARD_BOUNCE, 550),
            ),
        ],
        T0,
    )
    await store.hand_back("w1", None, T0)
    assert await store.purge_finished(T0 + 100, retention=3600, dead_retention=7200) == 0
    assert await store.purge_finished(T0 + 3600, retention=3600, dead_retention=7200) == 1
    with pytest.raises(NotFound):
        await store.get_message(sent.id)
    await store.get_message(dead.id)
    assert await store.purge_finished(T0 + 7200, retention=3600, dead_retention=7200) == 1
    with pytest.raises(NotFound):
        await store.get_message(dead.id)
    await store.get_message(pending.id)  # never purged while pending


# -- every other Store method, by name, on every backend ------------------------------------------

WAITING = ("queued", "deferred", "held")


async def test_wait_for_work_wakes_on_an_enqueue_and_times_out_without_one(store: Any) -> None:
    await store.wait_for_work(0)  # PostgreSQL starts listening on the first call
    assert await store.wait_for_work(0.05) is False
    waiter = asyncio.create_task(store.wait_for_work(10))
    await asyncio.sleep(0)  # let it start waiting
    await store.enqueue([msg()], T0)
    assert await asyncio.wait_for(waiter, 10) is True


async def test_selection_walks_in_slices_and_summarizes(store: Any) -> None:
    a = msg("a@gmail.com", "b@example.net", lane="high")
    b = msg("c@example.net", lane="low")
    await store.enqueue([a, b], T0)
    first = await store.select_delivery_ids(Selector(), WAITING, after=0, limit=2)
    rest = await store.select_delivery_ids(Selector(), WAITING, after=first[-1], limit=2)
    assert len(first) == 2 and len(rest) == 1 and first[-1] < rest[0]
    assert await store.select_delivery_ids(Selector(), ("dead",), after=0, limit=10) == []
    by_domain = await store.select_delivery_ids(
        Selector(domains=("example.net",)), WAITING, after=0, limit=10
    )
    assert len(by_domain) == 2
    # states outside the action's states are never selected, whatever the selector asks
    assert (
        await store.select_delivery_ids(
            Selector(states=(RecipientState.SENT,)), WAITING, after=0, limit=10
        )
        == []
    )
    counts = {(c.lane, c.domain, c.state, c.cls): c.count
              for c in await store.summarize(Selector(), WAITING)}  # fmt: skip
    assert counts == {
        (Lane.HIGH, "gmail.com", RecipientState.QUEUED, None): 1,
        (Lane.HIGH, "example.net", RecipientState.QUEUED, None): 1,
        (Lane.LOW, "example.net", RecipientState.QUEUED, None): 1,
    }
    summary = await store.summarize(Selector(lanes=(Lane.LOW,)), WAITING)
    assert [(c.domain, c.count) for c in summary] == [("example.net", 1)]


async def test_flush_hold_and_release(store: Any) -> None:
    prepared = msg("a@example.net", "b@example.net")
    await store.enqueue([prepared], T0)
    a, b = deliveries(await claim(store))
    await store.record(
        "w1",
        [Outcome(a.id, RecipientState.DEFERRED, 1, 0, T0 + 900, attempt(ReplyClass.TEMPORARY))],
        T0,
    )
    # b is being sent: a hold applies once its try is recorded
    assert await store.hold([a.id, b.id], T0 + 1) == (1, 1)  # a now, b after its try
    states = {r.address: r.state for r in (await store.get_message(prepared.id)).recipients}
    assert states == {"a@example.net": RecipientState.HELD, "b@example.net": RecipientState.SENDING}
    await store.record(
        "w1",
        [Outcome(b.id, RecipientState.DEFERRED, 1, 0, T0 + 900, attempt(ReplyClass.TEMPORARY))],
        T0 + 2,
    )
    states = {r.address: r.state for r in (await store.get_message(prepared.id)).recipients}
    assert set(states.values()) == {RecipientState.HELD}
    assert await store.flush([a.id], T0 + 3) == 0  # held deliveries are not flushed
    assert await store.release([a.id, b.id], T0 + 3) == (2, 0)
    view = await store.get_message(prepared.id)
    assert all(r.state is RecipientState.QUEUED for r in view.recipients)
    assert all(r.next_attempt_at == T0 + 3 for r in view.recipients)
    await store.hold([a.id], T0 + 4)
    [c] = deliveries(await claim(store, now=T0 + 4))
    assert c.id == b.id
    await store.record(
        "w1",
        [Outcome(b.id, RecipientState.DEFERRED, 2, 0, T0 + 900, attempt(ReplyClass.TEMPORARY))],
        T0 + 5,
    )
    assert await store.flush([a.id, b.id], T0 + 6) == 1  # only the deferred one
    assert (await store.get_message(prepared.id)).recipients[1].next_attempt_at == T0 + 6


async def test_a_recipient_deleted_before_it_was_sent_is_an_event_and_so_is_its_import(
    store: Any,
) -> None:
    """The application heard "queued": it hears the end of it when an operator deletes it
    (not of one already final, whose end it heard), and "queued" again when it is imported."""
    prepared = msg("a@example.net", "b@example.net")
    await store.enqueue([prepared], T0)
    a, b = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(a.id, RecipientState.DEFERRED, 1, 0, T0 + 900, attempt(ReplyClass.TEMPORARY)),
            Outcome(b.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED, 250)),
        ],
        T0,
    )
    [exported] = await store.export_deliveries([a.id, b.id])
    assert await store.delete_deliveries([a.id, b.id], (*WAITING, "sent")) == 2
    events = await read_events(store, lambda es: last_type(es) == "deleted")
    [deleted] = [e for e in events if e.type == "deleted"]
    assert deleted.recipient == "a@example.net" and deleted.text == "deleted by an operator"
    assert deleted.queue_id == prepared.id
    assert await store.import_messages([exported], T0 + 10) == 2
    events = await read_events(store, lambda es: last_type(es) == "queued")
    assert (events[-1].recipient, events[-1].text) == ("a@example.net", "restored by an import")
    assert [e.type for e in events].count("queued") == 3  # two at enqueue, one imported


async def test_a_dead_letter_keeps_its_time_of_death_through_an_export_and_an_import(
    store: Any,
) -> None:
    """Its dead-letter retention counts from its death, not from the import (a purge with
    an export, then an import, must not make it young again)."""
    prepared = msg("gone@example.net")
    await store.enqueue([prepared], T0)
    [d] = deliveries(await claim(store))
    bounce = attempt(ReplyClass.HARD_BOUNCE, 550, now=T0 + 5)
    await store.record("w1", [Outcome(d.id, RecipientState.DEAD, 1, 0, None, bounce)], T0 + 5)
    [dead] = await store.list_dead(Selector(), limit=10)
    [exported] = await store.export_deliveries([d.id])
    assert exported.recipients[0].updated_at == dead.dead_at
    again = ExportedMessage.from_json(json.loads(json.dumps(exported.as_json())))
    assert await store.delete_deliveries([d.id], ("dead",)) == 1
    assert await store.import_messages([again], T0 + 86400) == 1
    [back] = await store.list_dead(Selector(), limit=10)
    assert back.dead_at == dead.dead_at


async def test_a_pending_hold_is_cancelled_by_a_release(store: Any) -> None:
    await store.enqueue([msg()], T0)
    [d] = deliveries(await claim(store))
    assert await store.release([d.id], T0) == (0, 0)  # no hold pending: nothing cancelled
    assert await store.hold([d.id], T0) == (0, 1)
    assert await store.hold([d.id], T0) == (0, 0)  # noted once, counted once
    assert await store.release([d.id], T0) == (0, 1)
    await store.record(
        "w1",
        [Outcome(d.id, RecipientState.DEFERRED, 1, 0, T0 + 60, attempt(ReplyClass.TEMPORARY))],
        T0 + 1,
    )
    [view] = await store.list_messages(Selector(), limit=1)
    assert view.recipients[0].state is RecipientState.DEFERRED


async def test_delete_export_and_import_round_trip(store: Any) -> None:
    prepared = msg("a@example.net", "b@example.net", key="k-1", metadata={"t": "x"})
    await store.enqueue([prepared], T0)
    a, b = deliveries(await claim(store))
    await store.record(
        "w1",
        [Outcome(a.id, RecipientState.DEFERRED, 1, 0, T0 + 900, attempt(ReplyClass.TEMPORARY))],
        T0,
    )
    [exported] = await store.export_deliveries([a.id, b.id])
    assert exported.id == prepared.id and exported.content == prepared.content
    assert exported.idempotency_key == "k-1" and exported.metadata == {"t": "x"}
    by_address = {r.address: r for r in exported.recipients}
    assert by_address["a@example.net"].state is RecipientState.DEFERRED
    assert [h.code for h in by_address["a@example.net"].history] == [250]
    assert by_address["b@example.net"].state is RecipientState.SENDING
    # b is being sent: only a (deferred) is deleted
    assert await store.delete_deliveries([a.id, b.id], WAITING) == 1
    assert [r.address for r in (await store.get_message(prepared.id)).recipients] == [
        "b@example.net"
    ]
    await store.hand_back("w1", None, T0)
    assert await store.delete_deliveries([b.id], WAITING) == 1
    with pytest.raises(NotFound):  # a message left without recipients goes too
        await store.get_message(prepared.id)
    assert await store.import_messages([exported], T0 + 10) == 2
    assert await store.import_messages([exported], T0 + 10) == 0  # already there: skipped
    view = await store.get_message(prepared.id, history=True)
    assert view.idempotency_key == "k-1" and view.message_id == prepared.message_id
    by_address = {r.address: r for r in view.recipients}
    # waiting or being sent comes back due now, with its history
    assert by_address["a@example.net"].state is RecipientState.QUEUED
    assert by_address["a@example.net"].next_attempt_at == T0 + 10
    assert by_address["a@example.net"].attempts == 1
    assert [h.code for h in by_address["a@example.net"].history or ()] == [250]
    assert by_address["b@example.net"].state is RecipientState.QUEUED
    assert await store.get_content(prepared.id) == prepared.content
    [again] = await store.enqueue([msg(key="k-1")], T0 + 11)
    assert again.duplicate and again.id == prepared.id


async def test_dead_letters_are_requeued_grouped_and_recovered(store: Any) -> None:
    prepared = msg("x@example.net", "y@example.net", "z@gmail.com")
    await store.enqueue([prepared], T0)
    x, y, z = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(
                d.id, RecipientState.DEAD, 3, 0, None,
                attempt(ReplyClass.POLICY_BLOCK, 554, now=T0 + 10),
            )
            for d in (x, y, z)
        ],
        T0 + 10,
    )  # fmt: skip
    groups = await store.dead_groups(Selector(), limit=10)
    assert sorted((g.domain, g.count, g.cls) for g in groups) == [
        ("example.net", 2, ReplyClass.POLICY_BLOCK),
        ("gmail.com", 1, ReplyClass.POLICY_BLOCK),
    ]
    assert groups[0].count == 2 and groups[0].sample_id == prepared.id  # largest first
    assert await store.dead_groups(Selector(domains=("gmail.com",)), limit=10) != []
    assert await store.finished_between(T0, T0 + 60) == (0, 3, 0)
    waited = await store.requeue_dead([x.id, z.id], T0 + 100)
    assert sorted(waited) == [90.0, 90.0]
    # what happened in that minute stays counted, whatever became of it since (the alerts'
    # dead-letter spike must fire though the operator requeued before the minute was sampled)
    assert await store.finished_between(T0, T0 + 60) == (0, 3, 0)
    view = await store.get_message(prepared.id)
    states = {r.address: (r.state, r.attempts) for r in view.recipients}
    assert states["x@example.net"] == (RecipientState.QUEUED, 0)
    assert states["y@example.net"][0] is RecipientState.DEAD
    assert await store.requeue_dead([x.id], T0 + 101) == []  # no longer dead
    claimed = deliveries(await claim(store, now=T0 + 100))
    assert {d.id for d in claimed} == {x.id, z.id}
    assert all(d.created_at == T0 + 100 for d in claimed)  # max_age counted from the requeue
    await store.record(
        "w1",
        [
            Outcome(
                d.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED, now=T0 + 130)
            )
            for d in claimed
        ],
        T0 + 130,
    )
    recoveries = await store.recoveries_after(0)
    assert sorted(seconds for _id, seconds in recoveries) == [120.0, 120.0]
    assert await store.recoveries_after(max(i for i, _ in recoveries)) == []
    assert await store.finished_between(T0 + 100, T0 + 200) == (2, 0, 0)
    # each recovery is taken once (one process's scrape counts it); older ones are dropped
    assert await store.claim_recoveries(T0 + 130, limit=1) == [120.0]
    assert await store.claim_recoveries(T0 + 131) == []  # the other: older than asked, dropped
    assert await store.claim_recoveries(0) == []


async def test_shape_counts_waiting_recipients_by_domain_and_age(store: Any) -> None:
    await store.enqueue([msg("a@example.net"), msg("b@example.net", "c@gmail.com")], T0)
    await store.enqueue([msg("d@example.net")], T0 + 250)
    rows = await store.shape(T0 + 300, [60, 600], limit=10)
    assert [(r.domain, r.total, r.buckets) for r in rows] == [
        ("example.net", 3, (1, 2, 0)),
        ("gmail.com", 1, (0, 1, 0)),
    ]
    assert [r.domain for r in await store.shape(T0 + 300, [60], limit=1)] == ["example.net"]
    assert (await store.shape(T0 + 10_000, [60, 600], limit=10))[0].buckets == (0, 0, 3)


async def test_unattempted_deferrals_use_no_attempt(store: Any) -> None:
    prepared = msg("a@example.net", "b@example.net")
    await store.enqueue([prepared], T0)
    a, b = deliveries(await claim(store))
    reason = "waiting for the destination"
    deferrals = [Deferral(a.id, T0 + 30), Deferral(b.id, T0)]
    assert await store.defer_unattempted("w1", deferrals, T0, reason) == 2
    assert await store.defer_unattempted("w1", deferrals[:1], T0, reason) == 0  # not leased
    view = await store.get_message(prepared.id, history=True)
    by_address = {r.address: r for r in view.recipients}
    assert by_address["a@example.net"].state is RecipientState.DEFERRED
    assert by_address["a@example.net"].next_attempt_at == T0 + 30
    assert by_address["b@example.net"].state is RecipientState.QUEUED
    assert all(r.attempts == 0 and not r.history and r.reason == reason for r in view.recipients)


async def test_a_paused_destination_is_deferred_then_hastened(store: Any) -> None:
    await store.enqueue([msg("a@gmail.com"), msg("b@gmail.com"), msg("c@example.net")], T0)
    reason = "destination google is paused"
    assert await store.defer_destination("google", T0 + 600, T0, reason) == 2
    assert await store.defer_destination("google", T0 + 600, T0, reason) == 0  # already there
    claimed = deliveries(await claim(store))
    assert [d.address for d in claimed] == ["c@example.net"]
    assert await store.hasten("google", T0 + 1, "another reason") == 0
    assert await store.hasten("example.net", T0 + 1, reason) == 0
    assert await store.hasten("google", T0 + 1, reason) == 2
    assert len(deliveries(await claim(store, now=T0 + 1))) == 2
    await store.enqueue([msg("d@gmail.com"), msg("e@example.org")], T0 + 2)
    await store.defer_destination("google", T0 + 600, T0 + 2, reason)
    await store.defer_destination("example.org", T0 + 600, T0 + 2, reason)
    assert await store.hasten(None, T0 + 3, reason) == 2  # every destination


async def test_what_a_pause_holds_back_is_deferred_not_ready_until_called_back(
    store: Any,
) -> None:
    """A paused destination's backlog waits for the pause's end: ``stats`` show it deferred,
    not ready (an operator read a queue of ready mail that no worker would touch for ten
    minutes); mail scheduled for later stays scheduled. Called back, it is ready again."""
    later = dataclasses.replace(msg("s@gmail.com"), send_at=T0 + 60)
    await store.enqueue([msg("a@gmail.com"), msg("b@gmail.com"), msg("c@example.net")], T0)
    await store.enqueue([later], T0)
    lane = (await store.stats(T0)).lanes[Lane.NORMAL]
    assert (lane.ready, lane.deferred, lane.scheduled) == (3, 0, 1)
    reason = "destination google is paused"
    assert await store.defer_destination("google", T0 + 600, T0, reason) == 3
    lane = (await store.stats(T0)).lanes[Lane.NORMAL]
    assert (lane.ready, lane.deferred, lane.scheduled) == (1, 2, 1)
    # one sent back to wait for a rate, then called back (the rate grew)
    waiting = "waiting for the destination's rate"
    [c] = deliveries(await claim(store, now=T0 + 1))
    await store.defer_unattempted("w1", [Deferral(c.id, T0 + 30)], T0 + 1, waiting)
    lane = (await store.stats(T0 + 1)).lanes[Lane.NORMAL]
    assert (lane.ready, lane.deferred) == (0, 3)
    assert await store.hasten(None, T0 + 2, waiting) == 1
    lane = (await store.stats(T0 + 2)).lanes[Lane.NORMAL]
    assert (lane.ready, lane.deferred, lane.scheduled) == (1, 2, 1)


async def test_a_deferral_decided_before_a_lift_it_had_not_heard_of_is_due_now(
    store: Any,
) -> None:
    """A worker read google's pause and sent a and b back to wait for its end; an operator
    lifted it (from another process) before the worker handed them back. The lift's own call-back
    of waiting mail could not see them (they were leased): the store, which counts lifts,
    makes due now what was decided knowing fewer lifts than it recorded. A deferral that knew of
    the lift stands, and so does one for a destination never lifted."""
    first, second, third = msg("a@gmail.com"), msg("b@gmail.com"), msg("c@example.net")
    await store.enqueue([first, second, third], T0)
    paused = DestinationStatus("google", None, None, T0 + 600, "paused", updated_at=T0)
    await store.save_destination_states([paused])
    a, b, c = sorted(deliveries(await claim(store)), key=lambda d: d.address)
    await store.lift_destinations(["google"], T0 + 1)
    [google] = [s for s in await store.destination_states() if s.destination == "google"]
    assert google.lifts == 1 and google.paused_until is None
    deferrals = [
        Deferral(a.id, T0 + 600, "google", lifts=0),
        Deferral(b.id, T0 + 600, "google", lifts=1),
        Deferral(c.id, T0 + 30, "example.net", lifts=0),
    ]
    assert await store.defer_unattempted("w1", deferrals, T0 + 2, WAITING_FOR_DESTINATION) == 3
    due = {}
    for prepared in (first, second, third):
        [r] = (await store.get_message(prepared.id, history=False)).recipients
        due[r.address] = (r.state, r.next_attempt_at, r.attempts)
    assert due == {
        "a@gmail.com": (RecipientState.QUEUED, T0 + 2, 0),
        "b@gmail.com": (RecipientState.DEFERRED, T0 + 600, 0),
        "c@example.net": (RecipientState.DEFERRED, T0 + 30, 0),
    }


async def test_a_backlog_deferral_refused_once_its_pause_was_lifted(store: Any) -> None:
    """Pushing a paused destination's backlog to the end of its pause says None, and moves
    nothing, when more lifts of it are recorded than the caller knew of."""
    reason = "destination google is paused"
    await store.save_destination_states(
        [DestinationStatus("google", None, None, T0 + 600, "paused", updated_at=T0)]
    )
    await store.lift_destinations(["google"], T0 + 1)
    await store.enqueue([msg("a@gmail.com"), msg("b@gmail.com")], T0 + 2)
    assert await store.defer_destination("google", T0 + 600, T0 + 2, reason, lifts=0) is None
    assert await store.next_due_at() == T0 + 2
    assert await store.defer_destination("google", T0 + 600, T0 + 2, reason, lifts=1) == 2
    assert await store.defer_destination("example.net", T0 + 600, T0 + 2, reason, lifts=0) == 0


async def test_a_bulk_actions_slices_select_by_sender_and_metadata_as_listings_do(
    store: Any,
) -> None:
    """A bulk action walks the deliveries by id a slice at a time, looking each one's message
    up (a scale audit: the list of a sender's messages, made again for every slice, took
    minutes at 1,000,000 recipients); it picks what a listing with the same selector picks."""
    sent = []
    for i in range(7):
        prepared = msg(f"r{i}@example.net", sender=f"app{i % 2}@example.com",
                       metadata={"campaign": f"c{i % 3}"})  # fmt: skip
        await store.enqueue([prepared], T0)
        sent.append(prepared)
    for selector, expected in (
        (Selector(sender="APP1@example.com"), {1, 3, 5}),
        (Selector(metadata={"campaign": "c0"}), {0, 3, 6}),
        (Selector(sender="app0@example.com", metadata={"campaign": "c0"}), {0, 6}),
    ):
        ids: list[int] = []
        after = 0
        while found := await store.select_delivery_ids(selector, ["queued"], after=after, limit=2):
            ids += found
            after = found[-1]
        listed = {m.id for m in await store.list_messages(selector, limit=100)}
        assert listed == {sent[i].id for i in expected}
        walked = set()
        for message in sent:
            [ref] = await store.find_deliveries(message.recipients[0].address, queue_id=message.id)
            if ref.delivery_id in ids:
                walked.add(message.id)
        assert walked == listed and len(ids) == len(expected)


async def test_a_deleted_deliverys_id_is_never_given_to_another(store: Any) -> None:
    """A security audit: SQLite gave the highest ids out again once their rows were gone, and a
    delivery's id is what its VERP and unsubscribe tokens name: a send token cancelled its own
    deferred message, and its tokens then named another tenant's next recipient."""
    first = msg("grab@attacker.example")
    await store.enqueue([first], T0)
    [gone] = await store.find_deliveries("grab@attacker.example", queue_id=first.id)
    assert await store.cancel_message(first.id, now=T0 + 1) is not None
    second = msg("victim@rcpt.example")
    await store.enqueue([second], T0 + 2)
    [ref] = await store.find_deliveries("victim@rcpt.example", queue_id=second.id)
    assert ref.delivery_id > gone.delivery_id
    await store.delete_deliveries([ref.delivery_id], ["queued"])  # an operator's delete too
    third = msg("next@rcpt.example")
    await store.enqueue([third], T0 + 3)
    [after] = await store.find_deliveries("next@rcpt.example", queue_id=third.id)
    assert after.delivery_id > ref.delivery_id


async def test_a_record_made_before_its_process_heard_of_a_lift_does_not_undo_it(
    store: Any,
) -> None:
    """The worker that began google's pause records it again (with its rate) after an
    operator lifted it, before it read the lift: the lift stands. Once it knows of the lift,
    what it records is recorded."""
    mine = DestinationStatus(
        "google", 1.0, None, T0 + 600, "3 connection failure(s)", updated_at=T0
    )
    await store.save_destination_states([mine])
    await store.lift_destinations(["google"], T0 + 1)
    await store.save_destination_states([dataclasses.replace(mine, updated_at=T0 + 2)])
    [google] = [s for s in await store.destination_states() if s.destination == "google"]
    assert (google.paused_until, google.rate, google.reason, google.lifts) == (
        None,
        None,
        LIFTED,
        1,
    )
    later = dataclasses.replace(mine, paused_until=T0 + 900, updated_at=T0 + 3, lifts=1)
    await store.save_destination_states([later])
    [google] = [s for s in await store.destination_states() if s.destination == "google"]
    assert (google.paused_until, google.rate, google.lifts) == (T0 + 900, 1.0, 1)


async def test_samples_are_recorded_once_per_minute_and_purged(store: Any) -> None:
    from postlane.records import Sample

    first = Sample(at=T0, lane="high", ready=3, oldest_age=12.5, paused=("google",))
    assert await store.record_samples([first, Sample(at=T0, lane="*", sent=7)]) is True
    assert await store.record_samples([Sample(at=T0, lane="high", ready=99)]) is False
    await store.record_samples([Sample(at=T0 + 60, lane="high", ready=4, soft_bounces=2)])
    samples = await store.samples(T0)
    assert [(s.at, s.lane) for s in samples] == [(T0, "*"), (T0, "high"), (T0 + 60, "high")]
    assert samples[1] == first
    assert samples[2].soft_bounces == 2
    assert [s.at for s in await store.samples(T0 + 1)] == [T0 + 60]
    assert await store.purge_samples(T0 + 60) == 2
    assert [s.at for s in await store.samples(0)] == [T0 + 60]


# -- idempotency keys belong to their submitter ---------------------------------------------------


def submitted(prepared: PreparedMessage, submitter: str | None) -> PreparedMessage:
    return dataclasses.replace(prepared, submitter=submitter)


async def test_finding_3_an_idempotency_key_belongs_to_its_submitter(store: Any) -> None:
    mine = submitted(msg(key="receipt-9001"), "token:a")
    theirs = submitted(msg(key="receipt-9001"), "token:b")
    [a] = await store.enqueue([mine], T0)
    [b] = await store.enqueue([theirs], T0)  # another submitter's key: another message
    assert not a.duplicate and not b.duplicate and a.id != b.id
    [again] = await store.enqueue([submitted(msg(key="receipt-9001"), "token:a")], T0 + 1)
    assert again.duplicate and again.id == mine.id  # a retry: the same payload


async def test_a_raw_messages_key_stored_before_its_fingerprint_changed_is_a_retry(
    store: Any,
) -> None:
    """A raw message's fingerprint is made another way since a review (``raw2:``): one stored
    before says nothing about the payload now, so a client's retry across the upgrade gets its
    first message back instead of a conflict; two of the new kind still tell payloads apart."""
    first = dataclasses.replace(msg("ada@example.net", key="k"), fingerprint="ab" * 32)
    await store.enqueue([first], T0)
    retry = dataclasses.replace(msg("ada@example.net", key="k"), fingerprint="raw2:" + "cd" * 32)
    [again] = await store.enqueue([retry], T0 + 1)
    assert again.duplicate and again.id == first.id
    new = dataclasses.replace(msg("bob@example.net", key="j"), fingerprint="raw2:" + "01" * 32)
    await store.enqueue([new], T0)
    other = dataclasses.replace(msg("bob@example.net", key="j"), fingerprint="raw2:" + "02" * 32)
    with pytest.raises(IdempotencyConflict):
        await store.enqueue([other], T0 + 1)


async def test_a_key_reused_with_another_payload_is_a_conflict(store: Any) -> None:
    first = msg("ada@example.net", key="k")
    await store.enqueue([first], T0)
    other = msg("bob@example.net", key="k")
    with pytest.raises(IdempotencyConflict) as raised:
        await store.enqueue([msg("carol@example.net"), other], T0 + 1)
    assert raised.value.existing_id == first.id and raised.value.key == "k"
    assert [m.id for m in await store.list_messages(Selector(), limit=10)] == [first.id]
    # two payloads under one key in one batch: no stored message to name, the batch is wrong
    with pytest.raises(ValidationError, match="two different messages of this batch") as bad:
        await store.enqueue([msg("x@example.net", key="j"), msg("y@example.net", key="j")], T0)
    assert bad.value.field == "idempotency_key"
    assert len(await store.list_messages(Selector(), limit=10)) == 1


async def test_concurrent_enqueues_keep_their_own_results_times_and_failures(store: Any) -> None:
    """Concurrent enqueue calls, which both stores run as one plan in a shared transaction
    (group commit): each call keeps its own time and results, a key repeated by two calls is
    one message, and a call whose key conflicts fails alone (the others are stored)."""
    stored_first = msg("ada@example.net", key="k")
    await store.enqueue([stored_first], T0)
    plain = [msg(f"user{i}@example.net") for i in range(30)]
    before = store.combined
    results = await asyncio.gather(
        *(store.enqueue([m], T0 + 1 + i) for i, m in enumerate(plain[:15]))
    )
    assert store.combined > before  # they shared a transaction: one plan over their batch
    assert [r.id for [r] in results] == [m.id for m in plain[:15]]
    twice = [msg("bob@example.net", key="same"), msg("bob@example.net", key="same")]
    conflicting = msg("carol@example.net", key="k")  # k's first payload was another
    calls = [[twice[0]], [conflicting], [twice[1]]] + [[m] for m in plain[15:]]
    outcomes = await asyncio.gather(
        *(store.enqueue(call, T0 + 16 + i) for i, call in enumerate(calls)),
        return_exceptions=True,
    )
    refused = outcomes[1]
    assert isinstance(refused, IdempotencyConflict) and refused.existing_id == stored_first.id
    first, second = outcomes[0], outcomes[2]
    assert isinstance(first, list) and isinstance(second, list)
    assert [r.id for r in first] == [r.id for r in second]  # one message, whichever ran first
    assert sorted([first[0].duplicate, second[0].duplicate]) == [False, True]
    for i, message in enumerate(plain[15:]):
        got = outcomes[3 + i]
        assert isinstance(got, list) and got[0].id == message.id and not got[0].duplicate
    at = {m.id: T0 + 1 + i for i, m in enumerate(plain[:15])}
    at |= {m.id: T0 + 19 + i for i, m in enumerate(plain[15:])}
    for message in plain:  # each call's own time, combined or not
        assert (await store.get_message(message.id)).created_at == at[message.id]
    events = await store.events_after(None, limit=1000, types=["queued"])
    assert all(at[e.queue_id] == e.at for e in events if e.queue_id in at)
    listed = await store.list_messages(Selector(), limit=100)
    assert len(listed) == 1 + 30 + 1  # the first, the plain ones, one of the twins; no carol


# -- scheduled and expiring mail ------------------------------------------------------------------


async def test_scheduled_mail_waits_queued_until_its_time(store: Any) -> None:
    later = dataclasses.replace(msg(), send_at=T0 + 3600)
    await store.enqueue([later], T0)
    view = await store.get_message(later.id)
    assert view.send_at == T0 + 3600 and view.as_json()["send_at"] is not None
    recipient = view.recipients[0]
    assert recipient.state is RecipientState.QUEUED and recipient.next_attempt_at == T0 + 3600
    assert await claim(store, now=T0 + 3599) == []
    assert len(await claim(store, now=T0 + 3600)) == 1
    past = dataclasses.replace(msg(), send_at=T0 - 60)  # in the past: at once
    await store.enqueue([past], T0)
    assert (await store.get_message(past.id)).recipients[0].next_attempt_at == T0


async def test_a_release_leaves_mail_scheduled_for_later_to_its_time(store: Any) -> None:
    later = dataclasses.replace(msg("a@example.net"), send_at=T0 + 3600)
    now = msg("b@example.net")
    await store.enqueue([later, now], T0)
    ids = await store.select_delivery_ids(Selector(), ["queued"], after=0, limit=5)
    assert await store.hold(ids, T0 + 1) == (2, 0)
    assert await store.release(ids, T0 + 2) == (2, 0)
    assert (await store.get_message(later.id)).recipients[0].next_attempt_at == T0 + 3600
    assert (await store.get_message(now.id)).recipients[0].next_attempt_at == T0 + 2
    assert await claim(store, now=T0 + 3599) != []  # the other one
    assert await claim(store, now=T0 + 3599) == []
    assert len(await claim(store, now=T0 + 3600)) == 1


async def test_expired_mail_is_never_claimed_and_is_dead_lettered(store: Any) -> None:
    soon = dataclasses.replace(msg("a@example.net", "b@example.net"), expires_at=T0 + 60)
    await store.enqueue([soon], T0)
    [d, _] = deliveries(await claim(store, now=T0, limit=1))  # both: one message
    await store.record(
        "w1",
        [Outcome(d.id, RecipientState.DEFERRED, 1, 0, T0 + 30, attempt(ReplyClass.TEMPORARY))],
        T0,
    )
    await store.hand_back("w1", None, T0)
    assert d.expires_at == T0 + 60
    assert await claim(store, now=T0 + 60) == []  # due, but expired
    assert await store.expire_due(T0 + 59) == 0
    assert await store.expire_due(T0 + 60) == 2
    view = await store.get_message(soon.id)
    assert all(r.state is RecipientState.DEAD and r.reason == "expired" for r in view.recipients)
    events = await read_events(store, lambda es: "expired" in {e.type for e in es})
    assert {e.type for e in events} >= {"expired"}
    assert await store.purge_finished(T0 + 60 + 31 * 86400, 7 * 86400, 30 * 86400) == 1


# -- the event log --------------------------------------------------------------------------------


async def test_a_dead_letter_without_a_try_keeps_its_last_reply_and_takes_a_given_class(
    store: Any,
) -> None:
    """An outcome without an attempt keeps the delivery's last reply; the class it gives (what
    held a never-tried one back: its relay's pause) is the dead letter's and its event's. (A
    review: giving a class to one tried before blanked its reply.)"""
    tried, never = msg("ada@example.net"), msg("bob@example.net")
    await store.enqueue([tried, never], T0)
    claimed = {d.address: d for d in deliveries(await claim(store))}
    first, other = claimed["ada@example.net"], claimed["bob@example.net"]
    retry = Outcome(first.id, RecipientState.DEFERRED, 1, 0, T0 + 1,
                    attempt(ReplyClass.TEMPORARY, 451))  # fmt: skip
    deferred = Outcome(other.id, RecipientState.DEFERRED, 0, 1, T0 + 1, None)
    await store.record("w1", [retry, deferred], T0)
    again = deliveries(await claim(store, now=T0 + 1))
    assert len(again) == 2
    expired = [
        Outcome(d.id, RecipientState.DEAD, d.attempts, d.deferrals, None, None,
                reason="max_age 1s exceeded",
                cls=ReplyClass.TEMPORARY if d.id == first.id else ReplyClass.CONNECTION)
        for d in again
    ]  # fmt: skip
    await store.record("w1", expired, T0 + 2)
    letters = {letter.address: letter for letter in await store.list_dead(Selector(), limit=10)}
    ada, bob = letters["ada@example.net"], letters["bob@example.net"]
    assert ada.cls is ReplyClass.TEMPORARY
    assert ada.last_response is not None and ada.last_response.code == 451
    assert bob.cls is ReplyClass.CONNECTION  # never answered: a reply with nothing in it
    assert bob.as_json()["last_response"] == {"code": None, "enhanced": None, "text": ""}
    dead = await read_events(store, lambda es: len(es) >= 2, types=["dead"])
    assert {(e.recipient, e.cls) for e in dead} == {
        ("ada@example.net", ReplyClass.TEMPORARY),
        ("bob@example.net", ReplyClass.CONNECTION),
    }


async def test_every_change_of_a_recipient_is_an_event_in_order(store: Any) -> None:
    await store.add_suppression(Suppression("gone@example.net", T0, "operator", None))
    prepared = msg("ok@example.net", "later@example.net", "gone@example.net",
                   metadata={"order": "42"})  # fmt: skip
    await store.enqueue([prepared], T0)
    ok, later = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(ok.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED)),
            Outcome(
                later.id, RecipientState.DEFERRED, 1, 0, T0 + 60,
                attempt(ReplyClass.TEMPORARY, 451),
            ),
        ],
        T0 + 1,
    )  # fmt: skip
    [later_again] = deliveries(await claim(store, now=T0 + 60))
    await store.record(
        "w1",
        [
            Outcome(
                later_again.id, RecipientState.DEAD, 2, 0, None,
                attempt(ReplyClass.HARD_BOUNCE, 550), suppress=True,
            )
        ],
        T0 + 61,
    )  # fmt: skip
    events = await read_events(store, lambda es: len(es) >= 6)
    assert [(e.type, e.recipient) for e in events] == [
        ("queued", "ok@example.net"),
        ("queued", "later@example.net"),
        ("suppressed", "gone@example.net"),
        ("sent", "ok@example.net"),
        ("deferred", "later@example.net"),
        ("dead", "later@example.net"),
    ]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.queue_id == prepared.id and e.metadata == {"order": "42"} for e in events)
    dead = events[-1]
    assert (dead.cls, dead.code, dead.text) == (ReplyClass.HARD_BOUNCE, 550, "550 reply")
    assert dead.as_json()["message_id"] == prepared.id and dead.as_json()["id"] == str(dead.id)
    # a cursor, a type filter and a limit
    page = await read_events(store, lambda es: len(es) == 2, limit=2, after=events[2].id)
    assert [e.type for e in page] == ["sent", "deferred"]
    chosen = await read_events(store, lambda es: len(es) == 2, limit=10, types=["sent", "dead"])
    assert [e.type for e in chosen] == ["sent", "dead"]
    assert await store.events_after(events[-1].id, limit=10) == []
    with pytest.raises(NotFound):
        await store.events_after(events[-1].id + 1000, limit=10)
    # 0 is the cursor before any event: from the oldest kept, as None
    assert await store.events_after(0, limit=10) == await store.events_after(None, limit=10)


async def test_reaped_and_requeued_deliveries_are_events_and_events_expire(store: Any) -> None:
    await store.enqueue([msg()], T0)
    await claim(store, owner="gone", lease=10)
    await store.reap_expired_leases(T0 + 10)
    [d] = deliveries(await claim(store, now=T0 + 10))
    await store.record(
        "w1",
        [
            Outcome(
                d.id, RecipientState.DEAD, 2, 0, None,
                attempt(ReplyClass.POLICY_BLOCK, 554, now=T0 + 11),
            )
        ],
        T0 + 11,
    )  # fmt: skip
    await store.requeue_dead([d.id], T0 + 100)
    events = await read_events(store, lambda es: len(es) >= 4)
    assert [e.type for e in events] == ["queued", "deferred", "dead", "queued"]
    assert "lease expired" in (events[1].text or "")
    assert await store.purge_events(T0 + 11) == 2
    assert [e.type for e in await store.events_after(None, limit=100)] == ["dead", "queued"]
    with pytest.raises(NotFound):  # a purged cursor cannot be followed
        await store.events_after(events[0].id, limit=10)


async def test_retention_keeps_the_newest_event_for_a_caught_up_reader(store: Any) -> None:
    """On a quiet system every event may pass its retention: the newest stays, so a reader
    caught up on it reads on instead of being told it lost events (it lost none)."""
    await store.enqueue([msg()], T0)
    [last] = await read_events(store, lambda es: len(es) >= 1)
    assert await store.purge_events(T0 + 3600) == 0
    assert await store.events_after(last.id, limit=10) == []
    await store.enqueue([msg("bob@example.net")], T0 + 7200)
    await read_events(store, lambda es: len(es) >= 2)  # both shown (PostgreSQL: see above)
    assert await store.purge_events(T0 + 7200) == 1  # no longer the newest: it goes
    [new] = await store.events_after(None, limit=10)
    assert new.id > last.id


async def test_the_readiness_check_writes(store: Any) -> None:
    await store.check(T0)
    await store.check(T0 + 1)  # again: one row, updated


async def test_the_database_clock_is_the_servers_or_none_for_a_file(store: Any) -> None:
    """Hosts compare leases with their own clocks; a worker compares its clock with the
    database server's (PostgreSQL: here, the same machine's). A SQLite file has no clock but
    its host's: nothing to compare."""
    before = time.time()
    clock = await store.database_clock()
    after = time.time()
    if store.description.startswith("sqlite"):
        assert clock is None
    else:
        assert before - 0.5 <= clock <= after + 0.5


# -- suppressions: scopes and expiry --------------------------------------------------------------


async def test_a_suppression_holds_for_every_sender_or_for_one_sender_domain(store: Any) -> None:
    await store.add_suppression(
        Suppression("news@example.net", T0, "arf", "complaint", scope="shop.example",
                    detail="reported as spam")
    )  # fmt: skip
    await store.add_suppression(
        Suppression("gone@example.net", T0, "operator", "manual", expires_at=T0 + 100)
    )
    assert await store.is_suppressed(["news@example.net"], sender="a@shop.example", now=T0) == {
        "news@example.net": True
    }
    assert await store.is_suppressed(["news@example.net"], sender="a@other.example", now=T0) == {
        "news@example.net": False
    }
    assert (await store.is_suppressed(["gone@example.net"], now=T0 + 99))["gone@example.net"]
    assert not (await store.is_suppressed(["gone@example.net"], now=T0 + 100))["gone@example.net"]
    # at enqueue: the complaint holds for shop.example's mail only; the expiry is honoured
    shop = msg("news@example.net", sender="receipts@shop.example")
    other = msg("news@example.net", "gone@example.net", sender="app@other.example")
    await store.enqueue([shop], T0)
    await store.enqueue([other], T0 + 200)
    assert (await store.get_message(shop.id)).state is RecipientState.SUPPRESSED
    assert {r.state for r in (await store.get_message(other.id)).recipients} == {
        RecipientState.QUEUED
    }
    listed = {(s.address, s.scope): s for s in await store.list_suppressions(limit=10)}
    complaint = listed[("news@example.net", "shop.example")]
    assert (complaint.reason, complaint.detail, complaint.source) == (
        "complaint",
        "reported as spam",
        "arf",
    )
    assert complaint.as_json()["scope"] == "shop.example"
    assert listed[("gone@example.net", "*")].as_json()["expires_at"] is not None


async def test_an_expired_suppression_is_replaced_and_scopes_are_removed_apart(store: Any) -> None:
    old = Suppression("a@example.net", T0, "operator", "manual", expires_at=T0 + 10)
    assert await store.add_suppression(old)
    again = Suppression("a@example.net", T0 + 5, "operator", "manual", detail="still")
    assert not await store.add_suppression(again)  # the first holds while it lasts
    later = Suppression("a@example.net", T0 + 20, "operator", "manual", detail="for good")
    assert await store.add_suppression(later)  # it had ended: replaced
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.detail, entry.expires_at) == ("for good", None)
    await store.add_suppression(Suppression("a@example.net", T0, "arf", "complaint",
                                            scope="shop.example"))  # fmt: skip
    assert await store.remove_suppression("A@example.net", "SHOP.example")
    assert [s.scope for s in await store.list_suppressions(limit=10)] == ["*"]
    await store.add_suppression(Suppression("a@example.net", T0, "arf", "complaint",
                                            scope="shop.example"))  # fmt: skip
    assert await store.remove_suppression("a@example.net")  # every scope
    assert await store.list_suppressions(limit=10) == []


# -- suppressions: lanes ---------------------------------------------------------------------------


def state_of(view: Any, address: str) -> RecipientState:
    return next(r.state for r in view.recipients if r.address == address)


async def test_an_entry_for_some_lanes_stops_only_their_mail(store: Any) -> None:
    """A day-one audit: an unsubscribe from a low-lane newsletter suppressed the recipient's
    next password reset (lane high) from the same sender domain."""
    await store.add_suppression(
        Suppression("ada@example.net", T0, "unsubscribe", "unsubscribe", scope="shop.example",
                    lanes=(Lane.LOW,))
    )  # fmt: skip
    for lane, stopped in ((Lane.HIGH, False), (Lane.NORMAL, False), (Lane.LOW, True), (None, True)):
        found = await store.is_suppressed(
            ["ada@example.net"], sender="news@shop.example", lane=lane, now=T0
        )
        assert found == {"ada@example.net": stopped}, lane
    other = await store.is_suppressed(["ada@example.net"], sender="a@other.example", now=T0)
    assert other == {"ada@example.net": False}
    # many mails in one look-up, each with its own sender and lane (a worker's batch)
    mails = [
        ("ada@example.net", "news@shop.example", Lane.LOW),
        ("ADA@example.net", "accounts@shop.example", Lane.HIGH),
        ("ada@example.net", "news@other.example", Lane.LOW),
        ("bob@example.net", "news@shop.example", Lane.LOW),
    ]
    assert await store.suppressed_mail(mails, now=T0) == [True, False, False, False]
    # at enqueue
    reset = msg("ada@example.net", lane="high", sender="accounts@shop.example")
    news = msg("ada@example.net", "bob@example.net", lane="low", sender="news@shop.example")
    await store.enqueue([reset, news], T0)
    assert (await store.get_message(reset.id)).state is RecipientState.QUEUED
    view = await store.get_message(news.id)
    assert state_of(view, "ada@example.net") is RecipientState.SUPPRESSED
    assert state_of(view, "bob@example.net") is RecipientState.QUEUED
    [entry] = await store.list_suppressions(limit=10)
    assert entry.lanes == (Lane.LOW,)
    assert entry.as_json()["lanes"] == ["low"]
    # every lane, said as such or by naming them all, is an entry without lanes
    await store.add_suppression(
        Suppression("bob@example.net", T0, "operator", "manual", lanes=tuple(Lane))
    )
    listed = {s.address: s for s in await store.list_suppressions(limit=10)}
    assert listed["bob@example.net"].lanes is None
    assert listed["bob@example.net"].as_json()["lanes"] is None


async def test_an_entry_for_more_lanes_widens_the_one_of_its_scope_and_reason(store: Any) -> None:
    """The first entry wins, but never over one for the same reason that stops more: the
    widened entry stops the lanes of both, as long as the longer of the two. An entry for
    another reason is an entry of its own."""
    low = Suppression("ada@example.net", T0, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,),
                      expires_at=T0 + 100)  # fmt: skip
    assert await store.add_suppression(low)
    assert not await store.add_suppression(dataclasses.replace(low, created_at=T0 + 1))  # a repeat
    normal = Suppression("ada@example.net", T0 + 2, "unsubscribe", "unsubscribe",
                         lanes=(Lane.NORMAL,), expires_at=T0 + 50,
                         detail="second link")  # fmt: skip
    assert await store.add_suppression(normal)
    [entry] = await store.list_suppressions(limit=10)
    assert entry.lanes == (Lane.NORMAL, Lane.LOW)
    assert (entry.reason, entry.detail, entry.expires_at) == (
        "unsubscribe",
        "second link",
        T0 + 100,
    )
    assert not await store.add_suppression(
        Suppression("ada@example.net", T0 + 3, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,))
    )  # fewer lanes: nothing changes
    # every lane, for a while, after lanes for good: every lane, for good
    assert await store.add_suppression(
        Suppression("ada@example.net", T0 + 4, "unsubscribe", "unsubscribe", expires_at=T0 + 60)
    )
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.lanes, entry.expires_at) == (None, T0 + 100)
    # an entry for every lane is never narrowed
    assert not await store.add_suppression(
        Suppression("ada@example.net", T0 + 5, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,))
    )
    [entry] = await store.list_suppressions(limit=10)
    assert entry.lanes is None
    # an operator's entry beside it is another entry, and so are its lanes
    manual = Suppression("ada@example.net", T0 + 6, "operator", "manual", lanes=(Lane.LOW,))
    assert await store.add_suppression(manual)
    listed = {s.reason: s for s in await store.list_suppressions(limit=10)}
    assert (listed["manual"].lanes, listed["unsubscribe"].lanes) == ((Lane.LOW,), None)
    # an expired entry is replaced as it was, lanes and all
    assert await store.remove_suppression("ada@example.net", reason="manual")
    assert await store.add_suppression(
        Suppression("ada@example.net", T0 + 200, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,))
    )
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.lanes, entry.expires_at, entry.reason) == ((Lane.LOW,), None, "unsubscribe")


async def test_a_hard_bounce_after_an_unsubscribe_stops_every_lane_and_leaves_it(
    store: Any,
) -> None:
    """A hard-bounced address must get no more mail of any lane, though an unsubscribe from
    bulk mail got to its scope first; and removing the bounce (a mistake) leaves the
    unsubscribe. (The bounce used to widen the unsubscribe's entry and take its reason:
    removing it sent the recipient the bulk mail they had unsubscribed from.)"""
    await store.add_suppression(
        Suppression("ada@example.net", T0, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,))
    )
    reset = msg("ada@example.net", lane="high")
    await store.enqueue([reset], T0)
    [d] = deliveries(await claim(store))
    await store.record(
        "w1",
        [Outcome(d.id, RecipientState.DEAD, 1, 0, None, attempt(ReplyClass.HARD_BOUNCE, 550),
                 suppress=True)],
        T0 + 1,
    )  # fmt: skip
    listed = {s.reason: s for s in await store.list_suppressions(limit=10)}
    assert sorted(listed) == ["hard_bounce", "unsubscribe"]
    bounce = listed["hard_bounce"]
    assert (bounce.lanes, bounce.source, bounce.queue_id) == (None, "bounce", reset.id)
    assert listed["unsubscribe"].lanes == (Lane.LOW,)
    again = msg("ada@example.net", lane="high")
    await store.enqueue([again], T0 + 2)
    assert (await store.get_message(again.id)).state is RecipientState.SUPPRESSED
    # the bounce was a mistake: lifted, the unsubscribe still stops the bulk lane only
    assert await store.remove_suppression("ada@example.net", reason="hard_bounce")
    assert not await store.remove_suppression("ada@example.net", reason="hard_bounce")
    [left] = await store.list_suppressions(limit=10)
    assert (left.reason, left.lanes) == ("unsubscribe", (Lane.LOW,))
    stopped = await store.is_suppressed(["ada@example.net"], lane=Lane.LOW)
    assert stopped == {"ada@example.net": True}
    assert await store.is_suppressed(["ada@example.net"], lane=Lane.HIGH) == {
        "ada@example.net": False
    }


def low_lane_unsubscribe(delivery_id: int, at: float) -> Any:
    """A one-click unsubscribe from the low lane's mail, for every sender."""
    from postlane.feedback import Feedback, FeedbackKind

    return Feedback(
        FeedbackKind.UNSUBSCRIBED,
        delivery_id,
        at,
        "unsubscribe",
        suppression=("*", "unsubscribe", None),
        suppression_lanes=(Lane.LOW,),
    )


async def test_an_unsubscribe_and_a_complaint_in_one_batch_stop_every_lane(store: Any) -> None:
    """One statement writes a batch's entries (PostgreSQL can change a row once in it): the
    one for every lane wins there too, as one after the other would."""
    from postlane.feedback import Feedback, FeedbackKind

    [ada] = await sent_message(store, "ada@example.net")
    unsubscribe = low_lane_unsubscribe(ada.id, T0 + 5)
    complaint = Feedback(FeedbackKind.COMPLAINED, ada.id, T0 + 6, "arf",
                         suppression=("*", "complaint", None))  # fmt: skip
    results = await store.record_feedback([unsubscribe, complaint], T0 + 10)
    assert [r.changed for r in results] == [True, True]
    listed = {s.reason: s.lanes for s in await store.list_suppressions(limit=10)}
    assert listed == {"complaint": None, "unsubscribe": (Lane.LOW,)}
    assert await store.is_suppressed(["ada@example.net"], lane=Lane.HIGH) == {
        "ada@example.net": True
    }


async def test_an_addresss_entries_are_read_whatever_the_case_expired_ones_too(
    store: Any,
) -> None:
    for entry in (
        Suppression("ada@example.net", T0, "bounce", "hard_bounce"),
        Suppression("ada@example.net", T0 + 1, "arf", "complaint", scope="shop.example"),
        Suppression("ada@example.net", T0 + 2, "op", "manual", expires_at=T0 + 3),
        Suppression("bob@example.net", T0, "op", "manual"),
    ):
        assert await store.add_suppression(entry)
    found = await store.suppressions_of(["ADA@example.net", "nobody@example.net"])
    assert [(s.reason, s.scope) for s in found] == [
        ("manual", "*"), ("complaint", "shop.example"), ("hard_bounce", "*"),
    ]  # fmt: skip
    assert await store.suppressions_of([]) == []


async def test_lifting_suppressions_removes_only_the_entries_that_stop_the_mail(
    store: Any,
) -> None:
    """A requeue's lift: the entries that stop each (address, sender, lane), for every sender
    or the sender's domain; an unsubscribe from another lane and an entry for another sender
    domain stay."""
    for entry in (
        Suppression("ada@example.net", T0, "bounce", "hard_bounce"),
        Suppression("ada@example.net", T0, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,)),
        Suppression("ada@example.net", T0, "arf", "complaint", scope="shop.example"),
        Suppression("bob@example.net", T0, "unsubscribe", "unsubscribe", lanes=(Lane.LOW,)),
        Suppression("cy@example.net", T0, "operator", "manual", lanes=(Lane.LOW,)),
    ):
        assert await store.add_suppression(entry)
    mail = [
        ("Ada@example.net", "app@example.com", Lane.NORMAL),
        ("bob@example.net", "app@example.com", Lane.NORMAL),
        ("cy@example.net", "app@example.com", Lane.LOW),
    ]
    assert await store.lift_suppressions(mail) == ["ada@example.net", "cy@example.net"]
    left = sorted((s.address, s.scope, s.reason) for s in await store.list_suppressions(limit=10))
    assert left == [
        ("ada@example.net", "*", "unsubscribe"),
        ("ada@example.net", "shop.example", "complaint"),
        ("bob@example.net", "*", "unsubscribe"),
    ]
    assert await store.lift_suppressions([("dan@example.net", "a@x.example", Lane.HIGH)]) == []
    # a letter from shop.example: the complaint about its mail is what stops it, and goes
    lifted = await store.lift_suppressions([("ada@example.net", "news@Shop.example", Lane.NORMAL)])
    assert lifted == ["ada@example.net"]
    left = sorted((s.address, s.scope, s.reason) for s in await store.list_suppressions(limit=10))
    assert ("ada@example.net", "shop.example", "complaint") not in left


async def test_an_unsubscribe_after_a_hard_bounce_is_kept_on_its_own(store: Any) -> None:
    """A recipient who unsubscribes after their address hard-bounced (a link in mail sent
    before) asked something the bounce does not say: it is kept, so that removing the bounce
    later leaves it. (It counted as a repeat of the bounce's entry for every lane.)"""
    [ada] = await sent_message(store, "ada@example.net")
    bounce = Suppression("ada@example.net", T0 + 1, "bounce", "hard_bounce")
    assert await store.add_suppression(bounce)
    [result] = await store.record_feedback([low_lane_unsubscribe(ada.id, T0 + 5)], T0 + 10)
    assert result.changed
    assert await store.remove_suppression("ada@example.net", reason="hard_bounce")
    [left] = await store.list_suppressions(limit=10)
    assert (left.reason, left.lanes) == ("unsubscribe", (Lane.LOW,))


async def test_an_unsubscribe_for_more_lanes_is_no_repeat(store: Any) -> None:
    """[unsubscribe] lanes widened since a recipient's first click: their next click stops the
    new lanes too, and is told."""
    from postlane.feedback import Feedback, FeedbackKind

    [ada] = await sent_message(store, "ada@example.net")

    def click(at: float, *lanes: Lane) -> Feedback:
        return Feedback(
            FeedbackKind.UNSUBSCRIBED, ada.id, at, "unsubscribe",
            suppression=("example.com", "unsubscribe", None), suppression_lanes=lanes,
        )  # fmt: skip

    async def changed(at: float, *lanes: Lane) -> bool:
        [result] = await store.record_feedback([click(at, *lanes)], at)
        return bool(result.changed)

    assert await changed(T0 + 5, Lane.LOW)
    assert not await changed(T0 + 6, Lane.LOW)  # a second click
    assert await changed(T0 + 7, Lane.NORMAL, Lane.LOW)
    [entry] = await store.list_suppressions(limit=10)
    assert entry.lanes == (Lane.NORMAL, Lane.LOW)
    events = await read_events(store, lambda e: len(e) >= 2, types=["unsubscribed"])
    assert len(events) == 2


# -- feedback after the first hop -----------------------------------------------------------------


async def sent_message(store: Any, *to: str, sender: str = "app@example.com") -> list[Any]:
    prepared = msg(*to, sender=sender)
    await store.enqueue([prepared], T0)
    claimed = deliveries(await claim(store))
    await store.record(
        "w1",
        [
            Outcome(d.id, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED))
            for d in claimed
        ],
        T0 + 1,
    )
    return claimed


async def test_an_asynchronous_bounce_moves_a_sent_recipient_once(store: Any) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    [ada, bob] = await sent_message(store, "ada@example.net", "bob@example.net")
    bounce = Feedback(
        FeedbackKind.BOUNCED, ada.id, T0 + 60, "dsn", ReplyClass.HARD_BOUNCE, 550, "5.1.1",
        "550 5.1.1 <ada@example.net>: user unknown", suppression=("*", "hard_bounce", None),
    )  # fmt: skip
    complaint = Feedback(
        FeedbackKind.COMPLAINED, bob.id, T0 + 70, "arf", None,
        suppression=("example.com", "complaint", None),
    )  # fmt: skip
    results = await store.record_feedback([bounce, complaint], T0 + 80)
    assert [(r.state, r.changed) for r in results] == [
        (RecipientState.BOUNCED, True),
        (RecipientState.COMPLAINED, True),
    ]
    assert await store.record_feedback([bounce], T0 + 90) == [
        await_result(ada.id, RecipientState.BOUNCED, False)
    ]  # a repeat changes nothing
    view = await store.get_message(ada.queue_id if hasattr(ada, "queue_id") else
                                   (await store.delivery_refs([ada.id]))[0].queue_id,
                                   history=True)  # fmt: skip
    by_address = {r.address: r for r in view.recipients}
    assert by_address["ada@example.net"].state is RecipientState.BOUNCED
    assert by_address["ada@example.net"].last_response.code == 550  # type: ignore[union-attr]
    assert [h.relay for h in by_address["ada@example.net"].history or ()] == [
        "smtp://relay:25",
        "dsn",
    ]
    assert by_address["bob@example.net"].state is RecipientState.COMPLAINED
    events = [e.type for e in await read_events(store, lambda es: last_type(es) == "complained")]
    assert events[-2:] == ["bounced", "complained"] and events.count("bounced") == 1
    listed = {(s.address, s.scope, s.reason) for s in await store.list_suppressions(limit=10)}
    assert listed == {
        ("ada@example.net", "*", "hard_bounce"),
        ("bob@example.net", "example.com", "complaint"),
    }
    stats = await store.stats(T0 + 100)
    assert (stats.sent, stats.bounced, stats.complained) == (0, 1, 1)


def await_result(delivery_id: int, state: RecipientState, changed: bool) -> Any:
    from postlane.feedback import FeedbackResult

    return FeedbackResult(delivery_id, state, changed)


async def test_feedback_that_changes_no_state_is_history_and_an_event(store: Any) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    [ada] = await sent_message(store, "ada@example.net")
    await store.enqueue([msg("waiting@example.net")], T0)
    [waiting] = [
        r for r in await store.find_deliveries("WAITING@example.net", message_id=None,
                                               queue_id=None)
    ] or [None]  # fmt: skip
    results = await store.record_feedback(
        [
            Feedback(FeedbackKind.SOFT_BOUNCE, ada.id, T0 + 5, "dsn", ReplyClass.SOFT_BOUNCE,
                     452, "4.2.2", "mailbox full"),
            Feedback(FeedbackKind.DELAYED, ada.id, T0 + 6, "dsn", ReplyClass.TEMPORARY, 451),
            Feedback(FeedbackKind.UNSUBSCRIBED, ada.id, T0 + 7, "unsubscribe",
                     suppression=("example.com", "unsubscribe", None)),
            Feedback(FeedbackKind.DELIVERED, ada.id, T0 + 8, "webhook:ses", ReplyClass.DELIVERED,
                     250),
            Feedback(FeedbackKind.BOUNCED, 10**9, T0 + 9, "dsn", ReplyClass.HARD_BOUNCE, 550),
        ],
        T0 + 10,
    )  # fmt: skip
    assert [(r.state, r.changed) for r in results] == [
        (RecipientState.SENT, True),
        (RecipientState.SENT, True),
        (RecipientState.SENT, True),
        (RecipientState.SENT, True),
        (None, False),  # no such delivery
    ]
    assert waiting is None  # find_deliveries needs a message to look in
    events = [e.type for e in await read_events(store, lambda es: last_type(es) == "unsubscribed")]
    assert events[-3:] == ["deferred", "deferred", "unsubscribed"]
    assert await store.attempt_classes_between(T0 + 5, T0 + 9) == {
        "soft_bounce": 1,
        "temporary": 1,
        "delivered": 1,
    }
    assert (await store.is_suppressed(["ada@example.net"], sender="x@example.com"))[
        "ada@example.net"
    ]


async def test_a_bounce_for_a_recipient_never_sent_changes_nothing(store: Any) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    prepared = msg("waiting@example.net")
    await store.enqueue([prepared], T0)
    [ref] = await store.find_deliveries("Waiting@Example.net", queue_id=prepared.id)
    [by_header] = await store.find_deliveries("waiting@example.net", message_id=prepared.message_id)
    assert ref == by_header and ref.state is RecipientState.QUEUED
    assert ref.sender == "app@example.com" and ref.lane is Lane.NORMAL
    [result] = await store.record_feedback(
        [Feedback(FeedbackKind.BOUNCED, ref.delivery_id, T0, "dsn", ReplyClass.HARD_BOUNCE, 550,
                  suppression=("*", "hard_bounce", None))],
        T0,
    )  # fmt: skip
    assert (result.state, result.changed) == (RecipientState.QUEUED, False)
    assert await store.list_suppressions(limit=10) == []
    assert [r.delivery_id for r in await store.delivery_refs([ref.delivery_id, 10**9])] == [
        ref.delivery_id
    ]


async def test_unmatched_reports_are_kept_for_review(store: Any) -> None:
    from postlane.feedback import Report

    bounce = Report("bounce listener", "dsn", b"x" * 10, "", "b-zz@bounce.example")
    first = await store.record_unmatched(bounce, "no recipient matched", T0)
    second = await store.record_unmatched(
        Report("webhook:ses", "event", b"{}"), "unknown message", T0 + 1
    )
    listed = await store.list_unmatched(limit=10)
    assert [u.id for u in listed] == [second, first]
    assert listed[1].content is None and listed[1].rcpt_to == "b-zz@bounce.example"
    assert listed[1].as_json()["size"] == 10
    shown = await store.get_unmatched(first)
    assert (shown.content, shown.size, shown.reason) == (b"x" * 10, 10, "no recipient matched")
    with pytest.raises(NotFound):
        await store.get_unmatched(second + 1000)
    assert await store.purge_unmatched(T0 + 1) == 1
    # an operator applied the other one (feedback apply): forgotten, once
    assert await store.delete_unmatched(second) is True
    assert await store.delete_unmatched(second) is False
    assert await store.list_unmatched(limit=10) == []


async def test_unmatched_reports_are_kept_up_to_a_total_size_the_oldest_going_first(
    store: Any,
) -> None:
    """Anybody may send to the bounce domain: what nothing matched must not fill the disk."""
    from postlane.feedback import Report

    store.unmatched_limit = 10 * (1000 + 512)  # ten reports of 1,000 bytes
    store.unmatched_trim_every = 5
    ids = [
        await store.record_unmatched(Report("bounce listener", "unknown", b"x" * 1000), "junk", T0)
        for _ in range(24)
    ]
    kept = [u.id for u in await store.list_unmatched(limit=100)]
    assert kept[0] == ids[-1] and ids[-5] in kept  # the newest stay
    assert ids[0] not in kept and len(kept) <= 10 + 4  # trimmed at every fifth, at most 4 over
    assert len(kept) >= 10


async def test_a_message_id_names_a_sole_delivery_only_of_a_message_to_one_address(
    store: Any,
) -> None:
    alone = msg("ada@example.net")
    shared = dataclasses.replace(msg("bob@example.net", "cy@example.net"), message_id="<m@x>")
    alone = dataclasses.replace(alone, message_id="<a@x>")
    await store.enqueue([alone, shared], T0)
    [found] = await store.sole_deliveries("ADA@example.net", "<a@x>")
    assert found.queue_id == alone.id and found.address == "ada@example.net"
    assert await store.sole_deliveries("bob@example.net", "<m@x>") == []
    assert len(await store.find_deliveries("bob@example.net", message_id="<m@x>")) == 1


async def test_a_shared_secret_is_made_once(store: Any) -> None:
    first = await store.secret("verp", T0)
    assert len(first) == 32 and await store.secret("verp", T0 + 1) == first
    assert await store.secret("unsubscribe", T0) != first


async def test_a_logged_out_session_is_refused_until_it_would_have_expired(store: Any) -> None:
    assert not await store.session_ended("s1", T0)
    await store.end_session("s1", T0 + 100, T0)
    await store.end_session("s1", T0 + 100, T0 + 1)  # twice (two clicks): still one logout
    assert await store.session_ended("s1", T0 + 99)
    assert not await store.session_ended("s2", T0 + 99)
    assert not await store.session_ended("s1", T0 + 100)  # its cookie has expired by then
    await store.end_session("s2", T0 + 500, T0 + 200)  # forgets s1's logout, now moot
    assert await store.session_ended("s2", T0 + 200)
    await store.end_session("s1", T0 + 300, T0 + 200)  # so the same ID can be logged out again
    assert await store.session_ended("s1", T0 + 250)


# -- outbound webhook endpoints -------------------------------------------------------------------


async def test_a_webhook_endpoint_is_leased_and_follows_its_cursor(store: Any) -> None:
    state = await store.claim_webhook_endpoint(
        "app", "w1", now=T0, lease_until=T0 + 30, start_after=7
    )
    assert state is not None and (state.cursor, state.failures) == (7, 0)
    assert await store.claim_webhook_endpoint(
        "app", "w2", now=T0 + 1, lease_until=T0 + 31, start_after=0
    ) is None  # fmt: skip
    assert await store.webhook_delivered("app", "w1", previous=7, cursor=12, count=5, now=T0 + 2)
    assert not await store.webhook_delivered(  # not its holder
        "app", "w2", previous=12, cursor=20, count=1, now=T0 + 2
    )
    assert not await store.webhook_delivered(  # not from where it is now: compare-and-set
        "app", "w1", previous=7, cursor=20, count=1, now=T0 + 2
    )
    # a cursor may be a lower id than the one before (PostgreSQL: ids are taken before commit)
    assert await store.webhook_delivered("app", "w1", previous=12, cursor=9, count=0, now=T0 + 2)
    assert await store.webhook_delivered("app", "w1", previous=9, cursor=12, count=0, now=T0 + 2)
    assert await store.webhook_failed(
        "app", "w1", error="HTTP 500", paused_until=T0 + 60, now=T0 + 3
    )
    [listed] = await store.webhook_endpoints()
    assert (listed.cursor, listed.delivered, listed.failures, listed.last_error) == (
        12,
        5,
        1,
        "HTTP 500",
    )
    assert listed.paused_until == T0 + 60 and listed.as_json()["cursor"] == "12"
    # its holder stopped renewing: another process takes it where it was
    taken = await store.claim_webhook_endpoint(
        "app", "w2", now=T0 + 31, lease_until=T0 + 61, start_after=0
    )
    assert taken is not None and taken.cursor == 12 and taken.lease_owner == "w2"
    assert await store.replay_webhook("app", after=3, now=T0 + 32)
    [replayed] = await store.webhook_endpoints()
    assert (replayed.cursor, replayed.failures, replayed.paused_until) == (3, 0, None)
    await store.release_webhook_endpoint("app", "w2")
    assert await store.claim_webhook_endpoint(
        "app", "w3", now=T0 + 33, lease_until=T0 + 63, start_after=0
    ) is not None  # fmt: skip
    await store.claim_webhook_endpoint("old", "w3", now=T0, lease_until=T0 + 1, start_after=0)
    assert await store.forget_webhook_endpoints(["app"]) == 1
    assert [e.name for e in await store.webhook_endpoints()] == ["app"]


# -- the fleet's shares of destinations' limits ---------------------------------------------------


async def test_processes_share_a_destination_by_demand_for_a_lease(store: Any) -> None:
    first = await store.share_destinations("a", {"google": 30.0, "*": 1.0}, T0, T0 + 3)
    assert first.demands == {"google": {"a": 30.0}, "*": {"a": 1.0}} and first.owners == 1
    both = await store.share_destinations("b", {"google": 10.0, "*": 1.0}, T0 + 1, T0 + 4)
    assert both.demands["google"] == {"a": 30.0, "b": 10.0} and both.owners == 2
    assert both.since[("google", "a")] == T0 and both.since[("google", "b")] == T0 + 1
    renewed = await store.share_destinations("a", {"google": 20.0, "*": 1.0}, T0 + 2, T0 + 5)
    assert renewed.demands["google"] == {"a": 20.0, "b": 10.0}
    assert renewed.since[("google", "a")] == T0  # since it first asked, not since renewed
    # b stopped renewing: its share is gone once its lease runs out
    alone = await store.share_destinations("a", {"google": 20.0, "*": 1.0}, T0 + 4, T0 + 7)
    assert alone.demands["google"] == {"a": 20.0} and alone.owners == 1
    await store.forget_shares("a")
    left = await store.share_destinations("c", {"google": 1.0}, T0 + 5, T0 + 8)
    assert left.demands["google"] == {"c": 1.0}


async def test_the_fleets_sends_in_flight_stay_within_a_shared_cap(store: Any) -> None:
    """Each send to a destination whose cap processes share takes a slot in the store; a
    slot is granted only while every live process's sends in flight stay within the cap,
    given back when the send ends, and gone with a process that stopped renewing its shares."""
    take = store.take_fleet_slot
    await store.share_destinations("a", {"google": 1.0}, T0, T0 + 3)
    assert await take("a", "google", 2, T0, T0 + 3)
    assert await take("b", "google", 2, T0, T0 + 3)
    assert not await take("a", "google", 2, T0, T0 + 3)  # a's and b's: the cap is full
    assert await take("a", "example.net", 2, T0, T0 + 3)  # another destination's are its own
    await store.give_fleet_slots("b", ["google"])
    assert not await take("b", "example.net", 1, T0, T0 + 3)
    assert await take("b", "google", 2, T0 + 1, T0 + 4)
    # a stopped renewing: past its lease, its sends no longer count (b's, renewed, do)
    await store.share_destinations("b", {"google": 1.0}, T0 + 2, T0 + 5)
    assert await take("c", "google", 2, T0 + 3.5, T0 + 6.5)
    assert not await take("c", "google", 2, T0 + 3.5, T0 + 6.5)
    # a process that stops hands its slots back at once
    await store.forget_shares("b")
    assert await take("d", "google", 2, T0 + 4, T0 + 7)
    # a slot given back twice (a retried give) never counts below none
    await store.give_fleet_slots("d", ["google", "google"])
    assert await take("d", "google", 2, T0 + 4, T0 + 7)
    assert not await take("e", "google", 2, T0 + 4, T0 + 7)  # c's and d's


async def test_concurrent_takes_of_the_last_slot_grant_it_once(store: Any) -> None:
    """Many processes asking at once for a destination's slots (each in its own transaction,
    on PostgreSQL from the pool's connections at the same time): exactly the cap is granted."""
    granted = await asyncio.gather(
        *(store.take_fleet_slot(f"p{n}", "google", 3, T0, T0 + 3) for n in range(12))
    )
    assert sum(granted) == 3


async def test_a_destinations_slots_are_one_sequence_for_the_fleet(store: Any) -> None:
    """Deliveries any process sends back to wait for a rate the fleet shares take successive
    slots of one schedule: each take continues after the last (whoever took it), starts no
    sooner than asked, waits at the horizon when the schedule reaches it, and starts again
    when what waited is called back (a grown rate, an operator's lift)."""
    take = store.take_destination_slots
    assert await take("google", 3, T0, 0.1, T0 + 120) == pytest.approx(T0)
    assert await take("google", 2, T0, 0.1, T0 + 120) == pytest.approx(T0 + 0.3)  # after those
    assert await take("google", 1, T0 + 5, 0.1, T0 + 120) == pytest.approx(T0 + 5)  # not sooner
    assert await take("google", 1, T0, 0.2, T0 + 120) == pytest.approx(T0 + 5.1)
    assert await take("example.net", 1, T0, 0.1, T0 + 120) == pytest.approx(T0)  # its own
    assert await take("google", 1, T0, 0.1, T0 + 5) == pytest.approx(T0 + 5)  # the horizon
    assert await take("google", 1, T0, 0.1, T0 + 5) == pytest.approx(T0 + 5)
    # concurrent takes (PostgreSQL: from the pool's connections at once) never share a slot
    firsts = await asyncio.gather(*(take("yahoo", 2, T0, 0.5, T0 + 120) for _ in range(8)))
    assert sorted(firsts) == pytest.approx([T0 + n for n in range(8)])
    await store.hasten("google", T0 + 1, WAITING_FOR_DESTINATION)  # its rate grew: called back
    assert await take("google", 1, T0 + 1, 0.1, T0 + 121) == pytest.approx(T0 + 1)
    assert await take("yahoo", 1, T0, 0.5, T0 + 120) == pytest.approx(T0 + 8)  # untouched
    await store.lift_destinations(["yahoo"], T0 + 2)  # an operator's flush
    assert await take("yahoo", 1, T0 + 2, 0.5, T0 + 122) == pytest.approx(T0 + 2)
    await store.hasten(None, T0 + 3, WAITING_FOR_DESTINATION)  # the relay's rate: everything
    assert await take("example.net", 1, T0 + 3, 0.1, T0 + 123) == pytest.approx(T0 + 3)


async def test_one_process_probes_a_destination_after_its_pause(store: Any) -> None:
    """When a pause ends, the first process to ask probes; the others wait for its outcome:
    open (they go) or failed (they wait for the longer pause it recorded). A probe of an
    earlier pause is over; one under way lasts while its process renews its shares, and no
    longer than the timeout."""
    end = T0 + 30
    for owner in ("a", "b", "c"):  # alive: each renews its presence in the fleet's shares
        await store.share_destinations(owner, {"*": 1.0}, end, end + 3)

    async def take(destination: str, owner: str, pause_end: float, now: float, timeout: float):
        return await store.take_probe(
            destination, owner, pause_end, now, timeout, presence_until=now + 3
        )

    assert await take("google", "a", end, end, 60) == ProbeTurn.PROBE
    assert await take("google", "b", end, end + 0.1, 60) == ProbeTurn.WAIT
    assert await take("google", "a", end, end + 0.2, 60) == ProbeTurn.PROBE  # still a's
    assert await take("example.net", "b", end, end, 60) == ProbeTurn.PROBE  # its own probe
    await store.end_probe("google", "a", end, opened=True)
    assert await take("google", "b", end, end + 1, 60) == ProbeTurn.OPEN
    assert await take("google", "c", end - 10, end + 1, 60) == ProbeTurn.OPEN  # an older pause
    # the next pause: its probe fails, and the others wait (for the longer pause recorded)
    again = end + 100
    for owner in ("a", "b", "c"):
        await store.share_destinations(owner, {"*": 1.0}, again, again + 3)
    assert await take("google", "b", again, again, 60) == ProbeTurn.PROBE
    assert await take("google", "a", again, again, 60) == ProbeTurn.WAIT
    await store.end_probe("google", "b", again, opened=False)
    assert await take("google", "a", again, again + 1, 60) == ProbeTurn.WAIT
    # a probe whose process stopped renewing its shares, or that never answered, is over
    later = again + 60  # the end of the longer pause
    await store.share_destinations("a", {"*": 1.0}, later, later + 3)
    await store.share_destinations("c", {"*": 1.0}, later, later + 300)
    assert await take("google", "a", later, later + 1, 60) == ProbeTurn.PROBE  # a newer pause
    assert await take("google", "c", later, later + 2, 60) == ProbeTurn.WAIT
    assert await take("google", "c", later, later + 4, 60) == ProbeTurn.PROBE  # a: gone
    await store.share_destinations("b", {"*": 1.0}, later + 4, later + 300)
    assert await take("google", "b", later, later + 5, 60) == ProbeTurn.WAIT  # c's, alive
    assert await take("google", "b", later, later + 4 + 60, 60) == ProbeTurn.PROBE  # too long


async def test_a_process_that_takes_a_probe_is_alive_though_its_sync_is_late(store: Any) -> None:
    """Taking the probe renews the taker's presence: the others wait for its probe even when
    its last sync (which renews its presence too) is older than the presence lasts. (A
    worker's sync came late on a loaded machine and, moments after it took the probe, another
    took it too: two probes at one pause's end.)"""
    end = T0 + 30
    await store.share_destinations("a", {"*": 1.0}, end - 10, end - 7)  # lapsed at end - 7
    await store.share_destinations("b", {"*": 1.0}, end, end + 3)  # forgets a's presence
    turn = await store.take_probe("relay", "a", end, end, 60, presence_until=end + 3)
    assert turn == ProbeTurn.PROBE
    turn = await store.take_probe("relay", "b", end, end + 0.1, 60, presence_until=end + 3.1)
    assert turn == ProbeTurn.WAIT
    # the probe's taker is alive for as long as the presence it renewed, and no longer
    turn = await store.take_probe("relay", "b", end, end + 3.5, 60, presence_until=end + 6.5)
    assert turn == ProbeTurn.PROBE
