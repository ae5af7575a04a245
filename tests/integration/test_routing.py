"""Routing: `[[routes]]` choose a relay by lane, sender domain and recipient domain; a route's
fallback carries its mail while its relay is paused; `[dkim.*]` signs what leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.dkim import dns_record_name, generate_key
from postlane.message import RecipientState
from postlane.transports import transport_for
from postlane.transports.router import Router
from postlane.worker import Worker
from tests.conftest import ScriptedHandler, SMTPPeer, free_port, make_config


@pytest.fixture
async def second_peer() -> AsyncIterator[SMTPPeer]:
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="second.test", loop=loop), "127.0.0.1", 0
    )
    yield SMTPPeer("127.0.0.1", server.sockets[0].getsockname()[1], handler)
    server.close()
    await server.wait_closed()


async def run(
    config: Any, clock: FakeClock, sends: list[dict[str, Any]]
) -> tuple[AsyncPostlane, Worker, list[str]]:
    app = AsyncPostlane(config, clock=clock)
    await app.open()
    worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
    ids = [(await app.send(text="x", subject="s", **fields)).id for fields in sends]
    await worker.run_until_idle()
    return app, worker, ids


def recipients(peer: SMTPPeer) -> set[str]:
    return {r for message in peer.handler.received for r in message.rcpt_tos}


async def test_routes_choose_a_relay_by_lane_sender_and_recipient_domain(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer, second_peer: SMTPPeer
) -> None:
    config = make_config(
        tmp_path,
        delivery={"relay": second_peer.url},
        routes=[
            {"lane": ["high"], "relay": smtp_peer.url},
            {"recipient_domain": ["*.edu"], "relay": smtp_peer.url},
            {"sender_domain": ["news.example.com"], "lane": ["low"], "relay": smtp_peer.url},
        ],
    )
    app, worker, _ = await run(
        config,
        clock,
        [
            {"sender": "app@example.com", "to": ["reset@example.net"], "lane": "high"},
            {"sender": "app@example.com", "to": ["prof@cs.uni.edu", "bob@example.net"]},
            {"sender": "a@news.example.com", "to": ["reader@example.org"], "lane": "low"},
            {"sender": "a@news.example.com", "to": ["other@example.org"]},  # normal lane
        ],
    )
    try:
        assert isinstance(worker.transport, Router)
        assert recipients(smtp_peer) == {
            "reset@example.net",
            "prof@cs.uni.edu",
            "reader@example.org",
        }
        assert recipients(second_peer) == {"bob@example.net", "other@example.org"}
    finally:
        await worker.transport.close()
        await app.close()


async def test_a_routes_fallback_carries_its_mail_while_its_relay_is_paused(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer, second_peer: SMTPPeer
) -> None:
    broken = f"smtp://127.0.0.1:{free_port()}"  # nothing listens: connections refused
    config = make_config(
        tmp_path,
        delivery={"relay": second_peer.url, "connect_timeout": "1s"},
        routes=[{"lane": ["high"], "relay": broken, "fallback": smtp_peer.url}],
        throttle={"pause_after": 3, "pause": "10m"},
        retry={"delays": ["1m"]},
    )
    sends = [
        {"sender": "app@example.com", "to": [f"u{i}@example.net"], "lane": "high"} for i in range(3)
    ]
    app, worker, ids = await run(config, clock, sends)
    try:
        for queue_id in ids:  # the primary refused: connection deferrals, no attempt used
            r = (await app.get(queue_id)).recipients[0]
            assert r.state is RecipientState.DEFERRED and r.attempts == 0
            assert r.last_response is not None and r.last_response.cls is ReplyClass.CONNECTION
        assert smtp_peer.handler.received == []
        # the primary is paused now: the retry goes through the fallback
        await clock.advance(60)
        await worker.run_until_idle()
        assert recipients(smtp_peer) == {f"u{i}@example.net" for i in range(3)}
        assert [(await app.get(q)).state for q in ids] == [RecipientState.SENT] * 3
        assert second_peer.handler.received == []  # the default relay was never used
        stats = await app.stats()
        paused = [d for d in stats.destinations if (d.paused_until or 0) > clock.now()]
        assert [d.destination for d in paused] == [f"relay:127.0.0.1:{broken.rsplit(':', 1)[1]}"]
    finally:
        await worker.transport.close()
        await app.close()


async def test_mail_through_a_relay_is_dkim_signed_per_sender_domain(
    tmp_path: Path, clock: FakeClock, smtp_peer: SMTPPeer
) -> None:
    key = generate_key("example.com", "pl1")
    (tmp_path / "example.com.pem").write_bytes(key.private_pem)
    config = make_config(
        tmp_path,
        delivery={"relay": smtp_peer.url},
        dkim={"example.com": {"selector": "pl1", "private_key": "example.com.pem"}},
    )
    app, worker, _ = await run(
        config,
        clock,
        [
            {"sender": "app@example.com", "to": ["ada@example.net"]},
            {"sender": "app@unsigned.example", "to": ["bob@example.net"]},
        ],
    )
    try:
        by_sender = {m.mail_from: m.content for m in smtp_peer.handler.received}
        signed = by_sender["app@example.com"]
        assert signed.startswith(b"DKIM-Signature:")
        name = dns_record_name("example.com", "pl1").encode() + b"."

        def dnsfunc(queried: bytes, timeout: float = 5) -> bytes | None:
            return key.dns_record.encode() if queried == name else None

        assert dkim.verify(signed, dnsfunc=dnsfunc)
        assert not by_sender["app@unsigned.example"].startswith(b"DKIM-Signature:")
    finally:
        await worker.transport.close()
        await app.close()
