"""Direct MX delivery against a real DNS server (tests/dns_server.py) and real SMTP servers.

Every MX host resolves to its own loopback address (127.0.0.2, 127.0.0.3, ...) with the same
port, so the transport's port override is the only test hook: which server got the mail says
which MX host was chosen. Addresses where nothing listens stand for hosts that refuse.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import pytest
import trustme
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.classify import ReplyClass
from postlane.config import DestinationLimits
from postlane.destinations import DestinationMap, merge_providers
from postlane.transports.base import Envelope, Response
from postlane.transports.mx import MXTransport
from tests.conftest import ScriptedHandler
from tests.dns_server import NO_ANSWER_AT_ALL, SERVFAIL, DNSServer, running_dns_server

UNREACHABLE = "127.0.0.99"  # nothing listens there: connections are refused


@dataclass
class RecordingHandler(ScriptedHandler):
    """Also records, for each message, whether it came over TLS and the client's EHLO name."""

    tls: list[bool] = field(default_factory=list)
    helo: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.tls.append(session.ssl is not None)
        self.helo.append(session.host_name)
        return await super().handle_DATA(server, session, envelope)


@dataclass
class MXHosts:
    """SMTP servers on 127.0.0.x, all on one port."""

    port: int = 0
    handlers: dict[str, RecordingHandler] = field(default_factory=dict)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def start(self, address: str, *, tls: ssl.SSLContext | None = None) -> RecordingHandler:
        handler = RecordingHandler()
        loop = asyncio.get_running_loop()

        def factory() -> SMTPServer:
            handler.connections += 1
            return SMTPServer(
                handler, hostname=address, tls_context=tls, require_starttls=False, loop=loop
            )

        server = await loop.create_server(factory, address, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self.servers.append(server)
        self.handlers[address] = handler
        return handler


@pytest.fixture
async def hosts() -> AsyncIterator[MXHosts]:
    pool = MXHosts()
    yield pool
    for server in pool.servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    async with running_dns_server({}) as server:
        yield server


Transports = Callable[..., MXTransport]


@pytest.fixture
async def make_transport(hosts: MXHosts, dns_server: DNSServer) -> AsyncIterator[Transports]:
    made: list[MXTransport] = []

    def make(**kwargs: Any) -> MXTransport:
        kwargs.setdefault("helo_name", "sender.postlane.test")
        transport = MXTransport(
            port=hosts.port, resolver=dns_server.resolver(), connect_timeout=5, **kwargs
        )
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


def envelope(*recipients: str) -> Envelope:
    content = (
        b"From: app@sender.test\r\nTo: someone@example.test\r\nSubject: hello\r\n"
        b"Message-ID: <m1@sender.test>\r\n\r\nbody\r\n"
    )
    return Envelope(
        queue_id="q1",
        sender="app@sender.test",
        recipients=recipients,
        content=content,
        message_id="<m1@sender.test>",
    )


def classes(responses: list[Response]) -> list[ReplyClass]:
    return [response.verdict().cls for response in responses]


async def test_mx_hosts_are_tried_in_preference_order(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    first = await hosts.start("127.0.0.2")
    second = await hosts.start("127.0.0.3")
    dns_server.zone.update(
        {
            "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
            "mx2.example.test": {"A": ["127.0.0.3"]},
        }
    )
    responses = await make_transport().send(envelope("bob@example.test"))
    assert classes(responses) == [ReplyClass.DELIVERED]
    assert responses[0].relay == f"smtp://mx1.example.test:{hosts.port}"
    assert [r.rcpt_tos for r in first.received] == [["bob@example.test"]]
    assert first.helo == ["sender.postlane.test"]
    assert second.received == []


async def test_a_refusing_mx_host_falls_back_to_the_next(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    backup = await hosts.start("127.0.0.3")
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
            "mx1.example.test": {"A": [UNREACHABLE]},
            "mx2.example.test": {"A": ["127.0.0.3"]},
        }
    )
    responses = await make_transport().send(envelope("bob@example.test"))
    assert classes(responses) == [ReplyClass.DELIVERED]
    assert responses[0].relay == f"smtp://mx2.example.test:{hosts.port}"
    assert len(backup.received) == 1


async def test_every_address_of_a_host_is_tried(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.4")
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": [UNREACHABLE, "127.0.0.4"]},
        }
    )
    assert classes(await make_transport().send(envelope("bob@example.test"))) == [
        ReplyClass.DELIVERED
    ]
    assert len(server.received) == 1


async def test_a_domain_without_mx_records_is_delivered_to_its_address(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.2")
    dns_server.zone["plain.test"] = {"A": ["127.0.0.2"]}
    responses = await make_transport().send(envelope("bob@plain.test"))
    assert classes(responses) == [ReplyClass.DELIVERED]
    assert responses[0].relay == f"smtp://plain.test:{hosts.port}"
    assert len(server.received) == 1
    assert ("plain.test", "MX") in dns_server.queries


async def test_a_null_mx_is_a_hard_bounce(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone["nomail.test"] = {"MX": [(0, ".")], "A": ["127.0.0.2"]}
    [response] = await make_transport().send(envelope("bob@nomail.test"))
    verdict = response.verdict()
    assert (verdict.cls, verdict.code, verdict.enhanced) == (ReplyClass.HARD_BOUNCE, 556, "5.1.10")
    assert "null MX" in response.text


async def test_a_domain_that_does_not_exist_is_a_hard_bounce(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    [response] = await make_transport().send(envelope("bob@example.invalid"))
    verdict = response.verdict()
    assert (verdict.cls, verdict.code, verdict.enhanced) == (ReplyClass.HARD_BOUNCE, 550, "5.1.2")
    assert "NXDOMAIN" in response.text
    assert dns_server.queries == [("example.invalid", "MX")]


async def test_a_domain_with_neither_mx_nor_address_is_a_hard_bounce(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone["empty.test"] = {"TXT": ["v=spf1 -all"]}
    [response] = await make_transport().send(envelope("bob@empty.test"))
    assert response.verdict().cls is ReplyClass.HARD_BOUNCE
    assert "no MX or address" in response.text


async def test_servfail_is_a_connection_failure(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone["broken.test"] = SERVFAIL
    [response] = await make_transport().send(envelope("bob@broken.test"))
    assert response.code is None
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "SERVFAIL" in response.text


async def test_a_dns_timeout_is_a_connection_failure(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone["silent.test"] = NO_ANSWER_AT_ALL
    [response] = await make_transport(dns_timeout=0.3).send(envelope("bob@silent.test"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "timed out" in response.text


async def test_an_mx_host_without_address_is_a_connection_failure_not_a_bounce(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone["example.test"] = {"MX": [(10, "gone.example.test")]}
    [response] = await make_transport().send(envelope("bob@example.test"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "gone.example.test has no address" in response.text


async def test_when_every_mx_host_refuses_the_recipients_get_a_connection_failure(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
            "mx1.example.test": {"A": [UNREACHABLE]},
            "mx2.example.test": {"A": ["127.0.0.98"]},
        }
    )
    responses = await make_transport().send(envelope("a@example.test", "b@example.test"))
    assert classes(responses) == [ReplyClass.CONNECTION] * 2
    assert "mx1.example.test" in responses[0].text and "mx2.example.test" in responses[0].text


async def test_a_421_greeting_from_the_last_host_is_classified_as_written(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    loop = asyncio.get_running_loop()

    class Busy(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.write(b"421 4.7.0 mx.example.test too many connections, slow down\r\n")
            transport.close()

    await hosts.start("127.0.0.2")  # fixes the port
    busy = await loop.create_server(Busy, "127.0.0.5", hosts.port)
    hosts.servers.append(busy)
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["127.0.0.5"]},
        }
    )
    [response] = await make_transport().send(envelope("bob@example.test"))
    assert response.code == 421
    assert response.verdict().cls is ReplyClass.THROTTLED


async def test_recipients_of_two_domains_go_to_their_own_mx_hosts_in_order(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    one = await hosts.start("127.0.0.2")
    two = await hosts.start("127.0.0.3")
    one.rcpt["gone@one.test"] = "550 5.1.1 <gone@one.test>: user unknown"
    dns_server.zone.update(
        {
            "one.test": {"MX": [(10, "mx.one.test")]},
            "two.test": {"MX": [(10, "mx.two.test")]},
            "mx.one.test": {"A": ["127.0.0.2"]},
            "mx.two.test": {"A": ["127.0.0.3"]},
        }
    )
    responses = await make_transport().send(
        envelope("a@one.test", "b@two.test", "gone@one.test", "c@two.test")
    )
    assert classes(responses) == [
        ReplyClass.DELIVERED,
        ReplyClass.DELIVERED,
        ReplyClass.HARD_BOUNCE,
        ReplyClass.DELIVERED,
    ]
    assert [r.relay.split("//")[1].split(":")[0] for r in responses] == [
        "mx.one.test",
        "mx.two.test",
        "mx.one.test",
        "mx.two.test",
    ]
    assert [r.rcpt_tos for r in one.received] == [["a@one.test"]]
    assert [r.rcpt_tos for r in two.received] == [["b@two.test", "c@two.test"]]


async def test_connections_are_reused_per_mx_host_across_messages_and_domains(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.2")
    dns_server.zone.update(
        {
            "one.test": {"MX": [(10, "mx.shared.test")]},
            "two.test": {"MX": [(10, "mx.shared.test")]},
            "mx.shared.test": {"A": ["127.0.0.2"]},
        }
    )
    transport = make_transport()
    for recipient in ("a@one.test", "b@one.test", "c@two.test"):
        assert classes(await transport.send(envelope(recipient))) == [ReplyClass.DELIVERED]
    assert len(server.received) == 3
    assert server.connections == 1


async def test_each_domain_keeps_its_messages_per_connection_on_a_shared_mx_host(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.2")
    dns_server.zone.update(
        {
            "strict.test": {"MX": [(10, "mx.shared.test")]},
            "loose.test": {"MX": [(10, "mx.shared.test")]},
            "mx.shared.test": {"A": ["127.0.0.2"]},
        }
    )
    transport = make_transport(
        limits={"strict.test": DestinationLimits(messages_per_connection=2)},
        messages_per_connection=100,  # [delivery]'s, for every other destination
    )

    async def send(recipient: str, count: int) -> None:
        for _ in range(count):
            assert classes(await transport.send(envelope(recipient))) == [ReplyClass.DELIVERED]

    await send("a@strict.test", 5)
    assert server.connections == 3  # 2 + 2 + 1
    await send("b@loose.test", 4)  # goes on over the connection strict.test left open
    assert server.connections == 3
    await send("a@strict.test", 1)  # that connection has carried 5: too many for strict.test
    assert server.connections == 4
    await send("b@loose.test", 1)
    assert server.connections == 4
    assert len(server.received) == 11


async def test_a_providers_messages_per_connection_applies_to_domains_behind_its_mx(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.2")
    dns_server.zone.update(
        {
            "corp.test": {"MX": [(10, "mx1.acme-mail.test")]},
            "mx1.acme-mail.test": {"A": ["127.0.0.2"]},
        }
    )
    acme = DestinationLimits(mx_suffixes=("acme-mail.test",), messages_per_connection=1)
    transport = make_transport(
        destinations=DestinationMap(merge_providers({"acme": acme})), limits={"acme": acme}
    )
    for recipient in ("a@corp.test", "b@corp.test", "c@corp.test"):
        assert classes(await transport.send(envelope(recipient))) == [ReplyClass.DELIVERED]
    assert server.connections == 3


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def one_mx(dns_server: DNSServer) -> None:
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
        }
    )


@pytest.mark.usefixtures("one_mx")
async def test_starttls_is_used_without_verifying_the_certificate_by_default(
    hosts: MXHosts, make_transport: Transports, ca: trustme.CA
) -> None:
    server = await hosts.start("127.0.0.2", tls=server_tls(ca, "mx1.example.test"))
    assert classes(await make_transport().send(envelope("bob@example.test"))) == [
        ReplyClass.DELIVERED
    ]
    assert server.tls == [True]


@pytest.mark.usefixtures("one_mx")
async def test_required_tls_refuses_an_untrusted_certificate(
    hosts: MXHosts, make_transport: Transports, ca: trustme.CA
) -> None:
    server = await hosts.start("127.0.0.2", tls=server_tls(ca, "mx1.example.test"))
    transport = make_transport(require_tls={"example.test"})  # the system CAs: not trustme's
    [response] = await transport.send(envelope("bob@example.test"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "TLS is required" in response.text
    assert server.received == []


@pytest.mark.usefixtures("one_mx")
async def test_required_tls_refuses_a_certificate_for_another_name(
    hosts: MXHosts, make_transport: Transports, ca: trustme.CA, tmp_path: Path
) -> None:
    server = await hosts.start("127.0.0.2", tls=server_tls(ca, "other.example.test"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    transport = make_transport(require_tls={"example.test"}, tls_ca=str(tmp_path / "ca.pem"))
    [response] = await transport.send(envelope("bob@example.test"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert server.received == []


@pytest.mark.usefixtures("one_mx")
async def test_required_tls_delivers_over_a_verified_certificate(
    hosts: MXHosts, make_transport: Transports, ca: trustme.CA, tmp_path: Path
) -> None:
    server = await hosts.start("127.0.0.2", tls=server_tls(ca, "mx1.example.test"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    transport = make_transport(require_tls={".test"}, tls_ca=str(tmp_path / "ca.pem"))
    assert classes(await transport.send(envelope("bob@example.test"))) == [ReplyClass.DELIVERED]
    assert server.tls == [True]


@pytest.mark.usefixtures("one_mx")
async def test_required_tls_refuses_a_server_without_starttls(
    hosts: MXHosts, make_transport: Transports
) -> None:
    server = await hosts.start("127.0.0.2")
    [response] = await make_transport(require_tls={"*"}).send(envelope("bob@example.test"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "does not offer STARTTLS" in response.text
    assert server.received == []


@pytest.mark.usefixtures("one_mx")
async def test_a_failed_opportunistic_handshake_is_retried_in_clear_text(
    hosts: MXHosts, make_transport: Transports, ca: trustme.CA
) -> None:
    context = server_tls(ca, "mx1.example.test")
    context.verify_mode = ssl.CERT_REQUIRED  # asks for a client certificate we do not have
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # so the handshake itself fails
    server = await hosts.start("127.0.0.2", tls=context)
    assert classes(await make_transport().send(envelope("bob@example.test"))) == [
        ReplyClass.DELIVERED
    ]
    assert server.tls == [False]
    assert server.connections == 2


# -- destinations -----------------------------------------------------------------------------


async def test_mx_destination_names_the_provider_or_the_shared_mx_host(
    make_transport: Transports, dns_server: DNSServer
) -> None:
    dns_server.zone.update(
        {
            "corp.test": {"MX": [(1, "aspmx.l.google.com"), (5, "alt1.aspmx.l.google.com")]},
            "small.test": {"MX": [(20, "mx2.hoster.test"), (10, "mx1.hoster.test")]},
            "other.test": {"MX": [(10, "mx1.hoster.test")]},
            "plain.test": {"A": ["127.0.0.2"]},
        }
    )
    transport = make_transport()
    destination: Callable[[str], Awaitable[str]] = transport.mx_destination
    assert await destination("gmail.com") == "google"  # known without DNS
    assert await destination("corp.test") == "google"
    assert await destination("small.test") == await destination("other.test") == "mx1.hoster.test"
    assert await destination("plain.test") == "plain.test"
    assert await destination("example.invalid") == "example.invalid"
    assert ("gmail.com", "MX") not in dns_server.queries


async def test_the_dns_server_answers_over_tcp_too(dns_server: DNSServer) -> None:
    dns_server.zone["example.test"] = {"MX": [(10, "mx1.example.test")]}
    query = dns.message.make_query("example.test", "MX")
    answer = await dns.asyncquery.tcp(query, "127.0.0.1", port=dns_server.port, timeout=2)
    assert [str(record) for record in answer.answer[0]] == ["10 mx1.example.test."]


async def test_idle_connections_and_unused_pools_are_swept(
    hosts: MXHosts,
    dns_server: DNSServer,
    make_transport: Transports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await hosts.start("127.0.0.2")
    dns_server.zone.update(
        {"one.test": {"MX": [(10, "mx.one.test")]}, "mx.one.test": {"A": ["127.0.0.2"]}}
    )
    transport = make_transport()
    await transport.send(envelope("a@one.test"))
    assert transport.pooled_hosts == ["mx.one.test"]
    monkeypatch.setattr("postlane.transports.mx.SWEEP_INTERVAL", 0.0)
    monkeypatch.setattr("postlane.transports.smtp.IDLE_TIMEOUT", 0.0)
    dns_server.zone["two.test"] = {"MX": [(10, "mx.one.test")]}
    # the next send sweeps first: the idle connection is past its time, its pool is dropped,
    # and a fresh pool (and connection) serves the message
    assert classes(await transport.send(envelope("b@two.test"))) == [ReplyClass.DELIVERED]
    assert server.connections == 2


async def test_the_queue_gives_domains_on_the_same_mx_hosts_one_destination(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """What the queue stores at enqueue (and throttles by): a provider found by its MX hosts,
    else the primary MX host, so two domains hosted on one server share its rate, cap and
    pause; else the domain."""
    dns_server.zone.update(
        {
            "shop-a.example": {"MX": [(10, "mx1.hoster.test"), (20, "mx2.hoster.test")]},
            "shop-b.example": {"MX": [(5, "MX1.hoster.test.")]},
            "corp.example": {"MX": [(1, "aspmx.l.google.com")]},
            "bare.test": {"A": ["127.0.0.9"]},
            "null.test": {"MX": [(0, ".")]},
            "broken.test": SERVFAIL,
        }
    )
    destinations = DestinationMap(mx_lookup=True, resolver=dns_server.resolver())
    domains = ["shop-a.example", "shop-b.example", "corp.example", "bare.test", "null.test"]
    found = await destinations.resolve([*domains, "broken.test", "missing.test", "gmail.com"])
    assert found == {
        "shop-a.example": "mx1.hoster.test",
        "shop-b.example": "mx1.hoster.test",  # same server: same destination
        "corp.example": "google",
        "bare.test": "bare.test",
        "null.test": "null.test",
        "broken.test": "broken.test",
        "missing.test": "missing.test",
        "gmail.com": "google",  # from the table, no lookup
    }
    assert ("gmail.com", "MX") not in dns_server.queries

    from postlane.app import AsyncPostlane
    from tests.conftest import make_config

    config = make_config(tmp_path, delivery={"relay": "mx"})
    async with AsyncPostlane(config) as app:
        app.destinations = destinations
        sent = await app.send(
            sender="a@x.example",
            to=["u@shop-a.example", "v@shop-b.example", "w@corp.example"],
            text="x",
        )
        view = await app.get(sent.id)
        assert [r.destination for r in view.recipients] == [
            "mx1.hoster.test",
            "mx1.hoster.test",
            "google",
        ]


async def test_an_address_literal_is_delivered_to_its_address_without_dns(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    """RFC 5321 5.1: a literal names the host; no MX (nor A) is looked up for it."""
    server = await hosts.start("127.0.0.2")
    responses = await make_transport().send(envelope('"john doe"@[127.0.0.2]', "ann@[127.0.0.2]"))
    assert classes(responses) == [ReplyClass.DELIVERED] * 2
    assert [r.rcpt_tos for r in server.received] == [['"john doe"@[127.0.0.2]', "ann@[127.0.0.2]"]]
    assert dns_server.queries == []


async def test_an_ipv6_address_literal_is_delivered_to_its_address_without_dns(
    hosts: MXHosts, dns_server: DNSServer, make_transport: Transports
) -> None:
    server = await hosts.start("::1")
    [response] = await make_transport().send(envelope("ann@[IPv6:::1]"))
    assert response.verdict().cls is ReplyClass.DELIVERED
    assert [r.rcpt_tos for r in server.received] == [["ann@[IPv6:::1]"]]
    assert dns_server.queries == []
