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
with a message) and a :class:`Gate` (which connections are let in), both in
:mod:`~postlane.ingest.smtp_listener`; the rest is here: the connection, its commands and their
replies, with what a command line may hold in :mod:`~postlane.ingest.smtp_syntax`, the message
being received in :mod:`~postlane.ingest.smtp_body` and AUTH's exchange in
:mod:`~postlane.ingest.smtp_sasl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import cast

from postlane.ingest.smtp_auth import Outcome
from postlane.ingest.smtp_body import MessageBuffer
from postlane.ingest.smtp_listener import Envelope, Gate, ServerSettings, Session, SmtpHandler
from postlane.ingest.smtp_sasl import MECHANISMS, SaslExchange
from postlane.ingest.smtp_syntax import (
    COMMAND_LIMIT,
    LINE_LIMIT,
    MAIL_LIMIT,
    PATH_SYNTAX,
    is_one_word,
    is_utf8,
    parse_parameters,
    parse_path,
)
from postlane.toml_values import is_decimal

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

#: unknown commands before the connection is closed
BOGUS_LIMIT = 5
#: commands that move no mail (NOOP, RSET, VRFY, EXPN, HELP) between two messages before the
#: connection is closed, as Postfix's ``smtpd_junk_command_limit``: a client cannot hold a
#: connection (one of the listener's few) forever by saying NOOP before each timeout
JUNK_LIMIT = 100
#: RFC 6531 3.4: a non-ASCII address in a transaction whose MAIL did not say SMTPUTF8
_NEEDS_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send non-ASCII addresses"


_JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
#: input buffered while a command is being answered; past it, reading pauses
BUFFER_LIMIT = 64 * 1024
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
        self._junk = JUNK_LIMIT
        self._auth_failures = 0
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._line_waiter: asyncio.Future[bytes | None] | None = None
        # the message being received, by DATA or BDAT
        self._message = MessageBuffer(settings.max_size if settings.keep is None else settings.keep)
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
                self._goodbye("502 5.5.1 Too many unrecognized commands, goodbye.")
            else:
                self._reply(f'500 Error: command "{command}" not recognized')
            return
        if command in _JUNK:
            self._junk -= 1
            if self._junk < 0:
                self._goodbye("421 4.7.0 Error: too many commands that move no mail, goodbye")
                return
        self._set_deadline(self.settings.command_timeout)
        try:
            method(self, arg)
        except Exception as error:
            self._reply(self.handler.failed(session, error))

    def _goodbye(self, reply: str) -> None:
        """Answer, then close: nothing more is read."""
        self._reply(reply)
        self._close_after_flush = True
        self.phase = _BUSY

    def _helo_needed(self, verb: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self._reply(f"503 Error: send {verb} first")
            return True
        return False

    def smtp_HELO(self, arg: str | None) -> None:
        if not arg or not is_one_word(arg):
            self._reply("501 Syntax: HELO hostname")
            return
        assert self.session is not None
        self.envelope = Envelope()
        self._message.discard()
        self.session.extended_smtp = False
        self.session.host_name = arg
        self._reply(f"250 {self.settings.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if not arg or not is_one_word(arg):
            self._reply("501 Syntax: EHLO hostname")
            return
        session = self.session
        assert session is not None
        settings = self.settings
        self.envelope = Envelope()
        self._message.discard()
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
        self._message.discard()
        self._reply("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: QUIT")
            return
        self._goodbye("221 Bye")

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
        self._reply(f"214 Supported commands: {' '.join(sorted(_COMMANDS))}")

    def _path(self, keyword: str, arg: str | None) -> tuple[str, list[str]] | None:
        """The address of MAIL or RCPT and the words of its parameters, or None once the error
        is answered."""
        assert self.session is not None
        if arg is None or arg[: len(keyword)].upper() != keyword:
            self._path_syntax_error(keyword)
            return None
        address, rest = parse_path(arg[len(keyword) :].strip())
        if address is None:
            self._reply("553 5.1.3 Error: malformed address")
            return None
        if not address.isascii() and not is_utf8(address):
            self._reply("553 5.1.3 Error: malformed address (not valid UTF-8)")
            return None
        if not address or (rest and not self.session.extended_smtp):
            self._path_syntax_error(keyword)
            return None
        return address, rest.upper().split()

    def _parameters(self, keyword: str, options: list[str]) -> dict[str, str | bool] | None:
        """The ESMTP parameters of MAIL or RCPT, or None once their syntax error is answered."""
        params = parse_parameters(options)
        if params is None:
            self._path_syntax_error(keyword)
        return params

    def _path_syntax_error(self, keyword: str) -> None:
        assert self.session is not None
        syntax = PATH_SYNTAX[keyword]
        self._reply(syntax + (" [SP <mail-parameters>]" if self.session.extended_smtp else ""))

    def smtp_MAIL(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        path = self._path("FROM:", arg)
        if path is None:
            return
        address, options = path
        envelope = self.envelope
        if envelope.mail_from is not None:
            self._reply("503 Error: nested MAIL command")
            return
        params = self._parameters("FROM:", options)
        if params is None:
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
            if not isinstance(size, str) or not is_decimal(size):
                self._path_syntax_error("FROM:")
                return
            if int(size) > self.settings.max_size:
                self._reply("552 5.3.4 Message size exceeds fixed maximum message size")
                return
        if self.settings.guard is not None and self.session is not None and self.session.tls:
            # AUTH is offered, so (RFC 4954 5) AUTH=<mailbox> or AUTH=<> is read and set aside:
            # postlane never passes the submitter's word on who authored the mail further on
            params.pop("AUTH", None)
        if params:
            self._reply("555 MAIL FROM parameters not recognized or not implemented")
            return
        if not smtputf8 and not address.isascii():
            self._reply(_NEEDS_SMTPUTF8)
            return
        assert self.session is not None
        reply = self.handler.mail(self.session, envelope, address, options)
        if reply.startswith("2"):
            envelope.smtp_utf8 = smtputf8
        self._reply(reply)

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.mail_from:
            self._reply("503 Error: need MAIL command")
            return
        path = self._path("TO:", arg)
        if path is None:
            return
        address, options = path
        params = self._parameters("TO:", options)
        if params is None:
            return
        if params:
            self._reply("555 RCPT TO parameters not recognized or not implemented")
            return
        if not self.envelope.smtp_utf8 and not address.isascii():
            self._reply(_NEEDS_SMTPUTF8)
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
        self._message.begin()
        self._set_deadline(self.settings.data_timeout)

    # -- DATA --------------------------------------------------------------------------------------

    def _take_message(self, data: bytes) -> bytes | None:
        """Add ``data`` to the message being received; at its end, hand it to the handler and
        return what followed it (pipelined commands), else None."""
        message = self._message
        leftover = message.add_dotted(data)
        if leftover is None:
            return None
        if message.size > self.settings.max_size:
            message.discard()
            self.envelope = Envelope()
            self.phase = _COMMAND
            self._set_deadline(self.settings.command_timeout)
            assert self.session is not None
            self._reply(self.handler.too_big(self.session))
            return leftover
        self._hand_over(message.take(unstuff=True))
        self._buffer += leftover
        return None

    async def _store(self, envelope: Envelope) -> None:
        session = self.session
        assert session is not None
        try:
            reply = await self.handler.data(session, envelope)
        except Exception as error:
            reply = self.handler.failed(session, error)
        if reply.startswith("2"):
            self._junk = JUNK_LIMIT  # a client moving mail may RSET or NOOP between messages
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
        malformed = not words or len(words) > 2 or (len(words) == 2 and not last)
        if malformed or not is_decimal(words[0]):
            # without a size the chunk cannot be told from what follows: nothing is read
            self._reply("501 5.5.4 Syntax: BDAT <chunk-size> [LAST]")
            return
        assert self.session is not None
        if int(words[0]) > self.settings.max_size:
            # a chunk no message could hold: reading it (as a refused chunk is read) would tie
            # the connection up for as long as the client cares to send; it cannot be told from
            # what follows unread, so the session ends here
            self.say_and_close(
                "552 5.3.4 Error: chunk size exceeds fixed maximum message size, closing"
            )
            return
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
            self._message.begin()  # the first of this message's chunks
        self.phase = _CHUNK
        self._set_deadline(self.settings.data_timeout)

    def _take_chunk(self, data: bytes) -> bytes | None:
        """Add ``data`` to the chunk being received; once it is complete, answer it and return
        what followed it (None while more is to come, or once the message is with the handler)."""
        count = self._chunk_left
        piece, leftover = (data, b"") if len(data) <= count else (data[:count], data[count:])
        self._chunk_left -= len(piece)
        if self._chunk_refusal is None and piece:
            self._message.add(piece)
        if self._chunk_left > 0:
            return None
        self.phase = _COMMAND
        self._set_deadline(self.settings.command_timeout)
        assert self.session is not None
        if self._chunk_refusal is not None:
            self._reply(self._chunk_refusal)
            return leftover
        message = self._message
        size = message.size
        if size > self.settings.max_size:
            message.discard()
            self.envelope = Envelope()
            self._reply(self.handler.too_big(self.session))
            return leftover
        if not self._chunk_last:
            self._reply(f"250 2.0.0 {size} octets received")
            return leftover
        self._hand_over(message.take(unstuff=False))  # no dot-stuffing in chunks
        self._buffer += leftover
        return None

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
        if mechanism not in MECHANISMS:
            self._reply("504 5.5.4 Unrecognized authentication type")
            self._auth_failed()
            return
        self.phase = _BUSY
        initial = words[1] if len(words) == 2 else None
        self._task = self.loop.create_task(self._authenticate(mechanism, initial))

    async def _authenticate(self, mechanism: str, initial: str | None) -> None:
        try:
            exchange = SaslExchange(self._ask, self._reply)
            credentials = await exchange.credentials(mechanism, initial)
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

    async def _ask(self, challenge: str) -> bytes | None:
        """Send a 334 challenge and wait for the client's answer line (None: the connection is
        gone)."""
        self._reply(challenge)
        self._flush()
        waiter: asyncio.Future[bytes | None] = self.loop.create_future()
        self._line_waiter = waiter
        self._answer_waiter()
        line = await waiter
        self._line_waiter = None
        return line

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
