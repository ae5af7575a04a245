"""The bounce listener: inbound SMTP for the bounce domain only, where DSNs, complaints and
plain-text bounces addressed to VERP return paths arrive (``[bounces] listen``; ``serve``
starts it).

Who may send what
    Any client, any envelope sender, the null sender ``<>`` included (what DSNs use): the
    security is in the recipient. RCPT TO is accepted only at the bounce domain and only for
    a valid VERP token (or a local part listed in ``report_addresses``, a feedback loop's
    fixed address); everything else is refused at RCPT with ``550 5.1.1``, so the listener
    never relays, never accepts mail it would have to bounce (no backscatter), and a forged
    token gets nowhere near the store.
Limits
    ``SIZE`` is announced; a message over ``max_size`` (25 MB by default: a bounce returning a
    large attachment is handled) is read to its end, as RFC 5321 asks, and refused with 552.
    Of a message within the limit at most ``keep`` bytes are held in memory and parsed (every
    report puts its report before the returned message); an idle client is dropped after
    ``timeout``; at most ``max_connections`` clients at once, the next is told 421.
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from postlane.feedback.inbound import BounceProcessor, InboundResult
from postlane.feedback.reports import PARSE_LIMIT
from postlane.ingest.smtpd import FastSMTP

__all__ = [
    "BounceHandler",
    "BounceListenerSettings",
    "BounceObserver",
    "BounceServer",
    "start_bounce_listener",
]

log = logging.getLogger("postlane.bounces")

MB = 1024 * 1024


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
    """aiosmtpd hooks: which recipients are accepted, and the durable processing."""

    def __init__(
        self,
        processor: BounceProcessor,
        settings: BounceListenerSettings,
        observer: BounceObserver | None = None,
    ) -> None:
        self.processor = processor
        self.settings = settings
        self.observer: BounceObserver = observer or _NoObserver()
        self.domain = processor.return_paths.domain
        self.report_addresses = frozenset(a.lower() for a in settings.report_addresses)
        #: clients connected now (the cap counts them), closed when the listener stops
        self.sessions: set[BounceServer] = set()
        self.processed = 0

    def __dir__(self) -> list[str]:
        # aiosmtpd scans the handler per connection for handle_* hooks
        return _HANDLER_NAMES

    def accepts(self, address: str) -> bool:
        """Whether mail for ``address`` is taken: at the bounce domain, with a valid token (or
        a configured report address)."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return False
        if local.lower() in self.report_addresses:
            return True
        return self.processor.return_paths.verify_token(local) is not None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # any sender: DSNs come from <>, complaints from a feedback loop's address
        envelope.mail_from = address or ""
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not self.accepts(address):
            self.observer.refused("recipient")
            return "550 5.1.1 No such recipient here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        if not isinstance(content, bytes):
            content = str(content or "").encode("utf-8", "surrogateescape")
        try:
            result = await self.processor.process(
                content, mail_from=envelope.mail_from, rcpt_to=list(envelope.rcpt_tos)
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

    async def handle_exception(self, error: Exception) -> str:
        log.exception("bounce listener error", exc_info=error)
        return "451 4.3.0 Local error, try again later"


_HANDLER_NAMES = sorted(name for name in dir(BounceHandler) if name.startswith("handle_"))


def _reply_text(text: str) -> str:
    """One printable line, short enough for an SMTP reply."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in text)[:200]


class BounceServer(FastSMTP):
    """aiosmtpd's SMTP (with :class:`FastSMTP`'s speed-ups) with a connection cap and a DATA
    that holds at most ``keep`` bytes of a message in memory."""

    def __init__(self, handler: BounceHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.bounce_handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.bounce_handler.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.bounce_handler.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        handler = self.bounce_handler
        if len(handler.sessions) > handler.settings.max_connections:
            handler.observer.refused("connections")
            await self.push("421 4.7.0 Too many connections, try again later")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        settings = self.bounce_handler.settings
        content = await _read_kept(self._reader, settings.max_size, settings.keep)
        if content is None:
            self.bounce_handler.observer.refused("size")
            await self.push("552 5.3.4 Message too big for this system")
            self.envelope = self._create_envelope()
            return
        envelope.content = envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push("250 OK" if status is MISSING else status)


async def _read_kept(reader: asyncio.StreamReader, max_size: int, keep: int) -> bytes | None:
    """A message's data up to the lone dot, unstuffed, of which only the first ``keep`` bytes
    are held; None if it is over ``max_size`` (read to its end all the same)."""
    chunks: list[bytes] = []
    kept = 0
    size = 0
    tail = b"\r\n"  # the last bytes read: is a ".\r\n" at the start of a line?
    while True:
        try:
            piece = await reader.readuntil(b".\r\n")
            ended = True
        except asyncio.LimitOverrunError as exc:
            # no ".\r\n" within the stream's limit: take what is there and read on
            piece = await reader.readexactly(exc.consumed)
            ended = False
        tail = piece[-5:] if len(piece) >= 5 else (tail + piece)[-5:]
        ended = ended and tail[-5:-3] == b"\r\n"
        size += len(piece)
        if kept < keep + 3:
            chunks.append(piece[: keep + 3 - kept])
            kept += len(chunks[-1])
        if ended:
            break
    if size - 3 > max_size:
        return None
    message = b"".join(chunks)
    if size <= keep + 3:
        message = message[:-3]  # the whole message: drop the ".\r\n" that ended it
    # RFC 5321 4.5.2: a line's leading dot was doubled by the client
    message = message.replace(b"\r\n.", b"\r\n")
    return message[1:] if message.startswith(b".") else message


@contextlib.asynccontextmanager
async def start_bounce_listener(
    processor: BounceProcessor,
    settings: BounceListenerSettings | None = None,
    *,
    observer: BounceObserver | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[str]:
    """Listen for bounces at ``settings.listen`` (or on ``sock``, a socket already bound and
    listening, e.g. one shared by several processes) until the context exits; yields
    ``host:port``. ``processor`` carries the bounce domain and the store."""
    from postlane.ingest.server import bind

    settings = settings or BounceListenerSettings()
    handler = BounceHandler(processor, settings, observer)
    hostname = settings.hostname or socket.gethostname()
    if sock is None:
        sock = bind(settings.listen, "bounces.listen")
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return BounceServer(
            handler,
            data_size_limit=settings.max_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="postlane bounces",
            timeout=settings.timeout,
            loop=loop,
        )

    server = await loop.create_server(factory, sock=sock)
    host, port = sock.getsockname()[:2]
    log.info("bounce listener on %s:%s for %s", host, port, processor.return_paths.domain)
    try:
        yield f"{host}:{port}"
    finally:
        server.close()
        for session in list(handler.sessions):  # a stop does not wait for idle clients
            if session.transport is not None:
                session.transport.close()
        await server.wait_closed()
        await processor.close()


def refused_reasons() -> Sequence[str]:
    """Every ``reason`` :meth:`BounceObserver.refused` is called with (metric labels)."""
    return ("recipient", "size", "connections", "store")
