"""VERP return paths: each delivery's envelope sender names that delivery, so the bounce that
comes back to it says, by its address alone, which recipient of which message failed.

With ``[bounces] domain = "bounce.example.com"``, the delivery with id 42 is sent with the
envelope sender (``MAIL FROM``, the future ``Return-Path``) ``b-16-<mac>@bounce.example.com``:
``16`` is 42 in base 36 and ``<mac>`` is the first 80 bits of HMAC-SHA256 over the id, keyed
with the store's shared ``verp`` secret (32 random bytes every process reads with
``await store.secret("verp", now)``), written in lower-case base 32
(:class:`~postlane.feedback.tokens.DeliveryTokens`, shared with unsubscribe links). So:

- nobody can make an address that names a delivery without the key: a forged bounce cannot
  suppress an arbitrary recipient, and the bounce listener refuses every other local part at
  RCPT (no backscatter, no relay);
- the local part is lower-case only (some MTAs lower-case local parts, others upper-case them:
  a token is checked case-insensitively) and short (at most 32 characters, well under RFC
  5321's 64);
- the visible ``From:`` is never touched; only the envelope changes.

:class:`VerpTransport` wraps any transport (as :class:`postlane.dkim.SigningTransport` does) and
sends each recipient in its own transaction with its own return path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

from postlane.feedback.tokens import DeliveryTokens
from postlane.transports.base import Envelope, Response, Transport
from postlane.transports.per_recipient import PerRecipientTransport

__all__ = ["TOKEN_PREFIX", "ReturnPaths", "VerpTransport"]

#: what every VERP local part starts with
TOKEN_PREFIX = "b-"
#: base-32 characters of the MAC kept in a token (80 bits: an online guess is hopeless)
MAC_CHARS = 16


@dataclass(frozen=True)
class ReturnPaths:
    """The VERP addresses of one bounce domain under one key: make them, and tell which
    delivery one names (or that it names none). The tokens are
    :class:`~postlane.feedback.tokens.DeliveryTokens` of purpose ``verp``."""

    domain: str
    key: bytes = dataclasses.field(repr=False)
    tokens: DeliveryTokens = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", self.domain.lower().rstrip("."))
        if len(self.key) < 16:
            raise ValueError("a VERP key needs at least 16 bytes")
        tokens = DeliveryTokens(self.key, prefix=TOKEN_PREFIX, purpose="verp", mac_chars=MAC_CHARS)
        object.__setattr__(self, "tokens", tokens)

    def local_part(self, delivery_id: int) -> str:
        """``b-<id in base 36>-<mac>``: what names ``delivery_id``."""
        return self.tokens.make(delivery_id)

    def address(self, delivery_id: int) -> str:
        """The envelope sender of ``delivery_id``: ``b-<token>@<domain>``."""
        return f"{self.local_part(delivery_id)}@{self.domain}"

    def verify_token(self, local_part: str) -> int | None:
        """The delivery id ``local_part`` names, or None when it is not a token made with this
        key (forged, mangled, or another sender's). Case does not matter."""
        return self.tokens.verify(local_part)

    def delivery_id(self, address: str) -> int | None:
        """The delivery a whole address at the bounce domain names (None for any other)."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return None
        return self.verify_token(local)

    def find(self, text: str) -> Iterator[int]:
        """The deliveries named by valid return paths anywhere in ``text`` (a bounce quoting
        the original's ``Return-Path``, a DSN's ``X-Postfix-Sender``, a complaint's
        ``Original-Mail-From``), each once, in order of appearance."""
        pattern = _address_pattern(self.domain, self.tokens.pattern)
        seen: set[int] = set()
        for match in pattern.finditer(text):
            delivery_id = self.verify_token(match.group(1))
            if delivery_id is not None and delivery_id not in seen:
                seen.add(delivery_id)
                yield delivery_id


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _address_pattern(domain: str, token: str) -> re.Pattern[str]:
    pattern = _PATTERNS.get(domain)
    if pattern is None:
        # the domain, and not the start of a longer one (bounce.example.com.evil.example)
        end = r"(?![\w-]|\.[\w-])"
        pattern = re.compile(rf"(?<![\w.+-])({token})@{re.escape(domain)}{end}", re.IGNORECASE)
        _PATTERNS[domain] = pattern
    return pattern


class VerpTransport(PerRecipientTransport):
    """A transport that gives every recipient its own return path (``b-<token>@domain``) and
    its own transaction, then hands each to ``inner``; the message's bytes (its ``From:``)
    are untouched, and the name, shared destination and routes are ``inner``'s.

    An envelope without delivery ids (a test's own, a probe) or with the null sender goes
    through as it is: there is no delivery for a token to name. One recipient's transport
    failing is that recipient's ``temporary`` attempt; the others' replies stand.

    Put it inside DKIM signing (``SigningTransport(VerpTransport(relay, ...), signer)``): the
    message is then signed once, not once per recipient.
    """

    def __init__(self, inner: Transport, domain: str, key: bytes) -> None:
        super().__init__(inner)
        self.return_paths = ReturnPaths(domain, key)

    async def send(self, envelope: Envelope) -> list[Response]:
        ids = envelope.delivery_ids
        if not envelope.sender or not ids or len(ids) != len(envelope.recipients):
            return await self.inner.send(envelope)
        return await self.send_each(
            [
                dataclasses.replace(
                    envelope,
                    sender=self.return_paths.address(delivery_id),
                    recipients=(recipient,),
                    delivery_ids=(delivery_id,),
                )
                for recipient, delivery_id in zip(envelope.recipients, ids, strict=True)
            ]
        )
