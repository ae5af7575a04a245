"""Quoted local parts (``"john doe"@example.com``, ``"a@b"@example.com``) and address literals
(``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``) at every front door (Python API, HTTP API,
SMTP submission, CLI) and on the wire: what an aiosmtpd server receives in MAIL FROM and RCPT TO,
byte for byte, and the To header a reader parses back."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from postlane.destinations import DestinationMap
from postlane.errors import ValidationError
from postlane.feedback.verp import ReturnPaths
from postlane.ingest.door import FrontDoor
from postlane.ingest.smtp import start_smtp
from postlane.message import RecipientState
from postlane.records import Selector
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import ScriptedHandler, api_client, free_port, make_config
from tests.dns_server import running_dns_server
from tests.processes import clean_environment

QUOTED = '"john doe"@example.com'
AT_SIGN = '"a@b"@example.com'
IPV4 = "user@[192.0.2.1]"
IPV6 = "user@[IPv6:2001:db8::1]"
ACCEPTED = [QUOTED, AT_SIGN, IPV4, IPV6]
#: what RFC 5321 does not allow, each refused with the error that says why
REFUSED = {
    "john doe@example.com": "SPACE",
    '"john doe@example.com': "@-sign",
    '"john\x01doe"@example.com': "control character",
    "user@[example.com]": "not an IPv4 address",
    "user@[192.0.2]": "not an IPv4 address",
}
TOKEN = "t0ken-for-the-tests"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[AsyncPostlane]:
    config = make_config(tmp_path, http={"tokens": [TOKEN]})
    async with AsyncPostlane(config) as postlane:
        yield postlane


async def addresses_of(app: AsyncPostlane, queue_id: str) -> list[str]:
    return [r.address for r in (await app.get(queue_id)).recipients]


# -- the Python API ------------------------------------------------------------------------------


async def test_the_python_api_takes_quoted_local_parts_and_address_literals(
    app: AsyncPostlane,
) -> None:
    result = await app.send(sender='"the app"@example.com', to=ACCEPTED, text="hello")
    view = await app.get(result.id)
    assert view.sender == '"the app"@example.com'
    assert [r.address for r in view.recipients] == ACCEPTED
    assert [r.domain for r in view.recipients] == [
        "example.com",
        "example.com",
        "[192.0.2.1]",
        "[ipv6:2001:db8::1]",
    ]
    literal = await app.messages(Selector(domains=("[IPv6:2001:DB8::1]",)))
    assert [m.id for m in literal] == [result.id]


async def test_needless_quotes_are_dropped_and_the_same_address_is_one_recipient(
    app: AsyncPostlane,
) -> None:
    to = ['"john"@Example.com', "john@example.com", '"john doe"@example.com', QUOTED]
    result = await app.send(sender="app@example.com", to=to, text="hello")
    assert await addresses_of(app, result.id) == ["john@example.com", QUOTED]


async def test_the_python_api_still_refuses_what_rfc_5321_does_not_allow(
    app: AsyncPostlane,
) -> None:
    for address, why in REFUSED.items():
        with pytest.raises(ValidationError, match=why):
            await app.send(sender="app@example.com", to=[address], text="hello")
        with pytest.raises(ValidationError, match=why):
            await app.send(sender=address, to=["ada@example.net"], text="hello")
    assert await app.messages() == []


async def test_a_suppressed_quoted_address_is_never_attempted_and_can_be_lifted(
    app: AsyncPostlane,
) -> None:
    assert await app.suppress('"John Doe"@EXAMPLE.com')
    # the list compares addresses case-insensitively, as for any other address
    assert [s.address for s in await app.suppressions()] == [QUOTED]
    result = await app.send(sender="app@example.com", to=[QUOTED, IPV4], text="hello")
    states = {r.address: r.state for r in (await app.get(result.id)).recipients}
    assert states == {QUOTED: RecipientState.SUPPRESSED, IPV4: RecipientState.QUEUED}
    assert await app.unsuppress('"john doe"@example.com')
    assert await app.suppressions() == []


async def test_an_idempotency_key_holds_for_a_quoted_recipient(app: AsyncPostlane) -> None:
    fields: dict[str, Any] = {"sender": "app@example.com", "to": [QUOTED], "text": "hi"}
    first = await app.send(**fields, idempotency_key="k1")
    again = await app.send(**fields, idempotency_key="k1")
    assert (again.id, again.duplicate) == (first.id, True)
    assert len(await app.messages()) == 1


# -- the HTTP API --------------------------------------------------------------------------------


@pytest.fixture
async def client(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app, TOKEN) as c:
        yield c


async def test_the_http_api_takes_quoted_local_parts_and_address_literals(
    client: httpx.AsyncClient,
) -> None:
    body = {"from": '"the app"@example.com', "to": ACCEPTED, "subject": "Hi", "text": "Hello"}
    response = await client.post("/v1/messages", json=body)
    assert response.status_code == 202, response.text
    message = (await client.get(f"/v1/messages/{response.json()['id']}")).json()
    assert message["sender"] == '"the app"@example.com'
    assert [r["address"] for r in message["recipients"]] == ACCEPTED
    raw = {"from": IPV4, "to": [AT_SIGN], "raw": f"From: {IPV4}\r\nTo: {QUOTED}\r\n\r\nhi\r\n"}
    assert (await client.post("/v1/messages", json=raw)).status_code == 202


async def test_the_http_api_refuses_bad_addresses_with_422(client: httpx.AsyncClient) -> None:
    for address, why in REFUSED.items():
        body = {"from": "app@example.com", "to": [address], "text": "Hello"}
        response = await client.post("/v1/messages", json=body)
        assert response.status_code == 422, address
        error = response.json()["error"]
        assert error["code"] == "invalid_message" and why in error["message"]


async def test_the_http_api_suppresses_and_lifts_a_quoted_address(
    client: httpx.AsyncClient,
) -> None:
    added = await client.post("/v1/suppressions", json={"address": QUOTED})
    assert added.status_code in (200, 201), added.text
    listed = (await client.get("/v1/suppressions")).json()
    assert [s["address"] for s in listed] == [QUOTED]
    removed = await client.delete(f"/v1/suppressions/{quote(QUOTED, safe='')}")
    assert removed.status_code == 200, removed.text
    assert (await client.get("/v1/suppressions")).json() == []


# -- SMTP submission -----------------------------------------------------------------------------


@pytest.fixture
async def submission(tmp_path: Path) -> AsyncIterator[tuple[AsyncPostlane, int]]:
    port = free_port()
    config = make_config(tmp_path, smtp={"listen": f"127.0.0.1:{port}"})
    async with AsyncPostlane(config) as app, start_smtp(FrontDoor(config, app, None)):
        yield app, port


MESSAGE = b'From: "the app"@example.com\r\nTo: "john doe"@example.com\r\nSubject: hi\r\n\r\nhi\r\n'


async def test_smtp_submission_takes_quoted_local_parts_and_address_literals(
    submission: tuple[AsyncPostlane, int],
) -> None:
    app, port = submission

    def submit() -> tuple[list[tuple[int, bytes]], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo()
            assert s.docmd("MAIL", 'FROM:<"the app"@example.com> SIZE=100')[0] == 250
            rcpt = [s.docmd("RCPT", f"TO:<{address}>") for address in ACCEPTED]
            rcpt.append(s.docmd("RCPT", 'TO:<"ann"@example.com>'))  # needless quotes
            return rcpt, s.data(MESSAGE)

    rcpt, data = await asyncio.to_thread(submit)
    assert [code for code, _ in rcpt] == [250] * 5
    assert data[0] == 250 and b"queued as" in data[1]
    [message] = await app.messages()
    assert message.sender == '"the app"@example.com'
    assert [r.address for r in message.recipients] == [*ACCEPTED, "ann@example.com"]


async def test_smtp_submission_refuses_paths_rfc_5321_does_not_allow_one_by_one(
    submission: tuple[AsyncPostlane, int],
) -> None:
    app, port = submission
    paths = [
        "<john doe@example.com>",  # an unquoted space: the RFC 5322 parser would quote it
        '<"john doe@example.com>',  # an unbalanced quote
        '<"john\tdoe"@example.com>',  # a control character in quotes
        "<user@[example.com]>",  # a literal that is no IP address
        "<user@[192.0.2]>",
        "<user@[ 192.0.2.1 ]>",
    ]

    def submit() -> tuple[list[tuple[int, bytes]], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo()
            bad_sender = s.docmd("MAIL", "FROM:<john doe@example.com>")
            assert s.docmd("MAIL", "FROM:<app@example.com>")[0] == 250
            rcpt = [s.docmd("RCPT", f"TO:{path}") for path in paths]
            good = s.docmd("RCPT", f"TO:<{QUOTED}>")
            s.data(MESSAGE)
            return rcpt, good, bad_sender

    rcpt, good, bad_sender = await asyncio.to_thread(submit)
    assert bad_sender[0] == 553
    assert [code for code, _ in rcpt] == [553] * len(paths)
    assert b"not an IPv4 address" in rcpt[3][1]
    assert good[0] == 250
    [message] = await app.messages()
    assert [r.address for r in message.recipients] == [QUOTED]


async def test_an_address_literal_opens_no_relay_to_an_unauthenticated_client(
    tmp_path: Path,
) -> None:
    """Only trusted or authenticated clients submit, whatever the recipient's domain: a literal
    (here this very host's) is no way around it."""
    port = free_port()
    config = make_config(tmp_path, smtp={"listen": f"127.0.0.1:{port}", "trusted_networks": []})
    async with AsyncPostlane(config) as app, start_smtp(FrontDoor(config, app, None)):

        def submit() -> tuple[int, int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo()
                mail = s.docmd("MAIL", "FROM:<app@[127.0.0.1]>")[0]
                rcpt = s.docmd("RCPT", 'TO:<"root"@[127.0.0.1]>')[0]
                return mail, rcpt

        assert await asyncio.to_thread(submit) == (530, 503)
        assert await app.messages() == []


# -- the CLI -------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["postlane", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(None),
    )


def test_the_cli_sends_to_quoted_local_parts_and_address_literals(tmp_path: Path) -> None:
    assert run_cli("worker", "--burst", cwd=tmp_path).returncode == 0  # a queue here
    to = [arg for address in ACCEPTED for arg in ("--to", address)]
    sent = run_cli(
        "send", "--from", '"the app"@example.com', *to, "--text", "hi", "--json", cwd=tmp_path
    )
    assert sent.returncode == 0, sent.stderr
    queue_id = json.loads(sent.stdout)["id"]
    shown = run_cli("queue", "show", queue_id, "--json", cwd=tmp_path)
    message = json.loads(shown.stdout)
    assert message["sender"] == '"the app"@example.com'
    assert [r["address"] for r in message["recipients"]] == ACCEPTED
    listed = run_cli("queue", "list", "--domain", "[192.0.2.1]", "--json", cwd=tmp_path)
    assert [m["id"] for m in json.loads(listed.stdout)] == [queue_id]
    for address, why in REFUSED.items():
        if "\x01" in address:
            continue  # no control character passes through a command line
        refused = run_cli(
            "send", "--from", "a@example.com", "--to", address, "--text", "x", cwd=tmp_path
        )
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "not a valid address" in refused.stderr and why in refused.stderr


# -- delivery: on the wire -----------------------------------------------------------------------


@dataclass
class WirePeer:
    """An aiosmtpd server that keeps each MAIL and RCPT command's argument as it arrived."""

    port: int
    handler: ScriptedHandler
    commands: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


class _RecordingSMTP(SMTPServer):
    def __init__(self, handler: Any, commands: list[str], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._commands = commands

    async def smtp_MAIL(self, arg: str) -> None:
        self._commands.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        self._commands.append(f"RCPT {arg}")
        await super().smtp_RCPT(arg)


@pytest.fixture
async def wire_peer() -> AsyncIterator[WirePeer]:
    handler = ScriptedHandler()
    commands: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _RecordingSMTP(handler, commands, hostname="peer.test", loop=loop),
        "127.0.0.1",
        0,
    )
    yield WirePeer(server.sockets[0].getsockname()[1], handler, commands)
    server.close()
    await server.wait_closed()


async def deliver(
    tmp_path: Path, relay: str, *, sender: str, to: list[str], bounces: bool = False
) -> AsyncPostlane:
    sections: dict[str, Any] = {"delivery": {"relay": relay, "connect_timeout": "2s"}}
    if bounces:
        sections["bounces"] = {"domain": "bounce.example"}
    config = make_config(tmp_path, **sections)
    app = AsyncPostlane(config, clock=FakeClock())
    await app.open()
    key = await app.store.secret("verp", app.clock.now()) if bounces else None
    transport = transport_for(config, verp_key=key)
    worker = Worker.from_config(config, app.store, transport, clock=app.clock)
    await app.send(sender=sender, to=to, subject="hi", text="hello")
    assert await worker.run_until_idle() == len(to)
    await transport.close()
    return app


async def test_the_relay_receives_the_addresses_exactly_and_the_header_parses_back(
    tmp_path: Path, wire_peer: WirePeer
) -> None:
    to = ['John Doe <"john doe"@example.com>', AT_SIGN, IPV6]
    app = await deliver(tmp_path, wire_peer.url, sender='"the app"@example.com', to=to)
    try:
        [sent] = await app.messages(Selector(states=(RecipientState.SENT,)))
    finally:
        await app.close()
    assert [r.address for r in sent.recipients] == [QUOTED, AT_SIGN, IPV6]
    assert [command.partition(" SIZE=")[0] for command in wire_peer.commands] == [
        'MAIL FROM:<"the app"@example.com>',
        'RCPT TO:<"john doe"@example.com>',
        'RCPT TO:<"a@b"@example.com>',
        "RCPT TO:<user@[IPv6:2001:db8::1]>",
    ]
    [received] = wire_peer.handler.received
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [
        ("John Doe", QUOTED),
        ("", AT_SIGN),
        ("", IPV6),
    ]
    assert parsed["From"].addresses[0].addr_spec == '"the app"@example.com'
    assert b'To: John Doe <"john doe"@example.com>, "a@b"@example.com,' in received.content


async def test_a_quoted_recipient_gets_its_own_verp_return_path(
    tmp_path: Path, wire_peer: WirePeer
) -> None:
    """The return path names the delivery by its id, never by the recipient's address: no
    quote, space or ``@`` of a local part ever reaches it."""
    app = await deliver(
        tmp_path, wire_peer.url, sender="app@example.com", to=[QUOTED, AT_SIGN], bounces=True
    )
    try:
        key = await app.store.secret("verp", app.clock.now())
    finally:
        await app.close()
    paths = ReturnPaths("bounce.example", key)
    mails = [
        c.removeprefix("MAIL FROM:").partition(" ")[0]
        for c in wire_peer.commands
        if c.startswith("MAIL")
    ]
    rcpts = [c for c in wire_peer.commands if c.startswith("RCPT")]
    assert rcpts == [f"RCPT TO:<{QUOTED}>", f"RCPT TO:<{AT_SIGN}>"]
    assert len(mails) == 2 and len({paths.delivery_id(m) for m in mails} - {None}) == 2
    assert all(m.startswith("<b-") and m.endswith("@bounce.example>") for m in mails)


async def test_a_literal_is_its_own_destination_without_any_dns_question() -> None:
    async with running_dns_server({}) as dns_server:
        destinations = DestinationMap(mx_lookup=True, resolver=dns_server.resolver())
        found = await destinations.resolve(["[192.0.2.1]", "[ipv6:2001:db8::1]"])
        assert found == {"[192.0.2.1]": "[192.0.2.1]", "[ipv6:2001:db8::1]": "[ipv6:2001:db8::1]"}
        assert dns_server.queries == []
