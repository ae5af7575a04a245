"""aiosmtpd's SMTP server with its per-connection and per-message costs cut, for postlane's two
SMTP listeners (submission and the provider simulator).

aiosmtpd 1.4 is correct but slow where mail volume hurts: its constructor scans every attribute
of the instance (``inspect.getmembers``) for ``auth_*`` and ``smtp_*`` methods, its path parser
defines a ``typing.Protocol`` class on every MAIL and RCPT, and DATA is read line by line (a
2 kB message is thirty awaits). :class:`FastSMTP` keeps aiosmtpd's behaviour and replies and
changes only those three things. They reach into aiosmtpd's internals (``_getaddr``,
``_reader``, ``_call_handler_hook``), which the version pin in pyproject.toml guards and the
submission and simulator tests exercise.
"""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

from aiosmtpd.smtp import MISSING, SMTP, syntax

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: a plain ``<local@domain>`` path, which needs no RFC 5322 parser
_PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z")


class FastSMTP(SMTP):
    _method_names: ClassVar[dict[type, list[str]]] = {}
    #: what the session is doing: "command" (waiting for one), "data" (receiving a message),
    #: "storing" (the DATA handler has the message and has not answered yet)
    phase = "command"
    #: the whole message, from the 354 to its final dot, must arrive within this many seconds
    #: (None: aiosmtpd's ``timeout``, which otherwise covers only the time to the next command)
    data_timeout: float | None = None

    def __dir__(self) -> list[str]:
        # all aiosmtpd's constructor looks for: the auth_* mechanisms and smtp_* commands
        cls = type(self)
        names = FastSMTP._method_names.get(cls)
        if names is None:
            names = sorted(n for n in dir(cls) if n.startswith(("auth_", "smtp_")))
            FastSMTP._method_names[cls] = names
        return names

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parsing, with a fast path for the plain ``<local@domain>`` paths
        nearly all mail uses (the same result aiosmtpd's RFC 5322 parser gives for them)."""
        match = _PLAIN_PATH.match(arg) if arg else None
        if match is None or (
            self.local_part_limit and len(match.group(1).rpartition("@")[0]) > self.local_part_limit
        ):
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        return match.group(1), match.group(2).lstrip()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in chunks instead of line by line; the same
        replies, the same dot-unstuffing, the same size limit."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.phase = "data"
        self._reset_timeout(self.data_timeout)
        try:
            content = await self._read_message()
            self._reset_timeout()  # the handler has the command timeout to answer
            if content is None:
                await self.push("552 Error: Too much mail data")
                self.envelope = self._create_envelope()
                return
            envelope.content = envelope.original_content = content
            self.phase = "storing"
            status = await self._call_handler_hook("DATA")
            self.envelope = self._create_envelope()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self.phase = "command"

    async def _read_message(self) -> bytes | None:
        """The message up to the lone dot, unstuffed; None if over the size limit (read to its
        end all the same, RFC 5321 4.2.5)."""
        reader = self._reader
        limit = self.data_size_limit
        chunks: list[bytes] = []
        size = 0
        tail = b"\r\n"  # the last bytes read: is a ".\r\n" at the start of a line?
        while True:
            try:
                piece = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                # no ".\r\n" within the stream's limit: take what is there and read on
                piece = await reader.readexactly(exc.consumed)
                ended = False
            else:
                ended = True
            tail = piece[-5:] if len(piece) >= 5 else (tail + piece)[-5:]
            ended = ended and tail[-5:-3] == b"\r\n"
            size += len(piece)
            if limit is None or size <= limit + 3:
                chunks.append(piece)
            if ended:
                break
        if limit is not None and size - 3 > limit:
            return None
        message = b"".join(chunks)[:-3]
        # RFC 5321 4.5.2: a line's leading dot was doubled by the client
        message = message.replace(b"\r\n.", b"\r\n")
        return message[1:] if message.startswith(b".") else message
