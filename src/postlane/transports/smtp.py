"""The SMTP relay transport (``smtp://``, ``smtps://``).

aiosmtplib opens each connection: TCP or implicit TLS, EHLO, STARTTLS whenever the relay offers
it, and AUTH, which is only ever sent inside TLS (credentials never cross in clear).
Certificates are verified unless ``tls_verify = false``.

The mail transactions on an open connection are run by :class:`_ReplyReader` below, because
aiosmtplib does not pipeline: with PIPELINING (RFC 2920) MAIL, every RCPT and DATA leave in one
write and their replies are read together, two round trips per message instead of four. Servers
without PIPELINING get the same commands one at a time.

Connections are pooled per relay and reused for many messages: up to the relay destination's
``[destinations.relay] messages_per_connection``, else ``[delivery] messages_per_connection``.
Every recipient gets its own response: a 550 on one RCPT does not fail the others, and the
accepted ones are sent once, in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

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
from postlane.config import DeliveryConfig, DestinationLimits
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response, no_reply

#: a pooled connection idle longer than this is closed rather than reused (servers drop idle
#: clients after a few minutes; RFC 5321 says at least 5)
IDLE_TIMEOUT = 30.0
#: longest reply line we accept (RFC 5321 says 512; be generous, not unbounded)
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 100
_DOT_LINES = re.compile(rb"(?m)^\.")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None
    helo_name: str
    connect_timeout: float
    command_timeout: float
    messages_per_connection: int
    connections: int
    tls_verify: bool
    tls_ca: str | None

    @property
    def name(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @classmethod
    def from_url(
        cls, url: str, delivery: DeliveryConfig, limits: DestinationLimits | None = None
    ) -> RelaySettings:
        """The relay at ``url`` as ``[delivery]`` describes it; ``limits`` are the relay
        destination's own (its ``messages_per_connection`` wins over ``[delivery]``'s)."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                f"delivery.relay {url!r}: expected smtp://host[:port] or smtps://host[:port]"
            )
        implicit_tls = parts.scheme == "smtps"
        try:
            port = parts.port or (465 if implicit_tls else 25)
        except ValueError:
            raise ConfigError(f"delivery.relay {url!r}: bad port") from None
        username = unquote(parts.username) if parts.username else delivery.username
        password = unquote(parts.password) if parts.password else delivery.password
        return cls(
            host=parts.hostname,
            port=port,
            implicit_tls=implicit_tls,
            username=username,
            password=password,
            helo_name=delivery.helo_name or socket.gethostname(),
            connect_timeout=delivery.connect_timeout,
            command_timeout=delivery.command_timeout,
            messages_per_connection=(
                (limits and limits.messages_per_connection) or delivery.messages_per_connection
            ),
            connections=delivery.connections_per_host,
            tls_verify=delivery.tls_verify,
            tls_ca=delivery.tls_ca,
        )


class _Disconnected(Exception):
    """The server closed the connection, or a reply did not come in time."""


class _ReplyReader(asyncio.Protocol):
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
            raise _Disconnected(self._closed or "connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._writable.wait()
            except TimeoutError:
                self._close("timed out sending the message")
                raise _Disconnected("timed out sending the message") from None
        if self._closed is not None:
            raise _Disconnected(self._closed)

    async def reply(self, timeout: float) -> tuple[int, str]:
        while not self._replies:
            if self._closed is not None:
                raise _Disconnected(self._closed)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                self._close("timed out waiting for a reply")
                raise _Disconnected("timed out waiting for a reply") from None
            finally:
                self._waiter = None
        return self._replies.popleft()


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    reader: _ReplyReader
    pipelining: bool
    size: bool
    smtputf8: bool
    sent: int = 0
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        return self.reader.open and time.monotonic() - self.idle_since < IDLE_TIMEOUT


class _Refused(Exception):
    """The connection could not be made usable; the text says why (a reply or a failure)."""

    def __init__(self, response_text: str, code: int | None, failure: ReplyClass | None) -> None:
        super().__init__(response_text)
        self.text = response_text
        self.code = code
        self.failure = failure


class _StaleConnection(Exception):
    """A pooled connection turned out closed before any command was answered: nothing was
    sent, so the message can go on a fresh connection."""


def reply_text(code: int, message: str) -> str:
    """Rebuild a reply as the server wrote it (aiosmtplib strips the code from each line)."""
    lines = message.split("\n") or [""]
    return "\r\n".join(
        f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
    )


def _address(value: str, encoding: str) -> bytes:
    return b"<" + value.encode(encoding) + b">"


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


class SMTPRelayTransport:
    """Deliver everything to one relay (smarthost) over pooled SMTP connections."""

    def __init__(self, settings: RelaySettings, *, destination: str = "relay") -> None:
        self.settings = settings
        self.name = settings.name
        #: every delivery also goes through the relay: a throttle destination of its own
        #: (``[destinations.relay]``), which slow-downs and connection failures are charged to
        self.shared_destination = destination
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(settings.connections)
        self._tls_context: ssl.SSLContext | None = None
        self._closing = False

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            context = ssl.create_default_context(cafile=self.settings.tls_ca)
            if not self.settings.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context
        return self._tls_context

    async def _connect(self) -> _Connection:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=s.helo_name,
            timeout=s.command_timeout,
            use_tls=s.implicit_tls,
            start_tls=False,
            tls_context=self._context(),
        )
        try:
            await client.connect(timeout=s.connect_timeout)
            await _greet(client)
            if not s.implicit_tls and client.supports_extension("starttls"):
                await client.starttls(tls_context=self._context())
                await client.ehlo()
            encrypted = client.get_transport_info("sslcontext") is not None
            if s.username is not None:
                if not encrypted:
                    raise _Refused(
                        f"{s.name} does not offer STARTTLS; refusing to send credentials in clear",
                        None,
                        ReplyClass.CONNECTION,
                    )
                await client.login(s.username, s.password or "")
        except _Refused:
            client.close()
            raise
        except SMTPAuthenticationError as exc:
            # the relay refused our credentials: a configuration problem of the relay, retried
            # (and pausing it) rather than dead-lettering every message
            client.close()
            text = f"{s.name}: authentication failed: {reply_text(exc.code, exc.message)}"
            raise _Refused(text, exc.code, ReplyClass.CONNECTION) from exc
        except SMTPResponseException as exc:
            # Refused before any message (greeting, EHLO, STARTTLS): a fact about the relay, not
            # about a recipient, so it never dead-letters mail. A refusal worded as a rate limit is
            # "throttled"; anything else (421 "service not available" too) is connection-class.
            client.close()
            text = reply_text(exc.code, exc.message)
            if classify(text).cls is ReplyClass.THROTTLED:  # "too many connections": slow down
                raise _Refused(text, exc.code, None) from exc
            raise _Refused(
                f"{s.name} refused the session: {text}", exc.code, ReplyClass.CONNECTION
            ) from exc
        except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            raise _Refused(f"{s.name}: {_describe(exc)}", None, ReplyClass.CONNECTION) from exc
        transport = client.transport
        # (uvloop's transports are not asyncio.Transport subclasses, hence no isinstance here)
        if transport is None or transport.is_closing():
            client.close()
            raise _Refused(f"{s.name}: connection closed after EHLO", None, ReplyClass.CONNECTION)
        reader = _ReplyReader(transport)  # type: ignore[arg-type]
        transport.set_protocol(reader)  # from here on, the transactions are ours
        return _Connection(
            client=client,
            reader=reader,
            pipelining=client.supports_extension("pipelining"),
            size=client.supports_extension("size"),
            smtputf8=client.supports_extension("smtputf8"),
        )

    async def _acquire(self, per_connection: int) -> _Connection:
        """The most recently used idle connection that has carried fewer than
        ``per_connection`` messages, else a new one. (Idle connections that have carried more
        stay for destinations that allow more: an MX host's pool serves several.)"""
        found: _Connection | None = None
        spent: deque[_Connection] = deque()
        while self._idle:
            connection = self._idle.pop()
            if not connection.usable:
                self._close_connection(connection, polite=False)
            elif connection.sent < per_connection:
                found = connection
                break
            else:
                spent.appendleft(connection)
        self._idle.extend(spent)
        return found or await self._connect()

    def _release(self, connection: _Connection, healthy: bool, per_connection: int) -> None:
        connection.sent += 1
        if (
            not healthy
            or self._closing
            or connection.sent >= per_connection
            or not connection.reader.open
            or len(self._idle) >= self.settings.connections
        ):
            self._close_connection(connection, polite=healthy)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def send(
        self, envelope: Envelope, *, messages_per_connection: int | None = None
    ) -> list[Response]:
        """Send ``envelope`` on a pooled connection; one response per recipient.
        ``messages_per_connection`` (default: the relay's) is the most messages a connection
        carrying this one may carry in all."""
        per_connection = messages_per_connection or self.settings.messages_per_connection
        async with self._slots:
            for retry_on_fresh in (True, False):
                try:
                    connection = await self._acquire(per_connection)
                except _Refused as refused:
                    return [
                        Response(refused.code, refused.text, self.name, refused.failure)
                        for _ in envelope.recipients
                    ]
                fresh = connection.sent == 0
                try:
                    responses, healthy = await self._transaction(connection, envelope)
                except _StaleConnection:
                    self._close_connection(connection, polite=False)
                    if retry_on_fresh and not fresh:
                        continue
                    text = f"{self.name}: connection closed before MAIL FROM was answered"
                    return [no_reply(text, self.name) for _ in envelope.recipients]
                except BaseException:  # cancelled mid-transaction: never pool it, close it
                    self._close_connection(connection, polite=False)
                    raise
                self._release(connection, healthy, per_connection)
                return responses
        raise AssertionError("unreachable")

    async def _transaction(
        self, connection: _Connection, envelope: Envelope
    ) -> tuple[list[Response], bool]:
        """MAIL, RCPT per recipient, DATA (pipelined when offered), then the message. Returns a
        response per recipient and whether the connection can be reused."""
        relay = self.name
        reader = connection.reader
        timeout = self.settings.command_timeout
        count = len(envelope.recipients)
        encoding = "ascii"
        mail = b"MAIL FROM:" + _address(envelope.sender, "utf-8")
        if connection.size:
            mail += b" SIZE=%d" % len(envelope.content)
        if not all(value.isascii() for value in (envelope.sender, *envelope.recipients)):
            if not connection.smtputf8:
                text = "553 5.6.7 the relay does not support SMTPUTF8 for non-ASCII addresses"
                return [Response(553, text, relay) for _ in range(count)], True
            mail += b" SMTPUTF8"
            encoding = "utf-8"
        commands = [mail] + [b"RCPT TO:" + _address(r, encoding) for r in envelope.recipients]
        commands.append(b"DATA")

        replies: list[tuple[int, str]] = []
        try:
            if connection.pipelining:
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
        except _Disconnected as exc:
            if not replies:
                raise _StaleConnection from exc
            text = f"{relay}: connection lost during the transaction ({exc})"
            return _fill(replies, count, relay, no_reply(text, relay)), False

        mail_code, mail_text = replies[0]
        if mail_code >= 300:
            answer = Response(mail_code, mail_text, relay)
            return [answer] * count, await self._reset(connection, mail_code)
        results: list[Response | None] = [None] * count
        accepted: list[int] = []
        closing: Response | None = None
        for index in range(count):
            if 1 + index < len(replies):
                code, text = replies[1 + index]
                if code in (250, 251):
                    accepted.append(index)
                    continue
                results[index] = Response(code, text, relay)
                if code == 421:
                    closing = results[index]
            else:
                results[index] = closing or no_reply(f"{relay}: no reply to RCPT TO", relay)
        data_reply = replies[count + 1] if len(replies) > count + 1 else None

        if not accepted:
            if data_reply is not None and data_reply[0] == 354:
                # RFC 2920: DATA was accepted although no recipient was; end it empty
                with contextlib.suppress(_Disconnected):
                    reader.write(b".\r\n")
                    await reader.reply(timeout)
            healthy = closing is None and await self._reset(connection, 0)
            return [r for r in results if r is not None], healthy
        if data_reply is None or data_reply[0] != 354:
            if data_reply is None:
                answer = closing or no_reply(f"{relay}: no reply to DATA", relay)
            else:
                answer = Response(data_reply[0], data_reply[1], relay)
            for index in accepted:
                results[index] = answer
            code = data_reply[0] if data_reply else 421
            return [r for r in results if r is not None], await self._reset(connection, code)

        try:
            reader.write(_payload(envelope.content))
            await reader.drain(timeout)
            code, text = await reader.reply(timeout)
        except _Disconnected as exc:
            # No final reply: the message may or may not have been taken. Retried (at most one
            # duplicate), never dropped.
            answer = no_reply(f"{relay}: DATA: {exc}", relay)
            for index in accepted:
                results[index] = answer
            return [r for r in results if r is not None], False
        answer = Response(code, text, relay)
        for index in accepted:
            results[index] = answer
        healthy = code < 400 or (code != 421 and await self._reset(connection, code))
        return [r for r in results if r is not None], healthy

    async def _reset(self, connection: _Connection, code: int) -> bool:
        """RSET after a failed transaction; False when the connection should not be reused."""
        if code == 421 or not connection.reader.open:
            return False
        try:
            connection.reader.write(b"RSET\r\n")
            reply_code, _ = await connection.reader.reply(self.settings.command_timeout)
        except _Disconnected:
            return False
        return reply_code == 250

    def _close_connection(self, connection: _Connection, *, polite: bool) -> None:
        if polite and connection.reader.open:
            task = asyncio.ensure_future(self._quit(connection))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        else:
            connection.reader.transport.close()
            connection.client.close()

    async def _quit(self, connection: _Connection) -> None:
        try:
            connection.reader.write(b"QUIT\r\n")
            await connection.reader.reply(timeout=5)
        except _Disconnected:
            pass
        finally:
            connection.reader.transport.close()
            connection.client.close()

    async def close(self) -> None:
        self._closing = True
        quits = [self._quit(connection) for connection in self._idle]
        self._idle.clear()
        await asyncio.gather(*quits)


_BACKGROUND: set[asyncio.Future[None]] = set()

#: EHLO refusals after which HELO is tried (RFC 5321 4.1.4: an old server may not know EHLO)
_EHLO_UNKNOWN = frozenset({500, 501, 502, 504, 550})


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for a server that does not speak ESMTP."""
    try:
        await client.ehlo()
    except SMTPHeloError as exc:
        if exc.code not in _EHLO_UNKNOWN:
            raise
        await client.helo()


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
            out.append(Response(code, text, relay))
        else:
            out.append(missing)
    return out


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
