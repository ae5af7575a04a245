"""What one SMTP listener (submission, bounces) brings to postlane's SMTP server
(:mod:`postlane.ingest.smtp_protocol`), and what the server shows it: its
:class:`SmtpHandler` (who may send from and to whom, what is done with a message), its
:class:`Gate` (which connections are let in), its :class:`ServerSettings`, and the
:class:`Session` and :class:`Envelope` of each connection."""

from __future__ import annotations

import collections
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from postlane.ingest.smtp_auth import AuthGuard, address_key

if TYPE_CHECKING:
    from postlane.ingest.smtp_protocol import SmtpConnection

__all__ = ["Envelope", "Gate", "OpenConnections", "ServerSettings", "Session", "SmtpHandler"]


class OpenConnections:
    """A listener's connections open now, in all and by client address (an IPv6 /64): what
    its caps count, and what it closes when it stops."""

    def __init__(self) -> None:
        self._open: set[SmtpConnection] = set()
        self._by_address: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[SmtpConnection]:
        return iter(list(self._open))

    def __contains__(self, connection: object) -> bool:
        return connection in self._open

    def from_address(self, host: str) -> int:
        """How many are open from ``host``'s address (its /64 for IPv6)."""
        return self._by_address[address_key(host)]

    def add(self, connection: SmtpConnection, host: str) -> None:
        self._open.add(connection)
        self._by_address[address_key(host)] += 1

    def discard(self, connection: SmtpConnection, host: str) -> bool:
        """Forget a connection; False when it was not counted (refused at its start)."""
        if connection not in self._open:
            return False
        self._open.discard(connection)
        key = address_key(host)
        self._by_address[key] -= 1
        if self._by_address[key] <= 0:
            del self._by_address[key]
        return True


class Session:
    """One connection's state, as the handler sees it."""

    __slots__ = (
        "auth_data",
        "authenticated",
        "extended_smtp",
        "host_name",
        "peer",
        "tls",
        "tls_offered",
    )

    def __init__(self, peer: str, tls_offered: bool) -> None:
        #: the client's address
        self.peer = peer
        #: what the client said in EHLO or HELO (None before)
        self.host_name: str | None = None
        self.extended_smtp = False
        #: the session runs over TLS (after STARTTLS)
        self.tls = False
        #: STARTTLS is offered on this listener
        self.tls_offered = tls_offered
        self.authenticated = False
        #: the user name an AUTH succeeded with
        self.auth_data: str | None = None


class Envelope:
    """One mail transaction: MAIL, the accepted RCPTs, then the message."""

    __slots__ = ("content", "mail_from", "mail_options", "rcpt_options", "rcpt_tos", "smtp_utf8")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.smtp_utf8 = False
        #: the message as received, dot-unstuffed (at most ``keep`` bytes of it)
        self.content: bytes = b""


class SmtpHandler(Protocol):
    """What one listener decides. ``mail`` and ``rcpt`` answer at once; each returns the whole
    reply line (``"250 2.1.0 OK"``) and records what it accepts in the envelope."""

    def mail(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        """A MAIL command whose syntax and parameters were checked; sets ``mail_from``."""
        ...

    def rcpt(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        """A RCPT command whose syntax was checked; appends to ``rcpt_tos``."""
        ...

    async def data(self, session: Session, envelope: Envelope) -> str:
        """The message has arrived; the reply is given when this returns (so after the
        message is stored, if it is stored)."""
        ...

    def too_big(self, session: Session) -> str:
        """The reply to a message over ``max_size`` (read to its end, RFC 5321 4.2.5)."""
        ...

    def failed(self, session: Session, error: Exception) -> str:
        """The reply to an unexpected error in a command (logged and counted here)."""
        ...

    def timed_out(self, session: Session, phase: str) -> str | None:
        """A client sent nothing in time (``phase``: "command" or "data"): what it is told
        before the connection closes (None: nothing)."""
        ...


class Gate(Protocol):
    """Which connections a listener lets in, and whether it is stopping."""

    @property
    def closing(self) -> bool:
        """The listener is stopping: a session that finishes a message is closed after it."""
        ...

    def admit(self, connection: SmtpConnection, host: str) -> str | None:
        """None to let the connection in, else the 421 it is told before being closed."""
        ...

    def release(self, connection: SmtpConnection, host: str) -> None:
        """An admitted connection has closed."""
        ...


@dataclass(frozen=True)
class ServerSettings:
    """What one listener's connections share."""

    hostname: str
    #: the greeting's text after the host name
    ident: str
    #: a bigger message is read to its end and refused (SIZE announces it)
    max_size: int
    command_timeout: float
    data_timeout: float
    #: the most of one message held in memory (what is past it is read and dropped); None: all
    keep: int | None = None
    #: STARTTLS offered when set
    tls_context: ssl.SSLContext | None = None
    #: AUTH PLAIN/LOGIN offered after STARTTLS when set
    guard: AuthGuard | None = None
    #: failed AUTH attempts on one connection before it is closed
    max_auth_failures: int = 3
    #: the replies of DATA out of order and with an argument
    need_rcpt: str = "503 Error: need RCPT command"
    data_syntax: str = "501 Syntax: DATA"
