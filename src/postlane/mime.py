"""MIME: a message's parts rendered as the bytes we store, and the header checks and edits of a
raw message. Values in, bytes or a :class:`~postlane.errors.ValidationError` out; nothing here
knows about queues (:mod:`postlane.message` decides what a message is and calls these)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import encoders
from email import policy as email_policy
from email._header_value_parser import SPECIALS, quote_string
from email.charset import BASE64, QP, Charset
from email.header import Header, decode_header, make_header
from email.message import Message as HeaderBlock
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, getaddresses
from typing import Any

from postlane.addresses import Mailbox, no_line_breaks
from postlane.errors import ValidationError, kind_of, quoted

#: a header field name (RFC 5322 ftext: printable ASCII except ':')
HEADER_NAME = re.compile(r"[!-9;-~]+")


@dataclass(frozen=True)
class Attachment:
    """A file attached to a :class:`~postlane.message.Message` (sent base64-encoded)."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


# The bytes are rendered with the email package's MIME classes and its compat32 generator: about
# six times faster than EmailMessage under policy.SMTP (whose header objects re-parse every
# value), which matters because every enqueue renders once. Non-ASCII header text is encoded
# with email.header.Header (RFC 2047); addresses with non-ASCII local parts need SMTPUTF8 and are
# written as UTF-8.

_UTF8 = Charset("utf-8")
_UTF8.header_encoding = BASE64
_UTF8.body_encoding = QP
_GENERATOR_POLICY = email_policy.compat32.clone(linesep="\r\n")
_SMTPUTF8_POLICY = email_policy.SMTPUTF8
#: the longest line RFC 5322 2.1.1 allows, without its CRLF
MAX_LINE = 998


#: a run no header line could hold with its name (RFC 5322 2.1.1: 998 characters a line)
_UNFOLDABLE = re.compile(r"\S{900,}")


def header_value(value: str) -> str | Header:
    """Non-ASCII text, or a word too long for any line, as RFC 2047 encoded words: they fold
    anywhere, where plain text folds only at spaces (a 2,000-character subject made one
    2,000-character line, which receivers may refuse)."""
    if value.isascii() and not _UNFOLDABLE.search(value):
        return value
    return Header(value, _UTF8)


def address_header(boxes: Sequence[Mailbox]) -> str:
    return ", ".join(_mailbox_text(box) for box in boxes)


def _mailbox_text(box: Mailbox) -> str:
    if box.address.isascii():
        return formataddr((box.display_name, box.address), charset=_UTF8)
    # an SMTPUTF8 address: written as UTF-8, name and all (RFC 6532); the address as parsed,
    # quoted as RFC 5321 wants (headerregistry.Address would drop the quotes of "ä."), the name
    # quoted as Address quotes it
    name = box.display_name
    if not name:
        return box.address
    return f"{quote_string(name) if not SPECIALS.isdisjoint(name) else name} <{box.address}>"


def text_part(text: str, subtype: str) -> MIMEText:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    plain = text.isascii() and all(len(line) <= MAX_LINE for line in text.split("\n"))
    # MIMEText takes a Charset too (typeshed says str): ours makes UTF-8 text quoted-printable
    return MIMEText(text, subtype, "us-ascii" if plain else _UTF8)  # type: ignore[arg-type]


#: the containers an attachment cannot be: it is sent base64-encoded, and RFC 2046 5.1 and 5.2
#: allow neither a multipart body (its parts need a boundary) nor these message bodies (only
#: 7bit, 8bit or binary) so encoded; message/global may be (RFC 6532 3.7)
_NOT_ATTACHABLE = re.compile(r"multipart/.*|message/(?!global$).*", re.IGNORECASE)


def attachment_part(attachment: Attachment) -> MIMEBase:
    if not isinstance(attachment, Attachment):
        raise ValidationError(
            f"attachments must be postlane.Attachment values, not {kind_of(attachment)}",
            field="attachments",
        )
    for value, what in (
        (attachment.filename, "filename"),
        (attachment.content_type, "content_type"),
    ):
        if value is not None and not isinstance(value, str):
            raise ValidationError(
                f"an attachment's {what} must be a string, not {kind_of(value)}",
                field="attachments",
            )
    filename = no_line_breaks(attachment.filename or "attachment", "attachment filename")
    content_type = attachment.content_type or ""
    maintype, _, subtype = content_type.partition("/")
    if not maintype or not subtype or not HEADER_NAME.fullmatch(maintype + subtype):
        raise ValidationError(
            f"attachment {quoted(filename)}: content type {content_type!r} is not type/subtype",
            field="attachments",
        )
    if _NOT_ATTACHABLE.fullmatch(content_type):
        raise ValidationError(
            f"attachment {quoted(filename)}: content type {content_type} cannot be an attachment: "
            "attachments are sent base64-encoded, which MIME forbids for multipart/* and "
            "message/* (message/global aside); attach each part on its own or the whole as "
            "application/octet-stream, or send a complete message as raw",
            field="attachments",
        )
    if not isinstance(attachment.content, bytes | bytearray):
        raise ValidationError(
            f"attachment {quoted(filename)}: content must be bytes, "
            f"not {kind_of(attachment.content)}",
            field="attachments",
        )
    part = MIMEBase(maintype, subtype)
    part.set_payload(bytes(attachment.content))
    encoders.encode_base64(part)
    name: str | tuple[str, str, str] = filename if filename.isascii() else ("utf-8", "", filename)
    part.add_header("Content-Disposition", "attachment", filename=name)
    for header, value in part.items():
        if len(header) + 2 + len(str(value)) > MAX_LINE:  # unfoldable: one token
            raise ValidationError(
                f"attachment {quoted(filename)}: its {header} header would be longer than "
                f"{MAX_LINE} characters, the most RFC 5322 2.1.1 allows: shorten its "
                + ("filename" if header == "Content-Disposition" else "content type"),
                field="attachments",
            )
    return part


def mime_body(text: str | None, html: str | None, attachments: Sequence[Attachment]) -> MIMEBase:
    parts: list[MIMEBase] = []
    if text is not None and html is not None:
        alternative = MIMEMultipart("alternative")
        alternative.attach(text_part(text, "plain"))
        alternative.attach(text_part(html, "html"))
        parts.append(alternative)
    elif html is not None:
        parts.append(text_part(html, "html"))
    elif text is not None:
        parts.append(text_part(text, "plain"))
    parts.extend(attachment_part(a) for a in attachments)
    if len(parts) == 1:
        return parts[0]
    mixed = MIMEMultipart("mixed")
    for part in parts:
        mixed.attach(part)
    return mixed


def render(body: MIMEBase, headers: list[tuple[str, str]]) -> bytes:
    """The final bytes: our headers first, then the body's MIME headers, CRLF line ends."""
    for part in body.walk():
        if part is not body:
            del part["MIME-Version"]
    mime_headers = list(body.items())
    for name, _ in mime_headers:
        del body[name]
    utf8 = any(not value.isascii() for name, value in headers if name in _ADDRESS_HEADERS)
    for name, value in headers:
        # a Header is a valid header value (typeshed's Message is generic over str only)
        body[name] = value if utf8 else header_value(value)  # type: ignore[assignment]
    for name, value in mime_headers:
        body[name] = value
    try:
        if utf8:  # non-ASCII mailbox names: SMTPUTF8 (RFC 6532) headers, written as UTF-8
            return body.as_bytes(policy=_SMTPUTF8_POLICY.clone(linesep="\r\n"))
        return body.as_bytes(policy=_GENERATOR_POLICY)
    except (ValueError, UnicodeError) as exc:  # the email package's own refusals
        raise ValidationError(f"cannot render the message: {exc}") from None


_ADDRESS_HEADERS = frozenset({"From", "To", "Cc"})

#: a header line that is neither a continuation nor a field name (RFC 5322 2.2: printable
#: ASCII but the colon) followed at once by its colon; one search over the whole section
_NOT_A_FIELD = re.compile(rb"(?:\A|\r\n)(?![ \t]|[!-9;-~]+:)")


def check_field_names(head: bytes) -> None:
    """Refuse a header line that is not ``name:`` (continuations aside): an mbox ``From ``
    line, or ``From :`` (the obsolete space before the colon). Python's parser reads the first
    as no header at all and a DKIM signer the second as a From, so a message could pass the
    one-From check here and be signed for another domain."""
    found = _NOT_A_FIELD.search(head)
    if found is not None:
        start = found.end()
        number = head.count(b"\r\n", 0, start) + 1
        shown = head[start : start + 40].split(b"\r\n", 1)[0].decode("ascii", "replace")
        raise ValidationError(
            f"line {number} of the raw message's header section is no header field "
            f"(a name, then a colon at once): {shown!r}",
            field="raw",
        )


#: the headers RFC 5322 3.6 allows once at most; a second one is refused (receivers such as
#: Gmail refuse the message, and a DKIM signature cannot say which one it covers)
_SINGLETONS = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
)


def check_singletons(headers: HeaderBlock) -> None:
    for name in _SINGLETONS:
        values = headers.get_all(name)
        if values is not None and len(values) > 1:
            raise ValidationError(
                f"the raw message has {len(values)} {name} headers; RFC 5322 allows one",
                field="raw",
            )


def decoded(value: Any) -> str:
    """A header value with RFC 2047 encoded words decoded (for display; the bytes stay as sent)."""
    if value is None:
        return ""
    text = str(value)
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def first_address(values: Sequence[Any]) -> str:
    found = getaddresses([str(value) for value in values])
    return found[0][1] if found else ""


def drop_header(raw: bytes, lowered_name: bytes) -> bytes:
    """Remove every occurrence of one header (with its folded continuation lines) from ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == lowered_name
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n" + body
