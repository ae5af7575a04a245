"""The bounce listener: inbound SMTP for the bounce domain only, where DSNs, complaints and
plain-text bounces addressed to VERP return paths arrive (``[bounces] listen``; ``serve``
starts it).

Who may send what
    Any client, any envelope sender, the null sender ``<>`` included (what DSNs use): the
    security is in the recipient. RCPT TO is accepted only at the bounce domain and only for
    a valid VERP token (or ``postmaster``, which RFC 5321 requires, or a local part listed in
    ``report_addresses``, a feedback loop's fixed address); everything else is refused at
    RCPT with ``550 5.1.1``, so the listener never relays, never accepts mail it would have
    to bounce (no backscatter), and a forged token gets nowhere near the store.
Limits
    ``SIZE`` is announced; a message over ``max_size`` (25 MB by default: a bounce returning a
    large attachment is handled) is read to its end, as RFC 5321 asks, and refused with 552.
    Of a message within the limit at most ``keep`` bytes are held in memory and parsed (every
    report puts its report before the returned message); an idle client is dropped after
    ``timeout``, and one saying only NOOP, RSET and the like after 100 of them; at most
    ``max_connections`` clients at once and ``max_connections_per_address`` from one address
    (an IPv6 /64), the next is told 421.
Durability
    Each message is processed by :class:`postlane.feedback.inbound.BounceProcessor` and
    answered 250 only once its feedback is recorded or the message is kept unmatched. A
    store that cannot take it, or a report about a delivery still being sent, gets 451: the
    bouncing MTA keeps the message and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from postlane.feedback.inbound import BounceProcessor, InboundResult
from postlane.feedback.reports import PARSE_LIMIT
from postlane.ingest.smtp_listener import OpenConnections
from postlane.ingest.smtp_protocol import Envelope, ServerSettings, Session, SmtpConnection
from postlane.waits import MailFirst

__all__ = [
    "BounceHandler",
    "BounceListenerSettings",
    "BounceObserver",
    "start_bounce_listener",
]

log = logging.getLogger("postlane.bounces")

MB = 1024 * 1024
#: while the worker delivers, reports start in this share of every quarter second
MAIL_FIRST_SHARE = 0.1


@dataclass(frozen=True)
class BounceListenerSettings:
    """How the bounce listener listens (the ``[bounces]`` table's listener keys)."""

    listen: str = "127.0.0.1:2526"
    #: a bigger message is refused with 552 (after being read to its end)
    max_size: int = 25 * MB
    #: the most of one message held in memory and parsed
    keep: int = PARSE_LIMIT
    max_connections: int = 100
    #: seconds a client may stay idle (and the longest one DATA, reading and recording, may take)
    timeout: float = 300.0
    #: recipients of one transaction (a DSN has one: its return path)
    max_recipients: int = 20
    #: the name in the greeting (default: this host's name)
    hostname: str | None = None
    #: local parts at the bounce domain accepted without a token, e.g. ("fbl",) for the
    #: address a feedback loop was registered with (its reports are matched by the original's
    #: return path instead)
    report_addresses: tuple[str, ...] = ()
    #: clients connected at once from one address (an IPv6 /64)
    max_connections_per_address: int = 10


class BounceObserver(Protocol):
    """What the listener tells whoever counts (the metrics)."""

    def report(self, result: InboundResult) -> None:
        """A message was processed (recorded, kept unmatched, or left pending)."""
        ...

    def refused(self, reason: str) -> None:
        """Something was refused: ``recipient`` (no valid token: a forgery or a stray),
        ``size``, ``connections`` (over the cap), ``store`` (could not record: 451)."""
        ...


class _NoObserver:
    def report(self, result: InboundResult) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None


class BounceHandler:
    """What the bounce listener decides (its
    :class:`~postlane.ingest.smtp_protocol.SmtpHandler`): which recipients are accepted, and the
    durable processing. It is also the listener's gate: the connection cap."""

    def __init__(
        self,
        processor: BounceProcessor,
        settings: BounceListenerSettings,
        observer: BounceObserver | None = None,
        mail_first: MailFirst | None = None,
    ) -> None:
        self.processor = processor
        #: while the worker beside it delivers, reports wait their turn, one at a time
        self.mail_first = mail_first
        self._one_at_a_time = asyncio.Lock()
        self.settings = settings
        self.observer: BounceObserver = observer or _NoObserver()
        self.domain = processor.return_paths.domain
        self.report_addresses = frozenset(a.lower() for a in settings.report_addresses)
        #: clients connected now (the caps count them), closed when the listener stops
        self.sessions = OpenConnections()
        self.processed = 0
        self.closing = False

    def admit(self, connection: SmtpConnection, host: str) -> str | None:
        if len(self.sessions) >= self.settings.max_connections:
            self.observer.refused("connections")
            return "421 4.7.0 Too many connections, try again later"
        if self.sessions.from_address(host) >= self.settings.max_connections_per_address:
            self.observer.refused("connections")
            return "421 4.7.0 Too many connections from your address, try again later"
        self.sessions.add(connection, host)
        return None

    def release(self, connection: SmtpConnection, host: str) -> None:
        self.sessions.discard(connection, host)

    def accepts(self, address: str) -> bool:
        """Whether mail for ``address`` is taken: at the bounce domain, with a valid token (or
        a configured report address)."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return False
        if local.lower() in self.report_addresses or local.lower() == "postmaster":
            return True  # postmaster: RFC 5321 4.5.1 (read as a report address is)
        return self.processor.return_paths.verify_token(local) is not None

    def mail(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        # any sender: DSNs come from <>, complaints from a feedback loop's address
        envelope.mail_from = address or ""
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    def rcpt(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not self.accepts(address):
            self.observer.refused("recipient")
            return "550 5.1.1 No such recipient here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def data(self, session: Session, envelope: Envelope) -> str:
        if self.mail_first is None or not self.mail_first.busy():
            return await self._process(envelope)
        # mail first: a report is not urgent, and its sender waits for the answer (so a
        # flood of them slows down with it) where a delivery would lose its pace
        async with self._one_at_a_time:
            await self.mail_first.turn(0.0)
            return await self._process(envelope)

    async def _process(self, envelope: Envelope) -> str:
        try:
            result = await self.processor.process(
                envelope.content, mail_from=envelope.mail_from, rcpt_to=list(envelope.rcpt_tos)
            )
        except Exception:  # the store could not take it: the sender keeps it and retries
            log.exception("a report could not be recorded; answered 451")
            self.observer.refused("store")
            return "451 4.3.0 Cannot record the report now, try again later"
        self.processed += 1
        self.observer.report(result)
        if result.pending:
            return "451 4.3.0 The delivery is still being sent, try again later"
        return f"250 2.0.0 OK: {_reply_text(result.summary())}"

    def too_big(self, session: Session) -> str:
        self.observer.refused("size")
        return "552 5.3.4 Message too big for this system"

    def failed(self, session: Session, error: Exception) -> str:
        log.error("bounce listener error", exc_info=error)
        return "451 4.3.0 Local error, try again later"

    def timed_out(self, session: Session, phase: str) -> None:
        log.info("bounce listener: %s sent nothing in time, closing", session.peer)
        return None  # closed without a word, as before


def _reply_text(text: str) -> str:
    """One printable line, short enough for an SMTP reply."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in text)[:200]


@contextlib.asynccontextmanager
async def start_bounce_listener(
    processor: BounceProcessor,
    settings: BounceListenerSettings | None = None,
    *,
    observer: BounceObserver | None = None,
    sock: socket.socket | None = None,
    mail_activity: Callable[[], int] | None = None,
) -> AsyncIterator[str]:
    """Listen for bounces at ``settings.listen`` (or on ``sock``, a socket already bound and
    listening, e.g. one shared by several processes) until the context exits; yields
    ``host:port``. ``processor`` carries the bounce domain and the store. ``mail_activity``
    (the worker's attempt counter): while it moves, reports are read and recorded one at a
    time in a tenth of each quarter second (:class:`~postlane.waits.MailFirst`), so a flood
    of them does not slow delivery; they catch up when mail is quiet."""
    from postlane.ingest.server import bind

    settings = settings or BounceListenerSettings()
    mail_first = MailFirst(mail_activity, share=MAIL_FIRST_SHARE, max_lag=float("inf"))
    handler = BounceHandler(processor, settings, observer, mail_first)
    hostname = settings.hostname or socket.gethostname()
    if sock is None:
        sock = bind(settings.listen, "bounces.listen")
    loop = asyncio.get_running_loop()

    server_settings = ServerSettings(
        hostname=hostname,
        ident="postlane bounces",
        max_size=settings.max_size,
        keep=settings.keep,
        command_timeout=settings.timeout,
        data_timeout=settings.timeout,
        need_rcpt="503 5.5.1 Error: need RCPT command",
        data_syntax="501 5.5.4 Syntax: DATA",
    )

    def factory() -> SmtpConnection:
        return SmtpConnection(handler, handler, server_settings)

    server = await loop.create_server(factory, sock=sock)
    host, port = sock.getsockname()[:2]
    log.info("bounce listener on %s:%s for %s", host, port, processor.return_paths.domain)
    try:
        yield f"{host}:{port}"
    finally:
        server.close()
        handler.closing = True
        for session in handler.sessions:  # a stop does not wait for idle clients
            session.shut_down()
        await server.wait_closed()
        await processor.close()


def refused_reasons() -> Sequence[str]:
    """Every ``reason`` :meth:`BounceObserver.refused` is called with (metric labels)."""
    return ("recipient", "size", "connections", "store")
