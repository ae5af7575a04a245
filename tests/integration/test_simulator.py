"""The provider simulator, driven the way a provider is: by a plain ``smtplib`` client.

The simulator runs on the test's event loop; smtplib is blocking, so each client runs in a thread
(``asyncio.to_thread``). The CLI tests run ``postlane simulate`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from postlane.classify import ReplyClass, classify
from postlane.clock import FakeClock
from postlane.errors import ConfigError
from postlane.simulate import (
    Reply,
    Scenario,
    Simulator,
    builtin_scenarios,
    find_message_id,
)
from tests.processes import clean_environment

Address = tuple[str, int]

SENDER = "app@example.com"


# -- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def message(to: str = "someone@example.com", message_id: str | None = "<m1@example.com>") -> str:
    header = f"Message-ID: {message_id}\r\n" if message_id else ""
    return f"From: {SENDER}\r\nTo: {to}\r\nSubject: test\r\n{header}\r\nHello.\r\n"


def unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Outcome:
    """What a plain client saw for one message: the code (None: the connection was closed without
    a reply), the reply text as smtplib gives it, and the recipients refused at RCPT."""

    code: int | None
    text: str = ""
    refused: dict[str, tuple[int, bytes]] = field(default_factory=dict)


def outcome_of(send: Any) -> Outcome:
    try:
        refused = send()
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return Outcome(code, text.decode(), dict(exc.recipients))
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return Outcome(exc.smtp_code, error.decode() if isinstance(error, bytes) else str(error))
    except (smtplib.SMTPServerDisconnected, ConnectionResetError) as exc:
        # a dropped connection: closed, or reset when the server closes with unread input
        return Outcome(None, str(exc))
    return Outcome(250, "", dict(refused or {}))


def send(
    address: Address,
    recipients: Sequence[str],
    *,
    body: str | None = None,
    tls: bool = False,
) -> Outcome:
    """One message on a new connection, as a plain client sends it; SMTP errors are returned."""

    def deliver() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(*address, timeout=10) as client:
            if tls:
                client.starttls(context=unverified_tls())
            return client.sendmail(SENDER, list(recipients), body or message(recipients[0]))

    return outcome_of(deliver)


def send_on_one_connection(address: Address, count: int) -> list[Outcome]:
    """Up to ``count`` messages as fast as possible on one connection, until one is refused."""
    outcomes: list[Outcome] = []
    with smtplib.SMTP(*address, timeout=10) as client:
        for number in range(count):
            to = f"user{number}@gmail.com"
            outcome = outcome_of(
                lambda to=to, n=number: client.sendmail(SENDER, [to], message(to, f"<{n}@x>"))
            )
            outcomes.append(outcome)
            if outcome.code != 250:
                break
    return outcomes


@contextlib.asynccontextmanager
async def serving(scenario: Scenario | str, **options: Any) -> AsyncIterator[Simulator]:
    loaded = Scenario.load(scenario) if isinstance(scenario, str) else scenario
    simulator = Simulator(loaded, **options)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def replies(report: dict[str, Any], stage: str) -> dict[str, int]:
    by_stage: dict[str, int] = report["replies"]["by_stage"][stage]
    return by_stage


# -- the built-in scenarios ------------------------------------------------------------------------


async def test_accept_answers_250_to_everything() -> None:
    async with serving("accept") as simulator:
        for to in ("a@example.com", "b@example.org", "c@example.org"):
            outcome = await asyncio.to_thread(send, simulator.address, [to])
            assert outcome == Outcome(250)
    report = simulator.report()
    assert report["messages"] == 3
    assert report["domains"] == {
        "example.com": {"accepted": 1, "refused": 0},
        "example.org": {"accepted": 2, "refused": 0},
    }
    assert report["replies"]["total"] == {"delivered": 9}


async def test_bounces_550_5_1_1_for_bounce_recipients_and_250_for_others() -> None:
    async with serving("bounces") as simulator:
        outcome = await asyncio.to_thread(
            send, simulator.address, ["bounce-1@gmail.com", "ada@gmail.com", "Bounce@gmail.com"]
        )
    assert outcome.code == 250  # accepted for ada
    assert set(outcome.refused) == {"bounce-1@gmail.com", "Bounce@gmail.com"}
    code, text = outcome.refused["bounce-1@gmail.com"]
    assert code == 550
    assert text.startswith(b"5.1.1 The email account that you tried to reach does not exist.")
    report = simulator.report()
    assert report["messages"] == 1
    assert report["domains"]["gmail.com"] == {"accepted": 1, "refused": 2}
    assert replies(report, "rcpt") == {"delivered": 1, "hard_bounce": 2}
    assert report["replies"]["by_code"]["550 5.1.1"] == 2


async def test_gmail_throttle_421_4_7_28_above_the_rate_and_250_below_it() -> None:
    clock = FakeClock()
    async with serving("gmail-throttle", clock=clock) as simulator:
        burst = await asyncio.to_thread(send_on_one_connection, simulator.address, 30)
        # time stands still: the 20 tokens of the burst, then Gmail's 421 (and the connection
        # is closed by the server)
        assert [o.code for o in burst] == [250] * 20 + [421]
        assert burst[-1].text.startswith("4.7.28 [127.0.0.1] Our system has detected")
        assert "temporarily\n4.7.28 rate limited" in burst[-1].text

        await clock.advance(0.5)  # 20 messages a second: 10 more tokens
        later = await asyncio.to_thread(send_on_one_connection, simulator.address, 30)
        assert [o.code for o in later] == [250] * 10 + [421]
    report = simulator.report()
    assert report["messages"] == 30
    assert replies(report, "data") == {"delivered": 30, "throttled": 2}


async def test_throttle_in_real_time_refuses_a_fast_sender(tmp_path: Path) -> None:
    scenario = Scenario.from_dict({"throttle": {"rate": 1, "burst": 5, "stage": "mail"}})
    async with serving(scenario) as simulator:
        outcomes = await asyncio.to_thread(send_on_one_connection, simulator.address, 10)
    # five at once, then at most a sixth if the machine is very slow, then 421 at MAIL
    assert outcomes[-1].code == 421
    assert 5 <= len(outcomes) - 1 <= 6
    assert classify(f"421 {outcomes[-1].text}").cls is ReplyClass.THROTTLED


async def test_throttle_per_recipient_answers_at_rcpt() -> None:
    too_quickly = "4.2.1 The user you are trying to contact is receiving mail too quickly."
    scenario = Scenario.from_dict(
        {
            "throttle": {
                "rate": 1,
                "burst": 1,
                "per": "recipient",
                "reply": f"450 {too_quickly}",
            }
        }
    )
    async with serving(scenario, clock=FakeClock()) as simulator:
        first = await asyncio.to_thread(send, simulator.address, ["ada@gmail.com"])
        again = await asyncio.to_thread(send, simulator.address, ["ada@gmail.com", "bob@gmail.com"])
    assert first == Outcome(250)
    assert again.code == 250  # for bob
    assert again.refused == {"ada@gmail.com": (450, too_quickly.encode())}
    assert replies(simulator.report(), "rcpt") == {"delivered": 2, "throttled": 1}


async def test_outage_answers_421_or_closes_every_connection() -> None:
    async with serving("outage") as simulator:
        outcomes = [
            await asyncio.to_thread(send, simulator.address, ["a@example.com"]) for _ in range(10)
        ]
    for outcome in outcomes:
        assert outcome.code in (421, None), outcome
        if outcome.code == 421:
            assert outcome.text == "4.3.2 Service not available, closing transmission channel"
    assert {o.code for o in outcomes} == {421, None}  # the seed makes both happen in ten
    report = simulator.report()
    assert report["messages"] == 0
    assert sum(replies(report, "connect").values()) == 10
    assert set(replies(report, "connect")) == {"temporary", "connection"}


async def test_a_554_greeting_answers_every_command_until_quit() -> None:
    scenario = Scenario.from_dict({"connect": {"reply": "554 5.3.2 No SMTP service here"}})

    def converse(address: Address) -> list[bytes]:
        with socket.create_connection(address, timeout=10) as sock, sock.makefile("rb") as replies:
            heard = [replies.readline()]
            for command in (b"EHLO client.example\r\n", b"MAIL FROM:<a@b.c>\r\n", b"QUIT\r\n"):
                sock.sendall(command)
                heard.append(replies.readline())
            heard.append(replies.readline())  # b"": the server closed the connection
            return heard

    async with serving(scenario) as simulator:
        heard = await asyncio.to_thread(converse, simulator.address)
    refusal = b"554 5.3.2 No SMTP service here\r\n"
    assert heard == [refusal, refusal, refusal, b"221 2.0.0 Bye\r\n", b""]
    assert replies(simulator.report(), "connect") == {"policy_block": 1}


async def test_flaky_mixes_successes_and_temporary_failures_the_same_way_each_time() -> None:
    async def run() -> list[int | None]:
        async with serving("flaky") as simulator:
            codes = []
            for number in range(40):
                to = f"user{number}@example.com"
                outcome = await asyncio.to_thread(send, simulator.address, [to])
                codes.append(outcome.code)
        classes = set(simulator.report()["replies"]["total"])
        assert classes <= {"delivered", "temporary"}
        return codes

    first, second = await run(), await run()
    assert first == second  # the scenario's seed
    assert first.count(250) >= 20
    assert {code for code in first if code != 250} <= {421, 450, 451}
    assert len({code for code in first if code != 250}) >= 2


async def test_connection_dropped_mid_data_raises_server_disconnected() -> None:
    scenario = Scenario.from_dict(
        {"rules": [{"stage": "data", "drop": True, "local": "drop*"}]}, name="drops"
    )

    def deliver(address: Address) -> None:
        with smtplib.SMTP(*address, timeout=10) as client:
            client.sendmail(SENDER, ["keep@example.com"], message("keep@example.com"))
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.sendmail(SENDER, ["drop@example.com"], message("drop@example.com"))

    async with serving(scenario) as simulator:
        await asyncio.to_thread(deliver, simulator.address)
    report = simulator.report()
    assert report["messages"] == 1
    assert report["dropped"] == 1
    assert replies(report, "data") == {"connection": 1, "delivered": 1}


async def test_the_builtin_drops_scenario_closes_about_one_connection_in_ten() -> None:
    async with serving("drops") as simulator:
        outcomes = [
            await asyncio.to_thread(send, simulator.address, [f"user{i}@example.com"])
            for i in range(60)
        ]
    dropped = [o for o in outcomes if o.code is None]
    assert 1 <= len(dropped) <= 15  # 10% of 60, drawn from the scenario's fixed seed
    assert all(o.code == 250 for o in outcomes if o.code is not None)
    report = simulator.report()
    assert report["dropped"] == len(dropped)
    assert report["messages"] == 60 - len(dropped)  # counted as received only when answered
    assert replies(report, "data") == {"connection": len(dropped), "delivered": 60 - len(dropped)}


async def test_the_builtin_slow_scenario_answers_late_but_accepts() -> None:
    async with serving("slow") as simulator:
        started = time.monotonic()
        outcome = await asyncio.to_thread(send, simulator.address, ["a@example.com"])
        took = time.monotonic() - started
    assert outcome.code == 250
    assert took >= 1.0 + 0.2 + 0.2 + 0.1 + 1.0  # greeting, EHLO, MAIL, RCPT, end of DATA


async def test_tls_required_530_before_starttls_and_250_after() -> None:
    async with serving("tls-required") as simulator:
        in_clear = await asyncio.to_thread(send, simulator.address, ["a@example.com"])
        encrypted = await asyncio.to_thread(send, simulator.address, ["a@example.com"], tls=True)
    assert in_clear.code == 530
    assert in_clear.text == "5.7.0 Must issue a STARTTLS command first"
    assert encrypted == Outcome(250)
    report = simulator.report()
    assert report["messages"] == 1
    assert replies(report, "mail") == {"delivered": 1, "policy_block": 1}


async def test_tls_with_a_configured_certificate_relative_to_the_scenario(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "mx.pem")
    (tmp_path / "tls.toml").write_text('tls = "required"\ntls_cert = "mx.pem"\n')

    def deliver(address: Address) -> None:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP(*address, timeout=10) as client:
            client.starttls(context=context)  # verified against the test CA
            client.sendmail(SENDER, ["a@example.com"], message())

    async with serving(str(tmp_path / "tls.toml")) as simulator:
        await asyncio.to_thread(deliver, simulator.address)
    assert simulator.report()["messages"] == 1


async def test_tls_without_a_certificate_or_cryptography_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if it were not installed
    simulator = Simulator(Scenario.load("tls-required"))
    with pytest.raises(ConfigError) as caught:
        await simulator.start()
    assert "\n" not in caught.value.message
    assert "tls_cert" in caught.value.message
    assert "cryptography" in caught.value.message


async def test_providers_gives_every_class_in_each_providers_wording() -> None:
    recipients = {
        "bounce@gmail.com": ReplyClass.HARD_BOUNCE,
        "full@outlook.com": ReplyClass.SOFT_BOUNCE,
        "spam@yahoo.com": ReplyClass.POLICY_BLOCK,
        "defer@gmail.com": ReplyClass.THROTTLED,
        "defer@example.net": ReplyClass.TEMPORARY,
        "dmarc@hotmail.com": ReplyClass.POLICY_BLOCK,
        "ok@example.net": ReplyClass.DELIVERED,
    }
    async with serving("providers") as simulator:
        for to in recipients:
            await asyncio.to_thread(send, simulator.address, [to])
    report = simulator.report()
    assert report["messages"] == 1
    total = report["replies"]["total"]
    assert total["hard_bounce"] == 1
    assert total["soft_bounce"] == 1
    assert total["policy_block"] == 2
    assert total["throttled"] == 1
    assert total["temporary"] == 1
    assert report["replies"]["by_code"]["550 5.7.509"] == 1  # Microsoft's DMARC refusal


# -- the rest of the behaviour ---------------------------------------------------------------------


async def test_report_counts_messages_domains_and_duplicates_by_message_id() -> None:
    async with serving("accept") as simulator:
        address = simulator.address
        for to, message_id in [
            ("ada@example.com", "<dup@example.com>"),
            ("ada@example.com", "<dup@example.com>"),  # the same message again: a duplicate
            ("bob@example.org", "<dup@example.com>"),  # another recipient of it: not one
            ("ada@example.com", None),
        ]:
            body = message(to, message_id)
            assert (await asyncio.to_thread(send, address, [to], body=body)).code == 250
        both = ["cy@example.org", "di@example.org"]
        assert (await asyncio.to_thread(send, address, both)).code == 250
    report = simulator.report()
    assert report["messages"] == 5
    assert report["recipients"] == 6
    assert report["domains"] == {
        "example.com": {"accepted": 3, "refused": 0},
        "example.org": {"accepted": 3, "refused": 0},
    }
    assert report["without_message_id"] == 1
    assert report["duplicates"] == {
        "message_ids": 1,
        "deliveries": 1,
        "first": [{"message_id": "<dup@example.com>", "recipient": "ada@example.com", "count": 2}],
    }
    assert sum(report["rate"]["accepted"]) == 5
    assert report["replies"]["by_stage"]["data"] == {"delivered": 5}
    json.dumps(report)  # JSON all the way down


async def test_rules_match_in_order_on_globs_and_regular_expressions() -> None:
    scenario = Scenario.from_dict(
        {
            "rules": [
                {"stage": "mail", "sender": "*@blocked.test", "reply": "550 5.7.1 Not you"},
                {"domain": "example.com", "local": "/^vip[0-9]+$/", "reply": "250 2.1.5 VIP"},
                {"domain": "*.example.com", "reply": "550 5.1.1 No such user"},
                {"address": ["a@example.com", "b@*"], "reply": "451 4.3.0 Later"},
            ]
        }
    )

    def rcpt(address: Address, sender: str, to: str) -> tuple[int, bytes]:
        with smtplib.SMTP(*address, timeout=10) as client:
            client.ehlo()
            code, text = client.mail(sender)
            return client.rcpt(to) if code == 250 else (code, text)

    async with serving(scenario) as simulator:
        expected = [
            (SENDER, "vip7@example.com", (250, b"2.1.5 VIP")),
            (SENDER, "vip7x@example.com", (250, b"2.1.5 Ok")),
            (SENDER, "x@mx.example.com", (550, b"5.1.1 No such user")),
            (SENDER, "A@example.com", (451, b"4.3.0 Later")),
            (SENDER, "b@example.org", (451, b"4.3.0 Later")),
            ("x@blocked.test", "a@example.com", (550, b"5.7.1 Not you")),
        ]
        for sender, to, reply in expected:
            assert await asyncio.to_thread(rcpt, simulator.address, sender, to) == reply


async def test_message_too_large_in_the_providers_words_at_mail_and_at_data() -> None:
    too_large = "552 5.3.4 Your message exceeded Google's message size limits."
    scenario = Scenario.from_dict({"max_size": "1KB", "replies": {"too_large": too_large}})
    big = message() + "x" * 2000 + "\r\n"

    def without_size(address: Address) -> tuple[int, bytes]:
        with smtplib.SMTP(*address, timeout=10) as client:
            client.ehlo()
            client.mail(SENDER)  # no SIZE= parameter: the size is found out reading DATA
            client.rcpt("a@example.com")
            return client.data(big)

    async with serving(scenario) as simulator:
        with_size = await asyncio.to_thread(send, simulator.address, ["a@example.com"], body=big)
        at_data = await asyncio.to_thread(without_size, simulator.address)
    assert with_size == Outcome(552, too_large[4:])
    assert at_data == (552, too_large[4:].encode())
    report = simulator.report()
    assert replies(report, "mail") == {"delivered": 1, "message_error": 1}
    assert replies(report, "data") == {"message_error": 1}
    assert report["domains"] == {"example.com": {"accepted": 0, "refused": 1}}


async def test_dots_at_line_starts_are_unstuffed(tmp_path: Path) -> None:
    body = "Message-ID: <dots@x>\r\n\r\n.leading dot\r\n..two\r\nend.\r\n.\r\n"
    async with serving("accept", store_dir=tmp_path / "mail") as simulator:
        assert (
            await asyncio.to_thread(send, simulator.address, ["a@x.org"], body=body)
        ).code == 250
    stored = (tmp_path / "mail" / "00000001.eml").read_bytes()
    assert stored.endswith(b"\r\n\r\n.leading dot\r\n..two\r\nend.\r\n.\r\n")
    assert stored.startswith(b"Return-Path: <app@example.com>\r\nX-Envelope-To: a@x.org\r\n")


async def test_slow_replies_wait_before_answering() -> None:
    scenario = Scenario.from_dict({"delays": {"rcpt": "300ms"}})
    async with serving(scenario) as simulator:
        started = time.monotonic()
        assert (await asyncio.to_thread(send, simulator.address, ["a@x.org"])).code == 250
        assert time.monotonic() - started >= 0.3


async def test_stop_closes_open_sessions_and_wait_returns_at_max_messages() -> None:
    async with serving("accept", max_messages=2) as simulator:

        def two_and_hold(address: Address) -> None:
            client = smtplib.SMTP(*address, timeout=10)
            client.sendmail(SENDER, ["a@x.org"], message())
            client.sendmail(SENDER, ["a@x.org"], message(message_id="<m2@x>"))
            client.close()

        await asyncio.to_thread(two_and_hold, simulator.address)
        await asyncio.wait_for(simulator.wait(), 5)
    report = simulator.report()
    assert report["messages"] == 2
    assert report["stopped_at"] is not None


# -- scenario files ------------------------------------------------------------------------------


def test_the_promised_builtins_exist() -> None:
    promised = {"accept", "flaky", "gmail-throttle", "bounces", "outage", "late-bounces"}
    assert promised <= set(builtin_scenarios())


SAMPLE = {
    "id": "a1si2",
    "queue_id": "000000000A",
    "ip": "192.0.2.1",
    "hostname": "mx.example.com",
    "sender": "app@sender.example",
    "sender_domain": "sender.example",
    "address": "bounce@gmail.com",
    "local": "bounce",
    "domain": "gmail.com",
    "time": "1800000000",
}


def class_of(reply: Reply) -> ReplyClass:
    return classify(reply.render(SAMPLE)).cls


@pytest.mark.parametrize("name", builtin_scenarios())
def test_builtin_replies_classify_as_the_scenario_declares(name: str) -> None:
    scenario = Scenario.load(name)
    assert scenario.description
    for rule in scenario.rules:
        if rule.complaint:  # a complaint is no reply: nothing to classify
            assert rule.cls is None and not rule.replies, f"{name}: {rule.name}"
            continue
        assert rule.cls is not None, f"{name}: {rule.name} declares no class"
        for reply in rule.replies:
            assert class_of(reply) is rule.cls, f"{name}: {rule.name}: {reply.template}"
    if scenario.throttle is not None:
        assert {class_of(r) for r in scenario.throttle.replies} == {ReplyClass.THROTTLED}
    server = scenario.replies
    for accepted in (*server.mail, *server.rcpt, *server.data):
        assert class_of(accepted) is ReplyClass.DELIVERED
    assert {class_of(r) for r in server.too_large} == {ReplyClass.MESSAGE_ERROR}
    assert {class_of(r) for r in server.tls_required} == {ReplyClass.POLICY_BLOCK}


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("sed = 1", "sed"),
        ("[throttle]\nrate = 5\nburts = 10", "throttle.burts"),
        ('[[rules]]\nname = "x"\nlocall = "a*"', "rules[1] (x).locall"),
        ("[delays]\nrcpt = 5", "delays.rcpt"),
        ("[[rules]]\nprobability = 1.5", "rules[1].probability"),
        ('[[rules]]\nreply = "hello"', "rules[1].reply"),
        ('[[rules]]\nreply = "550 5.1.1 {user} unknown"', "rules[1].reply"),
        ('[[rules]]\nreply = "550 a"\ndrop = true', "rules[1].drop"),
        ('[[rules]]\nstage = "mail"\nlocal = "x"', "rules[1].stage"),
        ('[replies]\nrcpt = "550 5.1.1 no"', "replies.rcpt"),
        ('tls = "maybe"', "tls"),
        ("[connect]\nprobability = 0.5", "connect.probability"),
        ("rules = 3", "rules"),
    ],
)
def test_a_bad_scenario_is_a_one_line_error_naming_the_key(
    tmp_path: Path, toml: str, names: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        Scenario.load(str(path))
    assert "\n" not in caught.value.message
    assert f"scenario {path}: {names}:" in caught.value.message


def test_an_unknown_scenario_name_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match=r"unknown scenario 'nope' \(built-in: accept, "):
        Scenario.load("nope")


def test_a_reply_is_normalised_to_multiline_form() -> None:
    reply = Reply.parse(
        """
        550 5.1.1 The email account that you tried to reach does not exist.
        550 5.1.1 For more information, go to {hostname}
        """
    )
    assert reply.code == 550
    assert reply.template == (
        "550-5.1.1 The email account that you tried to reach does not exist.\r\n"
        "550 5.1.1 For more information, go to {hostname}"
    )
    with pytest.raises(ValueError, match="repeats its code 550"):
        Reply.parse("550-5.1.1 a\n551 5.1.1 b")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"Message-ID: <a@x>\r\n\r\nbody", b"<a@x>"),
        (b"Subject: s\r\nmessage-id:   <b@x>  \r\nTo: t\r\n\r\n", b"<b@x>"),
        (b"Subject: s\r\nMessage-Id:\r\n <folded@x>\r\n\r\n", b"<folded@x>"),
        (b"Resent-Message-ID: <r@x>\r\nMessage-ID: <c@x>\r\n\r\n", b"<c@x>"),
        (b"Resent-Message-ID: <r@x>\r\n\r\n", None),
        (b"Subject: s\r\n\r\nMessage-ID: <in-body@x>\r\n", None),
        (b"Subject: s\nMessage-ID: <lf@x>\n\nbody", b"<lf@x>"),
        (b"", None),
    ],
)
def test_find_message_id(content: bytes, expected: bytes | None) -> None:
    assert find_message_id(content) == expected


# -- the command line ----------------------------------------------------------------------------


@contextlib.contextmanager
def simulate(*args: str, cwd: Path) -> Iterator[tuple[subprocess.Popen[str], Address]]:
    """``postlane simulate`` on a free port, once it accepts connections."""
    port = free_port()
    process = subprocess.Popen(
        ["postlane", "simulate", "--listen", f"127.0.0.1:{port}", *args],
        cwd=cwd,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("postlane simulate did not listen in 15 s") from None
            # the poll interval, which also notices a process that died
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)
            if process.returncode is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"postlane simulate exited: {stderr}")
        yield process, ("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=15)


def test_cli_stops_after_max_messages_and_writes_the_report(tmp_path: Path) -> None:
    args = ("--scenario", "accept", "--report", str(tmp_path / "r.json"), "--max-messages", "3")
    with simulate(*args, "--store-dir", "mail", cwd=tmp_path) as (process, address):
        with smtplib.SMTP(*address, timeout=10) as client:
            for number in range(3):
                client.sendmail(SENDER, ["a@example.com"], message(message_id=f"<{number}@x>"))
        stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert "scenario accept" in stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(stdout) == report
    assert report["scenario"] == "accept"
    assert report["messages"] == 3
    assert report["domains"] == {"example.com": {"accepted": 3, "refused": 0}}
    assert report["duplicates"]["message_ids"] == 0
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == [
        "00000001.eml",
        "00000002.eml",
        "00000003.eml",
    ]


def test_cli_prints_the_report_on_sigterm(tmp_path: Path) -> None:
    with simulate("--scenario", "bounces", cwd=tmp_path) as (process, address):
        outcome = send(address, ["bounce@gmail.com", "ok@gmail.com"])
        assert outcome.code == 250
        assert list(outcome.refused) == ["bounce@gmail.com"]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["messages"] == 1
    assert report["replies"]["by_stage"]["rcpt"] == {"delivered": 1, "hard_bounce": 1}


def simulate_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``postlane simulate ARGS`` run to its end by the real console script."""
    return subprocess.run(
        ["postlane", "simulate", *args],
        cwd=cwd,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_a_bad_scenario_is_a_one_line_error(tmp_path: Path) -> None:
    result = simulate_cli("--scenario", "nope", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown scenario 'nope'" in lines[0]


def test_cli_lists_the_builtin_scenarios(tmp_path: Path) -> None:
    result = simulate_cli("--list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == builtin_scenarios()


def test_cli_stops_after_duration(tmp_path: Path) -> None:
    result = simulate_cli("--listen", "127.0.0.1:0", "--duration", "200ms", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["messages"] == 0
    assert report["elapsed_seconds"] >= 0.2


@pytest.mark.parametrize("rate", [float("inf"), float("nan"), 0, -1])
def test_a_throttle_rate_that_is_not_a_finite_positive_number_is_refused(rate: float) -> None:
    with pytest.raises(ConfigError) as caught:
        Scenario.from_dict({"throttle": {"rate": rate}})
    assert "throttle.rate" in caught.value.message and "\n" not in caught.value.message
