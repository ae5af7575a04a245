"""The worker and the SMTP relay transport against a real SMTP server (aiosmtpd, in-process) with
scripted replies, and an injected clock: retry spacing is checked without sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from postlane import worker as worker_module
from postlane.app import AsyncPostlane, QueueAction
from postlane.classify import ReplyClass
from postlane.clock import FakeClock, SystemClock
from postlane.errors import StoreUnavailable, ValidationError
from postlane.message import Lane, Message, RecipientState
from postlane.records import Selector, Suppression
from postlane.transports import transport_for
from postlane.transports.base import BaseTransport, Envelope, Response
from postlane.worker import Worker
from tests.conftest import SMTPPeer, free_port, make_config


class Harness:
    def __init__(self, app: AsyncPostlane, worker: Worker, clock: FakeClock) -> None:
        self.app = app
        self.worker = worker
        self.clock = clock

    async def send(self, *to: str, **fields: Any) -> str:
        fields.setdefault("sender", "app@example.com")
        fields.setdefault("subject", "hello")
        fields.setdefault("text", "body")
        return (await self.app.send(to=list(to), **fields)).id

    async def run(self) -> int:
        return await self.worker.run_until_idle()

    async def recipient(self, queue_id: str, address: str) -> Any:
        view = await self.app.get(queue_id, history=True)
        return next(r for r in view.recipients if r.address == address)

    async def advance_to_next_due(self) -> float:
        due = await self.app.store.next_due_at()
        assert due is not None
        await self.clock.advance(max(0.0, due - self.clock.now()))
        return due


async def harness(
    tmp_path: Path,
    clock: FakeClock,
    relay: str,
    verp_key: bytes | None = None,
    **sections: dict[str, Any],
) -> Harness:
    sections.setdefault("delivery", {})
    sections["delivery"] = {
        "relay": relay,
        "connect_timeout": "2s",
        "command_timeout": "2s",
        **sections["delivery"],
    }
    config = make_config(tmp_path, **sections)
    app = AsyncPostlane(config, clock=clock)
    await app.open()
    transport = transport_for(config, verp_key=verp_key)
    worker = Worker.from_config(config, app.store, transport, clock=clock)
    return Harness(app, worker, clock)


@pytest.fixture
async def h(tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer) -> Any:
    harness_ = await harness(
        tmp_path, clock, smtp_peer.url, retry={"delays": ["1m", "5m", "15m"], "max_attempts": 4}
    )
    yield harness_
    await harness_.worker.transport.close()
    await harness_.app.close()


async def test_a_message_is_delivered_once_with_its_message_id(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    queue_id = await h.send("ada@example.net", "bob@example.org")
    assert await h.run() == 2
    [received] = smtp_peer.handler.received
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["ada@example.net", "bob@example.org"]  # one transaction
    view = await h.app.get(queue_id)
    assert smtp_peer.handler.message_ids() == [view.message_id]
    assert view.state is RecipientState.SENT
    history = view.recipients[0].history or ()
    assert history[0].cls is ReplyClass.DELIVERED and history[0].code == 250
    assert history[0].relay == smtp_peer.url


async def test_connections_are_reused_for_many_messages(h: Harness, smtp_peer: SMTPPeer) -> None:
    for i in range(30):
        await h.send(f"user{i}@example.net")
    await h.run()
    assert len(smtp_peer.handler.received) == 30
    assert smtp_peer.handler.connections <= h.worker.settings.connections_per_host


async def test_a_550_on_one_rcpt_fails_only_that_recipient(h: Harness, smtp_peer: SMTPPeer) -> None:
    smtp_peer.handler.rcpt["gone@example.net"] = (
        "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown"
    )
    queue_id = await h.send("ok@example.net", "gone@example.net")
    await h.run()
    ok = await h.recipient(queue_id, "ok@example.net")
    gone = await h.recipient(queue_id, "gone@example.net")
    assert ok.state is RecipientState.SENT
    assert gone.state is RecipientState.DEAD and gone.last_response.cls is ReplyClass.HARD_BOUNCE
    assert [r.rcpt_tos for r in smtp_peer.handler.received] == [["ok@example.net"]]
    assert (await h.app.store.is_suppressed(["gone@example.net"]))["gone@example.net"]
    # nothing is resent to the accepted recipient afterwards
    await h.clock.advance(86400)
    assert await h.run() == 0
    assert len(smtp_peer.handler.received) == 1


async def test_a_suppressed_address_is_recorded_and_never_attempted(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    await h.app.suppress("blocked@example.net")
    queue_id = await h.send("blocked@example.net")
    assert await h.run() == 0
    assert (await h.recipient(queue_id, "blocked@example.net")).state is RecipientState.SUPPRESSED
    assert smtp_peer.handler.received == []


async def test_an_address_suppressed_after_its_mail_was_queued_is_not_sent(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    # a bounce of one message suppresses the address for the others already waiting
    smtp_peer.handler.rcpt["gone@example.net"] = "550 5.1.1 User unknown"
    first = await h.send("gone@example.net")
    second = await h.send("gone@example.net", "ok@example.net")
    await h.app.act(QueueAction.HOLD, Selector(ids=(second,)))
    await h.run()
    assert (await h.recipient(first, "gone@example.net")).state is RecipientState.DEAD
    # and an operator's `suppress add` counts as much for mail queued before it
    third = await h.send("later@example.net")
    await h.app.act(QueueAction.HOLD, Selector(ids=(third,)))
    await h.app.suppress("later@example.net", reason="asked to stop")
    await h.app.act(QueueAction.RELEASE, Selector(all=True))
    await h.run()
    gone = await h.recipient(second, "gone@example.net")
    assert gone.state is RecipientState.SUPPRESSED and gone.attempts == 0
    assert (await h.recipient(second, "ok@example.net")).state is RecipientState.SENT
    assert (await h.recipient(third, "later@example.net")).state is RecipientState.SUPPRESSED
    sent_to = [r.rcpt_tos for r in smtp_peer.handler.received]
    assert sent_to == [["ok@example.net"]]  # the 550 was refused at RCPT: nothing else arrived
    assert (await h.app.get(third)).state is RecipientState.SUPPRESSED


async def test_a_suppression_for_one_sender_domain_stops_only_its_mail(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    shop = await h.send("ada@example.net", sender="receipts@shop.example")
    other = await h.send("ada@example.net", sender="app@other.example")
    await h.app.act(QueueAction.HOLD, Selector(all=True))
    # a complaint about shop.example's mail, after both were queued
    await h.app.store.add_suppression(
        Suppression("ada@example.net", h.clock.now(), "arf", "complaint", scope="shop.example")
    )
    await h.app.act(QueueAction.RELEASE, Selector(all=True))
    await h.run()
    assert (await h.recipient(shop, "ada@example.net")).state is RecipientState.SUPPRESSED
    assert (await h.recipient(other, "ada@example.net")).state is RecipientState.SENT
    assert [r.mail_from for r in smtp_peer.handler.received] == ["app@other.example"]


async def test_mail_that_expires_during_an_outage_is_dead_lettered_and_never_sent_late(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    """A one-time code is useless after its time: a recipient not sent by ``expires_at`` is
    dead (reason and event ``expired``), even while its destination could not take it."""
    smtp_peer.handler.data = ["451 4.3.0 Temporary local problem"] * 3
    prepared = dataclasses.replace(
        h.app.prepare(Message(sender="app@example.com", to=["ada@example.net"], text="1234")),
        expires_at=h.clock.now() + 300,
    )
    [result] = await h.app.store.enqueue([prepared], h.clock.now())
    await h.run()  # 451: deferred for a minute
    assert (await h.recipient(result.id, "ada@example.net")).state is RecipientState.DEFERRED
    await h.clock.advance(301)  # the outage outlasts the code; the server is fine again
    smtp_peer.handler.data = []
    await h.run()
    expired = await h.recipient(result.id, "ada@example.net")
    assert expired.state is RecipientState.DEAD and expired.reason == "expired"
    assert smtp_peer.handler.received == []  # nothing was sent late
    events = await h.app.store.events_after(None, limit=10)
    assert [e.type for e in events] == ["queued", "deferred", "expired"]


async def test_temporary_failures_retry_on_the_schedule_then_dead_letter(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    smtp_peer.handler.data = ["451 4.3.0 Temporary local problem"] * 10
    queue_id = await h.send("ada@example.net")
    start = h.clock.now()
    await h.run()
    due_times = []
    for _ in range(3):
        due_times.append(await h.advance_to_next_due() - start)
        await h.run()
    r = await h.recipient(queue_id, "ada@example.net")
    # attempts at 0, +1m, +1m+5m, +1m+5m+15m; the 4th is max_attempts
    assert due_times == [60, 360, 1260]
    assert r.state is RecipientState.DEAD and r.attempts == 4
    assert [a.cls for a in r.history] == [ReplyClass.TEMPORARY] * 4
    assert all(a.code == 451 for a in r.history)
    [letter] = await h.app.dead_letter(queue_id)
    assert "max_attempts 4" in (letter.reason or "")


async def test_retry_then_success(h: Harness, smtp_peer: SMTPPeer) -> None:
    smtp_peer.handler.data = ["452 4.2.2 Mailbox full"]
    queue_id = await h.send("ada@example.net")
    await h.run()
    r = await h.recipient(queue_id, "ada@example.net")
    assert r.state is RecipientState.DEFERRED and r.attempts == 1
    assert r.last_response.cls is ReplyClass.SOFT_BOUNCE
    assert await h.run() == 0  # not due yet: nothing is attempted early
    await h.advance_to_next_due()
    await h.run()
    r = await h.recipient(queue_id, "ada@example.net")
    assert r.state is RecipientState.SENT and r.attempts == 2
    assert len(smtp_peer.handler.received) == 1


async def test_421_at_rcpt_defers_without_using_an_attempt(h: Harness, smtp_peer: SMTPPeer) -> None:
    smtp_peer.handler.rcpt["a@example.net"] = "421 4.7.0 Too many connections, slow down"
    queue_id = await h.send("a@example.net", "b@example.net")
    await h.run()
    a = await h.recipient(queue_id, "a@example.net")
    b = await h.recipient(queue_id, "b@example.net")
    # the server closes after 421: both recipients are deferred, neither uses an attempt
    for r in (a, b):
        assert r.state is RecipientState.DEFERRED
        assert r.attempts == 0
        assert r.last_response.cls is ReplyClass.THROTTLED
        # not retried before the destination's cool-down ([throttle] cool_down, 60 s)
        assert r.next_attempt_at >= h.clock.now() + 60
    del smtp_peer.handler.rcpt["a@example.net"]
    for _ in range(10):  # the relay asked to slow down: the rest goes out at the slower rate
        await h.advance_to_next_due()
        await h.run()
        if (await h.app.get(queue_id)).state is RecipientState.SENT:
            break
    view = await h.app.get(queue_id)
    assert view.state is RecipientState.SENT
    assert all(r.attempts == 1 for r in view.recipients)  # the throttled tries used none


async def test_a_message_error_dead_letters_without_suppressing(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    smtp_peer.handler.data = ["552 5.3.4 Message size exceeds fixed maximum message size"]
    queue_id = await h.send("a@example.net")
    await h.run()
    r = await h.recipient(queue_id, "a@example.net")
    assert r.state is RecipientState.DEAD and r.last_response.cls is ReplyClass.MESSAGE_ERROR
    assert not (await h.app.store.is_suppressed(["a@example.net"]))["a@example.net"]


async def test_a_dropped_connection_mid_data_is_retried_not_lost(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    smtp_peer.handler.drop_data = 1
    queue_id = await h.send("a@example.net")
    await h.run()
    r = await h.recipient(queue_id, "a@example.net")
    assert r.state is RecipientState.DEFERRED
    assert r.last_response.cls is ReplyClass.CONNECTION and r.attempts == 0
    # the ambiguous case said as such (a durability audit: the history hid it)
    assert "it may have been delivered" in r.last_response.text
    await h.advance_to_next_due()
    await h.run()
    assert (await h.recipient(queue_id, "a@example.net")).state is RecipientState.SENT
    assert len(smtp_peer.handler.received) == 1


async def test_a_server_slow_to_answer_the_final_dot_gets_the_message_once(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    """A durability audit: the reply to the final dot waited only command_timeout (2 minutes),
    a fifth of RFC 5321's 10; a slower server (a content filter) had the message and got it
    again. The final dot has its own timeout, data_timeout."""
    h = await harness(
        tmp_path,
        clock,
        smtp_peer.url,
        delivery={"command_timeout": "1s", "data_timeout": "10s"},
    )
    try:
        smtp_peer.handler.data_delay = 1.5  # past command_timeout, within data_timeout
        queue_id = await h.send("a@example.net")
        await h.run()
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.SENT and len(smtp_peer.handler.received) == 1
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_max_age_dead_letters_before_the_next_try(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    h = await harness(
        tmp_path,
        clock,
        smtp_peer.url,
        retry={"delays": ["10m"], "max_attempts": 50},
        lanes={"high": {"max_age": "25m"}},
    )
    try:
        smtp_peer.handler.data = ["451 4.3.0 try later"] * 10
        queue_id = await h.send("a@example.net", lane="high")
        await h.run()
        await h.advance_to_next_due()
        await h.run()  # +10m, then +20m would be the last before 25m
        await h.advance_to_next_due()
        await h.run()
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEAD and r.attempts == 3
        assert "max_age 25m" in (r.reason or "")
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_max_age_applies_to_a_leased_and_abandoned_message(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    h = await harness(
        tmp_path, clock, smtp_peer.url, lanes={"high": {"max_age": "30m"}}, delivery={"lease": "1m"}
    )
    try:
        queue_id = await h.send("a@example.net", lane="high")
        # a worker leases it and dies without a word
        await h.app.store.claim_due(
            "dead/1/1/x", [(Lane.HIGH, 1)], limit=1, now=clock.now(), lease_until=clock.now() + 60
        )
        await clock.advance(31 * 60)
        assert await h.app.store.reap_expired_leases(clock.now()) == 1
        assert await h.run() == 0  # dead-lettered without a try
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEAD and "max_age 30m exceeded" in (r.reason or "")
        assert smtp_peer.handler.received == []
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_a_retry_that_would_fall_on_the_expiry_is_dead_lettered_at_once(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    h = await harness(
        tmp_path,
        clock,
        smtp_peer.url,
        retry={"delays": ["10m"], "max_attempts": 50},
        lanes={"high": {"max_age": "20m"}},
    )
    try:
        smtp_peer.handler.data = ["451 4.3.0 try later"] * 10
        queue_id = await h.send("a@example.net", lane="high")
        await h.run()
        await h.advance_to_next_due()
        await h.run()  # +10m; the next try would be at +20m, the expiry itself
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEAD and r.attempts == 2
        assert r.reason == "max_age 20m reached before the next try"
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_a_delivery_claimed_exactly_at_its_expiry_is_not_sent(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    h = await harness(
        tmp_path, clock, smtp_peer.url, lanes={"high": {"max_age": "30m"}}, delivery={"lease": "1m"}
    )
    try:
        queue_id = await h.send("a@example.net", lane="high")
        await h.app.store.claim_due(
            "dead/1/1/x", [(Lane.HIGH, 1)], limit=1, now=clock.now(), lease_until=clock.now() + 60
        )
        await clock.advance(30 * 60)  # to the second
        assert await h.app.store.reap_expired_leases(clock.now()) == 1
        assert await h.run() == 0
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEAD and r.reason == "max_age 30m exceeded"
        assert smtp_peer.handler.received == []
    finally:
        await h.worker.transport.close()
        await h.app.close()


class Answering(BaseTransport):
    """A transport whose every recipient gets ``response`` (a provider API that says when to
    come back, as the worker sees it)."""

    def __init__(self, response: Response) -> None:
        self.name = response.relay
        self.response = response

    async def send(self, envelope: Envelope) -> list[Response]:
        return [self.response for _ in envelope.recipients]


@pytest.mark.parametrize(
    ("code", "text", "cls"),
    [
        (451, "451 4.3.0 try again later", ReplyClass.TEMPORARY),
        (452, "452 4.2.2 mailbox full", ReplyClass.SOFT_BOUNCE),
    ],
)
async def test_a_counted_reply_with_retry_after_is_not_retried_sooner(
    tmp_path: Path, clock: FakeClock, code: int, text: str, cls: ReplyClass
) -> None:
    config = make_config(tmp_path, retry={"delays": ["1m"], "max_attempts": 5})
    busy = Response(code, text, "api://provider.example", retry_after=600.0)
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, Answering(busy), clock=clock)
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        assert await worker.run_until_idle() == 1
        r = (await app.get(queue_id)).recipients[0]
        assert r.state is RecipientState.DEFERRED and r.attempts == 1
        assert r.last_response.cls is cls
        # the schedule says a minute; the server said ten
        assert r.next_attempt_at == clock.now() + 600
        await clock.advance(60)
        assert await worker.run_until_idle() == 0
        await clock.advance(540)
        assert await worker.run_until_idle() == 1


async def test_connection_refused_is_a_connection_deferral(
    tmp_path: Path, clock: FakeClock
) -> None:
    h = await harness(tmp_path, clock, f"smtp://127.0.0.1:{free_port()}")
    try:
        queue_id = await h.send("a@example.net")
        await h.run()
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEFERRED and r.attempts == 0
        assert r.last_response.cls is ReplyClass.CONNECTION
        assert "127.0.0.1" in r.last_response.text
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_a_silent_server_times_out(tmp_path: Path, clock: FakeClock) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    h = await harness(
        tmp_path, clock, f"smtp://127.0.0.1:{port}", delivery={"connect_timeout": "300ms"}
    )
    try:
        queue_id = await h.send("a@example.net")
        await h.run()
        r = await h.recipient(queue_id, "a@example.net")
        assert r.last_response.cls is ReplyClass.CONNECTION
        assert "timed out" in r.last_response.text.lower()
    finally:
        server.close()
        await h.worker.transport.close()
        await h.app.close()


async def test_a_server_that_stalls_after_the_data_times_out_per_command(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    smtp_peer.handler.data_delay = 5.0  # the reply to the final dot never comes in time
    # the final dot's reply has its own timeout (data_timeout), the other replies command_timeout
    delivery = {"command_timeout": "300ms", "data_timeout": "300ms"}
    h = await harness(tmp_path, clock, smtp_peer.url, delivery=delivery)
    try:
        queue_id = await h.send("a@example.net")
        started = time.monotonic()
        await h.run()
        assert time.monotonic() - started < 4.0  # the timeout, not the server, ended it
        r = await h.recipient(queue_id, "a@example.net")
        assert r.state is RecipientState.DEFERRED  # may have arrived: retried, never dropped
        assert r.last_response.cls is ReplyClass.CONNECTION
        assert "timed out" in r.last_response.text.lower()
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_a_send_that_outlasts_the_lease_keeps_it_and_is_sent_once(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """The worker renews its leases while a slow server holds the DATA reply, so another
    worker's reaper never takes the delivery back to send it again."""
    smtp_peer.handler.data_delay = 2.5  # two and a half leases
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url, "lease": "1s"})
    async with AsyncPostlane(config) as app:
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        transport = transport_for(config)
        worker = Worker.from_config(config, app.store, transport)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        reaped = 0
        deadline = time.monotonic() + 20
        while (await app.get(queue_id)).state is not RecipientState.SENT:
            assert time.monotonic() < deadline, "the slow send never finished"
            reaped += await app.store.reap_expired_leases(time.time())  # another host's reaper
            await asyncio.sleep(0.05)
        stop.set()
        await running
        await transport.close()
    assert reaped == 0
    assert len(smtp_peer.handler.received) == 1


async def test_a_store_that_cannot_answer_for_a_while_pauses_the_worker_not_ends_it(
    tmp_path: Path,
    smtp_peer: SMTPPeer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PostgreSQL connection lost (a failover, a restart): the worker ended with the first
    error, and a bare `postlane worker` stayed dead (a fleet audit). It waits and claims again,
    and delivers once the store answers."""
    monkeypatch.setattr(worker_module, "STORE_RETRY_FIRST", 0.01)
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url})
    async with AsyncPostlane(config) as app:
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        claim_due = app.store.claim_due
        failures = [3]

        async def unavailable_for_a_while(*args: Any, **kwargs: Any) -> Any:
            if failures[0]:
                failures[0] -= 1
                raise StoreUnavailable("cannot use the PostgreSQL database: connection lost")
            return await claim_due(*args, **kwargs)

        monkeypatch.setattr(app.store, "claim_due", unavailable_for_a_while)
        transport = transport_for(config)
        worker = Worker.from_config(config, app.store, transport)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while (await app.get(queue_id)).state is not RecipientState.SENT:
            assert not running.done(), running
            assert time.monotonic() < deadline, "never delivered after the store came back"
            await asyncio.sleep(0.05)
        stop.set()
        await running
        await transport.close()
    assert failures == [0] and len(smtp_peer.handler.received) == 1
    waits = [r.getMessage() for r in caplog.records if "cannot answer" in r.getMessage()]
    assert len(waits) == 3 and "claiming again in" in waits[0]


async def test_a_result_the_store_cannot_take_for_longer_than_a_lease_is_kept_not_resent(
    tmp_path: Path,
    smtp_peer: SMTPPeer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A durability audit: a live worker got the server's 250, the store could not answer for
    longer than half a lease (a failover, a full disk), the recorder gave up, the worker's own
    housekeeping made the delivery due again when its lease ran out, and the mail was sent a
    second time (76 copies in one run, no process stopped). The result is kept and recorded
    once the store answers; the worker's own lease is not reaped meanwhile."""
    clock = FakeClock(time.time())
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url, "lease": "1s"})
    async with AsyncPostlane(config, clock=clock) as app:
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        record = app.store.record
        down = {"failures": 0}

        async def unavailable_past_the_lease(*args: Any, **kwargs: Any) -> Any:
            if down["failures"] < 5:  # 1.55 s of the recorder's pauses: past the old deadline
                down["failures"] += 1
                await clock.advance(1.0)  # and 5 s of the store's time: the lease ran out
                raise StoreUnavailable("cannot use the PostgreSQL database: connection lost")
            return await record(*args, **kwargs)

        monkeypatch.setattr(app.store, "record", unavailable_past_the_lease)
        transport = transport_for(config)
        worker = Worker.from_config(config, app.store, transport, clock=clock)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while (await app.get(queue_id)).state is not RecipientState.SENT:
            assert not running.done(), running
            assert time.monotonic() < deadline, "the result was never recorded"
            await asyncio.sleep(0.05)
        stop.set()
        await running
        await transport.close()
        view = await app.get(queue_id, history=True)
    assert down["failures"] == 5 and len(smtp_peer.handler.received) == 1  # sent once
    [attempt] = view.recipients[0].history or ()
    assert attempt.cls is ReplyClass.DELIVERED  # the real 250, not "lease expired"
    said = [r.getMessage() for r in caplog.records if "outcome(s)" in r.getMessage()]
    assert len(said) == 2 and "keeping them" in said[0]  # one line down, one line back
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks


class HostsStore:
    """One host's way to the store: every call fails while ``down`` (the host lost the
    database), and the calls answered are counted by name."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False
        self.answered: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("cannot use the PostgreSQL database: connection lost")
            result = await attr(*args, **kwargs)
            self.answered[name] += 1
            return result

        return call


async def test_after_an_outage_longer_than_a_lease_another_host_leaves_a_live_workers_leases(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """Two hosts lose the database for longer than a lease while one of them is sending.
    The other, back first, used to reap the live worker's lease at once (it had run out in
    the store's terms) and send the message again. Housekeeping reaps nothing for a few
    seconds after the store answers again: the live worker renews its leases within a second
    of its return, and records its own result."""
    clock = FakeClock(time.time())
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url, "lease": "1s"})
    smtp_peer.handler.data_delay = 1.0  # the send is under way when the database goes
    async with AsyncPostlane(config, clock=clock) as app:
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        first, second = HostsStore(app.store), HostsStore(app.store)
        transports = [transport_for(config), transport_for(config)]
        workers = [
            Worker.from_config(config, first, transports[0], clock=clock, owner="first"),
            Worker.from_config(config, second, transports[1], clock=clock, owner="second"),
        ]
        stop = asyncio.Event()
        runs = [asyncio.create_task(workers[0].run(stop))]

        async def until(condition: Any, what: str) -> None:
            deadline = time.monotonic() + 20
            while not await condition():
                assert time.monotonic() < deadline, f"never {what}"
                for run in runs:
                    if run.done():
                        run.result()
                await asyncio.sleep(0.02)

        async def sending() -> bool:
            return (await app.get(queue_id)).state is RecipientState.SENDING

        async def received() -> bool:
            return len(smtp_peer.handler.received) >= 1

        async def housekeeping_back() -> bool:
            return second.answered["expire_due"] >= 2

        async def sent() -> bool:
            return (await app.get(queue_id)).state is RecipientState.SENT

        try:
            await until(sending, "claimed")
            first.down = second.down = True  # the database goes away for both hosts
            runs.append(asyncio.create_task(workers[1].run(stop)))
            await clock.advance(5)  # longer than the lease
            await until(received, "sent")  # the server took it: the result waits
            second.down = False  # the second host is back first
            await until(housekeeping_back, "back for the second host's housekeeping")
            first.down = False
            await until(sent, "recorded")
        finally:
            stop.set()
            await asyncio.gather(*runs)
            for transport in transports:
                await transport.close()
        view = await app.get(queue_id, history=True)
    assert len(smtp_peer.handler.received) == 1  # sent once
    [attempt] = view.recipients[0].history or ()
    assert attempt.cls is ReplyClass.DELIVERED  # the first host's own 250, not "lease expired"


async def test_a_stop_while_the_store_cannot_answer_ends_within_its_grace(
    tmp_path: Path, smtp_peer: SMTPPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """A durability audit: SIGTERM to a worker whose database had gone waited for it without
    end (10 minutes in one run), a core busy, until systemd or Kubernetes killed it. It waits
    what is left of its grace (and a few seconds) for the results of sends that went through,
    says what it could not record, and ends: those recipients go again once their leases
    lapse, as after any crash."""
    config = make_config(tmp_path, delivery={"relay": smtp_peer.url, "shutdown_grace": "1s"})
    async with AsyncPostlane(config) as app:
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        host = HostsStore(app.store)
        transport = transport_for(config)
        worker = Worker.from_config(config, host, transport)
        stop = asyncio.Event()
        smtp_peer.handler.data_delay = 0.5
        running = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while (await app.get(queue_id)).state is not RecipientState.SENDING:
            assert time.monotonic() < deadline and not running.done(), "never claimed"
            await asyncio.sleep(0.02)
        host.down = True  # the database goes while the message is being sent
        while not smtp_peer.handler.received:
            assert time.monotonic() < deadline, "never sent"
            await asyncio.sleep(0.02)
        stop.set()  # SIGTERM
        started = time.monotonic()
        await asyncio.wait_for(running, timeout=1 + worker_module.RECORD_AT_STOP + 5)
        took = time.monotonic() - started
        await transport.close()
        state = (await app.get(queue_id)).state
    assert took < 1 + worker_module.RECORD_AT_STOP + 1
    assert state is RecipientState.SENDING  # its lease lapses; another worker sends it again
    said = [r.getMessage() for r in caplog.records]
    assert any("stopping without recording 1 outcome(s)" in line for line in said), said
    assert not [r for r in caplog.records if r.exc_info]  # one line each, no tracebacks


class ExplodingTransport(BaseTransport):
    name = "exploding://"

    async def send(self, envelope: Envelope) -> list[Response]:
        raise RuntimeError("kaboom")

    async def close(self) -> None:
        return None


async def test_an_unexpected_transport_error_is_a_temporary_attempt(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, ExplodingTransport(), clock=clock)
        queue_id = (await app.send(sender="a@example.com", to=["b@example.net"], text="x")).id
        assert await worker.run_until_idle() == 1
        r = (await app.get(queue_id)).recipients[0]
        assert r.state is RecipientState.DEFERRED and r.attempts == 1
        assert r.last_response.cls is ReplyClass.TEMPORARY
        assert "kaboom" in r.last_response.text


async def test_capture_transport_writes_eml_files(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        result = await app.send(
            sender="a@example.com", to=["b@example.net"], bcc=["c@example.org"], text="hi"
        )
        await worker.run_until_idle()
        [path] = list((tmp_path / "captured").glob("*.eml"))
        content = path.read_bytes()
        assert content.startswith(b"X-Postlane-Envelope-From: <a@example.com>\r\n")
        assert b"X-Postlane-Envelope-To: <b@example.net>, <c@example.org>" in content
        assert (await app.get(result.id)).state is RecipientState.SENT


async def test_finding_13_a_stop_that_cuts_a_send_after_its_final_dot_says_so(
    tmp_path: Path, smtp_peer: SMTPPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """Audit finding 13: a shutdown_grace shorter than the server's reply time cuts sends off
    after the whole message went out; the log counts them (their recipients may get the
    message twice) instead of only "handed back N"."""
    smtp_peer.handler.data_delay = 30.0  # the server takes its time to answer the final dot
    h = await harness(tmp_path, SystemClock(), smtp_peer.url,
                      delivery={"shutdown_grace": "200ms"})  # fmt: skip
    try:
        caplog.set_level(logging.INFO)
        whole_message = asyncio.Event()
        handle_data = smtp_peer.handler.handle_DATA

        async def answer_late(server: Any, session: Any, envelope: Any) -> str:
            whole_message.set()  # aiosmtpd calls this once the final dot has arrived
            return await handle_data(server, session, envelope)

        smtp_peer.handler.handle_DATA = answer_late  # type: ignore[method-assign]
        await h.send("ada@example.net")
        stop = asyncio.Event()
        running = asyncio.create_task(h.worker.run(stop))
        await asyncio.wait_for(whole_message.wait(), 10)
        stop.set()
        await asyncio.wait_for(running, 10)
    finally:
        await h.worker.transport.close()
        await h.app.close()
    assert "stopping cut off 1 send(s) after the message was handed over" in caplog.text
    assert "handed back 1 delivery(ies)" in caplog.text


NULL_SENDER_BOUNCE = (
    b"From: Mail Delivery System <MAILER-DAEMON@relay.example.com>\r\n"
    b"To: app@example.com\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"\r\n"
    b"This is the mail system at host relay.example.com.\r\n"
)


async def test_a_bounce_from_the_null_sender_goes_on_from_the_null_sender(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    """An audit relayed Postfix into postlane: Postfix's own bounces (``MAIL FROM:<>``) were
    refused and lost. They are sent on from ``<>`` (RFC 5321 4.5.5), never from a VERP
    return path: nothing must answer a bounce."""
    h = await harness(
        tmp_path,
        clock,
        smtp_peer.url,
        verp_key=bytes(range(32)),
        bounces={"domain": "bounce.example.com"},
    )
    try:
        sent = await h.app.send(sender="<>", to=["app@example.com"], raw=NULL_SENDER_BOUNCE)
        await h.send("ada@example.net")  # an ordinary message still gets its return path
        assert await h.run() == 2
        by_rcpt = {r.rcpt_tos[0]: r for r in smtp_peer.handler.received}
        assert by_rcpt["app@example.com"].mail_from == "<>"
        assert by_rcpt["ada@example.net"].mail_from.endswith("@bounce.example.com")
        view = await h.app.get(sent.id)
        assert view.sender == "" and view.state is RecipientState.SENT
        assert view.message_id.endswith("@relay.example.com>")  # its From's domain
    finally:
        await h.worker.transport.close()
        await h.app.close()


async def test_the_null_sender_needs_a_raw_message_with_a_from_header(
    h: Harness,
) -> None:
    with pytest.raises(ValidationError, match="null sender <> is for raw messages"):
        await h.send("ada@example.net", sender="<>")
    with pytest.raises(ValidationError, match="needs a From header"):
        await h.app.send(sender="<>", to=["ada@example.net"], raw=b"Subject: x\r\n\r\nhi\r\n")
    assert await h.app.messages() == []


async def test_8bit_content_is_declared_as_8bitmime_and_utf8_headers_as_smtputf8(
    h: Harness, smtp_peer: SMTPPeer
) -> None:
    """An audit's relay logged a bare ``MAIL FROM:<...>`` for an 8-bit body (RFC 6152 3 asks
    for BODY=8BITMIME) and for UTF-8 headers (RFC 6531 3.4: SMTPUTF8 where it is offered)."""
    smtp_peer.handler.smtputf8 = True
    ascii_id = await h.send("ada@example.net", text="plain")
    eight_bit = "From: app@example.com\r\nSubject: menu\r\n\r\ncaf\u00e9\r\n".encode()
    utf8_head = "From: Zo\u00eb <app@example.com>\r\nSubject: x\r\n\r\ncaf\u00e9\r\n".encode()
    body_id = (await h.app.send(sender="app@example.com", to=["bob@example.net"], raw=eight_bit)).id
    head_id = (await h.app.send(sender="app@example.com", to=["cy@example.net"], raw=utf8_head)).id
    assert await h.run() == 3
    options = {r.rcpt_tos[0]: r.mail_options for r in smtp_peer.handler.received}
    assert "BODY=8BITMIME" not in options["ada@example.net"]
    assert "SMTPUTF8" not in options["ada@example.net"]
    assert "BODY=8BITMIME" in options["bob@example.net"]
    assert "SMTPUTF8" not in options["bob@example.net"]  # an 8-bit body, ASCII headers
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(options["cy@example.net"])
    for queue_id in (ascii_id, body_id, head_id):
        assert (await h.app.get(queue_id)).state is RecipientState.SENT
