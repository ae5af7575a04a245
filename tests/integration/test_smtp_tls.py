"""STARTTLS, certificate verification and AUTH against a real TLS-speaking aiosmtpd (trustme
certificates): credentials never cross in clear."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, LoginPassword

from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig
from postlane.transports.base import Envelope
from postlane.transports.smtp import RelaySettings, SMTPRelayTransport
from tests.conftest import ScriptedHandler


@dataclass
class TLSPeer:
    port: int
    handler: ScriptedHandler
    ca_file: Path
    auth_attempts: list[tuple[str, str, bool]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def start_peer(tmp_path: Path, ca: trustme.CA, *, offer_tls: bool) -> tuple[Any, TLSPeer]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = ScriptedHandler()
    attempts: list[tuple[str, str, bool]] = []

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        ok = (data.login, data.password) == (b"app", b"s3cret")
        attempts.append(
            (data.login.decode(), data.password.decode(), server._tls_protocol is not None)
        )
        return AuthResult(success=ok, handled=False)

    loop = asyncio.get_running_loop()

    def factory() -> SMTPServer:
        return SMTPServer(
            handler,
            hostname="tls.test",
            tls_context=context if offer_tls else None,
            require_starttls=offer_tls,
            authenticator=authenticator,
            auth_require_tls=False,  # a bad server that would take AUTH in clear: we must not
            loop=loop,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, TLSPeer(port, handler, ca_file, attempts)


@pytest.fixture
async def tls_peer(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[TLSPeer]:
    server, peer = await start_peer(tmp_path, ca, offer_tls=True)
    yield peer
    server.close()
    await server.wait_closed()


@pytest.fixture
async def plain_peer(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[TLSPeer]:
    server, peer = await start_peer(tmp_path, ca, offer_tls=False)
    yield peer
    server.close()
    await server.wait_closed()


def transport(url: str, **settings: Any) -> SMTPRelayTransport:
    delivery = DeliveryConfig(**{"connect_timeout": 3.0, "command_timeout": 3.0, **settings})
    return SMTPRelayTransport(RelaySettings.from_url(url, delivery))


ENVELOPE = Envelope(
    "q1", "app@example.com", ("ada@example.net",), b"Subject: hi\r\n\r\nbody\r\n", "<q1@x>"
)


async def test_starttls_is_used_when_offered_and_certificates_verified(tls_peer: TLSPeer) -> None:
    t = transport(f"smtp://127.0.0.1:{tls_peer.port}", tls_ca=str(tls_peer.ca_file))
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.code == 250, response.text
    assert len(tls_peer.handler.received) == 1


async def test_an_untrusted_certificate_is_a_connection_failure(tls_peer: TLSPeer) -> None:
    t = transport(f"smtp://127.0.0.1:{tls_peer.port}")  # system CAs do not know trustme's CA
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "certificate" in response.text.lower() or "tls" in response.text.lower()
    assert tls_peer.handler.received == []


async def test_verification_can_be_turned_off(tls_peer: TLSPeer) -> None:
    t = transport(f"smtp://127.0.0.1:{tls_peer.port}", tls_verify=False)
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.code == 250


async def test_auth_happens_only_inside_tls(tls_peer: TLSPeer) -> None:
    t = transport(f"smtp://app:s3cret@127.0.0.1:{tls_peer.port}", tls_ca=str(tls_peer.ca_file))
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.code == 250
    assert tls_peer.auth_attempts == [("app", "s3cret", True)]


async def test_issue_17_4_credentials_are_never_sent_in_clear(plain_peer: TLSPeer) -> None:
    t = transport(f"smtp://app:s3cret@127.0.0.1:{plain_peer.port}")
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert plain_peer.auth_attempts == []  # the server never saw a password
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "in clear" in response.text
    assert response.misconfigured is not None and "TLS its AUTH needs" in response.misconfigured
    assert plain_peer.handler.received == []


async def test_issue_17_4_wrong_credentials_are_a_relay_problem_not_a_dead_letter(
    tls_peer: TLSPeer,
) -> None:
    t = transport(f"smtp://app:wrong@127.0.0.1:{tls_peer.port}", tls_ca=str(tls_peer.ca_file))
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "authentication failed" in response.text
    assert "wrong" not in response.text
    assert response.misconfigured is not None and "credentials" in response.misconfigured


async def test_password_in_config_is_used_when_url_has_none(tls_peer: TLSPeer) -> None:
    t = transport(
        f"smtp://127.0.0.1:{tls_peer.port}",
        tls_ca=str(tls_peer.ca_file),
        username="app",
        password="s3cret",
    )
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
    assert response.code == 250


async def test_implicit_tls_smtps(tmp_path: Path, ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="tls.test", loop=loop), "127.0.0.1", 0, ssl=context
    )
    port = server.sockets[0].getsockname()[1]
    t = transport(f"smtps://127.0.0.1:{port}", tls_ca=str(ca_file))
    try:
        [response] = await t.send(ENVELOPE)
    finally:
        await t.close()
        server.close()
        await server.wait_closed()
    assert response.code == 250
    assert len(handler.received) == 1


async def test_issue_17_4_a_relay_refusing_our_credentials_holds_its_mail_and_says_why(
    tls_peer: TLSPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17.4: a relay that can never work (wrong credentials) was classed `connection`
    and retried quietly for two days, the log saying only class=connection code=-. Now it is
    paused at once with the reason, its mail waits using no attempt, the log line and a metric
    say why, and an alert fires."""
    from postlane.alerts import AlertMonitor
    from postlane.app import AsyncPostlane
    from postlane.clock import FakeClock
    from postlane.message import RecipientState
    from postlane.metrics import Metrics
    from postlane.transports import transport_for
    from postlane.worker import Worker
    from tests.conftest import make_config

    clock = FakeClock()
    relay = f"smtp://app:wrong@127.0.0.1:{tls_peer.port}"
    config = make_config(tmp_path, delivery={"relay": relay, "tls_ca": str(tls_peer.ca_file)})
    caplog.set_level(logging.INFO)
    async with AsyncPostlane(config, clock=clock) as app:
        metrics = Metrics(app)
        worker = Worker.from_config(
            config, app.store, transport_for(config), clock=clock, observer=metrics
        )
        try:
            ids = [(await app.send(sender="app@example.com", to=[f"u{n}@example.net"],
                                   text="x")).id for n in range(3)]  # fmt: skip
            await worker.run_until_idle()
            views = [await app.get(queue_id) for queue_id in ids]
            assert all(v.recipients[0].state is RecipientState.DEFERRED for v in views)
            assert all(v.recipients[0].attempts == 0 for v in views)  # no attempt used
            tried = len(tls_peer.auth_attempts)  # what was already in flight, and no more:
            later = await app.send(sender="app@example.com", to=["v@example.net"], text="y")
            await worker.run_until_idle()
            assert len(tls_peer.auth_attempts) == tried  # held: nothing tried while paused
            # while the relay is paused nothing is even claimed: the new mail waits, and is
            # shown waiting for the pause's end (not due at once, as its row still says)
            waiting = (await app.get(later.id)).recipients[0]
            [relay_state] = [d for d in (await app.stats()).destinations
                             if d.destination == "relay"]  # fmt: skip
            assert relay_state.paused_until is not None
            assert (waiting.state, waiting.attempts, waiting.next_attempt_at) == (
                RecipientState.DEFERRED, 0, relay_state.paused_until,
            )  # fmt: skip
            assert waiting.reason == "destination relay is paused"
            assert (relay_state.reason or "").startswith("misconfigured: the relay refused")
            line = next(r.getMessage() for r in caplog.records if r.name == "postlane.attempts")
            assert 'misconfigured="the relay refused the configured credentials (535)' in line
            exposed = (await metrics.exposition()).decode()
            assert 'postlane_destination_misconfigured{destination="relay"} 1.0' in exposed
            monitor = AlertMonitor.from_config(app, config)
            firing = [a for a in await monitor.run_once(clock.now()) if a.firing]
            assert "PostlaneRelayMisconfigured" in {a.rule.name for a in firing}
        finally:
            await worker.transport.close()
