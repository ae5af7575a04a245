"""The SMTP relay transport (``smtp://``, ``smtps://``) on aiosmtplib.

Connections are pooled per relay and reused for many messages (up to
``messages_per_connection``); STARTTLS is used whenever the relay offers it, and is required
before AUTH: credentials are never sent in clear. Certificates are verified unless
``tls_verify = false``. Every recipient gets its own response: a 550 on one RCPT does not fail
the others, and the accepted ones are sent once, in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response, no_reply

#: a pooled connection idle longer than this is closed rather than reused (servers drop idle
#: clients after a few minutes; RFC 5321 says at least 5)
IDLE_TIMEOUT = 30.0


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
    def from_url(cls, url: str, delivery: DeliveryConfig) -> RelaySettings:
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
            messages_per_connection=delivery.messages_per_connection,
            connections=delivery.connections_per_host,
            tls_verify=delivery.tls_verify,
            tls_ca=delivery.tls_ca,
        )


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        return self.client.is_connected and time.monotonic() - self.idle_since < IDLE_TIMEOUT


class _Refused(Exception):
    """The connection could not be made usable; the text says why (a reply or a failure)."""

    def __init__(self, response_text: str, code: int | None, failure: ReplyClass | None) -> None:
        super().__init__(response_text)
        self.text = response_text
        self.code = code
        self.failure = failure


def reply_text(code: int, message: str) -> str:
    """Rebuild the reply as the server wrote it (aiosmtplib strips the code from each line)."""
    lines = message.split("\n") or [""]
    return "\r\n".join(
        f"{code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
    )


class SMTPRelayTransport:
    """Deliver everything to one relay (smarthost) over pooled SMTP connections."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.name = settings.name
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
            await client.ehlo()
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
            client.close()
            raise _Refused(reply_text(exc.code, exc.message), exc.code, None) from exc
        except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            raise _Refused(f"{s.name}: {_describe(exc)}", None, ReplyClass.CONNECTION) from exc
        return _Connection(client)

    async def _acquire(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            _close_quietly(connection)
        return await self._connect()

    def _release(self, connection: _Connection, healthy: bool) -> None:
        connection.sent += 1
        if (
            not healthy
            or self._closing
            or connection.sent >= self.settings.messages_per_connection
            or not connection.client.is_connected
        ):
            _close_quietly(connection, polite=healthy)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def send(self, envelope: Envelope) -> list[Response]:
        async with self._slots:
            for retry_on_fresh in (True, False):
                try:
                    connection = await self._acquire()
                except _Refused as refused:
                    return [
                        Response(refused.code, refused.text, self.name, refused.failure)
                        for _ in envelope.recipients
                    ]
                fresh = connection.sent == 0
                try:
                    responses, healthy = await self._transaction(connection.client, envelope)
                except _StaleConnection:
                    _close_quietly(connection, polite=False)
                    if retry_on_fresh and not fresh:
                        continue  # a pooled connection the server had dropped: nothing was sent
                    text = f"{self.name}: connection closed before MAIL FROM was answered"
                    return [no_reply(text, self.name) for _ in envelope.recipients]
                self._release(connection, healthy)
                return responses
        raise AssertionError("unreachable")

    async def _transaction(
        self, client: aiosmtplib.SMTP, envelope: Envelope
    ) -> tuple[list[Response], bool]:
        """MAIL, RCPT per recipient, DATA; returns per-recipient responses and whether the
        connection can be reused."""
        relay = self.name
        count = len(envelope.recipients)
        options: list[str] = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(envelope.content)}")
        encoding = "ascii"
        if not _is_ascii(envelope.sender, *envelope.recipients):
            if not client.supports_extension("smtputf8"):
                text = "553 5.6.7 the relay does not support SMTPUTF8 for non-ASCII addresses"
                return [Response(553, text, relay) for _ in range(count)], True
            options.append("SMTPUTF8")
            encoding = "utf-8"
        try:
            await client.mail(envelope.sender, options=options, encoding=encoding)
        except SMTPSenderRefused as exc:
            text = reply_text(exc.code, exc.message)
            return [Response(exc.code, text, relay) for _ in range(count)], await _reset(client)
        except (SMTPServerDisconnected, ConnectionError) as exc:
            raise _StaleConnection from exc
        except (SMTPException, OSError, TimeoutError) as exc:
            return _all_failed(count, f"{relay}: MAIL FROM: {_describe(exc)}", relay), False

        results: list[Response | None] = [None] * count
        accepted: list[int] = []
        closing: Response | None = None
        for index, recipient in enumerate(envelope.recipients):
            if closing is not None:
                results[index] = closing
                continue
            try:
                await client.rcpt(recipient, encoding=encoding)
                accepted.append(index)
            except SMTPRecipientRefused as exc:
                results[index] = Response(exc.code, reply_text(exc.code, exc.message), relay)
                if exc.code == 421:  # the server is closing: the rest get the same answer
                    closing = results[index]
            except (SMTPException, OSError, TimeoutError) as exc:
                closing = no_reply(f"{relay}: RCPT TO: {_describe(exc)}", relay)
                results[index] = closing
        if closing is not None and not client.is_connected:
            return [r or closing for r in results], False
        if not accepted:
            return [r for r in results if r is not None], await _reset(client)

        healthy = True
        try:
            reply = await client.data(envelope.content)
            data_response = Response(reply.code, reply_text(reply.code, reply.message), relay)
        except SMTPDataError as exc:
            data_response = Response(exc.code, reply_text(exc.code, exc.message), relay)
            healthy = exc.code != 421 and await _reset(client)
        except (SMTPException, OSError, TimeoutError) as exc:
            # No final reply: the message may or may not have been taken. Retried (at most one
            # duplicate), never dropped.
            data_response = no_reply(f"{relay}: DATA: {_describe(exc)}", relay)
            healthy = False
        for index in accepted:
            results[index] = data_response
        return [r if r is not None else data_response for r in results], healthy

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            connection = self._idle.pop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.client.quit(), timeout=2)
            connection.client.close()


class _StaleConnection(Exception):
    """A pooled connection was closed by the server before the transaction started."""


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET after a failed transaction; False when the connection should not be reused."""
    if not client.is_connected:
        return False
    try:
        response = await client.rset()
    except (SMTPException, OSError, TimeoutError):
        client.close()
        return False
    return response.code == 250


def _all_failed(count: int, text: str, relay: str) -> list[Response]:
    return [no_reply(text, relay) for _ in range(count)]


def _close_quietly(connection: _Connection, polite: bool = False) -> None:
    client = connection.client
    if polite and client.is_connected:
        task = asyncio.ensure_future(_quit(client))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
    else:
        client.close()


_BACKGROUND: set[asyncio.Future[None]] = set()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), timeout=5)
    except (SMTPException, OSError, TimeoutError):
        pass
    finally:
        client.close()


def _is_ascii(*values: str) -> bool:
    return all(value.isascii() for value in values)


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
