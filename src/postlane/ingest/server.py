"""Listening: a bound socket with a one-line error naming its setting, and uvicorn serving an
ASGI application on it for as long as a context lasts (the API alone, or ``serve``'s API and
dashboard side by side).

A listener holds up against clients that connect and never finish (audit finding 7: 3,000
half-sent requests held their descriptors for minutes, until ``/healthz`` and SMTP submission
failed for want of one). uvicorn times out only the wait *between* requests (keep-alive), not
an unfinished request head, and its ``limit_concurrency`` counts requests, not connections, so
:class:`GuardedH11` adds both (see :class:`HttpLimits`):

- a request's head (request line and headers) must arrive within ``header_timeout`` of the
  connection (or, on a kept-alive connection, of its first byte), else the connection is
  answered ``408`` and closed;
- past ``max_connections`` open connections, a new one takes the place of the connection idle
  the longest (no request under way: a head still arriving, or a kept-alive wait), else it is
  answered ``503`` with ``Retry-After`` and closed at once, before it can hold anything.

A body that stops arriving is the endpoints' to time out (``body_timeout``, see
:func:`postlane.ingest.http.read_body`): by then the request is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from postlane.config import Config, parse_listen
from postlane.errors import ConfigError, StoreUnavailable
from postlane.ingest.tally import Tally

log = logging.getLogger("postlane.http")


def escaped_store_error(exc: BaseException) -> StoreUnavailable | None:
    """A database driver's own error that escaped the store (which should have raised
    :class:`StoreUnavailable`), as the store's failure: a client is told to retry (503), never
    that it broke something (500). The caller logs it: it is a bug in the store."""
    psycopg = sys.modules.get("psycopg")  # loaded only with a PostgreSQL store
    if isinstance(exc, sqlite3.Error) or (psycopg is not None and isinstance(exc, psycopg.Error)):
        return StoreUnavailable(f"the store failed: {exc}")
    return None


def default_max_connections() -> int:
    """Half the process's descriptors (the store, SMTP submission and the relay need the
    rest), between 64 and 1,000."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every POSIX system has it
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(64, min(1000, soft // 2))


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """How long an HTTP client may take and how many may connect (one listener's worth)."""

    #: seconds for a request's head (request line and headers) to arrive
    header_timeout: float = 10.0
    #: seconds a kept-alive connection may wait for its next request
    keep_alive: int = 5
    #: seconds a request body may stall (no byte arriving) before the request is dropped (408)
    body_timeout: float = 30.0
    #: open connections at most; past it a new one gets 503 at once
    max_connections: int = dataclasses.field(default_factory=default_max_connections)
    #: bytes of request bodies being read or worked on at once, process-wide (None: enough
    #: for one largest batch and some; see postlane.ingest.http.RequestBudget)
    request_bytes: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> HttpLimits:
        """The limits of ``[http]`` (0 for ``max_connections`` or ``max_request_bytes``: the
        defaults that follow the process's descriptors and the largest batch)."""
        http = config.http
        return cls(
            header_timeout=http.header_timeout,
            keep_alive=max(1, round(http.keep_alive)),
            body_timeout=http.body_timeout,
            max_connections=http.max_connections or default_max_connections(),
            request_bytes=http.max_request_bytes or None,
        )


def _describe_refusals(counts: dict[str, int]) -> str:
    said = {
        "connections": "connections refused over the cap (max_connections)",
        "evicted": "idle or unfinished connections closed to make room for new ones",
        "header_timeouts": "request heads not sent in time (header_timeout)",
    }
    parts = [f"{n} {said.get(kind, kind)}" for kind, n in sorted(counts.items())]
    return "HTTP listener, since the last such line: " + "; ".join(parts)


class Refusals(Tally):
    """What one listener turned away (``connections``, ``evicted``, ``header_timeouts``),
    counted since start and logged as a summary line a minute."""

    def __init__(self) -> None:
        super().__init__(log, _describe_refusals)


_OVER_CAP = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_OVER_CAP_BODY = (
    b'{"error":{"code":"too_many_connections","message":"the server has too many open '
    b'connections: retry shortly"}}'
)
_HEAD_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_HEAD_TIMEOUT_BODY = (
    b'{"error":{"code":"request_timeout","message":"the request head did not arrive in time"}}'
)


#: a request's head (request line and headers) at most; h11 holds to it only while a head is
#: incomplete, so one that arrives whole in a read is measured here
HEAD_LIMIT = 16 * 1024
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_HEAD_TOO_LARGE_BODY = (
    b'{"error":{"code":"malformed_request","message":"HTTP: the request line and headers are '
    b'over 16 KiB"}}'
)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a connection cap (see
    the module's docstring). :func:`guarded_protocol` makes one per listener, with its limits.

    At the cap, a new connection first makes room by closing the connection that has been
    *idle* longest: one with no request under way (its head not all there, or kept alive
    between requests). A client sending whole requests is thus served while a flood of
    unfinished ones churns through; only when every connection is busy with a request is the
    newcomer refused (503)."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    refusals: ClassVar[Refusals]
    #: this listener's connections with no request under way, the longest idle first
    idle: ClassVar[dict[GuardedH11, None]]

    _head_timer: asyncio.TimerHandle | None = None
    #: what arrived of the request head under way (until its blank line)
    _head: bytearray | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            if not self.idle:
                self.refusals.count("connections")
                transport.write(_OVER_CAP % (len(_OVER_CAP_BODY), _OVER_CAP_BODY))
                transport.close()
                return
            next(iter(self.idle))._make_room()
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._forget()
            self.transport.write(
                _HEAD_TOO_LARGE % (len(_HEAD_TOO_LARGE_BODY), _HEAD_TOO_LARGE_BODY)
            )
            self.transport.close()
            return
        super().data_received(data)
        if self.transport.is_closing():
            self._forget()
        elif self.conn.their_state is h11.IDLE:
            self._wait_for_head()  # a head under way (after a kept-alive wait): its deadline
        else:
            self._forget()  # the head is in: the request is the application's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._forget()  # kept alive: keep-alive's timer runs until the next head begins
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _head_too_large(self, data: bytes) -> bool:
        """Count ``data`` into the head under way; True when the head is over
        :data:`HEAD_LIMIT` (complete or not)."""
        if self._head is None:  # the usual case: a whole head in one read, nothing copied
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return end + 4 > HEAD_LIMIT
            self._head = bytearray()
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        size = end + 4 if end >= 0 else len(self._head)
        if end >= 0:
            self._head = None  # a whole head: the next one starts afresh
        return size > HEAD_LIMIT

    def _wait_for_head(self) -> None:
        self.idle.setdefault(self, None)
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )

    def _forget(self) -> None:
        self.idle.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot read (a malformed request line or header, a bad chunk size):
        the API's JSON error, not uvicorn's plain text, and the connection closed."""
        body = json.dumps(
            {"error": {"code": "malformed_request", "message": f"HTTP: {msg.rstrip('.')}"}},
            separators=(",", ":"),
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _make_room(self) -> None:
        self._forget()
        self.refusals.count("evicted")
        if self.cycle is None:  # no request yet: its client may be waiting for an answer
            self.transport.write(_OVER_CAP % (len(_OVER_CAP_BODY), _OVER_CAP_BODY))
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.idle.pop(self, None)
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.refusals.count("header_timeouts")
        if self.conn.our_state is h11.IDLE:  # nothing said yet on this request
            self.transport.write(_HEAD_TIMEOUT % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY))
        self.transport.close()


def guarded_protocol(limits: HttpLimits, refusals: Refusals) -> type[GuardedH11]:
    """The protocol class of one listener, bound to its limits, its refusal counts and its
    idle connections."""
    attributes = {"limits": limits, "refusals": refusals, "idle": {}}
    return type("GuardedH11", (GuardedH11,), attributes)


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: postlane's own handlers stop everything in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind(listen: str, what: str) -> socket.socket:
    """A listening socket, or a one-line error naming the setting."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what} {listen}: cannot listen ({exc.strerror})") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_http(
    asgi: ASGIApp,
    config: Config,
    *,
    probes_on: str | None = None,
    limits: HttpLimits | None = None,
    refusals: Refusals | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[str]:
    """Serve ``asgi`` on ``[http] listen`` (or on ``probes_on``, a worker's probes; or on
    ``sock``, a socket already bound and listening, shared by several processes) until the
    context exits, within ``limits``; yields the address it listens on."""
    listen = probes_on or config.http.listen
    limits = limits or HttpLimits.from_config(config)
    refusals = refusals or Refusals()
    if sock is None:
        sock = bind(listen, "worker --metrics" if probes_on else "http.listen")
    host, port = sock.getsockname()[:2]
    server = _Server(
        uvicorn.Config(
            asgi,
            http=guarded_protocol(limits, refusals),
            ws="none",
            timeout_keep_alive=limits.keep_alive,
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
            # the peer is who connected: X-Forwarded-For from a proxy (or from anyone on this
            # host) would let a guesser be a new client at every request (docs/security.md)
            proxy_headers=False,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="postlane-http")
    # uvicorn has no "started" event; its startup is quick (the socket is already bound)
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    address = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    if probes_on is not None:
        log.info("metrics and health probes on %s", address)
    elif not config.http.tokens and not config.http.send_tokens:
        log.info("HTTP API on %s (no token configured: loopback clients only)", address)
    else:
        log.info("HTTP API on %s", address)
    try:
        yield address
    finally:
        server.should_exit = True
        await task
        sock.close()
        refusals.flush()  # what was turned away since the last line, not lost at a stop
