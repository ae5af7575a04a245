"""A small HTTP/1.1 client for webhook POSTs: kept-alive connections to one checked address,
no redirects, no proxies, no cookies.

Why not httpx, the project's HTTP library: webhooks are sent from the process that delivers
mail, one request per event, two or more events per message, and a webhook must cost the mail
queue little. On the CI machine kind, an ``httpx.AsyncClient`` POST costs about 1.4 ms of CPU
against a local receiver; this client, about 0.06 ms. It also connects to the exact address
:func:`~postlane.webhooks.addresses.resolve_allowed` approved (TLS still verifies the
certificate against the host name, and sends it as SNI), which closes the DNS-rebinding gap that
a client resolving names on its own leaves open.

What it does: ``POST`` with ``Content-Length``; replies framed by ``Content-Length``, chunked
transfer coding or the end of the connection; informational (1xx) replies skipped; a reused
connection the receiver had closed meanwhile is replaced once, at once. What it does not:
redirects (a 3xx is a failure, as the specification recommends), HTTP/2, compression.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ssl
import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

from postlane import __version__
from postlane.webhooks.addresses import Resolver, WebhookDeliveryError, resolve_allowed
from postlane.webhooks.endpoints import URLParts

USER_AGENT = f"postlane/{__version__} (webhooks)"
#: how much of a reply's body is kept for the operator
BODY_KEPT = 512
#: a reply body longer than this is not read to its end (the connection is dropped instead)
BODY_READ_LIMIT = 1 << 20
MAX_HEADERS = 100
#: a kept-alive connection idle longer than this is closed rather than reused (servers commonly
#: drop idle connections after 5 to 75 seconds; reusing a dropped one costs a round trip)
IDLE_LIMIT = 4.0


class ConnectionFailed(WebhookDeliveryError):
    """No reply: the connection was refused, reset or closed, TLS failed, or the reply was not
    HTTP."""

    code = "webhook_connection_failed"


class TimedOut(WebhookDeliveryError):
    code = "webhook_timed_out"


class _Closed(Exception):
    """The receiver closed the connection before the first byte of a reply."""


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    #: the start of the body, for the operator
    text: str
    #: seconds, from a ``Retry-After`` header
    retry_after: float | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def describe(self) -> str:
        """``HTTP 503 Service Unavailable: <body start>``."""
        text = " ".join(self.text.split())[:200]
        head = f"HTTP {self.status} {self.reason}".rstrip()
        return f"{head}: {text}" if text else head


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    """The system's trusted certificates, host names checked (made once: loading them costs)."""
    return ssl.create_default_context()


def request_head(parts: URLParts, headers: Mapping[str, str], length: int) -> bytes:
    lines = [
        f"POST {parts.target} HTTP/1.1",
        f"Host: {parts.authority}",
        f"User-Agent: {USER_AGENT}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class Connection:
    """One connection to an endpoint's address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.reusable = True

    @classmethod
    async def open(
        cls, parts: URLParts, address: str, ssl_context: ssl.SSLContext | None
    ) -> Connection:
        tls = parts.scheme == "https"
        try:
            reader, writer = await asyncio.open_connection(
                address,
                parts.port,
                ssl=(ssl_context or default_tls_context()) if tls else None,
                server_hostname=parts.host if tls else None,
            )
        except ssl.SSLError as exc:
            raise ConnectionFailed(f"TLS with {parts.host} failed: {exc.reason or exc}") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectionFailed(
                f"cannot connect to {parts.host} ({address} port {parts.port}): {reason}"
            ) from None
        return cls(reader, writer)

    def close(self) -> None:
        self.reusable = False
        self.writer.close()

    async def exchange(self, head: bytes, body: bytes) -> Reply:
        """Send one request and read its reply; :class:`_Closed` if the receiver closed the
        connection before replying."""
        self.writer.write(head + body)
        try:
            await self.writer.drain()
            reply = await self._read_reply()
        except (ConnectionResetError, BrokenPipeError):
            self.close()
            raise _Closed from None
        except ValueError as exc:  # a line over the reader's limit
            self.close()
            raise ConnectionFailed(f"the reply is not HTTP/1.1: {exc}") from None
        except asyncio.IncompleteReadError:
            self.close()
            raise ConnectionFailed("the connection closed in the middle of the reply") from None
        except OSError as exc:
            self.close()
            raise ConnectionFailed(f"connection failed: {exc.strerror or exc}") from None
        self.idle_since = time.monotonic()
        return reply

    async def _read_reply(self) -> Reply:
        reader = self.reader
        first = True
        while True:
            line = await reader.readline()
            if not line:
                self.close()
                if first:
                    raise _Closed
                raise ConnectionFailed("the connection closed in the middle of the reply")
            first = False
            version, status, reason = _status_line(line)
            headers = await self._read_headers()
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: the real reply follows
            break
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.reusable = self.reusable and "keep-alive" in connection
        elif "close" in connection:
            self.reusable = False
        if status in (101, 204, 304):
            if status == 101:
                self.close()
            text = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            text = await self._read_chunked()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                self.close()
                raise ConnectionFailed("the reply has a bad Content-Length") from None
            text = await self._read_length(length)
        else:
            text = await self._read_to_end()
        if not self.reusable:
            self.close()
        return Reply(
            status=status,
            reason=reason,
            text=text[:BODY_KEPT].decode("utf-8", "replace"),
            retry_after=_retry_after(headers.get("retry-after")),
        )

    async def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ValueError(f"a header line without a colon: {line[:80]!r}")
            key = name.strip().lower()
            stripped = value.strip()
            headers[key] = f"{headers[key]}, {stripped}" if key in headers else stripped
        raise ValueError(f"more than {MAX_HEADERS} header lines")

    async def _read_length(self, length: int) -> bytes:
        if length > BODY_READ_LIMIT:
            kept = await self.reader.readexactly(min(length, BODY_KEPT))
            self.close()
            return kept
        return await self.reader.readexactly(length) if length else b""

    async def _read_chunked(self) -> bytes:
        kept = bytearray()
        total = 0
        while True:
            size_line = await self.reader.readline()
            if not size_line:
                raise asyncio.IncompleteReadError(b"", None)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError(f"a bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(kept)
            total += size
            if total > BODY_READ_LIMIT:
                self.close()
                return bytes(kept)
            chunk = await self.reader.readexactly(size + 2)  # the data and its CRLF
            if len(kept) < BODY_KEPT:
                kept += chunk[:size]

    async def _read_to_end(self) -> bytes:
        self.reusable = False
        kept = await self.reader.read(BODY_KEPT)
        total = len(kept)
        while total < BODY_READ_LIMIT:
            more = await self.reader.read(65536)
            if not more:
                break
            total += len(more)
        return kept


def _status_line(line: bytes) -> tuple[str, int, str]:
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""


def _retry_after(value: str | None) -> float | None:
    """``Retry-After``: seconds, or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(eq=False)
class EndpointClient:
    """Posts to one endpoint over a kept-alive connection, one request at a time (a sender
    keeps one client per request it has in flight)."""

    parts: URLParts
    _: KW_ONLY
    allow_private: bool
    timeout: float
    resolver: Resolver
    ssl_context: ssl.SSLContext | None = None
    _connection: Connection | None = field(default=None, init=False, repr=False)

    async def post(self, headers: Mapping[str, str], body: bytes) -> Reply:
        """POST ``body``; the reply, whatever its status. Raises
        :class:`~postlane.webhooks.addresses.AddressRefused`, :class:`ConnectionFailed` or
        :class:`TimedOut` when there is no reply. The timeout covers resolving, connecting,
        sending and reading."""
        head = request_head(self.parts, headers, len(body))
        try:
            async with asyncio.timeout(self.timeout):
                return await self._post(head, body)
        except TimeoutError:
            self.close()
            raise TimedOut(f"no reply within {self.timeout:g}s") from None

    async def _post(self, head: bytes, body: bytes) -> Reply:
        connection = self._connection
        if connection is not None and (
            not connection.reusable or time.monotonic() - connection.idle_since > IDLE_LIMIT
        ):
            connection.close()
            connection = None
        if connection is not None:
            try:
                return await connection.exchange(head, body)
            except _Closed:
                pass  # the receiver dropped the idle connection: once more, on a new one
        connection = self._connection = await self._connect()
        try:
            return await connection.exchange(head, body)
        except _Closed:
            raise ConnectionFailed("the connection closed before a reply") from None
        finally:
            if not connection.reusable:
                self._connection = None

    async def _connect(self) -> Connection:
        address = await resolve_allowed(
            self.parts.host,
            self.parts.port,
            allow_private=self.allow_private,
            resolver=self.resolver,
        )
        return await Connection.open(self.parts, address, self.ssl_context)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
