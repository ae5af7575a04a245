"""The message an SMTP connection is receiving, by DATA or in BDAT chunks (RFC 3030), as it
arrives: what postlane's SMTP server (:mod:`postlane.ingest.smtp_protocol`) holds of it in
memory, its size, and where DATA's message ends."""

from __future__ import annotations

__all__ = ["MessageBuffer"]

_END_OF_DATA = b"\r\n.\r\n"


class MessageBuffer:
    """One connection's message under way (one buffer per connection, emptied between
    messages).

    The message is held with a leading CRLF, so that DATA's end is always CRLF "." CRLF, even for
    an empty message, and a leading dot is unstuffed like every other. Of a message larger than
    ``held`` bytes, only the first ``held`` are kept: what is past them is counted and dropped,
    but for its last four bytes (where DATA's end may begin)."""

    __slots__ = ("_data", "_dropped", "_held", "_kept")

    def __init__(self, held: int) -> None:
        self._held = held
        self._data = bytearray()
        #: the bytes dropped (counted in the size, no longer held)
        self._dropped = 0
        #: the first ``held`` bytes, once what followed them is being dropped
        self._kept: bytes | None = None

    def __bool__(self) -> bool:
        """A message is under way: DATA has begun, or a BDAT chunk was taken."""
        return bool(self._data)

    def begin(self) -> None:
        self._data = bytearray(b"\r\n")
        self._dropped = 0
        self._kept = None

    def discard(self) -> None:
        self._data = bytearray()
        self._kept = None

    @property
    def size(self) -> int:
        """The message's bytes so far (DATA's stuffed, with its last CRLF once it has ended)."""
        return self._dropped + len(self._data) - 2

    def add(self, data: bytes) -> None:
        """A BDAT chunk's octets, as they are."""
        self._data += data
        self._trim()

    def add_dotted(self, data: bytes) -> bytes | None:
        """What came after DATA: once it holds the message's end, what followed the end (the
        commands pipelined after it), else None."""
        message = self._data
        start = max(len(message) - 4, 0)
        message += data
        end = message.find(_END_OF_DATA, start)
        if end < 0:
            self._trim()
            return None
        leftover = bytes(message[end + 5 :])
        del message[end + 2 :]  # the message, up to and with its last CRLF
        return leftover

    def take(self, *, unstuff: bool) -> bytes:
        """The message received (at most its first ``held`` bytes), dot-unstuffed if it came
        by DATA; the buffer is emptied."""
        content = self._kept if self._kept is not None else bytes(self._data)
        self.discard()
        if unstuff:
            # RFC 5321 4.5.2: a line's leading dot was doubled by the client
            content = content.replace(b"\r\n.", b"\r\n")
        return content[2:]

    def _trim(self) -> None:
        """Keep the first ``held`` bytes, and of what is past them only the last four."""
        message = self._data
        held = self._held
        if len(message) > held + 8:
            if self._kept is None:
                self._kept = bytes(message[: held + 2])
            self._dropped += len(message) - 4
            del message[:-4]
