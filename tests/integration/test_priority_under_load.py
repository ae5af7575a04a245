"""Priority under a backlog, as it happens: the real worker claiming from the real store (a
SQLite file, PostgreSQL) and delivering to an SMTP server that holds every message until the
test lets it go. Every send slot is busy with the low lane's backlog when a high-lane message
arrives; the test frees one slot at a time and watches which message the server gets next.

Nothing here is timed: the server's order of arrival says whether the password reset went first.
(How long it waits under a real slow peer is measured by benchmarks/priority.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.message import Lane, Message, PreparedMessage, prepare
from postlane.transports import transport_for
from postlane.transports.smtp import SMTPRelayTransport
from postlane.worker import Worker
from tests.conftest import make_config

DEADLINE = 20.0


@dataclass
class HoldingHandler:
    """Takes each message's DATA and answers it only when the test releases it."""

    arrivals: asyncio.Queue[tuple[str, asyncio.Event]] = field(default_factory=asyncio.Queue)
    #: set: every message is answered at once, those held included
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        released = self.opened if self.opened.is_set() else asyncio.Event()
        await self.arrivals.put((envelope.rcpt_tos[0], released))
        await released.wait()
        return "250 2.0.0 OK queued"


@dataclass
class HoldingPeer:
    url: str
    handler: HoldingHandler
    held: list[asyncio.Event] = field(default_factory=list)

    async def next_arrival(self) -> str:
        """The recipient of the next message the server is given (and holds)."""
        rcpt, released = await asyncio.wait_for(self.handler.arrivals.get(), DEADLINE)
        self.held.append(released)
        return rcpt

    def release_one(self) -> None:
        self.held.pop(0).set()

    def open(self) -> None:
        """Answer everything from now on, what is held first."""
        self.handler.opened.set()
        while self.held:
            self.release_one()
        while not self.handler.arrivals.empty():
            self.handler.arrivals.get_nowait()[1].set()


@pytest.fixture
async def peer() -> AsyncIterator[HoldingPeer]:
    handler = HoldingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="peer.test", loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    holding = HoldingPeer(f"smtp://127.0.0.1:{port}", handler)
    yield holding
    holding.open()
    server.close()
    await server.wait_closed()


def message(lane: Lane, rcpt: str) -> PreparedMessage:
    return prepare(
        Message(sender="app@example.com", to=[rcpt], subject=rcpt, text="x", lane=lane),
        max_size=10**6,
    )


async def wait_until(check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def run_worker(config: Any, store: Any) -> tuple[Worker, asyncio.Event, asyncio.Task[None]]:
    worker = Worker.from_config(config, store, transport_for(config))
    stop = asyncio.Event()
    return worker, stop, asyncio.create_task(worker.run(stop))


async def stop_worker(worker: Worker, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, DEADLINE)
    await worker.transport.close()


async def test_a_high_message_behind_a_backlog_takes_the_next_free_slot(
    store: Any, peer: HoldingPeer, tmp_path: Path
) -> None:
    # 8 slots claimed in batches: with one slot free a batch claim would wait for a second
    config = make_config(tmp_path, delivery={"relay": peer.url, "concurrency": 8, "batch_size": 8})
    await store.enqueue([message(Lane.LOW, f"news{i}@example.net") for i in range(30)], time.time())
    worker, stop, task = await run_worker(config, store)
    try:
        busy = [await peer.next_arrival() for _ in range(8)]
        assert all(rcpt.startswith("news") for rcpt in busy)  # low borrowed every slot
        reset = message(Lane.HIGH, "reset@example.net")
        await store.enqueue([reset], time.time())
        peer.release_one()
        assert await peer.next_arrival() == "reset@example.net"
        # and the backlog keeps moving
        peer.release_one()
        assert (await peer.next_arrival()).startswith("news")
    finally:
        peer.open()
        await stop_worker(worker, stop, task)


async def test_a_high_message_finds_a_slot_kept_free_without_waiting_for_the_backlog(
    store: Any, peer: HoldingPeer, tmp_path: Path
) -> None:
    # 10 slots: the low backlog fills all but one, which stays free for a password reset
    config = make_config(
        tmp_path, delivery={"relay": peer.url, "concurrency": 10, "batch_size": 10}
    )
    await store.enqueue([message(Lane.LOW, f"news{i}@example.net") for i in range(40)], time.time())
    worker, stop, task = await run_worker(config, store)
    try:
        busy = [await peer.next_arrival() for _ in range(9)]
        assert all(rcpt.startswith("news") for rcpt in busy)
        await store.enqueue([message(Lane.HIGH, "reset@example.net")], time.time())
        # no low send has finished: the reset goes out in the slot the backlog could not take
        assert await peer.next_arrival() == "reset@example.net"
        # the next low send to finish frees its slot for the next reset (the reset lane's
        # recent peak, 1, and a spare), not for the backlog
        peer.release_one()
        await store.enqueue([message(Lane.HIGH, "reset2@example.net")], time.time())
        assert await peer.next_arrival() == "reset2@example.net"
    finally:
        peer.open()
        await stop_worker(worker, stop, task)


async def test_a_high_message_waiting_for_a_connection_goes_before_the_low_ones(
    store: Any, peer: HoldingPeer, tmp_path: Path
) -> None:
    # 8 sends in flight but 2 connections to the relay: 6 low sends wait for a connection
    config = make_config(
        tmp_path,
        delivery={
            "relay": peer.url,
            "concurrency": 8,
            "batch_size": 8,
            "connections_per_host": 2,
        },
    )
    await store.enqueue([message(Lane.LOW, f"news{i}@example.net") for i in range(30)], time.time())
    worker, stop, task = await run_worker(config, store)
    try:
        first = [await peer.next_arrival() for _ in range(2)]
        assert all(rcpt.startswith("news") for rcpt in first)
        reset = message(Lane.HIGH, "reset@example.net")
        await store.enqueue([reset], time.time())
        peer.release_one()  # a slot frees: the reset is claimed; the connection went to a news
        assert (await peer.next_arrival()).startswith("news")

        relay = worker.transport
        assert isinstance(relay, SMTPRelayTransport)

        async def reset_waits_for_a_connection() -> bool:
            # claimed, past the gate, and asking the relay for a connection behind the news
            return relay.waiting("high") == 1

        await wait_until(reset_waits_for_a_connection)
        assert relay.waiting("low") >= 1  # news waited for a connection before the reset did
        peer.release_one()  # a connection frees: 6 news were waiting for it before the reset
        assert await peer.next_arrival() == "reset@example.net"
    finally:
        peer.open()
        await stop_worker(worker, stop, task)
