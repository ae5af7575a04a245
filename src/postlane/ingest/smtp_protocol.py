"""The SMTP server side of postlane's two inbound listeners (submission and bounces), written on
:class:`asyncio.Protocol` for the cost per message.

Why not aiosmtpd: under smtp-source load its design was the floor (docs/benchmarks.md, "SMTP
receive path: profile"): a StreamReader, a StreamWriter and a task per connection, a coroutine
and a timer handle per command, one ``send()`` per reply. Here a connection is one object fed by
``data_received``; commands that decide at once (all but DATA, AUTH and STARTTLS) are answered
without a coroutine, the replies to pipelined commands leave in one write, and one timer per
connection watches the deadlines.

What it speaks: RFC 5321 (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, VRFY answered 252,
HELP), PIPELINING (RFC 2920: commands buffered, answered in order, a batch of replies written
at once), CHUNKING (RFC 3030: BDAT; a refused chunk is read all the same), SIZE (RFC 1870),
8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), STARTTLS (RFC 3207: what was
pipelined after it is discarded, the session starts anew) and AUTH PLAIN/LOGIN (RFC 4954, only
over TLS). The replies and their texts are aiosmtpd's, which clients and tests know, where it had
one. Only ``<CRLF>.<CRLF>`` ends a message (no SMTP smuggling with bare LF).

What a listener decides is an :class:`SmtpHandler` (who may send from and to whom, what is done
with a message) and a :class:`Gate` (which connections are let in); the rest is here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Protocol, cast

from postlane.ingest.smtp_auth import AuthGuard, Outcome

__all__ = [
    "Envelope",
    "Gate",
    "ServerSettings",
    "Session",
    "SmtpConnection",
    "SmtpHandler",
    "parse_path",
]

log = logging.getLogger("postlane.smtp")

#: the longest command line (RFC 5321 4.5.3.1.4), with what SIZE and SMTPUTF8 add to MAIL
COMMAND_LIMIT = 512
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10
#: a line this long without its end is cut off unread, then answered 500 (aiosmtpd's limit)
LINE_LIMIT = 1001
#: unknown commands before the connection is closed
BOGUS_LIMIT = 5
#: input buffered while a command is being answered; past it, reading pauses
BUFFER_LIMIT = 64 * 1024

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: a plain ``<local@domain>`` path, which needs no RFC 5322 parser
_PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z")
_END_OF_DATA = b"\r\n.\r\n"


def parse_path(arg: str) -> tuple[str | None, str]:
    """The address of a MAIL or RCPT path and what follows it (the parameters); the address is
    None when the path cannot be parsed, ``"<>"`` for the null path. As aiosmtpd parses it, with
    a fast path for the plain ``<local@domain>`` nearly all mail uses."""
    if not arg:
        return "", ""
    match = _PLAIN_PATH.match(arg)
    if match is not None:
        return match.group(1), match.group(2).strip()
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, ""
    return str(address.addr_spec), str(rest).strip()


def _parameters(words: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 5321 4.1.2), or None if one is malformed."""
    result: dict[str, str | bool] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result


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


_COMMAND, _DATA, _CHUNK, _STORING, _BUSY = "command", "data", "chunk", "storing", "busy"


class SmtpConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, handler: SmtpHandler, gate: Gate, settings: ServerSettings) -> None:
        self.handler = handler
        self.gate = gate
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        #: "command" (reading commands), "data" (receiving a message), "storing" (the handler
        #: has the message and has not answered yet), "busy" (AUTH or STARTTLS under way)
        self.phase = _COMMAND
        self.session: Session | None = None
        self.envelope = Envelope()
        self.host = ""
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        self._buffer = bytearray()
        self._replies: list[bytes] = []
        self._close_after_flush = False
        self._skipping_line = False  # the rest of an over-long line is being dropped
        self._bogus = BOGUS_LIMIT
        self._auth_failures = 0
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._line_waiter: asyncio.Future[bytes | None] | None = None
        # the message being received: b"\r\n" + what came so far (see _take_message)
        self._message = bytearray()
        self._dropped = 0
        self._kept: bytes | None = None
        # BDAT (RFC 3030): the octets of this chunk still to come, whether it is the last, and
        # the reply it gets once read (None: the chunk is taken into the message)
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_refusal: str | None = None
        # one timer per connection: it fires at or before the deadline and looks again
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = stream.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = self.gate.admit(self, self.host)
        if refusal is not None:
            # answered and closed without reading a byte, nor starting a session
            stream.write(refusal.encode() + b"\r\n")
            stream.close()
            return
        self._transport = stream
        self._admitted = True
        settings = self.settings
        self.session = Session(self.host, settings.tls_context is not None)
        self._set_deadline(settings.command_timeout)
        stream.write(f"220 {settings.hostname} {settings.ident}\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._line_waiter is not None and not self._line_waiter.done():
            self._line_waiter.set_result(None)
        if self._task is not None and self.phase == _BUSY:
            self._task.cancel()  # AUTH or STARTTLS; a message being stored is stored
        if self._admitted:
            self._admitted = False
            self.gate.release(self, self.host)

    def say_and_close(self, reply: str) -> None:
        """Send one reply and close the connection."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        with contextlib.suppress(Exception):
            transport.write(reply.encode() + b"\r\n")
        transport.close()

    def shut_down(self) -> None:
        """The listener is stopping: 421 and close."""
        host = self.settings.hostname
        self.say_and_close(f"421 4.3.2 {host} Service shutting down, try again later")

    def pause_writing(self) -> None:
        # a client that does not read its replies: stop reading its commands too
        self._pause()

    def resume_writing(self) -> None:
        if len(self._buffer) <= BUFFER_LIMIT:
            self._resume()

    def _pause(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()

    # -- deadlines ---------------------------------------------------------------------------------

    def _set_deadline(self, seconds: float) -> None:
        self._deadline = deadline = self.loop.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return  # it fires first, and looks again
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        phase = "data" if self.phase in (_DATA, _CHUNK) else "command"
        assert self.session is not None
        reply = self.handler.timed_out(self.session, phase)
        if reply is None:
            self._transport.close()
        else:
            self.say_and_close(reply)

    # -- reading -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.phase == _DATA or self.phase == _CHUNK:
            leftover = self._take_message(data) if self.phase == _DATA else self._take_chunk(data)
            if leftover is None:
                return
            data = leftover
        self._buffer += data
        if self.phase == _COMMAND:
            self._process()
        elif self._line_waiter is not None:
            self._answer_waiter()
        if len(self._buffer) > BUFFER_LIMIT:
            self._pause()

    def _process(self) -> None:
        """Answer the buffered commands until one needs to wait (DATA's message, a store, AUTH,
        STARTTLS), then send the replies at once."""
        buffer = self._buffer
        start = 0
        try:
            while self.phase == _COMMAND and self._transport is not None:
                end = buffer.find(b"\n", start)
                if end < 0:
                    if len(buffer) - start > LINE_LIMIT:
                        start = len(buffer)
                        self._skipping_line = True
                    break
                line = bytes(buffer[start:end])
                start = end + 1
                if self._skipping_line:
                    self._skipping_line = False
                    self._reply("500 Command line too long")
                    continue
                self._command(line)
                if self.phase == _DATA or self.phase == _CHUNK:
                    rest = bytes(buffer[start:])
                    start = len(buffer)
                    if self.phase == _DATA:
                        leftover = self._take_message(rest)
                    else:
                        leftover = self._take_chunk(rest)
                    if leftover is not None:
                        buffer += leftover
        finally:
            del buffer[:start]
            self._flush()
            if self.phase == _COMMAND and len(buffer) <= BUFFER_LIMIT:
                self._resume()

    def _take_line(self) -> bytes | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    def _answer_waiter(self) -> None:
        waiter = self._line_waiter
        if waiter is None or waiter.done():
            return
        line = self._take_line()
        if line is not None:
            self._line_waiter = None
            waiter.set_result(line)
        elif len(self._buffer) > LINE_LIMIT:
            self._buffer.clear()
            self._line_waiter = None
            waiter.set_result(b"")  # an over-long answer: refused as bad base64

    def _reply(self, text: str) -> None:
        if not text.isprintable():
            # a reply may echo what the client sent: no control character (a CR, a NUL) nor
            # undecodable byte goes back into the reply stream
            text = "".join(c if c.isprintable() else "?" for c in text)
        self._replies.append(text.encode() + b"\r\n")
        if text.startswith("421"):  # "closing transmission channel" (RFC 5321 4.2.2)
            self._close_after_flush = True
            self.phase = _BUSY  # nothing more is read

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            self._replies.clear()
            return
        if self._replies:
            replies = self._replies
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
            replies.clear()
        if self._close_after_flush:
            transport.close()

    # -- commands ----------------------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        session = self.session
        assert session is not None
        line = line.rstrip(b"\r\n")
        if not line:
            self._reply("500 Error: bad syntax")
            return
        verb, _, rest = line.partition(b" ")
        try:
            command = verb.upper().decode("ascii")
        except UnicodeDecodeError:
            self._reply("500 Error: bad syntax")
            return
        arg = rest.strip().decode("utf-8", "surrogateescape") if rest else None
        limit = MAIL_LIMIT if command == "MAIL" and session.extended_smtp else COMMAND_LIMIT
        if len(line) > limit:
            self._reply("500 Command line too long")
            return
        method = _COMMANDS.get(command)
        if method is None:
            self._bogus -= 1
            if self._bogus < 1:
                self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._close_after_flush = True
                self.phase = _BUSY
                return
            self._reply(f'500 Error: command "{command}" not recognized')
            return
        self._set_deadline(self.settings.command_timeout)
        try:
            method(self, arg)
        except Exception as error:
            self._reply(self.handler.failed(session, error))

    def _helo_needed(self, verb: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self._reply(f"503 Error: send {verb} first")
            return True
        return False

    def smtp_HELO(self, arg: str | None) -> None:
        if not arg:
            self._reply("501 Syntax: HELO hostname")
            return
        assert self.session is not None
        self.envelope = Envelope()
        self._message = bytearray()
        self.session.extended_smtp = False
        self.session.host_name = arg
        self._reply(f"250 {self.settings.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if not arg:
            self._reply("501 Syntax: EHLO hostname")
            return
        session = self.session
        assert session is not None
        settings = self.settings
        self.envelope = Envelope()
        self._message = bytearray()
        session.extended_smtp = True
        session.host_name = arg
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if settings.tls_context is not None and not session.tls:
            lines.append("STARTTLS")
        if settings.guard is not None and session.tls:
            lines.append("AUTH LOGIN PLAIN")
        lines.append("HELP")
        last = len(lines) - 1
        for index, text in enumerate(lines):
            self._reply(f"250{' ' if index == last else '-'}{text}")

    def smtp_NOOP(self, arg: str | None) -> None:
        self._reply("250 OK")

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: RSET")
            return
        self.envelope = Envelope()
        self._message = bytearray()
        self._reply("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: QUIT")
            return
        self._reply("221 Bye")
        self._close_after_flush = True
        self.phase = _BUSY

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self._reply("501 Syntax: VRFY <address>")
            return
        address, _ = parse_path(arg)
        if address is None:
            self._reply(f"502 Could not VRFY {arg}")
            return
        # RFC 5321 3.5.3: 252 says nothing of whether the mailbox exists
        self._reply("252 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        self._reply("502 EXPN not implemented")

    def smtp_HELP(self, arg: str | None) -> None:
        self._reply(f"250 Supported commands: {' '.join(sorted(_COMMANDS))}")

    def _path(self, keyword: str, arg: str | None, syntax: str) -> tuple[str, list[str]] | None:
        """The address and parameters of MAIL or RCPT, or None once the error is answered."""
        assert self.session is not None
        if self.session.extended_smtp:
            syntax += " [SP <mail-parameters>]"
        if arg is None or arg[: len(keyword)].upper() != keyword:
            self._reply(syntax)
            return None
        address, rest = parse_path(arg[len(keyword) :].strip())
        if address is None:
            self._reply("553 5.1.3 Error: malformed address")
            return None
        if not address or (rest and not self.session.extended_smtp):
            self._reply(syntax)
            return None
        return address, rest.upper().split()

    def smtp_MAIL(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        syntax = "501 Syntax: MAIL FROM: <address>"
        path = self._path("FROM:", arg, syntax)
        if path is None:
            return
        address, options = path
        envelope = self.envelope
        if envelope.mail_from is not None:
            self._reply("503 Error: nested MAIL command")
            return
        params = _parameters(options)
        if params is None:
            self._path_syntax_error(syntax)
            return
        body = params.pop("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            self._reply("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if smtputf8 is not False and smtputf8 is not True:
            self._reply("501 Error: SMTPUTF8 takes no arguments")
            return
        size = params.pop("SIZE", None)
        if size is not None:
            if not isinstance(size, str) or not size.isdigit():
                self._path_syntax_error(syntax)
                return
            if int(size) > self.settings.max_size:
                self._reply("552 Error: message size exceeds fixed maximum message size")
                return
        if params:
            self._reply("555 MAIL FROM parameters not recognized or not implemented")
            return
        assert self.session is not None
        reply = self.handler.mail(self.session, envelope, address, options)
        if reply.startswith("2"):
            envelope.smtp_utf8 = smtputf8
        self._reply(reply)

    def _path_syntax_error(self, syntax: str) -> None:
        assert self.session is not None
        self._reply(syntax + (" [SP <mail-parameters>]" if self.session.extended_smtp else ""))

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.mail_from:
            self._reply("503 Error: need MAIL command")
            return
        syntax = "501 Syntax: RCPT TO: <address>"
        path = self._path("TO:", arg, syntax)
        if path is None:
            return
        address, options = path
        params = _parameters(options)
        if params is None:
            self._path_syntax_error(syntax)
            return
        if params:
            self._reply("555 RCPT TO parameters not recognized or not implemented")
            return
        assert self.session is not None
        self._reply(self.handler.rcpt(self.session, self.envelope, address, options))

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.rcpt_tos:
            self._reply(self.settings.need_rcpt)
            return
        if arg:
            self._reply(self.settings.data_syntax)
            return
        if self._message:  # RFC 3030 3: not both in one transaction
            self._reply("503 5.5.1 Error: BDAT chunks already sent, DATA not allowed")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self.phase = _DATA
        self._message = bytearray(b"\r\n")
        self._dropped = 0
        self._kept = None
        self._set_deadline(self.settings.data_timeout)

    # -- DATA --------------------------------------------------------------------------------------

    def _take_message(self, data: bytes) -> bytes | None:
        """Add ``data`` to the message being received; at its end, hand it to the handler and
        return what followed it (pipelined commands), else None."""
        message = self._message
        # the message is kept with a leading CRLF, so the end is always CRLF "." CRLF, even for
        # an empty message, and a leading dot is unstuffed like every other
        start = max(len(message) - 4, 0)
        message += data
        end = message.find(_END_OF_DATA, start)
        if end < 0:
            self._trim()
            return None
        size = self._dropped + end  # the message's bytes, stuffed, with its last CRLF
        leftover = bytes(message[end + 5 :])
        kept = self._kept
        if size > self.settings.max_size:
            content = None
        elif kept is not None:
            content = kept.replace(b"\r\n.", b"\r\n")[2:]
        else:
            # RFC 5321 4.5.2: a line's leading dot was doubled by the client
            content = bytes(message[: end + 2]).replace(b"\r\n.", b"\r\n")[2:]
        self._message = bytearray()
        self._kept = None
        if content is None:
            self.envelope = Envelope()
            self.phase = _COMMAND
            self._set_deadline(self.settings.command_timeout)
            assert self.session is not None
            self._reply(self.handler.too_big(self.session))
            return leftover
        self._hand_over(content)
        self._buffer += leftover
        return None

    async def _store(self, envelope: Envelope) -> None:
        session = self.session
        assert session is not None
        try:
            reply = await self.handler.data(session, envelope)
        except Exception as error:
            reply = self.handler.failed(session, error)
        self._task = None
        self.envelope = Envelope()
        self.phase = _COMMAND
        self._set_deadline(self.settings.command_timeout)
        self._reply(reply)
        if self.gate.closing and self.phase == _COMMAND:
            self._flush()
            self.shut_down()
            return
        self._process()

    # -- BDAT (RFC 3030 CHUNKING) ------------------------------------------------------------------

    def smtp_BDAT(self, arg: str | None) -> None:
        words = (arg or "").split()
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not words or len(words) > 2 or not words[0].isdigit() or (len(words) == 2 and not last):
            # without a size the chunk cannot be told from what follows: nothing is read
            self._reply("501 5.5.4 Syntax: BDAT <chunk-size> [LAST]")
            return
        assert self.session is not None
        refusal = None
        if not self.session.host_name or not self.session.extended_smtp:
            refusal = "503 5.5.1 Error: send EHLO first"
        elif not self.envelope.rcpt_tos:
            refusal = self.settings.need_rcpt
        # the chunk is read even when refused (RFC 3030 4.2): its octets are not commands
        self._chunk_left = int(words[0])
        self._chunk_last = last
        self._chunk_refusal = refusal
        if refusal is None and not self._message:
            self._message = bytearray(b"\r\n")  # as DATA's: the first of this message's chunks
            self._dropped = 0
            self._kept = None
        self.phase = _CHUNK
        self._set_deadline(self.settings.data_timeout)

    def _take_chunk(self, data: bytes) -> bytes | None:
        """Add ``data`` to the chunk being received; once it is complete, answer it and return
        what followed it (None while more is to come, or once the message is with the handler)."""
        count = self._chunk_left
        piece, leftover = (data, b"") if len(data) <= count else (data[:count], data[count:])
        self._chunk_left -= len(piece)
        if self._chunk_refusal is None and piece:
            self._hold(piece)
        if self._chunk_left > 0:
            return None
        self.phase = _COMMAND
        self._set_deadline(self.settings.command_timeout)
        assert self.session is not None
        if self._chunk_refusal is not None:
            self._reply(self._chunk_refusal)
            return leftover
        size = self._dropped + len(self._message) - 2
        if size > self.settings.max_size:
            self._message = bytearray()
            self.envelope = Envelope()
            self._reply(self.handler.too_big(self.session))
            return leftover
        if not self._chunk_last:
            self._reply(f"250 2.0.0 {size} octets received")
            return leftover
        held = self._kept if self._kept is not None else bytes(self._message)
        self._message = bytearray()
        self._kept = None
        self._hand_over(held[2:])  # no dot-stuffing in chunks
        self._buffer += leftover
        return None

    def _hold(self, data: bytes) -> None:
        self._message += data
        self._trim()

    def _trim(self) -> None:
        """Of the message being received keep what is held (``keep`` or ``max_size``), and of
        what is past it only the last four bytes (where DATA's end may begin)."""
        message = self._message
        settings = self.settings
        held = settings.max_size if settings.keep is None else settings.keep
        if len(message) > held + 8:
            if self._kept is None:
                self._kept = bytes(message[: held + 2])
            self._dropped += len(message) - 4
            del message[:-4]

    def _hand_over(self, content: bytes) -> None:
        """The message has arrived: the handler has it until its reply."""
        self.envelope.content = content
        self.phase = _STORING
        self._set_deadline(self.settings.command_timeout)  # the handler's time to answer
        self._flush()
        self._task = self.loop.create_task(self._store(self.envelope))

    # -- STARTTLS and AUTH -------------------------------------------------------------------------

    def smtp_STARTTLS(self, arg: str | None) -> None:
        assert self.session is not None
        if arg:
            self._reply("501 Syntax: STARTTLS")
            return
        if self.settings.tls_context is None:
            self._reply("454 TLS not available")
            return
        if self.session.tls:
            self._reply("503 5.5.1 Error: TLS already active")
            return
        self._reply("220 Ready to start TLS")
        assert self._transport is not None
        # no byte more in clear: what the client pipelined after STARTTLS is dropped (RFC 3207
        # 5, command injection), and its TLS hello must reach start_tls, not data_received
        self._transport.pause_reading()
        self.phase = _BUSY
        self._task = self.loop.create_task(self._start_tls())

    async def _start_tls(self) -> None:
        transport = self._transport
        context = self.settings.tls_context
        assert transport is not None and context is not None and self.session is not None
        self._buffer.clear()
        try:
            tls = await self.loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.settings.command_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("SMTP: TLS handshake with %s failed: %s", self.host, exc)
            transport.close()
            return
        finally:
            self._task = None
        if tls is None:
            transport.close()
            return
        self._transport = tls
        # a new session over TLS: EHLO again, nothing known from before (RFC 3207 4.2)
        self.session = Session(self.host, tls_offered=True)
        self.session.tls = True
        self.envelope = Envelope()
        self.phase = _COMMAND
        self._set_deadline(self.settings.command_timeout)
        # what came over TLS while this coroutine waited to resume (the client's EHLO)
        self._process()

    def smtp_AUTH(self, arg: str | None) -> None:
        session = self.session
        assert session is not None
        if self._helo_needed("EHLO"):
            return
        if not session.extended_smtp:
            self._reply("500 Error: command 'AUTH' not recognized")
            return
        if self.settings.guard is None or not session.tls:
            self._reply("538 5.7.11 Encryption required for requested authentication mechanism")
            self._auth_failed()
            return
        if session.authenticated:
            self._reply("503 Already authenticated")
            return
        words = (arg or "").split()
        if not words:
            self._reply("501 Not enough value")
            self._auth_failed()
            return
        if len(words) > 2:
            self._reply("501 Too many values")
            self._auth_failed()
            return
        mechanism = words[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            self._reply("504 5.5.4 Unrecognized authentication type")
            self._auth_failed()
            return
        self.phase = _BUSY
        initial = words[1] if len(words) == 2 else None
        self._task = self.loop.create_task(self._authenticate(mechanism, initial))

    async def _authenticate(self, mechanism: str, initial: str | None) -> None:
        try:
            credentials = await self._credentials(mechanism, initial)
            if credentials is not None:
                await self._check(*credentials)
            else:
                self._auth_failed()
        finally:
            self._task = None
        if self._transport is None or self._close_after_flush:
            return
        self.phase = _COMMAND
        self._set_deadline(self.settings.command_timeout)
        self._process()

    async def _credentials(self, mechanism: str, initial: str | None) -> tuple[str, str] | None:
        """The user name and password of an AUTH exchange, or None once its error is answered."""
        if mechanism == "PLAIN":
            blob = await self._decoded(initial) if initial is not None else await self._ask(b"")
            if blob is None:
                return None
            parts = blob.split(b"\x00")
            if len(parts) != 3:
                self._reply("501 5.5.2 Can't split auth value")
                return None
            login, password = parts[1], parts[2]
        else:
            login_or_none = (
                await self._decoded(initial)
                if initial is not None
                else await self._ask(b"User Name\x00")
            )
            if login_or_none is None:
                return None
            password_or_none = await self._ask(b"Password\x00")
            if password_or_none is None:
                return None
            login, password = login_or_none, password_or_none
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def _decoded(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text.encode(), validate=True)
        except (binascii.Error, ValueError):
            self._reply("501 5.5.2 Can't decode base64")
            return None

    async def _ask(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge and read the client's answer, decoded; None once a refusal is
        answered (or the connection is gone)."""
        self._reply("334 " + base64.b64encode(challenge).decode())
        self._flush()
        waiter: asyncio.Future[bytes | None] = self.loop.create_future()
        self._line_waiter = waiter
        self._answer_waiter()
        line = await waiter
        self._line_waiter = None
        if line is None:
            return None
        blob = line.strip()
        if blob == b"*":
            self._reply("501 5.7.0 Auth aborted")
            return None
        return await self._decoded(blob.decode("ascii", "replace"))

    async def _check(self, username: str, password: str) -> None:
        session = self.session
        guard = self.settings.guard
        assert session is not None and guard is not None
        outcome = await guard.authenticate(self.host, username, password)
        if outcome is Outcome.SUCCESS:
            session.authenticated = True
            session.auth_data = username
            self._reply("235 2.7.0 Authentication successful")
        elif outcome is Outcome.REFUSED_ADDRESS:
            self._reply("421 4.7.0 Too many failed authentications from your address, closing")
        elif outcome is Outcome.REFUSED_TOTAL:
            self._reply("454 4.7.0 Temporary authentication failure, try again later")
            self._auth_failed()
        else:
            self._reply("535 5.7.8 Authentication credentials invalid")
            self._auth_failed()
        self._flush()

    def _auth_failed(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self.settings.max_auth_failures and not self._close_after_flush:
            self._reply("421 4.7.0 Too many failed authentications, closing")


_COMMANDS: dict[str, Callable[[SmtpConnection, str | None], None]] = {
    name[5:]: getattr(SmtpConnection, name)
    for name in dir(SmtpConnection)
    if name.startswith("smtp_")
}
