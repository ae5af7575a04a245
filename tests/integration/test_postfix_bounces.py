"""Real DSNs from a real MTA: a private Postfix instance is postlane's relay, the next hop
refuses a recipient after Postfix accepted it, and Postfix's own DSN comes back to the VERP
return path, through the bounce listener, into the store.

    postlane worker ──VerpTransport──▶ Postfix (127.0.0.1, own config and queue)
                                          │ example.net ──▶ aiosmtpd peer: 550 5.1.1 for nobody@
                                          │ bounce.example ◀── Postfix's DSN to b-<token>@
                                          ▼
                                   bounce listener ──▶ store: nobody@ bounced + suppressed

The instance (tests/postfix.py) has its own configuration and queue and routes with
``transport_maps``: nothing leaves the machine and the system's Postfix (if any) is untouched.

Needs Postfix and root (``postfix start`` runs the master as root; its daemons switch to the
``postfix`` user): skipped otherwise, except under CI, where it must run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.feedback.inbound import BounceProcessor, InboundResult
from postlane.feedback.verp import ReturnPaths, VerpTransport
from postlane.ingest.bounces import BounceListenerSettings, start_bounce_listener
from postlane.message import Message, RecipientState
from postlane.records import RecipientView
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import IN_CI, ScriptedHandler, free_port, make_config
from tests.postfix import WHY_NOT, PrivatePostfix
from tests.postfix import postfix_root as postfix_root  # a fixture

if WHY_NOT is not None:
    if IN_CI:
        pytest.fail(f"CI must run the Postfix bounce test, but {WHY_NOT}", pytrace=False)
    pytest.skip(WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.slow

BOUNCE_DOMAIN = "bounce.example"
#: how long Postfix may take to relay, refuse, write its DSN and deliver it
DSN_DEADLINE = 60.0
REFUSAL = (
    "550 5.1.1 <nobody@example.net>: Recipient address rejected: "
    "User unknown in local recipient table"
)


@pytest.fixture
async def next_hop() -> AsyncIterator[tuple[int, ScriptedHandler]]:
    """The destination behind Postfix: takes ada@, refuses nobody@ at RCPT (after Postfix
    has accepted the message from postlane, so Postfix must write a DSN)."""
    handler = ScriptedHandler(rcpt={"nobody@example.net": REFUSAL})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="mx.example.net", loop=loop), "127.0.0.1", 0
    )
    yield server.sockets[0].getsockname()[1], handler
    server.close()
    await server.wait_closed()


async def test_postfixs_own_dsn_bounces_and_suppresses_the_refused_recipient(
    tmp_path: Path, postfix_root: Path, next_hop: tuple[int, ScriptedHandler]
) -> None:
    hop_port, hop = next_hop
    bounce_port = free_port()
    postfix = PrivatePostfix(
        postfix_root,
        free_port(),
        {BOUNCE_DOMAIN: bounce_port, "example.net": hop_port},
        relay_domains=BOUNCE_DOMAIN,
    )
    config = make_config(
        tmp_path,
        delivery={"relay": f"smtp://127.0.0.1:{postfix.port}", "tls_verify": False},
    )
    async with AsyncPostlane(config) as app:
        key = await app.store.secret("verp", app.clock.now())
        transport = VerpTransport(transport_for(config), BOUNCE_DOMAIN, key)
        worker = Worker.from_config(config, app.store, transport, clock=app.clock)
        processor = HeldProcessor(app.store, ReturnPaths(BOUNCE_DOMAIN, key), clock=app.clock)
        listener = BounceListenerSettings(listen=f"127.0.0.1:{bounce_port}")
        await postfix.start()
        try:
            async with start_bounce_listener(processor, listener):
                try:
                    result = await app.send(
                        Message(
                            sender="Shop <app@shop.example>",
                            to=["ada@example.net", "nobody@example.net"],
                            subject="Your order",
                            text="It shipped.",
                        )
                    )
                    assert await worker.run_until_idle() == 2
                    sent = await recipients(app, result.id)
                    # Postfix took both: to postlane they are sent
                    assert {r.state for r in sent.values()} == {RecipientState.SENT}
                    processor.release.set()
                    nobody = await wait_for_state(app, result.id, "nobody@example.net")
                finally:  # a failed check must not leave the DSN held at the stop
                    processor.release.set()
        finally:
            await transport.close()
            await postfix.stop()
        log = postfix.log_text()
        assert nobody.state is RecipientState.BOUNCED, log
        assert nobody.last_response is not None
        assert nobody.last_response.code == 550 and nobody.last_response.enhanced == "5.1.1"
        assert nobody.last_response.text == REFUSAL  # Postfix's diagnostic, as the hop said it
        assert [h.relay for h in nobody.history or ()][-1] == "dsn"
        final = await recipients(app, result.id)
        assert final["ada@example.net"].state is RecipientState.SENT
        listed = await app.store.list_suppressions(limit=10)
        assert [(s.address, s.scope, s.reason) for s in listed] == [
            ("nobody@example.net", "*", "hard_bounce")
        ]
        [ada] = await app.store.find_deliveries("ada@example.net", queue_id=result.id)
    # the hop saw ada's own transaction, with ada's own return path and the From: untouched
    [arrival] = hop.received
    assert arrival.rcpt_tos == ["ada@example.net"]
    assert ReturnPaths(BOUNCE_DOMAIN, key).delivery_id(arrival.mail_from) == ada.delivery_id
    assert b"From: Shop <app@shop.example>" in arrival.content
    assert "sender non-delivery notification" in log
    assert f"relay=127.0.0.1[127.0.0.1]:{bounce_port}" in log and "status=sent" in log


class HeldProcessor(BounceProcessor):
    """Holds a received DSN (its SMTP session stays open, as a slow listener's would) until
    the test has seen both recipients ``sent``: Postfix can write and deliver its DSN before
    the worker's run returns, and the check of the state in between must not race it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def process(
        self, content: bytes, *, mail_from: str | None = None, rcpt_to: Sequence[str] = ()
    ) -> InboundResult:
        await self.release.wait()
        return await super().process(content, mail_from=mail_from, rcpt_to=rcpt_to)


async def recipients(app: AsyncPostlane, queue_id: str) -> dict[str, RecipientView]:
    view = await app.get(queue_id, history=True)
    return {r.address: r for r in view.recipients}


async def wait_for_state(app: AsyncPostlane, queue_id: str, address: str) -> RecipientView:
    """Poll until ``address`` leaves ``sent`` (Postfix's DSN arrived), up to the deadline."""
    deadline = time.monotonic() + DSN_DEADLINE
    while True:
        recipient = (await recipients(app, queue_id))[address]
        if recipient.state is not RecipientState.SENT or time.monotonic() > deadline:
            return recipient
        await asyncio.sleep(0.2)  # the poll interval, not a wait for something
