"""The SMTP relay transport's own transactions (RFC 2920 PIPELINING) against aiosmtpd.

aiosmtpd reads commands line by line, so it copes with pipelined input; a handler hook adds
PIPELINING to its EHLO reply. The server records, per connection, the commands it ran (in order),
the replies it sent and the chunks it read off the socket, so a test can see what the client sent
in one write and whether a message body followed a refused DATA.

Most tests drive :class:`SMTPRelayTransport` directly, for exact per-recipient responses; one
runs a worker to check the outcome (sent / dead) a partial refusal leads to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass, classify
from postlane.clock import FakeClock
from postlane.config import DeliveryConfig
from postlane.message import RecipientState
from postlane.transports.base import Envelope, Response
from postlane.transports.smtp import RelaySettings, SMTPRelayTransport
from postlane.worker import Worker
from tests.conftest import ScriptedHandler, make_config

SENDER = "app@example.com"


@dataclass
class Session:
    """What one connection carried, as the server saw it."""

    #: commands in the order the server ran them: "MAIL FROM:<a@b> SIZE=12", "DATA", "RSET", ...
    commands: list[str] = field(default_factory=list)
    #: every reply line the server wrote
    replies: list[str] = field(default_factory=list)
    #: the bytes of each read off the socket, as they came
    chunks: list[bytes] = field(default_factory=list)
    #: set when the connection is gone
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: the server's side of the connection
    transport: asyncio.BaseTransport | None = None

    @property
    def verbs(self) -> list[str]:
        return [command.split(" ", 1)[0] for command in self.commands]

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)


@dataclass
class RecordingHandler(ScriptedHandler):
    """The shared scripted handler, plus PIPELINING in the EHLO reply when asked."""

    pipelining: bool = True
    #: set when a message body has arrived; its reply then waits for ``release_data`` if given
    data_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release_data: asyncio.Event | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_arrived.set()
        if self.release_data is not None:
            await self.release_data.wait()
        return await super().handle_DATA(server, session, envelope)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # with this hook, aiosmtpd leaves it to us
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses


class RecordingSMTP(SMTPServer):
    """aiosmtpd's server, recording its commands, replies and reads into a :class:`Session`."""

    def __init__(self, handler: RecordingHandler, session: Session, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.record = session
        # aiosmtpd dispatches through this table of bound smtp_* methods
        self._smtp_methods = {
            verb: self._recorded(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _recorded(
        self, verb: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            self.record.commands.append(verb if arg is None else f"{verb} {arg}")
            await method(arg)

        return run

    def data_received(self, data: bytes) -> None:
        self.record.chunks.append(bytes(data))
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.record.transport = transport
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.record.closed.set()
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        self.record.replies.append(status if isinstance(status, str) else status.decode())
        await super().push(status)


@dataclass
class Peer:
    host: str
    port: int
    handler: RecordingHandler
    sessions: list[Session]

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def transport(self, **delivery: Any) -> SMTPRelayTransport:
        settings = {"connect_timeout": 2.0, "command_timeout": 2.0, **delivery}
        return SMTPRelayTransport(RelaySettings.from_url(self.url, DeliveryConfig(**settings)))

    def drop_connections(self) -> None:
        """Close every connection from the server's side, without a word (as servers do to
        idle clients)."""
        for session in self.sessions:
            if session.transport is not None and not session.transport.is_closing():
                session.transport.close()


PeerFactory = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def start_peer() -> AsyncIterator[PeerFactory]:
    """Start recording aiosmtpd servers: ``await start_peer(pipelining=False)``."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []

    async def start(*, pipelining: bool = True) -> Peer:
        handler = RecordingHandler(pipelining=pipelining)
        sessions: list[Session] = []

        def factory() -> SMTPServer:
            handler.connections += 1
            sessions.append(Session())
            return RecordingSMTP(handler, sessions[-1], hostname="peer.test", loop=loop)

        server = await loop.create_server(factory, "127.0.0.1", 0)
        servers.append(server)
        return Peer("127.0.0.1", server.sockets[0].getsockname()[1], handler, sessions)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def peer(start_peer: PeerFactory) -> Peer:
    return await start_peer()


@pytest.fixture
async def plain_peer(start_peer: PeerFactory) -> Peer:
    """The same server without PIPELINING: the transport sends one command at a time."""
    return await start_peer(pipelining=False)


def envelope(*recipients: str, tag: str = "1", content: bytes | None = None) -> Envelope:
    message_id = f"<{tag}@example.com>"
    if content is None:
        content = (
            f"From: {SENDER}\r\nTo: {', '.join(recipients)}\r\nSubject: message {tag}\r\n"
            f"Message-ID: {message_id}\r\n\r\nbody of message {tag}\r\n"
        ).encode()
    return Envelope(
        queue_id=f"q{tag}",
        sender=SENDER,
        recipients=recipients,
        content=content,
        message_id=message_id,
    )


async def send(transport: SMTPRelayTransport, mail: Envelope) -> list[Response]:
    responses = await transport.send(mail)
    assert len(responses) == len(mail.recipients)
    return responses


# -- what goes out in one write ------------------------------------------------------------------


async def test_with_pipelining_mail_every_rcpt_and_data_leave_in_one_write(peer: Peer) -> None:
    transport = peer.transport()
    try:
        responses = await send(transport, envelope("a@example.net", "b@example.net"))
    finally:
        await transport.close()
    assert [r.code for r in responses] == [250, 250]
    [session] = peer.sessions
    [batch] = [chunk for chunk in session.chunks if chunk.startswith(b"MAIL FROM:")]
    assert batch.endswith(b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert session.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


async def test_without_pipelining_each_command_waits_for_its_reply(plain_peer: Peer) -> None:
    mail = envelope("a@example.net", "b@example.net")
    transport = plain_peer.transport()
    try:
        await send(transport, mail)
    finally:
        await transport.close()
    [session] = plain_peer.sessions
    commands = [c for c in session.chunks if c[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert commands == [
        b"MAIL FROM:<app@example.com> SIZE=%d\r\n" % len(mail.content),
        b"RCPT TO:<a@example.net>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"DATA\r\n",
    ]


# -- one reply per recipient ---------------------------------------------------------------------


async def test_a_550_on_the_second_of_three_rcpts_sends_the_others_in_one_transaction(
    peer: Peer,
) -> None:
    refusal = "550 5.1.1 <b@example.net>: Recipient address rejected: User unknown"
    peer.handler.rcpt["b@example.net"] = refusal
    transport = peer.transport()
    try:
        responses = await send(
            transport, envelope("a@example.net", "b@example.net", "c@example.org")
        )
    finally:
        await transport.close()
    assert [r.code for r in responses] == [250, 550, 250]
    assert responses[1].text == refusal
    assert responses[1].verdict().cls is ReplyClass.HARD_BOUNCE
    assert responses[0] == responses[2]  # both got the reply to the final dot
    [received] = peer.handler.received
    assert received.rcpt_tos == ["a@example.net", "c@example.org"]
    assert peer.sessions[0].verbs.count("DATA") == 1


async def test_a_550_on_one_of_three_rcpts_dead_letters_it_and_sends_the_others(
    tmp_path: Path, clock: FakeClock, peer: Peer
) -> None:
    peer.handler.rcpt["b@example.net"] = "550 5.1.1 User unknown"
    config = make_config(
        tmp_path, delivery={"relay": peer.url, "connect_timeout": "2s", "command_timeout": "2s"}
    )
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, peer.transport(), clock=clock)
        try:
            result = await app.send(
                sender=SENDER, to=["a@example.net", "b@example.net", "c@example.org"], text="hi"
            )
            assert await worker.run_until_idle() == 3
        finally:
            await worker.transport.close()
        view = await app.get(result.id)
    states = {r.address: r.state for r in view.recipients}
    assert states == {
        "a@example.net": RecipientState.SENT,
        "b@example.net": RecipientState.DEAD,
        "c@example.org": RecipientState.SENT,
    }
    [received] = peer.handler.received
    assert received.rcpt_tos == ["a@example.net", "c@example.org"]
    assert peer.handler.message_ids() == [view.message_id]


async def test_when_every_pipelined_rcpt_is_refused_no_body_follows_and_the_connection_is_reused(
    peer: Peer,
) -> None:
    peer.handler.rcpt["a@example.net"] = "550 5.1.1 User unknown"
    peer.handler.rcpt["b@example.net"] = "550 5.1.1 User unknown"
    transport = peer.transport()
    try:
        refused = await send(transport, envelope("a@example.net", "b@example.net", tag="1"))
        accepted = await send(transport, envelope("c@example.net", tag="2"))
    finally:
        await transport.close()
    assert [r.code for r in refused] == [550, 550]
    assert [r.code for r in accepted] == [250]
    [session] = peer.sessions  # one connection for both messages
    # DATA left with the RCPTs (pipelined) and was refused; the body of message 1 never did
    first = ["MAIL", "RCPT", "RCPT", "DATA", "RSET"]
    second = ["MAIL", "RCPT", "DATA"]
    assert session.verbs == ["EHLO", *first, *second, "QUIT"]
    assert "503 Error: need RCPT command" in session.replies
    assert b"message 1" not in session.raw
    assert peer.handler.message_ids() == ["<2@example.com>"]


async def test_when_every_rcpt_is_refused_without_pipelining_data_is_never_sent(
    plain_peer: Peer,
) -> None:
    plain_peer.handler.rcpt["a@example.net"] = "550 5.1.1 User unknown"
    plain_peer.handler.rcpt["b@example.net"] = "450 4.2.1 Mailbox busy, try again later"
    transport = plain_peer.transport()
    try:
        refused = await send(transport, envelope("a@example.net", "b@example.net", tag="1"))
        accepted = await send(transport, envelope("c@example.net", tag="2"))
    finally:
        await transport.close()
    assert [r.code for r in refused] == [550, 450]
    assert [r.code for r in accepted] == [250]
    [session] = plain_peer.sessions
    first = ["MAIL", "RCPT", "RCPT", "RSET"]  # no DATA
    second = ["MAIL", "RCPT", "DATA"]
    assert session.verbs == ["EHLO", *first, *second, "QUIT"]
    assert b"message 1" not in session.raw
    assert plain_peer.handler.message_ids() == ["<2@example.com>"]


async def test_a_refused_mail_from_gives_every_recipient_its_reply(peer: Peer) -> None:
    peer.handler.mail = ["451 4.3.0 Temporary local problem"]
    transport = peer.transport()
    try:
        responses = await send(
            transport, envelope("a@example.net", "b@example.net", "c@example.org")
        )
        after = await send(transport, envelope("d@example.net", tag="2"))
    finally:
        await transport.close()
    assert {(r.code, r.text) for r in responses} == {(451, "451 4.3.0 Temporary local problem")}
    assert {r.verdict().cls for r in responses} == {ReplyClass.TEMPORARY}
    assert [r.code for r in after] == [250]
    [session] = peer.sessions  # RSET made the connection usable again
    first = ["MAIL", "RCPT", "RCPT", "RCPT", "DATA", "RSET"]  # RCPTs and DATA: 503, no MAIL
    second = ["MAIL", "RCPT", "DATA"]
    assert session.verbs == ["EHLO", *first, *second, "QUIT"]
    assert b"message 1" not in session.raw
    assert peer.handler.message_ids() == ["<2@example.com>"]


async def test_a_421_on_rcpt_defers_every_recipient_and_the_next_message_uses_a_new_connection(
    peer: Peer,
) -> None:
    closing = "421 4.7.0 Too many connections, slow down"
    peer.handler.rcpt["b@example.net"] = closing
    transport = peer.transport()
    try:
        responses = await send(
            transport, envelope("a@example.net", "b@example.net", "c@example.org")
        )
        after = await send(transport, envelope("d@example.net", tag="2"))
    finally:
        await transport.close()
    # 421 means the server is closing: nothing after it counts, the accepted "a" included
    assert {(r.code, r.text) for r in responses} == {(421, closing)}
    assert {r.verdict().cls for r in responses} == {classify(closing).cls}
    assert classify(closing).cls is ReplyClass.THROTTLED
    assert [r.code for r in after] == [250]
    assert peer.handler.connections == 2
    assert b"message 1" not in peer.sessions[0].raw
    assert peer.sessions[1].verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert peer.handler.message_ids() == ["<2@example.com>"]


async def test_a_354_to_pipelined_data_after_every_rcpt_was_refused_gets_an_empty_message() -> None:
    """RFC 2920 says a server must refuse DATA when no RCPT succeeded; one that says 354 anyway
    must get a lone dot at once (no body), and the connection goes on."""
    events: list[tuple[str, bytes]] = []
    connections = 0

    async def lenient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 lenient.test ESMTP\r\n")
        accepted = 0
        while line := await reader.readline():
            verb = line[:4].decode().upper()
            events.append((verb, line))
            if verb == "EHLO":
                writer.write(b"250-lenient.test\r\n250 PIPELINING\r\n")
            elif verb == "MAIL":
                accepted = 0
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT" and b"refused" in line:
                writer.write(b"550 5.1.1 User unknown\r\n")
            elif verb == "RCPT":
                accepted += 1
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")  # whatever the RCPTs got
                body = b""
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    body += data
                events.append(("BODY", body))
                writer.write(b"250 2.0.0 Ok\r\n" if accepted else b"554 5.5.1 No recipients\r\n")
            elif verb == "RSET":
                writer.write(b"250 2.0.0 Ok\r\n")
            else:
                writer.write(b"221 2.0.0 Bye\r\n")
                break
        writer.close()

    server = await asyncio.start_server(lenient, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = DeliveryConfig(connect_timeout=2.0, command_timeout=2.0)
    transport = SMTPRelayTransport(RelaySettings.from_url(f"smtp://127.0.0.1:{port}", settings))
    try:
        refused = await send(transport, envelope("refused1@example.net", "refused2@example.net"))
        accepted = await send(transport, envelope("c@example.net", tag="2"))
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert [r.code for r in refused] == [550, 550]
    assert [r.code for r in accepted] == [250]
    assert connections == 1
    verbs = [verb for verb, _ in events]
    first = ["MAIL", "RCPT", "RCPT", "DATA", "BODY", "RSET"]
    second = ["MAIL", "RCPT", "DATA", "BODY"]
    assert verbs == ["EHLO", *first, *second, "QUIT"]
    bodies = [data for verb, data in events if verb == "BODY"]
    assert bodies[0] == b""  # the lone dot, nothing else
    assert b"body of message 2" in bodies[1]


# -- the message itself --------------------------------------------------------------------------


async def test_lines_starting_with_a_dot_arrive_intact(peer: Peer) -> None:
    content = (
        b".a first line that starts with a dot\r\n"
        b"Subject: dots\r\n"
        b"Message-ID: <dots@example.com>\r\n"
        b"\r\n"
        b".\r\n"
        b"..\r\n"
        b". a dot and a space\r\n"
        b"...three\r\n"
        b"not.at.the.start.\r\n"
        b"\r\n"
        b".\r\n"
    )
    transport = peer.transport()
    try:
        [response] = await send(transport, envelope("a@example.net", content=content))
    finally:
        await transport.close()
    assert response.code == 250
    [received] = peer.handler.received
    assert received.content == content  # dots and CRLFs exactly as sent
    wire = peer.sessions[0].raw
    assert b"\r\n..\r\n...\r\n.. a dot and a space\r\n....three\r\n" in wire
    assert wire.count(b"\r\n.\r\n") == 1  # only the real end of data


async def test_a_bare_lf_dot_in_the_body_cannot_end_the_message_early(peer: Peer) -> None:
    # SMTP smuggling: "\n.\r\n" (or "\r\n.\n") ends DATA for some servers, and what follows
    # would run as commands. Line ends are made CRLF before dots are stuffed, so it cannot.
    content = (
        b"Subject: smuggling\r\nMessage-ID: <s@example.com>\r\n\r\nhello\n.\r\n"
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"\r\n.\nQUIT\r\n"
    )
    transport = peer.transport()
    try:
        [response] = await send(transport, envelope("a@example.net", content=content))
    finally:
        await transport.close()
    assert response.code == 250
    [received] = peer.handler.received
    assert received.rcpt_tos == ["a@example.net"]
    assert received.content == content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert peer.sessions[0].verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


# -- connections ---------------------------------------------------------------------------------


async def test_twenty_messages_share_a_few_connections(peer: Peer) -> None:
    transport = peer.transport(connections_per_host=3)
    try:
        results = await asyncio.gather(
            *(send(transport, envelope(f"u{i}@example.net", tag=str(i))) for i in range(20))
        )
    finally:
        await transport.close()
    assert [r.code for [r] in results] == [250] * 20
    assert len(peer.handler.received) == 20
    assert peer.handler.connections <= 3
    assert sum(s.verbs.count("MAIL") for s in peer.sessions) == 20


async def test_a_connection_is_replaced_after_messages_per_connection(peer: Peer) -> None:
    transport = peer.transport(messages_per_connection=5)
    try:
        for i in range(20):
            await send(transport, envelope(f"u{i}@example.net", tag=str(i)))
    finally:
        await transport.close()
    assert len(peer.handler.received) == 20
    assert peer.handler.connections == 4
    assert [s.verbs.count("MAIL") for s in peer.sessions] == [5, 5, 5, 5]
    async with asyncio.timeout(5):  # each is closed with a QUIT (sent in the background)
        for session in peer.sessions:
            await session.closed.wait()
    assert [s.verbs[-1] for s in peer.sessions] == ["QUIT"] * 4


async def test_a_pooled_connection_the_server_dropped_is_replaced_and_the_message_sent_once(
    peer: Peer,
) -> None:
    transport = peer.transport()
    try:
        await send(transport, envelope("a@example.net", tag="1"))
        peer.drop_connections()  # while the connection waits in the pool
        [response] = await send(transport, envelope("b@example.net", tag="2"))
    finally:
        await transport.close()
    assert response.code == 250
    assert peer.handler.connections == 2
    assert peer.handler.message_ids() == ["<1@example.com>", "<2@example.com>"]


async def test_a_send_cancelled_mid_transaction_closes_its_connection(peer: Peer) -> None:
    peer.handler.release_data = asyncio.Event()  # the final reply waits
    transport = peer.transport()
    task = asyncio.create_task(send(transport, envelope("a@example.net")))
    try:
        async with asyncio.timeout(5):
            await peer.handler.data_arrived.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
        [session] = peer.sessions
        async with asyncio.timeout(1):  # a local close arrives at once
            await session.closed.wait()
    finally:
        peer.drop_connections()  # what the transport should have done
        await transport.close()
