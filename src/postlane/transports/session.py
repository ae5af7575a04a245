"""One SMTP session, as the relay transport (:mod:`.smtp`) and direct MX delivery (:mod:`.mx`)
open and use it; how many sessions are kept and for how long is theirs to say.

Opening (:func:`open_session`)
    aiosmtplib connects (TCP, or TLS from the first byte for ``smtps://``), sends EHLO (HELO to a
    server that does not speak ESMTP), then STARTTLS as the :class:`TLSPolicy` says, and AUTH,
    which is only ever sent inside TLS (credentials never cross in clear). Whatever goes wrong
    before a message is a fact about the server, never about a recipient, so it never
    dead-letters mail: it becomes a :class:`Refusal`, throttled when the refusal reads as a rate
    limit ("too many connections"), else a ``connection`` failure (a refused AUTH too).

Transactions (:meth:`Session.send`)
    aiosmtplib does not pipeline, so once the session is open its replies are read by
    :class:`ReplyReader`: with PIPELINING (RFC 2920) MAIL, every RCPT and DATA leave in one write
    and their replies are read together, two round trips per message instead of four. Servers
    without PIPELINING get the same commands one at a time. Every recipient gets its own
    response: a 550 on one RCPT does not fail the others, and the accepted ones are sent once, in
    the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPTimeoutError,
)

from postlane.classify import ReplyClass, classify
from postlane.transports.base import Envelope, Response, interrupted, no_reply

__all__ = [
    "ClearTextRetry",
    "Refusal",
    "Server",
    "Session",
    "StaleSession",
    "TLSPolicy",
    "open_session",
    "reply_text",
    "tls_context",
]

#: longest reply line we accept (RFC 5321 says 512; be generous, not unbounded)
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 100
#: EHLO refusals after which HELO is tried (RFC 5321 4.1.4: an old server may not know EHLO)
_EHLO_UNKNOWN = frozenset({500, 501, 502, 504, 550})
#: what can go wrong opening a session, besides a refusal worded by the server
_FAILURES = (SMTPException, OSError, ssl.SSLError, TimeoutError)


# -- opening ---------------------------------------------------------------------------------


def tls_context(*, verify: bool, ca: str | None) -> ssl.SSLContext:
    """A client TLS context: certificates checked against ``ca`` (default: the system's CAs),
    or not checked at all without ``verify``."""
    context = ssl.create_default_context(cafile=ca)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class TLSPolicy:
    """How a session uses TLS. The relay: STARTTLS whenever offered, a failed handshake refused
    like any failure. MX hosts: opportunistic (a failed handshake retried in clear text), or,
    for destinations that require it, verified TLS or nothing."""

    context: ssl.SSLContext
    #: TLS from the first byte (``smtps://``), no STARTTLS
    implicit: bool = False
    #: send STARTTLS when the server offers it (False: the clear-text retry)
    starttls: bool = True
    #: the name the certificate must be valid for, when the connection is to an address
    server_hostname: str | None = None
    #: nothing is sent without TLS: a missing STARTTLS or a failed handshake is a refusal
    required: bool = False
    #: a failed STARTTLS handshake raises :class:`ClearTextRetry` (opportunistic TLS)
    clear_text_retry: bool = False


class Server(Protocol):
    """What opening a session needs to know of the server (the relay's or an MX host's
    :class:`~postlane.transports.smtp.RelaySettings`)."""

    @property
    def name(self) -> str:
        """What responses carry as their relay, e.g. ``smtp://relay.example:587``."""
        ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def helo_name(self) -> str: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def command_timeout(self) -> float:
        """How long any reply may take, but the one to the message's final dot."""
        ...

    @property
    def data_timeout(self) -> float:
        """How long the reply to the message's final dot may take (RFC 5321 4.5.3.2.6)."""
        ...

    @property
    def username(self) -> str | None:
        """Set: AUTH with it and the password, only ever inside TLS."""
        ...

    @property
    def password(self) -> str | None: ...


class Refusal(Exception):
    """The session could not be made usable; the text says why (a reply or a failure)."""

    def __init__(
        self,
        response_text: str,
        code: int | None,
        failure: ReplyClass | None,
        misconfigured: str | None = None,
    ) -> None:
        super().__init__(response_text)
        self.text = response_text
        self.code = code
        self.failure = failure
        #: why this session can never work until the configuration changes
        self.misconfigured = misconfigured

    def response(self, relay: str) -> Response:
        """What every recipient of the message gets."""
        return Response(self.code, self.text, relay, self.failure, misconfigured=self.misconfigured)


class ClearTextRetry(Exception):
    """Opportunistic STARTTLS failed: the caller may open the session again without it."""


async def open_session(server: Server, tls: TLSPolicy, address: str | None = None) -> Session:
    """Connect to ``server`` (at ``address``, one of its host's addresses, if given), greet,
    secure and authenticate (see the module docstring). Raises :class:`Refusal`, or
    :class:`ClearTextRetry` when ``tls`` allows it."""
    where = f"{server.name} [{address}]" if address else server.name
    client = aiosmtplib.SMTP(
        hostname=address or server.host,
        port=server.port,
        local_hostname=server.helo_name,
        timeout=server.command_timeout,
        use_tls=tls.implicit,
        start_tls=False,
        tls_context=tls.context,
    )
    try:
        await client.connect(timeout=server.connect_timeout)
        await _greet(client)
        if not tls.implicit and tls.starttls and client.supports_extension("starttls"):
            await _start_tls(client, tls, where)
        elif tls.required and not tls.implicit:
            raise Refusal(
                f"{where} does not offer STARTTLS, and TLS is required for this destination",
                None,
                ReplyClass.CONNECTION,
            )
        if server.username is not None:
            if client.get_transport_info("sslcontext") is None:
                raise Refusal(
                    f"{where} does not offer STARTTLS; refusing to send credentials in clear",
                    None,
                    ReplyClass.CONNECTION,
                    misconfigured="the relay does not offer the TLS its AUTH needs: use "
                    "smtps:// or a relay port with STARTTLS",
                )
            await client.login(server.username, server.password or "")
    except (Refusal, ClearTextRetry):
        client.close()
        raise
    except SMTPAuthenticationError as exc:
        # the relay refused our credentials: a configuration problem of the relay, retried
        # (and pausing it) rather than dead-lettering every message
        client.close()
        text = f"{where}: authentication failed: {reply_text(exc.code, exc.message)}"
        why = f"the relay refused the configured credentials ({exc.code}): check the relay URL"
        raise Refusal(text, exc.code, ReplyClass.CONNECTION, misconfigured=why) from exc
    except SMTPResponseException as exc:
        # Refused before any message (greeting, EHLO, STARTTLS): a fact about the server, not
        # about a recipient, so it never dead-letters mail. A refusal worded as a rate limit is
        # "throttled"; anything else (421 "service not available" too) is connection-class.
        client.close()
        text = reply_text(exc.code, exc.message)
        if classify(text).cls is ReplyClass.THROTTLED:  # "too many connections": slow down
            raise Refusal(text, exc.code, None) from exc
        raise Refusal(
            f"{where} refused the session: {text}", exc.code, ReplyClass.CONNECTION
        ) from exc
    except _FAILURES as exc:
        client.close()
        raise Refusal(f"{where}: {_describe(exc)}", None, ReplyClass.CONNECTION) from exc
    transport = client.transport
    # (uvloop's transports are not asyncio.Transport subclasses, hence no isinstance here)
    if transport is None or transport.is_closing():
        client.close()
        raise Refusal(f"{where}: connection closed after EHLO", None, ReplyClass.CONNECTION)
    reader = ReplyReader(transport)  # type: ignore[arg-type]
    transport.set_protocol(reader)  # from here on, the transactions are ours
    return Session(
        client=client,
        reader=reader,
        relay=server.name,
        timeout=server.command_timeout,
        data_timeout=server.data_timeout,
        pipelining=client.supports_extension("pipelining"),
        size=client.supports_extension("size"),
        smtputf8=client.supports_extension("smtputf8"),
        eightbitmime=client.supports_extension("8bitmime"),
    )


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for a server that does not speak ESMTP."""
    try:
        await client.ehlo()
    except SMTPHeloError as exc:
        if exc.code not in _EHLO_UNKNOWN:
            raise
        await client.helo()


async def _start_tls(client: aiosmtplib.SMTP, tls: TLSPolicy, where: str) -> None:
    """STARTTLS and the EHLO after it; a failure is the policy's to answer (a clear-text retry,
    a refusal because TLS is required), else mapped like any failure to open the session."""
    try:
        await client.starttls(server_hostname=tls.server_hostname, tls_context=tls.context)
        await client.ehlo()
    except _FAILURES as exc:
        if tls.clear_text_retry:
            raise ClearTextRetry from exc
        if not tls.required:
            raise
        code = exc.code if isinstance(exc, SMTPResponseException) else None
        raise Refusal(
            f"{where}: TLS is required for this destination: {_describe(exc)}",
            code,
            ReplyClass.CONNECTION,
        ) from exc


def reply_text(code: int, message: str) -> str:
    """Rebuild a reply as the server wrote it (aiosmtplib strips the code from each line)."""
    lines = message.split("\n") or [""]
    return "\r\n".join(
        f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SMTPTimeoutError | TimeoutError):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, SMTPConnectError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, ssl.CertificateError):
        return f"TLS certificate rejected: {exc}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        text += f" (TLS: {cause.reason or cause})"
    return text


# -- reading replies -------------------------------------------------------------------------


class Disconnected(Exception):
    """The server closed the connection, or a reply did not come in time."""


class StaleSession(Exception):
    """A pooled session turned out closed before any command was answered: nothing was sent,
    so the message can go on a fresh one."""


class ReplyReader(asyncio.Protocol):
    """Reads SMTP replies off a connection that aiosmtplib opened, so several commands can be
    written at once (PIPELINING) and their replies read in order."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[tuple[int, str]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: str | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol --

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._close("reply line too long")
                return
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._lines.append(line)
            if len(line) < 3 or not line[:3].isdigit() or len(self._lines) > MAX_REPLY_LINES:
                self._close(f"malformed reply line {line[:80]!r}")
                return
            if line[3:4] == b"-":
                continue
            code = int(line[:3])
            text = "\r\n".join(raw.decode("utf-8", "replace") for raw in self._lines)
            self._lines = []
            self._replies.append((code, text))
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._closed or (f"connection lost ({exc})" if exc else "connection closed")
        self._writable.set()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = self._closed or "connection closed by the server"
        self._wake()
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- use --

    @property
    def open(self) -> bool:
        return self._closed is None and not self.transport.is_closing()

    def _close(self, why: str) -> None:
        self._closed = why
        self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def write(self, data: bytes) -> None:
        if not self.open:
            raise Disconnected(self._closed or "connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._writable.wait()
            except TimeoutError:
                self._close("timed out sending the message")
                raise Disconnected("timed out sending the message") from None
        if self._closed is not None:
            raise Disconnected(self._closed)

    async def reply(self, timeout: float) -> tuple[int, str]:
        while not self._replies:
            if self._closed is not None:
                raise Disconnected(self._closed)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                self._close("timed out waiting for a reply")
                raise Disconnected("timed out waiting for a reply") from None
            finally:
                self._waiter = None
        return self._replies.popleft()


# -- the session -----------------------------------------------------------------------------


@dataclass
class Session:
    """An open SMTP session, ready for mail transactions (:func:`open_session` makes one)."""

    client: aiosmtplib.SMTP
    reader: ReplyReader
    #: the name the responses carry
    relay: str
    #: how long any reply may take, but the one to the final dot
    timeout: float
    pipelining: bool
    size: bool
    smtputf8: bool
    eightbitmime: bool = False
    #: how long the reply to the final dot may take
    data_timeout: float = 600.0
    #: kept by the pool holding the session: messages carried, and idle since when
    sent: int = 0
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def open(self) -> bool:
        return self.reader.open

    async def send(self, envelope: Envelope) -> tuple[list[Response], bool]:
        """MAIL, RCPT per recipient, DATA (pipelined when offered), then the message. Returns a
        response per recipient and whether the session can be reused. Raises
        :class:`StaleSession` when the session was closed before anything was answered."""
        relay = self.relay
        reader = self.reader
        timeout = self.timeout
        count = len(envelope.recipients)
        encoding = "ascii"
        mail = b"MAIL FROM:" + _address(envelope.sender, "utf-8")
        if self.size:
            mail += b" SIZE=%d" % len(envelope.content)
        content = envelope.content
        if not all(value.isascii() for value in (envelope.sender, *envelope.recipients)):
            if not self.smtputf8:
                text = "553 5.6.7 the relay does not support SMTPUTF8 for non-ASCII addresses"
                return [Response(553, text, relay) for _ in range(count)], True
            mail += b" SMTPUTF8"
            encoding = "utf-8"
        elif self.smtputf8 and not content.isascii() and not _head(content).isascii():
            mail += b" SMTPUTF8"  # UTF-8 headers (RFC 6532): declared where the relay offers it
        if self.eightbitmime and not content.isascii():
            mail += b" BODY=8BITMIME"  # RFC 6152: 8-bit content is declared
        commands = [mail] + [b"RCPT TO:" + _address(r, encoding) for r in envelope.recipients]
        commands.append(b"DATA")

        replies: list[tuple[int, str]] = []
        try:
            if self.pipelining:
                reader.write(b"".join(c + b"\r\n" for c in commands))
                for _ in commands:
                    replies.append(await reader.reply(timeout))
                    if replies[-1][0] == 421:  # closing: nothing more will be answered
                        break
            else:
                for command in commands:
                    reader.write(command + b"\r\n")
                    replies.append(await reader.reply(timeout))
                    code = replies[-1][0]
                    if code == 421 or (len(replies) == 1 and code >= 400):
                        break  # MAIL refused: no point sending RCPT
                    if command == b"DATA" or (len(replies) == count + 1 and not _any_ok(replies)):
                        break
        except Disconnected as exc:
            if not replies:
                raise StaleSession from exc
            text = f"{relay}: connection lost during the transaction ({exc})"
            return _fill(replies, count, relay, no_reply(text, relay)), False

        mail_code, mail_text = replies[0]
        if mail_code >= 300:
            answer = Response(mail_code, mail_text, relay)
            return [answer] * count, await self.reset(mail_code)
        results: list[Response | None] = [None] * count
        accepted: list[int] = []
        closing: Response | None = None
        for index in range(count):
            if 1 + index < len(replies):
                code, text = replies[1 + index]
                if code in (250, 251):
                    accepted.append(index)
                    continue
                results[index] = Response(code, text, relay, per_recipient=code != 421)
                if code == 421:
                    closing = results[index]
            else:
                results[index] = closing or no_reply(f"{relay}: no reply to RCPT TO", relay)
        data_reply = replies[count + 1] if len(replies) > count + 1 else None

        if not accepted:
            if data_reply is not None and data_reply[0] == 354:
                # RFC 2920: DATA was accepted although no recipient was; end it empty
                with contextlib.suppress(Disconnected):
                    reader.write(b".\r\n")
                    await reader.reply(timeout)
            healthy = closing is None and await self.reset(0)
            return [r for r in results if r is not None], healthy
        if data_reply is None or data_reply[0] != 354:
            if data_reply is None:
                answer = closing or no_reply(f"{relay}: no reply to DATA", relay)
            else:
                answer = Response(data_reply[0], data_reply[1], relay)
            for index in accepted:
                results[index] = answer
            code = data_reply[0] if data_reply else 421
            return [r for r in results if r is not None], await self.reset(code)

        try:
            reader.write(_payload(envelope.content))
            with interrupted.counting():  # the whole message is the server's from here
                await reader.drain(self.data_timeout)
                code, text = await reader.reply(self.data_timeout)
        except Disconnected as exc:
            # No final reply: the message may or may not have been taken. Retried (at most one
            # duplicate), never dropped; said so in the history and the log, as Postfix says
            # "message may be sent more than once"
            answer = no_reply(
                f"{relay}: DATA: {exc} after the whole message was sent: it may have been "
                "delivered, and is sent again",
                relay,
            )
            for index in accepted:
                results[index] = answer
            return [r for r in results if r is not None], False
        answer = Response(code, text, relay)
        for index in accepted:
            results[index] = answer
        healthy = code < 400 or (code != 421 and await self.reset(code))
        return [r for r in results if r is not None], healthy

    async def reset(self, code: int) -> bool:
        """RSET after a failed transaction; False when the session should not be reused."""
        if code == 421 or not self.reader.open:
            return False
        try:
            self.reader.write(b"RSET\r\n")
            reply_code, _ = await self.reader.reply(self.timeout)
        except Disconnected:
            return False
        return reply_code == 250

    def close(self, *, polite: bool) -> None:
        """End the session: with QUIT in the background when ``polite`` and still open, else
        by closing the connection."""
        if polite and self.reader.open:
            task = asyncio.ensure_future(self.quit())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        else:
            self.reader.transport.close()
            self.client.close()

    async def quit(self) -> None:
        """QUIT, then close the connection whatever the answer."""
        try:
            self.reader.write(b"QUIT\r\n")
            await self.reader.reply(timeout=5)
        except Disconnected:
            pass
        finally:
            self.reader.transport.close()
            self.client.close()


#: the QUITs under way in the background (kept referenced until they finish)
_BACKGROUND: set[asyncio.Future[None]] = set()


def _head(content: bytes) -> bytes:
    """A message's header section."""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[:end]


def _address(value: str, encoding: str) -> bytes:
    return b"<" + value.encode(encoding) + b">"


_DOT_LINES = re.compile(rb"(?m)^\.")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


def _payload(content: bytes) -> bytes:
    """DATA payload: CRLF line ends (already so when stored), dots stuffed, the final dot."""
    data = content
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:  # stored content is CRLF already
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_LINES.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _any_ok(replies: list[tuple[int, str]]) -> bool:
    return any(code in (250, 251) for code, _ in replies[1:])


def _fill(
    replies: list[tuple[int, str]], count: int, relay: str, missing: Response
) -> list[Response]:
    """Responses for a transaction cut short: what each recipient got, else ``missing``."""
    if replies and replies[0][0] >= 300:
        return [Response(replies[0][0], replies[0][1], relay)] * count
    out = []
    for index in range(count):
        if 1 + index < len(replies) and replies[1 + index][0] not in (250, 251):
            code, text = replies[1 + index]
            out.append(Response(code, text, relay, per_recipient=code != 421))
        else:
            out.append(missing)
    return out
