"""One-click unsubscribe links (RFC 8058 over RFC 2369's ``List-Unsubscribe``): each recipient's
copy of a bulk message says where to unsubscribe that one recipient, and a mail client (Gmail's
and Yahoo's "Unsubscribe" button) POSTs there without the recipient leaving the inbox.

With ``[unsubscribe] url = "https://mail.example.com/unsubscribe"``, the copy that delivery 42
gets carries::

    List-Unsubscribe: <https://mail.example.com/unsubscribe/u-16-<mac>>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

``u-16-<mac>`` is a :class:`~postlane.feedback.tokens.DeliveryTokens` token of purpose
``unsubscribe``, keyed with the store's shared ``unsubscribe`` secret (not VERP's): 42 in base
36 and 130 bits of HMAC-SHA256, so nobody without the key can make a link that names a
delivery, and a link names exactly one recipient of one message.

:class:`UnsubscribeTransport` wraps a transport (outside DKIM signing, so each copy is signed
with its own headers: RFC 8058 section 4 requires the signature to cover both) and sends each
recipient of a message in the configured lanes its own copy. A message whose application set
its own ``List-Unsubscribe`` (or ``List-Unsubscribe-Post``) is sent as it is: the application
runs its own list management, and two links would leave the mail client to pick one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from postlane.feedback.tokens import DeliveryTokens
from postlane.transports.base import Envelope, Response, Transport
from postlane.transports.per_recipient import PerRecipientTransport

__all__ = [
    "ONE_CLICK",
    "UnsubscribeLinks",
    "UnsubscribeTransport",
    "has_list_unsubscribe",
    "with_unsubscribe_headers",
]

#: what every unsubscribe token starts with
TOKEN_PREFIX = "u-"
#: base-32 characters of the MAC kept (130 bits: links live long and travel far)
MAC_CHARS = 26
#: the List-Unsubscribe-Post value, and the body a one-click POST carries (RFC 8058 3.1)
ONE_CLICK = "List-Unsubscribe=One-Click"
_FIELDS = (b"list-unsubscribe", b"list-unsubscribe-post")


@dataclass(frozen=True)
class UnsubscribeLinks:
    """The one-click unsubscribe links of one base URL under one key: make them, and tell
    which delivery a token names (or that it names none)."""

    url: str
    key: bytes = dataclasses.field(repr=False)
    tokens: DeliveryTokens = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))
        tokens = DeliveryTokens(
            self.key, prefix=TOKEN_PREFIX, purpose="unsubscribe", mac_chars=MAC_CHARS
        )
        object.__setattr__(self, "tokens", tokens)

    def token(self, delivery_id: int) -> str:
        return self.tokens.make(delivery_id)

    def link(self, delivery_id: int) -> str:
        """``<url>/<token>``: where the recipient of ``delivery_id`` unsubscribes."""
        return f"{self.url}/{self.token(delivery_id)}"

    def delivery_id(self, token: str) -> int | None:
        """The delivery ``token`` names; None for a forged, mangled or other key's token."""
        return self.tokens.verify(token)


def _header_block(content: bytes) -> bytes:
    for end in (b"\r\n\r\n", b"\n\n"):
        at = content.find(end)
        if at >= 0:
            return content[: at + 1]
    return content


def has_list_unsubscribe(content: bytes) -> bool:
    """Whether the message's header already has a ``List-Unsubscribe`` or
    ``List-Unsubscribe-Post`` field (the application's own)."""
    for line in _header_block(content).splitlines():
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() in _FIELDS:
            return True
    return False


def with_unsubscribe_headers(content: bytes, link: str) -> bytes:
    """``content`` with ``List-Unsubscribe: <link>`` and ``List-Unsubscribe-Post`` put on top
    of its header (in the message's own line ends)."""
    end = b"\r\n" if b"\r\n" in content[:4096] or not content else b"\n"
    fields = (
        b"List-Unsubscribe: <" + link.encode("ascii") + b">" + end,
        b"List-Unsubscribe-Post: " + ONE_CLICK.encode("ascii") + end,
    )
    return b"".join(fields) + content


class UnsubscribeTransport(PerRecipientTransport):
    """A transport that gives each recipient of a message in ``lanes`` a copy of its own with
    its own ``List-Unsubscribe`` link and ``List-Unsubscribe-Post``, then hands each to
    ``inner`` (see the module docstring).

    Sent as it is: mail of other lanes, an envelope without delivery ids (a test's own, a
    probe) or with the null sender, and a message that has its own ``List-Unsubscribe``.
    Put it outside DKIM signing (``UnsubscribeTransport(SigningTransport(...))``) so the
    signature covers the headers; VERP may sit anywhere inside it.
    """

    def __init__(self, inner: Transport, links: UnsubscribeLinks, lanes: Iterable[str]) -> None:
        super().__init__(inner)
        self.links = links
        self.lanes = frozenset(lanes)

    async def send(self, envelope: Envelope) -> list[Response]:
        ids = envelope.delivery_ids
        if (
            envelope.lane not in self.lanes
            or not envelope.sender
            or not ids
            or len(ids) != len(envelope.recipients)
            or has_list_unsubscribe(envelope.content)
        ):
            return await self.inner.send(envelope)
        return await self.send_each(
            [
                dataclasses.replace(
                    envelope,
                    recipients=(recipient,),
                    delivery_ids=(delivery_id,),
                    content=with_unsubscribe_headers(
                        envelope.content, self.links.link(delivery_id)
                    ),
                )
                for recipient, delivery_id in zip(envelope.recipients, ids, strict=True)
            ]
        )
