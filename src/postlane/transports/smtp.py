"""The SMTP relay transport (``smtp://``, ``smtps://``): everything goes to one relay
(smarthost), over pooled sessions.

Each session is opened and run by :mod:`postlane.transports.session`: STARTTLS whenever the
relay offers it, certificates verified unless ``tls_verify = false``, AUTH only inside TLS,
pipelined transactions with a response per recipient. What is the relay's own is here: its
settings (:class:`RelaySettings`, from the relay URL) and the pool. Sessions are reused for many
messages: up to the relay destination's ``[destinations.relay] messages_per_connection``, else
``[delivery] messages_per_connection``; at most ``connections_per_host`` at once; an idle one is
closed after :data:`IDLE_TIMEOUT`. Direct MX delivery keeps a pool of this kind per MX host.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from postlane import redact
from postlane.config import DeliveryConfig, DestinationLimits
from postlane.errors import ConfigError
from postlane.lanes import LaneSlots
from postlane.transports.base import BaseTransport, Envelope, Response, no_reply
from postlane.transports.session import (
    Refusal,
    Session,
    StaleSession,
    TLSPolicy,
    open_session,
    tls_context,
)

__all__ = ["RelaySettings", "SMTPRelayTransport"]

#: a pooled session idle longer than this is closed rather than reused (servers drop idle
#: clients after a few minutes; RFC 5321 says at least 5)
IDLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class RelaySettings:
    """An SMTP server to deliver to and how: the relay of ``delivery.relay``, or an MX host."""

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
    #: the reply to the message's final dot (RFC 5321 4.5.3.2.6)
    data_timeout: float = 600.0

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
        shown = redact.mask_url(url)  # never the password
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                f"delivery.relay {shown!r}: expected smtp://host[:port] or smtps://host[:port]"
            )
        implicit_tls = parts.scheme == "smtps"
        try:
            port = parts.port or (465 if implicit_tls else 25)
        except ValueError:
            raise ConfigError(f"delivery.relay {shown!r}: bad port") from None
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
            data_timeout=delivery.data_timeout,
            messages_per_connection=(
                (limits and limits.messages_per_connection) or delivery.messages_per_connection
            ),
            connections=delivery.connections_per_host,
            tls_verify=delivery.tls_verify,
            tls_ca=delivery.tls_ca,
        )


class SMTPRelayTransport(BaseTransport):
    """Deliver everything to one relay (smarthost) over pooled SMTP sessions."""

    def __init__(self, settings: RelaySettings, *, destination: str = "relay") -> None:
        self.settings = settings
        self.name = settings.name
        #: every delivery also goes through the relay: a throttle destination of its own
        #: (``[destinations.relay]``), which slow-downs and connection failures are charged to
        self.shared_destination = destination
        self._idle: deque[Session] = deque()
        #: a connection each; waiters are served high lane first
        self._slots = LaneSlots(settings.connections)
        self._tls_context: ssl.SSLContext | None = None
        self._closing = False

    def waiting(self, lane: str) -> int:
        """How many of ``lane``'s sends wait for a connection to the relay now."""
        return self._slots.waiting(lane)

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            s = self.settings
            self._tls_context = tls_context(verify=s.tls_verify, ca=s.tls_ca)
        return self._tls_context

    async def _connect(self) -> Session:
        """A new session to the relay; raises :class:`Refusal`."""
        tls = TLSPolicy(self._context(), implicit=self.settings.implicit_tls)
        return await open_session(self.settings, tls)

    @staticmethod
    def _reusable(session: Session) -> bool:
        return session.open and time.monotonic() - session.idle_since < IDLE_TIMEOUT

    async def _acquire(self, per_connection: int) -> Session:
        """The most recently used idle session that has carried fewer than ``per_connection``
        messages, else a new one. (Idle sessions that have carried more stay for destinations
        that allow more: an MX host's pool serves several.)"""
        found: Session | None = None
        spent: deque[Session] = deque()
        while self._idle:
            session = self._idle.pop()
            if not self._reusable(session):
                session.close(polite=False)
            elif session.sent < per_connection:
                found = session
                break
            else:
                spent.appendleft(session)
        self._idle.extend(spent)
        return found or await self._connect()

    def _release(self, session: Session, healthy: bool, per_connection: int) -> None:
        session.sent += 1
        if (
            not healthy
            or self._closing
            or session.sent >= per_connection
            or not session.open
            or len(self._idle) >= self.settings.connections
        ):
            session.close(polite=healthy)
            return
        session.idle_since = time.monotonic()
        self._idle.append(session)

    def close_expired(self) -> None:
        """Close the idle sessions past their time (QUIT to those still open)."""
        keep: deque[Session] = deque()
        for session in self._idle:
            if self._reusable(session):
                keep.append(session)
            else:
                session.close(polite=session.open)
        self._idle = keep

    async def send(
        self, envelope: Envelope, *, messages_per_connection: int | None = None
    ) -> list[Response]:
        """Send ``envelope`` on a pooled session; one response per recipient.
        ``messages_per_connection`` (default: the relay's) is the most messages a session
        carrying this one may carry in all."""
        per_connection = messages_per_connection or self.settings.messages_per_connection
        async with self._slots.hold(envelope.lane):
            for retry_on_fresh in (True, False):
                try:
                    session = await self._acquire(per_connection)
                except Refusal as refusal:
                    return [refusal.response(self.name) for _ in envelope.recipients]
                fresh = session.sent == 0
                try:
                    responses, healthy = await session.send(envelope)
                except StaleSession:
                    session.close(polite=False)
                    if retry_on_fresh and not fresh:
                        continue
                    text = f"{self.name}: connection closed before MAIL FROM was answered"
                    return [no_reply(text, self.name) for _ in envelope.recipients]
                except BaseException:  # cancelled mid-transaction: never pool it, close it
                    session.close(polite=False)
                    raise
                self._release(session, healthy, per_connection)
                return responses
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closing = True
        quits = [session.quit() for session in self._idle]
        self._idle.clear()
        await asyncio.gather(*quits)
