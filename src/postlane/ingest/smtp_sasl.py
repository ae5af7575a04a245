"""The SASL exchanges that SMTP AUTH carries (RFC 4954) on postlane's SMTP server
(:mod:`postlane.ingest.smtp_protocol`, only over TLS): PLAIN (RFC 4616) and LOGIN, with
aiosmtpd's replies to what goes wrong in them. Whether the credentials are right is
:mod:`postlane.ingest.smtp_auth`'s to say."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

__all__ = ["MECHANISMS", "SaslExchange"]

#: the mechanisms AUTH takes
MECHANISMS = ("PLAIN", "LOGIN")


class SaslExchange:
    """One AUTH exchange on a connection, from the initial response (if any) to the user name
    and password."""

    __slots__ = ("_ask", "_reply")

    def __init__(
        self, ask: Callable[[str], Awaitable[bytes | None]], reply: Callable[[str], None]
    ) -> None:
        #: sends a 334 reply and returns the client's answer line (None: the connection is gone)
        self._ask = ask
        #: answers the client (an error that ends the exchange)
        self._reply = reply

    async def credentials(self, mechanism: str, initial: str | None) -> tuple[str, str] | None:
        """The user name and password, or None once the exchange's error is answered."""
        if mechanism == "PLAIN":
            blob = self._decoded(initial) if initial is not None else await self._answer(b"")
            if blob is None:
                return None
            parts = blob.split(b"\x00")
            if len(parts) != 3:
                self._reply("501 5.5.2 Can't split auth value")
                return None
            authorize_as, login, password = parts
            if authorize_as and authorize_as != login:
                # RFC 4616 2: a login acts as itself only (no user may act for another)
                self._reply("535 5.7.8 Authentication credentials invalid")
                return None
        else:
            login_or_none = (
                self._decoded(initial)
                if initial is not None
                else await self._answer(b"User Name\x00")
            )
            if login_or_none is None:
                return None
            password_or_none = await self._answer(b"Password\x00")
            if password_or_none is None:
                return None
            login, password = login_or_none, password_or_none
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def _answer(self, challenge: bytes) -> bytes | None:
        """The client's answer to a 334 challenge, decoded; None once a refusal is answered (or
        the connection is gone)."""
        line = await self._ask("334 " + base64.b64encode(challenge).decode())
        if line is None:
            return None
        blob = line.strip()
        if blob == b"*":
            self._reply("501 5.7.0 Auth aborted")
            return None
        return self._decoded(blob.decode("ascii", "replace"))

    def _decoded(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text.encode(), validate=True)
        except (binascii.Error, ValueError):
            self._reply("501 5.5.2 Can't decode base64")
            return None
