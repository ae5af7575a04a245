"""Bounces and complaints heard later: the simulator accepts at SMTP, then sends a DSN or an ARF
complaint to the message's return path, and postlane's bounce listener turns it into feedback.

    postlane worker ──VERP (b-<token>@bounces.test)──▶ simulator, late-bounces: 250 to all
                                                           │ a second or two later
    store: bounced / complained + suppressed ◀── bounce listener ◀── DSN / ARF report

Everything is real and in this process: the store, the worker and its transport chain
(``transport_for`` with the VERP key, as serve builds it), the simulator, the bounce listener.
The rest drives the simulator's report delivery against peers that refuse, defer or are absent.
"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from postlane.feedback.inbound import BounceProcessor
from postlane.feedback.verp import ReturnPaths
from postlane.ingest.bounces import BounceListenerSettings, start_bounce_listener
from postlane.message import Message, RecipientState
from postlane.records import RecipientView
from postlane.simulate import Scenario, Simulator
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import SMTPPeer, free_port, make_config
from tests.integration.test_simulator import simulate, simulate_cli
from tests.polling import until

BOUNCE_DOMAIN = "bounces.test"
#: the longest a test waits for the simulator's reports (each comes a second or two late)
REPORTS_DEADLINE = 60.0


async def reports_settled(simulator: Simulator) -> dict[str, Any]:
    await asyncio.wait_for(simulator.wait_for_reports(), REPORTS_DEADLINE)
    reports: dict[str, Any] = simulator.report()["reports"]
    return reports


def later(**rule: Any) -> Scenario:
    """A scenario with one stage "later" rule for local parts starting with "late"."""
    return Scenario.from_dict({"rules": [{"local": "late*", "stage": "later", **rule}]})


def send(address: tuple[str, int], sender: str, recipients: Sequence[str]) -> Any:
    """One message over smtplib (run it in a thread); what sendmail returns."""
    body = (
        f"From: {sender or 'app@shop.example'}\r\nTo: {', '.join(recipients)}\r\n"
        "Subject: Your order\r\nMessage-ID: <order-1@shop.example>\r\n\r\nIt shipped.\r\n"
    )
    with smtplib.SMTP(*address, timeout=10) as client:
        return client.sendmail(sender, list(recipients), body)


# -- the whole path ------------------------------------------------------------------------------


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[AsyncPostlane]:
    """postlane with a bounce domain; the relay is filled in by the test (the simulator)."""
    async with AsyncPostlane(make_config(tmp_path)) as app:
        yield app


async def recipients(app: AsyncPostlane, queue_id: str) -> dict[str, RecipientView]:
    view = await app.get(queue_id, history=True)
    return {r.address: r for r in view.recipients}


async def test_late_bounces_reach_the_bounce_listener_and_bounce_complain_and_suppress(
    tmp_path: Path,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    simulator = Simulator(Scenario.load("late-bounces"), reports_to=listen)
    sim_host, sim_port = await simulator.start()
    config = make_config(
        tmp_path,
        delivery={"relay": f"smtp://{sim_host}:{sim_port}"},
        bounces={"domain": BOUNCE_DOMAIN, "listen": listen},
    )
    try:
        async with AsyncPostlane(config) as app:
            key = await app.store.secret("verp", app.clock.now())
            transport = transport_for(config, verp_key=key)
            worker = Worker.from_config(config, app.store, transport, clock=app.clock)
            processor = BounceProcessor(app.store, ReturnPaths(BOUNCE_DOMAIN, key), clock=app.clock)
            settings = BounceListenerSettings(listen=config.bounces.listen)
            try:
                async with start_bounce_listener(processor, settings):
                    result = await app.send(
                        Message(
                            sender="Shop <app@shop.example>",
                            to=[
                                "ada@example.net",
                                "bounce-later@example.net",
                                "complain@example.net",
                                "full-later@example.net",
                            ],
                            subject="Your order",
                            text="It shipped.",
                        )
                    )
                    assert await worker.run_until_idle() == 4
                    sent = await recipients(app, result.id)
                    # the simulator took them all: to postlane they are sent
                    assert {r.state for r in sent.values()} == {RecipientState.SENT}
                    reports = await reports_settled(simulator)
            finally:
                await transport.close()
            final = await recipients(app, result.id)
            events = [
                (e.type, e.recipient, e.cls)
                for e in await app.store.events_after(None, limit=100)
                if e.type != "queued"
            ]
            suppressions = {
                (s.address, s.scope, s.reason) for s in await app.store.list_suppressions(limit=10)
            }
    finally:
        await simulator.stop()

    assert reports["sent"] == {"dsn": 2, "arf": 1}
    assert reports["recipients"] == {"failed": 1, "delayed": 1, "complained": 1}
    assert reports["undelivered"] == {"dsn": 0, "arf": 0}
    assert reports["first_undelivered"] == []

    assert final["ada@example.net"].state is RecipientState.SENT
    assert final["full-later@example.net"].state is RecipientState.SENT  # delayed: still trying
    bounced = final["bounce-later@example.net"]
    assert bounced.state is RecipientState.BOUNCED
    assert bounced.last_response is not None
    assert (bounced.last_response.code, bounced.last_response.enhanced) == (550, "5.1.1")
    assert "User unknown in virtual mailbox table" in bounced.last_response.text
    assert [h.relay for h in bounced.history or ()][-1] == "dsn"
    complained = final["complain@example.net"]
    assert complained.state is RecipientState.COMPLAINED
    # a complaint is no reply: it is the recipient's reason and last word, not a history entry
    assert complained.reason == "complained (arf)"
    assert complained.last_response is not None
    assert complained.last_response.text == "complaint (abuse) by postlane-simulator/1.0"

    assert suppressions == {
        ("bounce-later@example.net", "*", "hard_bounce"),
        ("complain@example.net", "shop.example", "complaint"),
    }
    assert ("bounced", "bounce-later@example.net", "hard_bounce") in events
    assert [who for kind, who, _cls in events if kind == "complained"] == ["complain@example.net"]
    assert ("deferred", "full-later@example.net", "soft_bounce") in events
    assert {who for kind, who, _cls in events if kind == "sent"} == set(final)


# -- delivering the reports ----------------------------------------------------------------------


async def test_a_report_nobody_takes_is_retried_then_counted_and_the_simulator_keeps_serving() -> (
    None
):
    clock = FakeClock()
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    scenario = later(reply="550 5.1.1 <{address}>: unknown", delay="0s")
    async with Simulator(scenario, clock=clock, reports_to=nowhere) as simulator:
        await asyncio.to_thread(send, simulator.address, "b-1@bounces.test", ["late@example.net"])
        # each retry waits on the simulator's clock: move it until the report is given up
        deadline = time.monotonic() + REPORTS_DEADLINE
        while simulator.report()["reports"]["undelivered"]["dsn"] == 0:
            assert time.monotonic() < deadline, simulator.report()["reports"]
            await clock.advance(1.0)
            await asyncio.sleep(0.01)  # the poll interval: a refused connect is real I/O
        refused = await asyncio.to_thread(
            send, simulator.address, "b-2@bounces.test", ["other@example.net"]
        )
        assert refused == {}
        report = simulator.report()
    reports = report["reports"]
    assert report["messages"] == 2
    assert reports["to"] == nowhere
    assert reports["sent"] == {"dsn": 0, "arf": 0}
    assert reports["undelivered"] == {"dsn": 1, "arf": 0}
    assert reports["retries"] == 4
    [given_up] = reports["first_undelivered"]
    assert given_up["return_path"] == "b-1@bounces.test"
    assert given_up["recipients"] == ["late@example.net"]
    assert given_up["attempts"] == 5
    assert nowhere.rpartition(":")[2] in given_up["reason"]  # the port it could not reach


async def test_a_5xx_from_the_bounce_listener_is_final_at_once(app: AsyncPostlane) -> None:
    """A return path the listener does not know (no VERP token) gets 550 5.1.1: no retry."""
    key = await app.store.secret("verp", app.clock.now())
    processor = BounceProcessor(app.store, ReturnPaths(BOUNCE_DOMAIN, key), clock=app.clock)
    settings = BounceListenerSettings(listen="127.0.0.1:0")
    async with start_bounce_listener(processor, settings) as listening:
        scenario = later(complaint=True, delay="0s")
        async with Simulator(scenario, reports_to=listening) as simulator:
            await asyncio.to_thread(
                send, simulator.address, "app@shop.example", ["late@example.net"]
            )
            reports = await reports_settled(simulator)
    assert reports["undelivered"] == {"dsn": 0, "arf": 1}
    assert reports["retries"] == 0
    [given_up] = reports["first_undelivered"]
    assert given_up["attempts"] == 1
    assert given_up["reason"].startswith("550 5.1.1")


async def test_a_4xx_is_tried_again_and_the_report_then_delivered(smtp_peer: SMTPPeer) -> None:
    smtp_peer.handler.data = ["451 4.3.0 The delivery is still being sent, try again later"]
    scenario = later(reply="452 4.2.2 <{address}>: Mailbox full", delay="0s")
    async with Simulator(scenario, reports_to=f"127.0.0.1:{smtp_peer.port}") as simulator:
        await asyncio.to_thread(send, simulator.address, "b-3@bounces.test", ["late@x.example"])
        reports = await reports_settled(simulator)
    assert (reports["sent"], reports["retries"]) == ({"dsn": 1, "arf": 0}, 1)
    assert reports["recipients"] == {"failed": 0, "delayed": 1, "complained": 0}
    [dsn] = smtp_peer.handler.received
    assert (dsn.mail_from, dsn.rcpt_tos) == ("<>", ["b-3@bounces.test"])  # the null sender
    assert b"Action: delayed\r\nStatus: 4.2.2\r\n" in dsn.content


async def test_stopping_sends_the_waiting_reports_at_once(smtp_peer: SMTPPeer) -> None:
    """An hour's delay is cut short by the stop; the null sender gets no report at all."""
    scenario = later(reply="550 5.1.1 unknown", delay="1h")
    simulator = Simulator(scenario, reports_to=f"127.0.0.1:{smtp_peer.port}")
    await simulator.start()
    try:
        await asyncio.to_thread(send, simulator.address, "b-4@bounces.test", ["late1@x.example"])
        await asyncio.to_thread(send, simulator.address, "", ["late2@x.example"])
        assert simulator.report()["reports"]["waiting"] == 1
        assert smtp_peer.handler.received == []
    finally:
        await simulator.stop()
    reports = simulator.report()["reports"]
    assert (reports["sent"]["dsn"], reports["waiting"], reports["without_return_path"]) == (1, 0, 1)
    [dsn] = smtp_peer.handler.received
    assert dsn.rcpt_tos == ["b-4@bounces.test"]
    assert b"Final-Recipient: rfc822; late1@x.example\r\n" in dsn.content


async def test_recipients_of_one_rule_share_a_dsn_and_complaints_come_one_each(
    smtp_peer: SMTPPeer,
) -> None:
    scenario = Scenario.from_dict(
        {
            "rules": [
                {"local": "gone*", "stage": "later", "reply": "550 5.1.1 unknown", "delay": "0s"},
                {"local": "angry*", "stage": "later", "complaint": True, "delay": "0s"},
            ]
        }
    )
    to = [f"{local}@x.example" for local in ("gone1", "gone2", "angry1", "angry2", "ok")]
    async with Simulator(scenario, reports_to=f"127.0.0.1:{smtp_peer.port}") as simulator:
        await asyncio.to_thread(send, simulator.address, "app@shop.example", to)
        reports = await reports_settled(simulator)
    assert reports["sent"] == {"dsn": 1, "arf": 2}
    assert reports["recipients"] == {"failed": 2, "delayed": 0, "complained": 2}
    fbl = "feedback-loop@mx.simulator.postlane.test"
    assert sorted(r.mail_from for r in smtp_peer.handler.received) == ["<>", fbl, fbl]
    [dsn] = [r for r in smtp_peer.handler.received if r.mail_from == "<>"]
    assert dsn.content.count(b"Action: failed") == 2


# -- the command line ----------------------------------------------------------------------------


async def test_cli_reports_to_sends_the_late_bounces_there(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    reports_to = f"127.0.0.1:{smtp_peer.port}"
    with simulate("--scenario", "late-bounces", "--reports-to", reports_to, cwd=tmp_path) as (
        process,
        address,
    ):
        await asyncio.to_thread(send, address, "b-5@bounces.test", ["bounce-later@x.example"])
        await until(lambda: smtp_peer.handler.received, "the DSN", REPORTS_DEADLINE)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr
    assert f"reports to {reports_to}" in stderr
    reports = json.loads(stdout)["reports"]
    assert (reports["to"], reports["sent"]) == (reports_to, {"dsn": 1, "arf": 0})
    [dsn] = smtp_peer.handler.received
    assert dsn.rcpt_tos == ["b-5@bounces.test"]


def test_cli_a_bad_reports_to_is_a_one_line_error(tmp_path: Path) -> None:
    result = simulate_cli("--listen", "127.0.0.1:0", "--reports-to", "nowhere", cwd=tmp_path)
    assert result.returncode != 0
    assert "--reports-to" in result.stderr and "HOST:PORT" in result.stderr
