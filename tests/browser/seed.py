"""A seeded queue for the dashboard's browser tests (and its screenshots).

Real mail through the real worker: messages are enqueued with the Python API and delivered by
the worker to an in-process SMTP server that answers per recipient the way providers do (user
unknown, blocklisted, greylisted, mailbox full), so deliveries, deferrals, dead letters and
suppressions are what postlane itself recorded. Two things are set directly, because they would
otherwise take hours of wall-clock time: three hours of per-minute history (the charts), and a
destination paused by a throttling rule.
"""

from __future__ import annotations

import asyncio
import math
import socket
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane, QueueAction
from postlane.config import load_config
from postlane.records import DestinationStatus, Sample, Selector
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import ScriptedHandler

#: an internationalised domain (bücher.example), stored and relayed in its ASCII form
IDN_DOMAIN = "xn--bcher-kva.example"
#: the alert the seeded history makes fire (the destination paused throughout)
FIRING = "PostlaneDestinationPausedTooLong{destination=slow.example}"
#: what the seeded relay answers, by recipient domain
REPLIES = {
    "gone.example": "550 5.1.1 <{}>: Recipient address rejected: User unknown",
    "blocked.example": "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using "
    "zen.spamhaus.org",
    "slow.example": "451 4.7.1 Greylisted, please try again later",
    "grey.example": "451 4.7.1 Greylisted, please try again later",
    "full.example": "452 4.2.2 Mailbox full",
    IDN_DOMAIN: "451 4.7.1 Greylisted, please try again later",
}
#: waiting messages in the low lane: more than a page, to page through
NEWSLETTERS = 90
HELD = 3


@dataclass(frozen=True)
class Seeded:
    config: Path
    http: str
    held_ids: tuple[str, ...]
    deferred_id: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, relay: str, http_port: int, smtp_port: int) -> Path:
    path = directory / "postlane.toml"
    path.write_text(
        f"""
[store]
url = "sqlite:///{directory / "postlane.db"}"

[delivery]
relay = "{relay}"

[retry]
delays = ["30m", "2h"]   # nothing deferred comes due while the tests look at it
jitter = 0

[http]
listen = "127.0.0.1:{http_port}"

[smtp]
listen = "127.0.0.1:{smtp_port}"
"""
    )
    return path


async def seed(directory: Path) -> Seeded:
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="relay.test", loop=loop), "127.0.0.1", 0
    )
    relay_port = server.sockets[0].getsockname()[1]
    http_port = free_port()
    path = write_config(directory, f"smtp://127.0.0.1:{relay_port}", http_port, free_port())
    config = load_config(path)

    def to(address: str) -> str:
        domain = address.rpartition("@")[2]
        if domain in REPLIES:
            handler.rcpt[address] = REPLIES[domain].format(address)
        return address

    async with AsyncPostlane(config) as app:
        for i in range(8):  # password resets: delivered, one greylisted
            domain = "grey.example" if i == 0 else "gmail.com"
            await app.send(
                sender="accounts@shop.example",
                to=[to(f"user{i}@{domain}")],
                subject="Reset your password",
                text="Follow the link to choose a new password.",
                lane="high",
                metadata={"kind": "password_reset"},
            )
        await app.send(  # a reader at an internationalised domain, greylisted
            sender="accounts@shop.example",
            to=[to(f"leser@{IDN_DOMAIN}")],
            subject="Reset your password",
            text="Follow the link to choose a new password.",
            lane="high",
        )
        for i in range(12):  # a stale list: hard bounces (dead, suppressed)
            await app.send(
                sender="news@shop.example",
                to=[to(f"old{i}@gone.example")],
                subject="Our winter catalogue",
                text="...",
                lane="low",
            )
        for i in range(5):  # blocklisted: policy blocks (dead, not suppressed)
            await app.send(
                sender="billing@shop.example",
                to=[to(f"ap{i}@blocked.example")],
                subject=f"Invoice 2026-{i:04d}",
                text="Your invoice is attached.",
            )
        for i in range(NEWSLETTERS):  # greylisted and full mailboxes: deferred
            domain = "full.example" if i % 3 else "slow.example"
            await app.send(
                sender="news@shop.example",
                to=[to(f"reader{i}@{domain}"), to(f"friend{i}@outlook.com")],
                subject=f"Weekly digest #{i}",
                text="...",
                lane="low",
            )
        held = [
            (
                await app.send(
                    sender="billing@shop.example",
                    to=[to(f"cfo{i}@customer.example")],
                    subject="Payment failed",
                    text="...",
                )
            ).id
            for i in range(HELD)
        ]
        await app.act(QueueAction.HOLD, Selector(ids=tuple(held)))

        transport = transport_for(config)
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        try:
            await worker.run_until_idle()
        finally:
            await transport.close()
        await app.suppress("complaint@shop-customer.example", reason="asked by phone, ticket 4411")

        now = app.clock.now()
        await app.store.save_destination_states(
            [
                DestinationStatus(
                    destination="slow.example",
                    rate=2.5,
                    configured_rate=10.0,
                    paused_until=now + 1800,
                    reason="421 4.7.0 Too many connections from your host",
                    updated_at=now,
                ),
                # paused too, for the test that lifts a pause: slow.example's stays, and so
                # does the alert it fires (the monitor in serve would resolve it within a
                # minute of a lift, whichever test looks at it next)
                DestinationStatus(
                    destination="lift.example",
                    rate=None,
                    configured_rate=None,
                    paused_until=now + 1800,
                    reason="3 connection failure(s): Connection refused",
                    updated_at=now,
                ),
                # the relay itself asked to slow down: every delivery goes through it
                DestinationStatus(
                    destination="relay",
                    rate=4.0,
                    configured_rate=None,
                    paused_until=None,
                    reason="421 4.7.28 Our system has detected an unusual rate of mail",
                    updated_at=now,
                ),
            ]
        )
        from postlane.feedback import Report

        await app.store.record_unmatched(
            Report(
                "bounce listener",
                "auto-reply",
                b"From: ada@example.net\r\nSubject: Out of office\r\n\r\nBack on Monday.\r\n",
                "ada@example.net",
                "b-1-abcdefghijklmnop@bounce.example",
            ),
            "an automatic reply, not a bounce",
            now,
        )
        await _history(app, now)
        await app.store.alert_transition(FIRING, True, now - 600)
        [deferred] = await app.messages(Selector(lanes=(), recipient="user0@grey.example"))
    server.close()
    await server.wait_closed()
    # the dashboard runs with the default capture relay: what is released or requeued arrives
    write_config(directory, f"capture://{directory / 'captured'}", http_port, free_port())
    return Seeded(path, f"http://127.0.0.1:{http_port}", tuple(held), deferred.id)


async def _history(app: AsyncPostlane, now: float) -> None:
    """Three hours of per-minute samples ending before this minute: a morning campaign that
    backs up the low lane, then drains (the shape the charts exist to show)."""
    minute = math.floor(now / 60) * 60
    samples: list[Sample] = []
    for back in range(180, 0, -1):
        at = minute - back * 60
        wave = max(0.0, math.sin((180 - back) / 180 * math.pi))
        samples += [
            Sample(at, "high", ready=int(3 * wave), oldest_age=4 + 20 * wave),
            Sample(at, "normal", ready=int(40 * wave), deferred=5, oldest_age=30 + 300 * wave),
            Sample(
                at, "low", ready=int(900 * wave), deferred=int(130 * wave), oldest_age=1800 * wave
            ),
            Sample(
                at,
                "*",
                sent=int(300 + 500 * wave),
                dead=int(4 * wave),
                hard_bounces=int(3 * wave),
                deferrals=int(60 * wave),
                soft_bounces=int(9 * wave),
                bounced=int(2 * wave),  # DSNs from beyond the relay, minutes later
                complaints=1 if back % 30 == 0 else 0,
                paused=("slow.example",) if back <= 40 else (),  # paused for 40 minutes now
            ),
        ]
    await app.store.record_samples(samples)
