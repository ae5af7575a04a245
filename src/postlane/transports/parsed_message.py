"""The stored message read into the parts that JSON mail APIs want (SendGrid's Mail Send,
Postmark's Email API): addresses, subject, text and HTML bodies, attachments, and the other header
fields to pass through. The raw-MIME APIs (Mailgun, SES) send the stored bytes as they are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

__all__ = ["BUILT_HEADERS", "Attachment", "ParsedMessage"]

#: header fields a JSON API builds from its own fields (or adds itself): never passed through
BUILT_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "received",
        "return-path",
        "dkim-signature",
    }
)


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    content: bytes
    content_id: str | None
    inline: bool


@dataclass
class ParsedMessage:
    """The parts of a stored message that JSON APIs want: addresses, subject, bodies,
    attachments, and the other header fields to pass through."""

    sender: Address | None
    reply_to: list[Address]
    to: list[str]
    cc: list[str]
    subject: str
    text: str | None
    html: str | None
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: display names of the To and Cc addresses, by lower-cased address
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, content: bytes, *, exclude_headers: frozenset[str]) -> ParsedMessage:
        """Read ``content``; header fields named in ``exclude_headers`` (lower case) are the
        ones the API sets from its own fields, the others are passed through."""
        message = BytesParser(policy=email_policy.default).parsebytes(content)
        assert isinstance(message, EmailMessage)
        text_part = message.get_body(preferencelist=("plain",))
        html_part = message.get_body(preferencelist=("html",))
        attachments = []
        for part in message.walk():
            if part.is_multipart() or part is text_part or part is html_part:
                continue
            payload = part.get_payload(decode=True)
            content_id = part.get("Content-ID")
            attachments.append(
                Attachment(
                    filename=part.get_filename(),
                    content_type=part.get_content_type(),
                    content=payload if isinstance(payload, bytes) else b"",
                    content_id=str(content_id).strip("<> ") if content_id else None,
                    inline=part.get_content_disposition() != "attachment"
                    and content_id is not None,
                )
            )
        to, cc = _addresses(message, "to"), _addresses(message, "cc")
        return cls(
            sender=_first_address(message, "from"),
            reply_to=_addresses(message, "reply-to"),
            to=[a.addr_spec.lower() for a in to],
            cc=[a.addr_spec.lower() for a in cc],
            subject=str(message.get("subject", "")),
            text=_content(text_part),
            html=_content(html_part),
            attachments=attachments,
            headers=[
                (name, str(value))
                for name, value in message.items()
                if name.lower() not in exclude_headers
            ],
            names={a.addr_spec.lower(): a.display_name for a in to + cc if a.display_name},
        )

    def mailbox(self, address: str) -> tuple[str, str | None]:
        """``address`` and the display name the message's headers give it, if any."""
        return address, self.names.get(address.lower())

    def split(self, recipients: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """The recipients as To, Cc and Bcc: where the message's headers show them (a recipient
        in neither To nor Cc is a Bcc)."""
        to: list[str] = []
        cc: list[str] = []
        bcc: list[str] = []
        for recipient in recipients:
            lowered = recipient.lower()
            (to if lowered in self.to else cc if lowered in self.cc else bcc).append(recipient)
        return to, cc, bcc


def _addresses(message: EmailMessage, name: str) -> list[Address]:
    out: list[Address] = []
    for value in message.get_all(name, []):
        addresses = getattr(value, "addresses", None)
        if addresses is not None:
            out.extend(addresses)
        else:  # an unparsable header: fall back to the plain parser
            out.extend(
                Address(display_name=display, addr_spec=spec)
                for display, spec in getaddresses([str(value)])
                if "@" in spec
            )
    return out


def _first_address(message: EmailMessage, name: str) -> Address | None:
    found = _addresses(message, name)
    return found[0] if found else None


def _content(part: Any) -> str | None:
    if part is None:
        return None
    try:
        text = str(part.get_content())
    except (LookupError, ValueError):  # an unknown charset: the bytes, decoded leniently
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        text = payload.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")  # stored with CRLF (SMTP's); JSON bodies use LF
