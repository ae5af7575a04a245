"""Outbound webhooks against a real receiver (tests/webhook_receiver.py: an HTTP server that
verifies every request with the Standard Webhooks reference library), on a real store: every
event arrives, signed, in order per message, none lost, through failures, timeouts, a kill -9,
an operator's replay; slow endpoints hold up nothing else; private addresses are refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import ssl
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from postlane.alerts import evaluate, load_rules
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.errors import NotFound
from postlane.events import Event
from postlane.message import Lane, Message, RecipientState, prepare
from postlane.records import AttemptRecord, Outcome
from postlane.store.sqlite import SQLiteStore
from postlane.webhooks.endpoints import WebhookEndpoint, new_secret
from postlane.webhooks.operations import (
    endpoint_gauges,
    endpoint_statuses,
    failures,
    replay,
    resume,
    send_test_event,
)
from postlane.webhooks.retry import RetrySchedule
from postlane.webhooks.sender import OUTCOMES, SenderSettings, WebhookSender
from postlane.webhooks.subscribers import EventSubscribers, follow_events
from tests.processes import PostlaneProcess
from tests.webhook_receiver import Answer, Request, WebhookReceiver, ok, signed_ok

SECRET = new_secret()
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]
ROOT = Path(__file__).resolve().parents[2]

#: quick for tests: saves and polls every few milliseconds
FAST = SenderSettings(lease=5.0, poll=0.02, save_every=0.05, shutdown_grace=2.0)


# -- building blocks -----------------------------------------------------------------------------


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as running:
        yield running


def endpoint_to(receiver: WebhookReceiver, **keys: Any) -> WebhookEndpoint:
    table = {"url": receiver.url, "secret": SECRET, "allow_private": True, **keys}
    return WebhookEndpoint.from_table(table)


def attempt(cls: ReplyClass, code: int, now: float) -> AttemptRecord:
    return AttemptRecord(now, cls, code, None, f"{code} reply", "smtp://relay", "example.net", 3)


async def make_events(
    store: Any, messages: int, *, recipients: int = 2, now: float | None = None
) -> list[Event]:
    """``messages`` messages of ``recipients`` recipients, each recipient queued, deferred and
    then sent (three events each, interleaved across messages); returns the whole log."""
    now = time.time() if now is None else now
    prepared = [
        prepare(
            Message(
                sender="app@example.com",
                to=[f"r{n}-{i}@example.net" for n in range(recipients)],
                subject="s",
                text="x",
                metadata={"n": i},
            ),
            max_size=1_000_000,
            now=now,
        )
        for i in range(messages)
    ]
    await store.enqueue(prepared, now)
    for state, cls, code, at in (
        (RecipientState.DEFERRED, ReplyClass.TEMPORARY, 451, now),
        (RecipientState.SENT, ReplyClass.DELIVERED, 250, now + 1),
    ):
        claimed = await store.claim_due(
            "maker", ALL_LANES, limit=messages * recipients, now=at, lease_until=at + 60
        )
        await store.record(
            "maker",
            [
                Outcome(d.id, state, 1, 0, at + 1 if state is RecipientState.DEFERRED else None,
                        attempt(cls, code, at))
                for m in claimed
                for d in m.deliveries
            ],
            at,
        )  # fmt: skip
    return await store.events_after(None, limit=1_000_000)


def first_arrivals(requests: Sequence[Request]) -> list[int]:
    """Event ids in the order each was first acknowledged."""
    seen: set[int] = set()
    order = []
    for request in requests:
        event_id = int(request.data["id"])
        if event_id not in seen:
            seen.add(event_id)
            order.append(event_id)
    return order


def assert_all_arrived_in_order(receiver: WebhookReceiver, log: Sequence[Event]) -> None:
    """Every event of ``log`` acknowledged, in log order within each message; duplicates only
    as the same event under the same webhook-id."""
    arrived = first_arrivals(receiver.accepted)
    assert sorted(arrived) == sorted(e.id for e in log), "every event, none lost or invented"
    position = {e.id: n for n, e in enumerate(log)}
    message_of = {e.id: e.queue_id for e in log}
    per_message: dict[str, list[int]] = defaultdict(list)
    for event_id in arrived:
        per_message[message_of[event_id]].append(position[event_id])
    for queue_id, positions in per_message.items():
        assert positions == sorted(positions), f"message {queue_id}: events out of order"
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for request in receiver.received:
        bodies[request.webhook_id].add(request.body)
        assert request.webhook_id == f"evt_{request.data['id']}"
    assert all(len(same) == 1 for same in bodies.values()), "one webhook-id, one event"


def sender_for(
    store: Any,
    *endpoints: WebhookEndpoint,
    clock: FakeClock | None = None,
    settings: SenderSettings = FAST,
    seed: int = 1,
    **options: Any,
) -> WebhookSender:
    return WebhookSender(
        store, endpoints, clock=clock, settings=settings, rng=random.Random(seed), **options
    )


@contextlib.asynccontextmanager
async def running(sender: WebhookSender) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def eventually(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``check()`` (sync or async) until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def state_of(store: Any, name: str) -> Any:
    return next((s for s in await store.webhook_endpoints() if s.name == name), None)


# -- delivery -------------------------------------------------------------------------------------


async def test_every_event_arrives_signed_once_in_order_per_message(
    store: Any, receiver: WebhookReceiver
) -> None:
    log = await make_events(store, 40)
    endpoint = endpoint_to(receiver, concurrency=8)
    async with running(sender_for(store, endpoint)):
        await receiver.wait_until(lambda: len(receiver.accepted) >= len(log), "the backlog")
        # events that happen while it runs follow
        log = log + (await make_events(store, 10))[len(log) :]
        await receiver.wait_until(lambda: len(receiver.accepted) >= len(log), "new events")
        await eventually(lambda: _saved(store, endpoint.name, log[-1].id), "the cursor saved")
    state = await state_of(store, endpoint.name)  # after a graceful stop
    assert all(request.verified for request in receiver.received)
    assert len(receiver.received) == len(log)  # a healthy endpoint gets each event once
    assert_all_arrived_in_order(receiver, log)
    first = receiver.accepted[0]
    assert first.payload is not None
    event = next(e for e in log if e.id == int(first.data["id"]))
    assert first.payload == {"type": event.type, "timestamp": first.payload["timestamp"],
                             "data": event.as_json()}  # fmt: skip
    assert first.headers["content-type"] == "application/json"
    assert (state.delivered, state.failures, state.lease_owner) == (len(log), 0, None)
    assert receiver.connections <= endpoint.concurrency  # connections are kept alive


async def _saved(store: Any, name: str, cursor: int) -> Any:
    state = await state_of(store, name)
    return state if state is not None and state.cursor == cursor else None


async def test_an_endpoint_gets_only_the_types_it_wants_and_its_cursor_passes_the_rest(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 5)
    endpoint = endpoint_to(receiver, events=["sent"])
    sent = [e for e in log if e.type == "sent"]
    async with running(sender_for(sqlite, endpoint)):
        await receiver.wait_until(lambda: len(receiver.accepted) == len(sent), "the sent events")
        state = await eventually(lambda: _saved(sqlite, endpoint.name, log[-1].id), "cursor")
    assert {r.data["type"] for r in receiver.received} == {"sent"}
    assert state.delivered == len(sent)


async def test_a_failing_endpoint_backs_off_on_the_schedule_pauses_and_recovers(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    clock = FakeClock(time.time())
    log = await make_events(sqlite, 3, recipients=1, now=clock.now())
    endpoint = endpoint_to(receiver, concurrency=4)
    schedule = RetrySchedule()
    expected = random.Random(9)  # the sender's draws, in the same order
    receiver.answer = lambda request: Answer(500, body=b"database is down")
    sender = sender_for(sqlite, endpoint, clock=clock, seed=9)
    async with running(sender):
        await receiver.wait_until(lambda: len(receiver.received) >= 1, "a first try")
        # the first requests went out together; their failures count once
        await eventually(lambda: _failed(sqlite, endpoint.name, 1), "the first failure")
        await asyncio.sleep(0.1)
        first_round = len(receiver.received)
        assert 1 <= first_round <= 3
        for failures_so_far in range(1, schedule.pause_after + 2):
            state = await eventually(
                lambda n=failures_so_far: _failed(sqlite, endpoint.name, n), "a failure recorded"
            )
            delay = schedule.delay(failures_so_far, expected)
            assert state.paused_until == pytest.approx(clock.now() + delay)
            assert state.last_error == "HTTP 500 Status: database is down"
            tried = len(receiver.received)
            await asyncio.sleep(0.1)  # nothing more before the time comes
            assert len(receiver.received) == tried
            await clock.advance(delay)
            # one probe at a time while it fails
            await receiver.wait_until(lambda t=tried: len(receiver.received) == t + 1, "a probe")
        failed = schedule.pause_after + 2
        state = await eventually(lambda: _failed(sqlite, endpoint.name, failed), "the last one")
        # failing many times in a row: paused, and the alert fires
        [status] = await endpoint_statuses(sqlite, [endpoint], now=clock.now())
        assert status["state"] == "paused" and status["failures"] == failed
        rule = next(r for r in load_rules() if r.check == "webhook_failing")
        [alert] = evaluate([], clock.now(), [rule], await sqlite.webhook_endpoints())
        assert alert.firing and alert.labels == {"endpoint": endpoint.name}
        # it recovers: the next probe succeeds and the backlog follows
        receiver.answer = signed_ok
        await clock.advance(state.paused_until - clock.now())
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "the backlog")
        state = await eventually(lambda: _saved(sqlite, endpoint.name, log[-1].id), "cursor")
    assert (state.failures, state.paused_until) == (0, None)
    assert state.last_error == "HTTP 500 Status: database is down"  # kept for the operator
    assert all(request.signed for request in receiver.received)
    ids = {request.webhook_id for request in receiver.received}
    assert ids == {f"evt_{e.id}" for e in log}  # one webhook-id per event across retries
    assert len(receiver.received) == first_round + (failed - 1) + len(log)
    assert_all_arrived_in_order(receiver, log)


async def test_one_message_the_endpoint_refuses_holds_up_only_itself(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    """A handler that chokes on one payload: every other message, arriving one at a time on a
    quiet system, goes at once (the fake clock stands still while it does), and the endpoint
    is never paused, nor alerted on, for that one message."""
    clock = FakeClock(time.time())
    [first, *_] = await make_events(sqlite, 1, recipients=1, now=clock.now())
    poison = first.queue_id
    receiver.answer = lambda request: (
        Answer(500, body=b"KeyError: 'x'")
        if request.data["message_id"] == poison
        else signed_ok(request)
    )
    endpoint = endpoint_to(receiver, concurrency=2)
    known = {e.id for e in await sqlite.events_after(None, limit=1000)}
    async with running(sender_for(sqlite, endpoint, clock=clock)):
        await eventually(lambda: _failed(sqlite, endpoint.name, 1), "the poison's first failure")
        for _ in range(12):  # another message now and then, while the poison keeps failing
            log = await make_events(sqlite, 1, recipients=1, now=clock.now())
            fresh = {e.id for e in log} - known
            known |= fresh
            await receiver.wait_until(
                lambda f=fresh: f <= {int(r.data["id"]) for r in receiver.accepted},
                "another message's events, with the clock standing still",
            )
            await clock.advance(60)
        state = await state_of(sqlite, endpoint.name)
    assert state.failures < RetrySchedule().pause_after
    assert not [r for r in receiver.accepted if r.data["message_id"] == poison]
    assert len([r for r in receiver.received if r.data["message_id"] == poison]) >= 3


async def _failed(store: Any, name: str, count: int) -> Any:
    state = await state_of(store, name)
    return state if state is not None and state.failures == count else None


async def test_through_drops_timeouts_and_errors_every_event_arrives_within_seconds(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    """Real time: the endpoint drops connections, then times out, then answers 503, for about
    two seconds in all; then it recovers and gets everything."""
    log = await make_events(sqlite, 15)
    endpoint = endpoint_to(receiver, timeout="300ms")
    started = time.monotonic()

    def flaky(request: Request) -> Answer:
        elapsed = time.monotonic() - started
        if elapsed < 0.6:
            return Answer(drop=True)
        if elapsed < 1.2:
            return Answer(200, delay=0.5)  # too late: the sender gave up at 300 ms
        if elapsed < 2.0:
            return Answer(503, headers=(("Retry-After", "0"),))
        return ok(request)

    receiver.answer = flaky
    settings = SenderSettings(
        lease=5.0, poll=0.02, save_every=0.05, retry=RetrySchedule(first=0.2, cap=1.0)
    )
    sender = sender_for(sqlite, endpoint, settings=settings)
    async with running(sender):
        await receiver.wait_until(
            lambda: set(first_arrivals(receiver.accepted)) >= {e.id for e in log},
            "every event",
            timeout=30,
        )
        state = await eventually(lambda: _saved(sqlite, endpoint.name, log[-1].id), "cursor")
    assert {f.outcome for f in sender.recent_failures()} >= {"connection", "timeout", "rejected"}
    assert state.failures == 0 and state.last_error  # healthy again; the last error is kept
    assert_all_arrived_in_order(receiver, log)


async def test_timeouts_connection_failures_and_refusals_are_counted_by_outcome(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    counted: dict[str, int] = defaultdict(int)

    class Counting:
        def webhook_attempted(self, endpoint: str, outcome: str, seconds: float) -> None:
            assert outcome in OUTCOMES and seconds >= 0
            counted[outcome] += 1

    log = await make_events(sqlite, 1, recipients=1)
    answers = iter([Answer(drop=True), Answer(200, delay=0.5), Answer(418)])
    receiver.answer = lambda request: next(answers, Answer(200))
    endpoint = endpoint_to(receiver, timeout="200ms", concurrency=1)
    settings = SenderSettings(lease=5, poll=0.02, save_every=0.05, retry=RetrySchedule(first=0.05))
    sender = sender_for(sqlite, endpoint, settings=settings, observer=Counting())
    async with running(sender):
        await eventually(lambda: counted["delivered"] == len(log), "the deliveries")
        recent = sender.recent_failures(endpoint.name)
    assert counted == {"connection": 1, "timeout": 1, "rejected": 1, "delivered": len(log)}
    assert [f.outcome for f in recent] == ["rejected", "timeout", "connection"]
    assert recent[0].error.startswith("HTTP 418") and recent[1].error == "no reply within 0.2s"
    assert "closed" in recent[2].error


async def test_a_slow_endpoint_holds_up_neither_another_nor_the_store(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 10)
    async with WebhookReceiver(SECRET) as slow:
        slow.answer = lambda request: Answer(200, delay=5)
        hanging = WebhookEndpoint.from_table(
            {"url": slow.url, "secret": SECRET, "allow_private": True, "name": "slow",
             "timeout": "10s"}
        )  # fmt: skip
        healthy = endpoint_to(receiver, name="healthy")
        started = time.monotonic()
        async with running(sender_for(sqlite, hanging, healthy)):
            await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "everything")
            elapsed = time.monotonic() - started
            # the store is not held either: mail goes on
            await sqlite.enqueue([prepare(Message(sender="a@example.com", to=["b@example.net"],
                                                  text="x"), max_size=10**6, now=time.time())],
                                 time.time())  # fmt: skip
    assert elapsed < 4.0
    # the message enqueued above adds events the healthy endpoint may have got before the stop
    arrived = set(first_arrivals(receiver.accepted))
    assert {e.id for e in log} <= arrived
    everything = await sqlite.events_after(None, limit=1000)
    assert_all_arrived_in_order(receiver, [e for e in everything if e.id in arrived])


async def test_a_graceful_stop_saves_the_cursor_and_hands_the_endpoint_back(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 5)
    endpoint = endpoint_to(receiver)
    settings = SenderSettings(lease=30, poll=0.02, save_every=60)  # saved only on stop
    async with running(sender_for(sqlite, endpoint, settings=settings)):
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "everything")
    state = await state_of(sqlite, endpoint.name)
    assert (state.cursor, state.lease_owner, state.delivered) == (log[-1].id, None, len(log))
    # another process takes it at once, and sends nothing twice
    async with running(sender_for(sqlite, endpoint, settings=FAST, owner="another")):
        await eventually(lambda: _held_by(sqlite, endpoint.name, "another"), "the takeover")
        await asyncio.sleep(0.2)
    assert len(receiver.received) == len(log)


async def test_a_process_waiting_for_an_endpoint_takes_it_soon_after_a_graceful_stop(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    """A fleet audit: the waiting process looked again only every third of the lease (10 s
    with the default 30 s), so webhooks stopped for 9 s after a graceful stop."""
    await make_events(sqlite, 2)
    endpoint = endpoint_to(receiver)
    settings = SenderSettings(lease=30, poll=0.02, save_every=0.05)
    first = running(sender_for(sqlite, endpoint, settings=settings, owner="first"))
    await first.__aenter__()
    await eventually(lambda: _held_by(sqlite, endpoint.name, "first"), "the first claim")
    async with running(sender_for(sqlite, endpoint, settings=settings, owner="second")):
        await asyncio.sleep(0.1)  # the second is waiting, the lease held elsewhere
        await first.__aexit__(None, None, None)  # a graceful stop: the lease handed back
        stopped = time.monotonic()
        await eventually(lambda: _held_by(sqlite, endpoint.name, "second"), "the takeover")
        assert time.monotonic() - stopped < 3.0  # not a third of the 30 s lease


async def _held_by(store: Any, name: str, owner: str) -> bool:
    state = await state_of(store, name)
    return state is not None and state.lease_owner == owner


async def test_one_process_sends_to_an_endpoint_at_a_time(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 10)
    endpoint = endpoint_to(receiver)
    first = sender_for(sqlite, endpoint, owner="host/1/2/3/4/aa")
    second = sender_for(sqlite, endpoint, owner="host/5/6/7/8/bb")
    async with running(first), running(second):
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "everything")
        await asyncio.sleep(0.2)
        holding = [s.senders[endpoint.name].holding for s in (first, second)]
    assert holding.count(True) == 1
    assert len(receiver.received) == len(log)


async def test_a_kill_9_loses_no_event_and_repeats_only_under_the_same_webhook_id(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    store = SQLiteStore(tmp_path / "queue.db")
    await store.open()
    log = await make_events(store, 150)  # 900 events
    await store.close()
    receiver.answer = lambda request: Answer(200, delay=0.002)
    table = {"url": receiver.url, "secret": SECRET, "allow_private": True, "name": "app"}
    args = [
        sys.executable,
        str(ROOT / "tests/webhook_sender_process.py"),
        "--store",
        f"sqlite:///{tmp_path / 'queue.db'}",
        "--endpoint",
        json.dumps(table),
        "--lease",
        "60",  # far longer than the test: the restart takes over from the dead process at once
        "--save-every",
        "0.2",
    ]

    def start(log_name: str) -> PostlaneProcess:
        out = tmp_path / log_name
        with out.open("ab") as handle:
            popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
        return PostlaneProcess(args, out, popen)

    first = start("first.log")
    await first.wait_until(lambda: len(receiver.accepted) >= len(log) // 3, "a third of them")
    assert await first.kill() == -signal.SIGKILL
    got_before = len(first_arrivals(receiver.accepted))
    assert got_before < len(log)
    second = start("second.log")
    async with second:
        await second.wait_until(
            lambda: len(set(first_arrivals(receiver.accepted))) == len(log), "every event"
        )
        assert second.logged("taking over from a stopped process")
    assert_all_arrived_in_order(receiver, log)
    assert all(request.verified for request in receiver.received)


async def test_a_purged_cursor_is_logged_and_the_endpoint_goes_on_from_the_oldest_kept(
    sqlite: SQLiteStore, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    old = await make_events(sqlite, 2, now=now - 1000)
    endpoint = endpoint_to(receiver)
    # the endpoint got the first event, then was stopped while the rest expired
    await sqlite.claim_webhook_endpoint(endpoint.name, "gone", now=now, lease_until=now,
                                        start_after=old[0].id)  # fmt: skip
    await sqlite.release_webhook_endpoint(endpoint.name, "gone")
    await sqlite.purge_events(now - 500)
    new = (await make_events(sqlite, 2, now=now))[-12:]
    caplog.set_level(logging.WARNING, "postlane.webhooks")
    async with running(sender_for(sqlite, endpoint)):
        # the newest event at the purge is kept (a caught-up reader's cursor): sent with the new
        kept = [old[-1].id, *(e.id for e in new)]
        await receiver.wait_until(lambda: len(receiver.accepted) == len(kept), "the kept events")
    assert sorted(int(r.data["id"]) for r in receiver.accepted) == kept
    assert "removed by retention" in caplog.text


# -- addresses ------------------------------------------------------------------------------------


async def test_a_name_resolving_to_loopback_is_refused_when_sent(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    await make_events(sqlite, 1, recipients=1)
    url = f"http://localhost:{receiver.port}/hooks"
    refused = WebhookEndpoint.from_table({"url": url, "secret": SECRET})  # passes config
    async with running(sender_for(sqlite, refused)):
        state = await eventually(lambda: _failed(sqlite, refused.name, 1), "the refusal")
    assert "localhost, which resolves to" in state.last_error
    assert "loopback address" in state.last_error and "allow_private" in state.last_error
    assert receiver.received == []
    allowed = WebhookEndpoint.from_table({"url": url, "secret": SECRET, "allow_private": True})
    async with running(sender_for(sqlite, allowed)):
        await receiver.wait_until(lambda: len(receiver.accepted) == 3, "the events")


async def test_the_connection_goes_to_the_checked_address_never_a_second_lookup(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    """DNS rebinding: a name that resolved to a harmless address when checked must not be
    looked up again by the HTTP client (which could then get 169.254.169.254)."""
    lookups: list[str] = []
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])

    async def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers, ["169.254.169.254"])

    await make_events(sqlite, 1, recipients=1)
    # hooks.invalid resolves nowhere but through this resolver
    endpoint = WebhookEndpoint.from_table(
        {"url": f"http://hooks.invalid:{receiver.port}/hooks", "secret": SECRET,
         "allow_private": True}
    )  # fmt: skip
    async with running(sender_for(sqlite, endpoint, resolver=rebinding)):
        await receiver.wait_until(lambda: len(receiver.accepted) == 3, "the events")
    assert lookups == ["hooks.invalid"]  # one connection, one lookup, kept alive
    assert receiver.accepted[0].headers["host"] == f"hooks.invalid:{receiver.port}"


async def test_https_verifies_the_certificate_for_the_host_name_at_the_checked_address(
    sqlite: SQLiteStore,
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("hooks.example.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def to_loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    await make_events(sqlite, 1, recipients=1)
    async with WebhookReceiver(SECRET, tls=server_context) as receiver:
        good = WebhookEndpoint.from_table(
            {"url": f"https://hooks.example.test:{receiver.port}/h", "secret": SECRET,
             "allow_private": True, "name": "good"}
        )  # fmt: skip
        wrong = WebhookEndpoint.from_table(
            {"url": f"https://other.example.test:{receiver.port}/h", "secret": SECRET,
             "allow_private": True, "name": "wrong"}
        )  # fmt: skip
        sender = sender_for(sqlite, good, wrong, resolver=to_loopback, ssl_context=client_context)
        async with running(sender):
            await receiver.wait_until(lambda: len(receiver.accepted) == 3, "the events")
            state = await eventually(lambda: _failed(sqlite, "wrong", 1), "the TLS failure")
    assert all(r.verified for r in receiver.accepted)
    assert "TLS" in state.last_error and "other.example.test" in state.last_error


# -- operators ------------------------------------------------------------------------------------


async def test_replay_sends_again_from_an_event_while_the_sender_runs(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 4)
    endpoint = endpoint_to(receiver)
    async with running(sender_for(sqlite, endpoint)):
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "everything")
        await eventually(lambda: _saved(sqlite, endpoint.name, log[-1].id), "cursor")
        await replay(sqlite, [endpoint], endpoint.name, after=log[9].id, now=time.time())
        again = len(log) - 10
        await receiver.wait_until(
            lambda: len(receiver.accepted) == len(log) + again, "the replayed events"
        )
    replayed = [int(r.data["id"]) for r in receiver.accepted[len(log) :]]
    assert sorted(replayed) == [e.id for e in log[10:]]

    with pytest.raises(NotFound, match="no event 999999 is kept"):
        await replay(sqlite, [endpoint], endpoint.name, after=999_999, now=time.time())
    with pytest.raises(NotFound, match="no webhook endpoint is named 'nope'"):
        await replay(sqlite, [endpoint], "nope", after=None, now=time.time())


async def test_resume_tries_a_paused_endpoint_at_once(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 1, recipients=1)
    endpoint = endpoint_to(receiver)
    receiver.answer = lambda request: Answer(410)  # Gone: the next try is an hour away
    async with running(sender_for(sqlite, endpoint)):
        state = await eventually(lambda: _failed(sqlite, endpoint.name, 1), "the 410")
        assert state.paused_until - time.time() > 3500
        receiver.answer = ok
        await resume(sqlite, [endpoint], endpoint.name, now=time.time())
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "the events")


async def test_operators_see_each_endpoint_its_state_lag_and_failures(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    now = time.time()
    log = await make_events(sqlite, 1, recipients=1, now=now - 30)
    healthy = endpoint_to(receiver, name="healthy")
    async with WebhookReceiver(SECRET) as down:
        down.answer = lambda request: Answer(503, body=b"maintenance")
        failing = WebhookEndpoint.from_table(
            {"url": down.url, "secret": SECRET, "allow_private": True, "name": "failing"}
        )
        never = WebhookEndpoint.from_table(
            {"url": "https://never.example.com/", "secret": SECRET, "name": "never"}
        )
        sender = sender_for(sqlite, healthy, failing)
        async with running(sender):
            await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "the events")
            await eventually(lambda: _failed(sqlite, "failing", 1), "a failure")
            await eventually(lambda: _saved(sqlite, "healthy", log[-1].id), "cursor")
            statuses = await endpoint_statuses(
                sqlite, [healthy, failing, never], now=time.time(), sender=sender
            )
            recent = await failures(sqlite, [healthy, failing], sender=sender)
        stored = await failures(sqlite, [healthy, failing])  # another process: the store's
        gauges = await endpoint_gauges(sqlite, [healthy, failing], now=time.time())
    by_name = {s["name"]: s for s in statuses}
    json.dumps(statuses)  # JSON-able
    assert by_name["healthy"]["state"] == "healthy" and by_name["healthy"]["lag_seconds"] == 0
    assert by_name["healthy"]["delivered"] == len(log)
    assert by_name["failing"]["state"] == "failing"
    assert by_name["failing"]["last_error"] == "HTTP 503 Status: maintenance"
    assert by_name["failing"]["lag_seconds"] >= 30 and by_name["failing"]["next_attempt_at"]
    assert by_name["failing"]["process"]["recent_failures"][0]["error"].startswith("HTTP 503")
    assert by_name["never"]["state"] == "new"
    assert "secret" not in json.dumps(statuses) and SECRET not in json.dumps(statuses)
    assert recent[0]["endpoint"] == "failing" and recent[0]["webhook_id"].startswith("evt_")
    assert stored[0]["error"] == "HTTP 503 Status: maintenance"
    assert {g.name: (g.failures >= 1, g.paused, g.lag_seconds >= 30) for g in gauges} == {
        "healthy": (False, False, False),
        "failing": (True, False, True),
    }


async def test_a_test_event_is_signed_like_the_others_and_stored_nowhere(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    result = await send_test_event(endpoint_to(receiver))
    assert result.ok and result.status == 200 and result.error is None
    [request] = receiver.received
    assert request.verified and request.payload is not None
    assert request.payload["type"] == "test" and request.webhook_id == result.webhook_id
    assert await sqlite.events_after(None, limit=10) == []
    receiver.answer = lambda request: Answer(500, body=b"nope")
    failed = await send_test_event(endpoint_to(receiver))
    assert not failed.ok and failed.error == "HTTP 500 Status: nope"
    refused = await send_test_event(
        WebhookEndpoint.from_table({"url": f"http://localhost:{receiver.port}/", "secret": SECRET})
    )
    assert not refused.ok and refused.status is None and "loopback" in (refused.error or "")
    assert json.dumps(refused.as_json())


# -- in-process subscribers ---------------------------------------------------------------------


async def test_follow_events_waits_for_new_events_and_filters_types(sqlite: SQLiteStore) -> None:
    log = await make_events(sqlite, 2, recipients=1)
    stop = asyncio.Event()
    seen: list[Event] = []

    async def follow() -> None:
        async for event in follow_events(sqlite, types=["sent"], poll=0.05, stop=stop):
            seen.append(event)

    task = asyncio.create_task(follow())
    await eventually(lambda: len(seen) == 2, "the sent events so far")
    more = (await make_events(sqlite, 1, recipients=1))[len(log) :]
    await eventually(lambda: len(seen) == 3, "a new sent event")
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert [e.id for e in seen] == [e.id for e in log + more if e.type == "sent"]


async def test_follow_events_stops_at_once_and_refuses_a_cursor_never_written(
    sqlite: SQLiteStore,
) -> None:
    """A day-one audit: ``stop`` set after the 2nd event still delivered the 4 of the page;
    and a cursor this store never wrote (another store's, a typo) went on from the oldest
    event kept, telling the whole log again. Stopped, nothing more comes; a cursor never
    written is NotFound; one retention removed still goes on from the oldest kept."""
    log = await make_events(sqlite, 4, recipients=1)
    stop = asyncio.Event()
    seen: list[Event] = []
    async for event in follow_events(sqlite, poll=0.05, stop=stop):
        seen.append(event)
        if len(seen) == 2:
            stop.set()
    assert [e.id for e in seen] == [e.id for e in log[:2]]
    with pytest.raises(NotFound):
        async for _ in follow_events(sqlite, after=log[-1].id + 1000, poll=0.05):
            pass
    assert await sqlite.purge_events(log[1].at + 0.001) > 0  # the oldest go: a cursor removed
    kept = [e async for e in _first(follow_events(sqlite, after=log[0].id, poll=0.05), 1)]
    assert kept and kept[0].id > log[0].id


async def _first(events: AsyncIterator[Event], count: int) -> AsyncIterator[Event]:
    async for event in events:
        yield event
        count -= 1
        if count <= 0:
            return


async def test_subscribers_hear_new_events_in_order_sync_ones_off_the_event_loop(
    sqlite: SQLiteStore,
) -> None:
    import threading

    await make_events(sqlite, 1, recipients=1)  # before run: not told ("latest")
    subscribers = EventSubscribers(sqlite, poll=0.05)
    heard: list[tuple[str, int, bool]] = []
    main = threading.get_ident()

    def sync_callback(event: Event) -> None:
        heard.append(("sync", event.id, threading.get_ident() != main))

    async def async_callback(event: Event) -> None:
        heard.append(("async", event.id, False))

    def broken(event: Event) -> None:
        raise RuntimeError("a subscriber's bug")

    subscribers.connect(sync_callback)
    subscribers.connect(broken)
    disconnect = subscribers.connect(async_callback, types=["dead"])
    disconnect()
    subscribers.connect(async_callback, types=["sent"])
    stop = asyncio.Event()
    task = asyncio.create_task(subscribers.run(stop))
    await asyncio.sleep(0.2)
    new = (await make_events(sqlite, 1, recipients=1))[3:]
    await eventually(lambda: subscribers.last_event_id == new[-1].id, "every new event")
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert [(kind, i) for kind, i, _ in heard if kind == "sync"] == [("sync", e.id) for e in new]
    assert all(other_thread for kind, _, other_thread in heard if kind == "sync")
    assert [i for kind, i, _ in heard if kind == "async"] == [e.id for e in new if e.type == "sent"]


class RefusingSaves:
    """The store, except that saving the cursor is refused ``times`` times (a transient
    refusal: the lease and the cursor are as the sender left them)."""

    def __init__(self, store: Any, times: int) -> None:
        self._store = store
        self.refusals = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def webhook_delivered(self, *args: Any, **kwargs: Any) -> bool:
        if self.refusals:
            self.refusals -= 1
            return False
        return bool(await self._store.webhook_delivered(*args, **kwargs))


async def test_a_refused_cursor_save_is_saved_later_not_taken_for_a_lost_lease(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 5)
    endpoint = endpoint_to(receiver)
    refusing = RefusingSaves(sqlite, times=3)
    sender = sender_for(refusing, endpoint)
    async with running(sender):
        await receiver.wait_until(lambda: len(receiver.accepted) == len(log), "everything")
        await eventually(lambda: _saved(sqlite, endpoint.name, log[-1].id), "the cursor saved")
        assert sender.senders[endpoint.name].holding
    assert refusing.refusals == 0
    assert len(receiver.received) == len(log)  # no tenure restarted: nothing sent twice


async def test_the_cursor_never_passes_an_event_the_endpoint_did_not_acknowledge(
    sqlite: SQLiteStore, receiver: WebhookReceiver
) -> None:
    log = await make_events(sqlite, 6, recipients=1)
    stuck = log[1].queue_id  # every event of this message is refused, for now
    receiver.answer = lambda request: (
        Answer(500) if request.data["message_id"] == stuck else ok(request)
    )
    endpoint = endpoint_to(receiver)
    others = [e for e in log if e.queue_id != stuck]
    settings = SenderSettings(
        lease=5.0, poll=0.02, save_every=0.05, retry=RetrySchedule(first=0.05, cap=0.2)
    )
    async with running(sender_for(sqlite, endpoint, settings=settings)):
        # the other messages go on while this one waits
        await receiver.wait_until(
            lambda: set(first_arrivals(receiver.accepted)) == {e.id for e in others},
            "the other messages' events",
        )
    first_stuck = next(n for n, e in enumerate(log) if e.queue_id == stuck)
    state = await state_of(sqlite, endpoint.name)
    assert state.cursor == log[first_stuck - 1].id  # just before the first unacknowledged one
    receiver.answer = ok
    async with running(sender_for(sqlite, endpoint, settings=settings)):
        await receiver.wait_until(
            lambda: set(first_arrivals(receiver.accepted)) == {e.id for e in log}, "everything"
        )
    assert_all_arrived_in_order(receiver, log)
