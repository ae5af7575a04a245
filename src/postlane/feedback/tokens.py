"""Tokens that name one delivery and cannot be made without a key: what a VERP return path's
local part (:mod:`postlane.feedback.verp`) and a one-click unsubscribe link
(:mod:`postlane.feedback.unsubscribe`) carry.

A token is ``<prefix><delivery id in base 36>-<mac>``: the MAC is the first bits of
HMAC-SHA256 over ``<purpose>:<delivery id>``, keyed with one of the store's shared secrets
(``store.secret(name)``: 32 random bytes made once, read by every process), written in
lower-case base 32. Lower case letters and digits and ``-`` only, so a token is at home in an
address's local part and in a URL path alike, and survives MTAs that change the case of local
parts (it is checked case-insensitively). Each use has a key of its own and a purpose of its
own, so a token made for one use never verifies for another.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
from dataclasses import dataclass

__all__ = ["DeliveryTokens"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
#: the longest delivery id (2**63 - 1) in base 36
_ID_CHARS = 13


def base36(number: int) -> str:
    out = []
    while number:
        number, digit = divmod(number, 36)
        out.append(_DIGITS[digit])
    return "".join(reversed(out)) or "0"


@dataclass(frozen=True)
class DeliveryTokens:
    """Make the tokens of one use (``prefix``, ``purpose``) under one key, and tell which
    delivery a token names (or that it names none)."""

    key: bytes = dataclasses.field(repr=False)
    #: what every token of this use starts with ("b-" for VERP, "u-" for unsubscribe links)
    prefix: str
    #: signed with the delivery id ("verp", "unsubscribe"): a token of one use is no other's
    purpose: str
    #: base-32 characters of the MAC kept (5 bits each)
    mac_chars: int = 16
    _pattern: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("a token key needs at least 16 bytes")
        if not 16 <= self.mac_chars <= 52:
            raise ValueError("a token keeps 16 to 52 base-32 characters of its MAC")
        pattern = re.compile(
            rf"{re.escape(self.prefix)}([1-9a-z][0-9a-z]{{0,{_ID_CHARS - 1}}})"
            rf"-([a-z2-7]{{{self.mac_chars}}})"
        )
        object.__setattr__(self, "_pattern", pattern)

    @property
    def pattern(self) -> str:
        """A regular expression matching a token of this shape (not checking its MAC)."""
        return rf"{re.escape(self.prefix)}[0-9a-z]{{1,{_ID_CHARS}}}-[a-z2-7]{{{self.mac_chars}}}"

    def _mac(self, delivery_id: int) -> str:
        message = f"{self.purpose}:{delivery_id}".encode("ascii")
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii")[: self.mac_chars].lower()

    def make(self, delivery_id: int) -> str:
        """``<prefix><id in base 36>-<mac>``: what names ``delivery_id``."""
        if delivery_id < 1:
            raise ValueError(f"a delivery id is positive, not {delivery_id}")
        return f"{self.prefix}{base36(delivery_id)}-{self._mac(delivery_id)}"

    def verify(self, token: str) -> int | None:
        """The delivery id ``token`` names, or None when it is not a token made with this key
        for this use (forged, mangled, another use's). Case does not matter."""
        match = self._pattern.fullmatch(token.strip().lower())
        if match is None:
            return None
        delivery_id = int(match.group(1), 36)
        if not hmac.compare_digest(match.group(2), self._mac(delivery_id)):
            return None
        return delivery_id
