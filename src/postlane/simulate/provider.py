"""The provider's SMTP server: aiosmtpd, with a handler that plays the scenario.

:class:`ProviderSMTP` is one connection (aiosmtpd's server, with the scenario's connect
behaviour and the provider's wording); :class:`Provider` is the handler every connection shares:
it decides each reply from the scenario's rules, throttle and delays, with one
``random.Random(seed)`` (the same seed and the same client traffic give the same answers), and
counts what it answers in :class:`~postlane.simulate.report.ReportCounts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import Envelope, Session

from postlane.clock import Clock
from postlane.ingest.smtpd import FastSMTP
from postlane.simulate.feedback import Arrival, LateReport, LateReports
from postlane.simulate.replies import Reply
from postlane.simulate.report import ReportCounts
from postlane.simulate.scenario import Delay, Rule, Scenario, Stage, TLSMode

#: per-key throttle buckets kept before full ones are forgotten
_MAX_BUCKETS = 100_000


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.burst, now))
        if now > at:
            tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


class Transaction(Envelope):
    """aiosmtpd's envelope, with what the scenario decided for this transaction."""

    def __init__(self) -> None:
        super().__init__()
        #: the first data-stage rule a recipient matched: it decides the end of DATA
        self.data_rule: Rule | None = None
        #: recipients accepted with a report to come (stage "later"), and their rules
        self.later: list[tuple[str, Rule]] = []
        self.throttle_checked = False
        self.throttled = False


class ProviderSMTP(FastSMTP):
    """aiosmtpd's server with the scenario's connect behaviour, its wording for aiosmtpd's own
    refusals, and RFC 5321's "421 closes the channel", which real providers follow."""

    def __init__(self, provider: Provider, session_id: str, **kwargs: Any) -> None:
        super().__init__(provider, **kwargs)
        self.provider = provider
        self.session_id = session_id
        self.client_ip = ""

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call, after STARTTLS
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
            self.provider.session_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.provider.session_closed(self)

    async def _handle_client(self) -> None:
        refusal = await self.provider.greet(self)
        if refusal is None:
            await super()._handle_client()
        elif refusal and not refusal.startswith("421"):
            await self._repeat_until_quit(refusal)

    async def _repeat_until_quit(self, refusal: str) -> None:
        """RFC 5321 3.1: after a 554 greeting the server answers every command but QUIT with
        the refusal, and waits for QUIT."""
        for _ in range(100):
            try:
                line = await self._reader.readuntil()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                break
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 Bye")
                break
            await self.push(refusal)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the scenario closed the connection: nothing more is said
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        text = self.provider.own_wording(self, text)
        await super().push(text)
        if text.startswith("421"):
            transport = self.transport
            if transport is not None:
                transport.close()

    def refuse_at_once(self) -> None:
        """Close with a TCP reset, before any greeting: the client sees a refused connection."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()


#: aiosmtpd's own replies that a provider words differently, and the stage they answer
_AIOSMTPD_TOO_LARGE = {
    "552 Error: message size exceeds fixed maximum message size": Stage.MAIL,
    "552 Error: Too much mail data": Stage.DATA,
}


@dataclass(eq=False)
class Provider:
    """The aiosmtpd handler: plays the scenario, counts what it answers."""

    scenario: Scenario
    rng: random.Random
    clock: Clock
    stats: ReportCounts
    _: KW_ONLY
    store_dir: Path | None
    max_messages: int | None
    on_limit: Callable[[], None]
    #: where the reports of stage "later" rules are scheduled
    late: LateReports

    def __post_init__(self) -> None:
        scenario = self.scenario
        self.delays = scenario.delays
        throttle = scenario.throttle
        self.throttle = throttle
        self.buckets = TokenBuckets(throttle.rate, throttle.burst) if throttle else None
        self.mail_rules = tuple(rule for rule in scenario.rules if rule.stage is Stage.MAIL)
        self.rcpt_rules = tuple(rule for rule in scenario.rules if rule.stage is not Stage.MAIL)
        self.sessions: set[ProviderSMTP] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._stored = 0

    # -- sessions

    def session_opened(self, server: ProviderSMTP) -> None:
        self.sessions.add(server)
        self.idle.clear()

    def session_closed(self, server: ProviderSMTP) -> None:
        self.sessions.discard(server)
        if not self.sessions:
            self.idle.set()

    # -- chance, time and wording

    def chance(self, probability: float) -> bool:
        return probability >= 1.0 or (probability > 0.0 and self.rng.random() < probability)

    def pick(self, replies: tuple[Reply, ...]) -> Reply:
        return replies[0] if len(replies) == 1 else self.rng.choice(replies)

    def over_client_rate(self, stage: Stage, server: ProviderSMTP) -> Reply | None:
        """The throttle's reply if it applies at ``stage`` and this client is over its rate (a
        token is taken per message), else None. RCPT throttling, also per recipient, is
        handle_RCPT's own."""
        throttle, buckets = self.throttle, self.buckets
        if (
            throttle is not None
            and buckets is not None
            and throttle.stage is stage
            and not buckets.take(server.client_ip, self.clock.now())
        ):
            return self.pick(throttle.replies)
        return None

    def draw(self, delay: Delay | None) -> float:
        """Seconds of ``delay``: its value, or a pick in its range."""
        if delay is None:
            return 0.0
        low, high = delay
        return low if low == high else self.rng.uniform(low, high)

    async def pause(self, delay: Delay | None) -> None:
        if delay is not None:
            await self.clock.sleep(self.draw(delay))

    def render(
        self, reply: Reply, server: ProviderSMTP, envelope: Envelope | None, address: str
    ) -> str:
        if not reply.templated:
            return reply.template
        sender = str(envelope.mail_from or "") if envelope is not None else ""
        local, domain = _split(address)
        return reply.render(
            {
                "id": server.session_id,
                "queue_id": f"{self.stats.messages + 1:010X}",
                "ip": server.client_ip,
                "hostname": self.scenario.hostname,
                "sender": sender,
                "sender_domain": sender.rpartition("@")[2],
                "address": address,
                "local": local,
                "domain": domain,
                "time": str(int(self.clock.now())),
            }
        )

    def say(
        self,
        stage: Stage,
        reply: Reply,
        server: ProviderSMTP,
        envelope: Envelope | None,
        address: str = "",
    ) -> str:
        text = self.render(reply, server, envelope, address)
        self.stats.count_reply(stage, reply, text)
        return text

    def drop(self, stage: Stage, server: ProviderSMTP) -> str:
        self.stats.count_no_reply(stage)
        if server.transport is not None:
            server.transport.close()
        return "451 4.3.0 never sent: the connection is closed"

    def own_wording(self, server: ProviderSMTP, text: str) -> str:
        """aiosmtpd's size refusals, in the scenario's wording."""
        stage = _AIOSMTPD_TOO_LARGE.get(text)
        if stage is None:
            return text
        envelope = server.envelope
        recipients = list(envelope.rcpt_tos) if envelope is not None else []
        if stage is Stage.DATA:
            self.stats.refuse(recipients)
        first = recipients[0] if recipients else ""
        return self.say(stage, self.pick(self.scenario.replies.too_large), server, envelope, first)

    # -- the dialogue

    async def greet(self, server: ProviderSMTP) -> str | None:
        """Before the greeting: None to greet; else the reply sent instead of the greeting (a
        421 closes the connection, anything else is repeated until QUIT), or "" if the
        connection was closed without a word."""
        connect = self.scenario.connect
        await self.pause(self.delays.greeting)
        if self.chance(connect.refuse):
            self.stats.count_no_reply(Stage.CONNECT)
            server.refuse_at_once()
            return ""
        if connect.replies and self.chance(connect.probability):
            text = self.say(Stage.CONNECT, self.pick(connect.replies), server, None)
            await server.push(text)
            return text
        return None

    async def handle_HELO(
        self, server: ProviderSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        await self.pause(self.delays.ehlo)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        await self.pause(self.delays.ehlo)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Transaction,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self.pause(self.delays.mail)
        scenario = self.scenario
        if scenario.tls is TLSMode.REQUIRED and session.ssl is None:
            return self.say(Stage.MAIL, self.pick(scenario.replies.tls_required), server, envelope)
        refusal = self.over_client_rate(Stage.MAIL, server)
        if refusal is not None:
            return self.say(Stage.MAIL, refusal, server, envelope)
        accept = scenario.replies.mail
        subject = ("", "", "", address)
        for rule in self.mail_rules:
            if rule.matches(subject) and self.chance(rule.probability):
                await self.pause(rule.delay)
                if rule.drop:
                    return self.drop(Stage.MAIL, server)
                if rule.replies:
                    reply = self.pick(rule.replies)
                    if reply.code >= 300:
                        return self.say(Stage.MAIL, reply, server, envelope)
                    accept = (reply,)
                break
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.say(Stage.MAIL, self.pick(accept), server, envelope)

    async def handle_RCPT(
        self,
        server: ProviderSMTP,
        session: Session,
        envelope: Transaction,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        throttle, buckets = self.throttle, self.buckets
        if throttle is not None and buckets is not None and throttle.stage is Stage.RCPT:
            if throttle.per == "recipient":
                throttled = not buckets.take(address.lower(), self.clock.now())
            else:
                # one token per message, taken at its first recipient
                if not envelope.throttle_checked:
                    envelope.throttle_checked = True
                    envelope.throttled = not buckets.take(server.client_ip, self.clock.now())
                throttled = envelope.throttled
            if throttled:
                await self.pause(self.delays.rcpt)
                self.stats.refuse((address,))
                return self.say(Stage.RCPT, self.pick(throttle.replies), server, envelope, address)

        subject = (address, *_split(address), str(envelope.mail_from or ""))
        rule = None
        for candidate in self.rcpt_rules:
            if candidate.matches(subject) and self.chance(candidate.probability):
                rule = candidate
                break
        delay = self.delays.rcpt
        if rule is not None and rule.stage is Stage.RCPT and rule.delay is not None:
            delay = rule.delay
        await self.pause(delay)

        accept = self.scenario.replies.rcpt
        if rule is not None:
            if rule.stage is Stage.DATA:
                if envelope.data_rule is None:
                    envelope.data_rule = rule
            elif rule.stage is Stage.LATER:
                envelope.later.append((address, rule))
            elif rule.drop:
                return self.drop(Stage.RCPT, server)
            elif rule.replies:
                reply = self.pick(rule.replies)
                if reply.code >= 300:
                    self.stats.refuse((address,))
                    return self.say(Stage.RCPT, reply, server, envelope, address)
                accept = (reply,)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return self.say(Stage.RCPT, self.pick(accept), server, envelope, address)

    async def handle_DATA(
        self, server: ProviderSMTP, session: Session, envelope: Transaction
    ) -> str:
        rule = envelope.data_rule
        delay = self.delays.data
        if rule is not None and rule.delay is not None:
            delay = rule.delay
        await self.pause(delay)
        recipients: list[str] = list(envelope.rcpt_tos)
        first = recipients[0]
        refusal = self.over_client_rate(Stage.DATA, server)
        if refusal is not None:
            self.stats.refuse(recipients)
            return self.say(Stage.DATA, refusal, server, envelope, first)
        accept = self.scenario.replies.data
        if rule is not None:
            if rule.drop:
                return self.drop(Stage.DATA, server)
            if rule.replies:
                reply = self.pick(rule.replies)
                if reply.code >= 300:
                    self.stats.refuse(recipients)
                    return self.say(Stage.DATA, reply, server, envelope, first)
                accept = (reply,)
        content = envelope.original_content or b""
        if self.store_dir is not None:
            self._stored += 1
            path = self.store_dir / f"{self._stored:08d}.eml"
            sender = str(envelope.mail_from or "")
            try:
                await asyncio.to_thread(_write_eml, path, sender, recipients, content)
            except OSError as exc:
                reply = Reply.parse(f"451 4.3.0 cannot store the message ({exc.strerror})")
                return self.say(Stage.DATA, reply, server, envelope, first)
        text = self.say(Stage.DATA, self.pick(accept), server, envelope, first)
        if envelope.later:
            self.report_later(server, session, envelope, content)
        self.stats.accept(recipients, content)
        if self.max_messages is not None and self.stats.messages >= self.max_messages:
            self.on_limit()
        return text

    def report_later(
        self, server: ProviderSMTP, session: Session, envelope: Transaction, content: bytes
    ) -> None:
        """Schedule the reports of the accepted message's stage "later" recipients: one DSN
        per rule (its recipients together, each with its reply), one complaint per recipient."""
        sender = str(envelope.mail_from or "")
        arrival = Arrival(
            return_path="" if sender == "<>" else sender,  # aiosmtpd's null sender is "<>"
            content=content,
            client_ip=server.client_ip,
            helo=str(session.host_name or ""),
            at=self.clock.now(),
            queue_id=f"{self.stats.messages + 1:010X}",
        )
        groups: list[tuple[Rule, list[str]]] = []
        for address, rule in envelope.later:
            for known, addresses in groups:
                if known is rule:
                    addresses.append(address)
                    break
            else:
                groups.append((rule, [address]))
        for rule, addresses in groups:
            delay = self.draw(rule.delay)
            if rule.complaint:
                for address in addresses:
                    self.late.schedule(LateReport.complaint(arrival, address), delay)
            else:
                replies = [
                    self.render(self.pick(rule.replies), server, envelope, address)
                    for address in addresses
                ]
                self.late.schedule(LateReport.dsn(arrival, addresses, replies), delay)


def _split(address: str) -> tuple[str, str]:
    """(local part, domain) of a recipient; an address without ``@`` is all local part."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def _write_eml(path: Path, sender: str, recipients: Sequence[str], content: bytes) -> None:
    envelope = f"Return-Path: <{sender}>\r\nX-Envelope-To: {', '.join(recipients)}\r\n"
    path.write_bytes(envelope.encode("utf-8", "surrogateescape") + content)
