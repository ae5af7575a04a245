"""The message model: what an application hands in, how it is validated, and the bytes we store.

A :class:`Message` is the application's draft: addresses, subject, bodies, attachments, extra
headers (or a whole raw RFC 5322 message), a lane, an idempotency key and free metadata.
:func:`prepare` validates it and renders the final MIME bytes once, with a ``Message-ID`` fixed for
good, into a :class:`PreparedMessage`, which is all the store and the transports ever see.
Nothing here knows about storage or networks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses
from enum import StrEnum
from typing import Any

from postlane.addresses import Mailbox, check_text, mailboxes, no_line_breaks, parse_address
from postlane.clock import parse_when
from postlane.errors import MessageTooLarge, ValidationError, kind_of
from postlane.mime import (
    HEADER_NAME,
    MAX_LINE,
    Attachment,
    address_header,
    check_field_names,
    check_singletons,
    decoded,
    drop_header,
    first_address,
    mime_body,
    render,
)


class Lane(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the order lanes are served in."""
        return _LANE_RANK[self]


_LANE_RANK = {Lane.HIGH: 0, Lane.NORMAL: 1, Lane.LOW: 2}


def in_lane_order(lanes: Iterable[Lane]) -> tuple[Lane, ...]:
    """Each of ``lanes`` once, in the order lanes are served (high, normal, low)."""
    return tuple(sorted(set(lanes), key=lambda lane: lane.rank))


class RecipientState(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    HELD = "held"
    SENT = "sent"
    DEAD = "dead"
    SUPPRESSED = "suppressed"
    #: it was sent, then a DSN or a provider's event said it failed for good
    BOUNCED = "bounced"
    #: it was sent, then its recipient reported it as spam
    COMPLAINED = "complained"


#: states a recipient can still leave on its own
PENDING_STATES = frozenset(
    {RecipientState.QUEUED, RecipientState.SENDING, RecipientState.DEFERRED, RecipientState.HELD}
)
#: states that end a recipient's delivery
FINAL_STATES = frozenset(
    {
        RecipientState.SENT,
        RecipientState.DEAD,
        RecipientState.SUPPRESSED,
        RecipientState.BOUNCED,
        RecipientState.COMPLAINED,
    }
)

MAX_RECIPIENTS = 1000
MAX_IDEMPOTENCY_KEY = 255
MAX_METADATA_BYTES = 16 * 1024
#: metadata nests at most this deep (a 100,000-deep value would break every later read)
MAX_METADATA_DEPTH = 32
#: headers `headers` may not set, and what to do instead: those the model sets itself (an app
#: sets them through the fields), ``Return-Path`` (RFC 5321 4.4: the receiving server adds it
#: from the envelope sender; the sender must not) and postlane's control headers, which the
#: SMTP and Django front doors read and remove (here they would reach every recipient)
_RESERVED_HEADERS = {
    "from": "use the 'from' field",
    "to": "use the 'to' field",
    "cc": "use the 'cc' field",
    "bcc": "use the 'bcc' field",
    "subject": "use the 'subject' field",
    "date": "postlane sets it",
    "mime-version": "postlane sets it",
    "content-type": "postlane sets it",
    "content-transfer-encoding": "postlane sets it",
    "return-path": (
        "the receiving server adds it from the envelope sender, RFC 5321 4.4; the envelope "
        "sender is the 'from' field's address, or a VERP return path with [bounces] domain"
    ),
    "x-postlane-lane": "use the 'lane' field",
    "x-postlane-idempotency-key": "use the 'idempotency_key' field",
    "x-postlane-metadata": "use the 'metadata' field",
    "x-postlane-send-at": "use the 'send_at' field",
    "x-postlane-expires-at": "use the 'expires_at' field",
}
#: any other ``X-Postlane-*`` name
_POSTLANE_HEADERS = (
    "X-Postlane-* headers are postlane's own: use the lane, idempotency_key, metadata, send_at "
    "and expires_at fields"
)
#: a raw message's ``sender`` that asks for the null return path (``MAIL FROM:<>``)
NULL_SENDER = "<>"
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
#: a raw message's header section at most (Exim's ``header_maxsize``), and its fields at most:
#: each field costs the header parser a few microseconds of the event loop, and 3,000,000
#: short fields (24 MB) held one serve process for 15 s; real messages have tens, a long
#: ``Received`` chain a few hundred
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADER_FIELDS = 2000
#: a line of more than 998 characters (RFC 5322 2.1.1), once line endings are CRLF; tried at
#: line starts only (``^``): unanchored, it was tried at every byte, 4.3 s for 2 MB of 998-
#: character lines against 16 ms
_LONG_LINE = re.compile(rb"(?m)^[^\r\n]{%d}" % (MAX_LINE + 1))
#: a header line that starts a field (not a folded continuation)
_FIELD_START = re.compile(rb"\r\n[^ \t]")


def rfc5322_date(now: float | None = None) -> str:
    """``Fri, 04 Dec 2026 20:28:26 +0000``: a Date header's value in UTC, with the numeric
    zone RFC 5322 3.3 asks for (``GMT`` is its obsolete form, which must not be generated)."""
    when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return format_datetime(when.replace(microsecond=0))


def new_message_id(now: float | None = None) -> str:
    """A sortable, unique queue id: 48 bits of milliseconds then 42 random bits, 18 characters."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 42) | secrets.randbits(42)
    chars = []
    for _ in range(18):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass
class Message:
    """An email as an application hands it to postlane (Python API, HTTP API, CLI)."""

    sender: str
    to: Sequence[str] = ()
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: Sequence[Attachment] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    #: a complete RFC 5322 message; then `to`/`cc`/`bcc` are the envelope recipients, taken from
    #: its To/Cc/Bcc headers when empty, and `subject`/`text`/`html`/`headers` must be unset
    raw: bytes | str | None = None
    lane: Lane | str = Lane.NORMAL
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] | None = None
    #: not before this time: an aware datetime, ISO 8601 text with a zone, or Unix seconds
    send_at: datetime | str | float | None = None
    #: never after this time (same forms): a recipient not sent by then is dead, ``expired``
    expires_at: datetime | str | float | None = None


#: the text fields of a Message (None: not given) and what each takes
_STRING_FIELDS = {
    "subject": "a string",
    "text": "a string",
    "html": "a string",
    "lane": "high, normal or low (a string)",
}
#: the mappings of a Message (None: none) and what each takes
_MAPPING_FIELDS = {
    "headers": "a mapping of header names to values (a dict)",
    "metadata": "an object (a dict or another mapping)",
}


def _check_types(message: Message) -> None:
    """Refuse a field of the wrong type, naming it and what it takes, before any check reads it
    as what it should be (a Python caller is not type-checked: ``bytes(5)`` is five NUL bytes,
    ``None`` has no ``strip``). What each value holds is checked after."""
    if not isinstance(message, Message):
        raise ValidationError(f"a message is a postlane.Message, not {kind_of(message)}")
    if not isinstance(message.sender, str):
        raise ValidationError(
            f"sender must be an address (a string), not {kind_of(message.sender)}", field="from"
        )
    for name in ("to", "cc", "bcc"):
        values = getattr(message, name)
        if isinstance(values, str):
            continue
        if not isinstance(values, Sequence | AbstractSet) or isinstance(values, bytes | bytearray):
            raise ValidationError(
                f"{name} must be an address or a list of addresses (strings), "
                f"not {kind_of(values)}",
                field=name,
            )
        for value in values:
            if not isinstance(value, str):
                raise ValidationError(
                    f"{name} must be an address or a list of addresses (strings), not a list "
                    f"holding {kind_of(value)}",
                    field=name,
                )
    for name, expected in _STRING_FIELDS.items():
        value = getattr(message, name)
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"{name} must be {expected}, not {kind_of(value)}", field=name)
    for name, expected in _MAPPING_FIELDS.items():  # None: none
        value = getattr(message, name)
        if value is not None and not isinstance(value, Mapping):
            raise ValidationError(f"{name} must be {expected}, not {kind_of(value)}", field=name)
    if not isinstance(message.attachments, Sequence) or isinstance(
        message.attachments, str | bytes | bytearray
    ):
        raise ValidationError(
            "attachments must be a list of postlane.Attachment, "
            f"not {kind_of(message.attachments)}",
            field="attachments",
        )
    if message.raw is not None and not isinstance(
        message.raw, str | bytes | bytearray | memoryview
    ):
        raise ValidationError(
            f"raw must be a whole message as bytes or str, not {kind_of(message.raw)}", field="raw"
        )


@dataclass(frozen=True)
class Recipient:
    address: str
    domain: str
    #: the throttling destination (a provider or the domain); set at enqueue, None: by domain
    destination: str | None = None


@dataclass(frozen=True)
class PreparedMessage:
    """A validated message with its final bytes: what the store keeps, once per message."""

    id: str
    sender: str
    recipients: tuple[Recipient, ...]
    lane: Lane
    subject: str
    message_id: str
    idempotency_key: str | None
    metadata: Mapping[str, Any]
    content: bytes
    #: who handed it in (a token fingerprint, an SMTP user); set by ingest, not by validation.
    #: An idempotency key is the submitter's own: the same key from another submitter is another
    #: message.
    submitter: str | None = None
    #: a digest of the submission (everything but the idempotency key), when it has a key: a
    #: key reused with another payload is a conflict, not a duplicate
    fingerprint: str | None = None
    #: not before this time (epoch seconds; None: at once)
    send_at: float | None = None
    #: never after this time: a recipient not sent by then is dead-lettered as expired
    expires_at: float | None = None

    @property
    def size(self) -> int:
        return len(self.content)


class _Utf8Headers(email_policy.Compat32):
    """compat32 (header values as plain strings, parsed once), but a value holding 8-bit
    bytes read as the UTF-8 that RFC 6532 makes them, not as unknown bytes (which compat32
    shows as U+FFFD: a stored subject ``grüße`` came out ``gr����e``)."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if (
            isinstance(value, str)
            and not value.isascii()
            and any("\udc80" <= c <= "\udcff" for c in value)
        ):
            return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
        return super().header_fetch_parse(name, value)


#: how prepared and raw messages' header sections are read
_HEADERS = _Utf8Headers()


#: the fields that say who a message is from, as readers show them (From; Sender, shown as
#: "X on behalf of Y"; a resent message's own)
_AUTHOR_FIELDS = ("From", "Sender", "Resent-From", "Resent-Sender")


def sender_domains(message: PreparedMessage) -> Iterator[tuple[str, str]]:
    """The domains ``message`` is sent from, each with what says so in a refusal: the
    envelope sender's (``""``; none for the null sender), then those of every address in
    every From, Sender, Resent-From and Resent-Sender field (``" (its From header)"``),
    lower-cased, in their ASCII (IDNA) form. An address in such a field with no domain (an
    encoded word a reader shows as an address, an empty group) is given as written, which no
    sender list holds: a From must name an address (RFC 5322 3.6.2), and one that names none
    cannot be checked."""
    if message.sender:
        yield message.sender.rpartition("@")[2].lower(), ""
    for name, values in _author_fields(message.content):
        which = f" (its {name} header)"
        for _, address in getaddresses(values):
            if "@" not in address:
                yield (address.strip() or "no address"), which
                continue
            try:
                domain = parse_address(address, f"{name} header").domain
            except ValidationError:  # compared as written: a domain no token is bound to
                domain = address.rpartition("@")[2].strip().lower()
            yield domain, which


def _author_fields(content: bytes) -> list[tuple[str, list[str]]]:
    """The values of every From (and Sender, Resent-From, Resent-Sender) field of a prepared
    message. Its header section holds only well-formed fields (``prepare`` refuses ``From :``
    and mbox lines, which a parser and a DKIM signer read differently), so the standard parser
    sees every one."""
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    parsed = BytesHeaderParser(policy=_HEADERS).parsebytes(head)
    return [(name, [str(value) for value in parsed.get_all(name) or []]) for name in _AUTHOR_FIELDS]


def parse_lane(value: Lane | str | None) -> Lane:
    if value is None or value == "":
        return Lane.NORMAL
    try:
        return Lane(str(value).lower())
    except ValueError:
        raise ValidationError(
            f"unknown lane {value!r} (lanes are high, normal, low)", field="lane"
        ) from None


def _unique_recipients(mailboxes: Sequence[Mailbox]) -> tuple[Recipient, ...]:
    seen: set[str] = set()
    out: list[Recipient] = []
    for box in mailboxes:
        key = box.address.lower()
        if key not in seen:
            seen.add(key)
            out.append(Recipient(address=box.address, domain=box.domain))
    if not out:
        raise ValidationError("the message has no recipient", field="to")
    if len(out) > MAX_RECIPIENTS:
        raise ValidationError(
            f"too many recipients ({len(out)}; at most {MAX_RECIPIENTS} per message)", field="to"
        )
    return tuple(out)


def _check_common(message: Message) -> tuple[Lane, str | None, dict[str, Any]]:
    lane = parse_lane(message.lane)
    key = message.idempotency_key
    if key is not None:
        if not isinstance(key, str) or not key.strip():
            raise ValidationError(
                "idempotency_key must be a non-empty string", field="idempotency_key"
            )
        if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise ValidationError(
                f"idempotency_key must be printable and at most {MAX_IDEMPOTENCY_KEY} characters",
                field="idempotency_key",
            )
    if not isinstance(message.metadata or {}, Mapping):
        raise ValidationError("metadata must be an object", field="metadata")
    metadata = dict(message.metadata or {})
    _check_metadata(metadata)
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and no later reader could show them
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"metadata must be JSON: {exc}", field="metadata") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValidationError(
            f"metadata is {len(encoded)} bytes as JSON; at most {MAX_METADATA_BYTES}",
            field="metadata",
        )
    return lane, key, metadata


#: the furthest ahead send_at and expires_at may be (a year): a typo'd year is an error
MAX_SCHEDULE_AHEAD = 366 * 86400.0


def _check_schedule(message: Message, now: float | None) -> tuple[float | None, float | None]:
    """``send_at`` and ``expires_at`` as epoch seconds, checked against ``now``."""
    send_at = parse_when(message.send_at, "send_at")
    expires_at = parse_when(message.expires_at, "expires_at")
    current = time.time() if now is None else now
    for value, what in ((send_at, "send_at"), (expires_at, "expires_at")):
        if value is not None and value > current + MAX_SCHEDULE_AHEAD:
            raise ValidationError(f"{what} is more than a year ahead", field=what)
    if expires_at is not None:
        if expires_at <= current:
            raise ValidationError("expires_at has already passed", field="expires_at")
        if send_at is not None and expires_at <= send_at:
            raise ValidationError("expires_at must come after send_at", field="expires_at")
    if send_at is not None and send_at <= current:
        send_at = None  # a moment already past: at once
    return send_at, expires_at


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    """Metadata is plain JSON every reader can show: strings without NUL or lone surrogates,
    finite numbers, at most :data:`MAX_METADATA_DEPTH` levels deep (walked without recursion,
    so no depth breaks the check itself)."""
    pending: list[tuple[Any, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_METADATA_DEPTH:
                raise ValidationError(
                    f"metadata nests more than {MAX_METADATA_DEPTH} levels deep", field="metadata"
                )
            if isinstance(value, Mapping):
                for key in value:
                    if not isinstance(key, str):
                        raise ValidationError("metadata keys must be strings", field="metadata")
                    check_text(key, "metadata")
                items = list(value.values())
            else:
                items = list(value)
            pending.extend((item, depth + 1) for item in items)
        elif isinstance(value, str):
            check_text(value, "metadata")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(
                f"metadata holds {value!r}: numbers must be finite (JSON has no NaN)",
                field="metadata",
            )


def _check_size(content: bytes, max_size: int) -> None:
    if len(content) > max_size:
        raise MessageTooLarge(
            f"the message is {len(content)} bytes, over the limit of {max_size} bytes"
        )


def prepare(
    message: Message,
    *,
    max_size: int,
    now: float | None = None,
    message_id: str | None = None,
) -> PreparedMessage:
    """Validate ``message`` and render its final bytes. Raises :class:`ValidationError`."""
    _check_types(message)
    lane, key, metadata = _check_common(message)
    send_at, expires_at = _check_schedule(message, now)
    queue_id = message_id or new_message_id(now)
    if message.raw is not None:
        rendered = _prepare_raw(message, queue_id, max_size, now)
    else:
        rendered = _prepare_parts(message, queue_id, now)
        _check_size(rendered.content, max_size)
    return PreparedMessage(
        id=queue_id,
        sender=rendered.sender,
        recipients=rendered.recipients,
        lane=lane,
        subject=rendered.subject,
        message_id=rendered.message_id,
        idempotency_key=key,
        metadata=metadata,
        content=rendered.content,
        fingerprint=None if key is None else submission_fingerprint(message),
        send_at=send_at,
        expires_at=expires_at,
    )


@dataclass(frozen=True)
class _Rendered:
    """What rendering a message (from its parts, or raw) settles: the envelope's sender and
    recipients, the subject, the Message-ID and the final bytes."""

    sender: str
    recipients: tuple[Recipient, ...]
    subject: str
    message_id: str
    content: bytes


#: what a raw message's fingerprint starts with (its body is read as bytes with its MIME
#: boundaries taken out: before, it was parsed part by part, which a message of millions of
#: header lines in one part turned into seconds of the event loop); one stored before says
#: nothing about a raw message's payload now, so a retry across the upgrade is a retry
RAW_FINGERPRINT = "raw2:"
#: a MIME boundary parameter, in the message's Content-Type or a part's
_BOUNDARY_PARAM = re.compile(
    rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"\r\n]{1,200}))', re.IGNORECASE
)
#: the boundary parameters read at most (real messages have a few)
MAX_FINGERPRINT_BOUNDARIES = 100
#: headers a re-rendering of the same message changes (a retried view, a new Date each time)
_VOLATILE_HEADERS = frozenset({"date", "message-id", "mime-version", "received"})


def submission_fingerprint(message: Message) -> str:
    """A digest of everything an application handed in but the idempotency key: equal for a
    retry of the same submission, different for another message under the same key.

    A retry may render the same message again (a framework's new Date and Message-ID, new
    MIME boundaries): those are left out, so a raw message counts by its headers (but the
    volatile ones) and its body with its boundaries taken out."""
    digest = hashlib.sha256()

    def part(value: Any) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")

    part([message.sender, _as_list(message.to), _as_list(message.cc), _as_list(message.bcc)])
    part([message.subject, message.text, message.html, str(message.lane)])
    part(sorted((k.lower(), v) for k, v in (message.headers or {}).items()
                if k.lower() not in _VOLATILE_HEADERS))  # fmt: skip
    part(message.metadata or {})
    part([parse_when(message.send_at, "send_at"), parse_when(message.expires_at, "expires_at")])
    for attachment in message.attachments:
        part([attachment.filename, attachment.content_type])
        digest.update(hashlib.sha256(attachment.content).digest())
    if message.raw is not None:
        raw = message.raw.encode("utf-8") if isinstance(message.raw, str) else bytes(message.raw)
        head, _, body = _crlf(raw).partition(b"\r\n\r\n")  # the head: within the limits
        headers = BytesHeaderParser(policy=_HEADERS).parsebytes(head + b"\r\n\r\n")
        part(
            [
                (name.lower(), _without_boundary(name, str(value)))
                for name, value in headers.items()
                if name.lower() not in _VOLATILE_HEADERS
            ]
        )
        digest.update(hashlib.sha256(_without_boundaries(raw, body)).digest())
        return RAW_FINGERPRINT + digest.hexdigest()
    return digest.hexdigest()


_BOUNDARY = re.compile(r';\s*boundary="?[^";]*"?', re.IGNORECASE)


def _without_boundary(name: str, value: str) -> str:
    """A Content-Type without its boundary parameter (a fresh one on every rendering)."""
    return _BOUNDARY.sub("", value) if name.lower() == "content-type" else value


def _prepare_parts(message: Message, queue_id: str, now: float | None) -> _Rendered:
    """A message from its parts: headers written here, the body rendered as MIME."""

    if message.sender.strip() == NULL_SENDER:
        raise ValidationError(
            "the null sender <> is for raw messages (a bounce, an auto-reply): give raw, with "
            "a From header",
            field="from",
        )
    sender = parse_address(message.sender, "from")
    to = mailboxes(message.to, "to")
    cc = mailboxes(message.cc, "cc")
    bcc = mailboxes(message.bcc, "bcc")
    recipients = _unique_recipients([*to, *cc, *bcc])
    subject = no_line_breaks(message.subject or "", "subject")
    text = _body_text(message.text, "text")
    html = _body_text(message.html, "html")
    if text is None and html is None and not message.attachments:
        raise ValidationError(
            "the message has no body (give a non-empty text or html, attachments, or raw)",
            field="text",
        )

    headers: list[tuple[str, str]] = [("From", address_header([sender]))]
    if to:
        headers.append(("To", address_header(to)))
    if cc:
        headers.append(("Cc", address_header(cc)))
    if not to and not cc:
        headers.append(("To", "undisclosed-recipients:;"))
    headers.append(("Subject", subject))
    headers.append(("Date", rfc5322_date(now)))
    message_id = f"<{queue_id}@{sender.domain}>"
    extra: list[tuple[str, str]] = []
    for name, value in (message.headers or {}).items():
        _check_header(name, value)
        if name.lower() == "message-id":
            message_id = _check_message_id(value)
        else:
            extra.append((name, value))
    headers.append(("Message-ID", message_id))
    headers.extend(extra)

    content = render(mime_body(text, html, message.attachments), headers)
    return _Rendered(sender.address, recipients, subject, message_id, content)


def _body_text(value: str | None, what: str) -> str | None:
    """A text or html body, or None when it is missing, empty or only white space: one rule
    for every front door, so ``"text": ""`` is no body, as a missing text is."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string", field=what)
    check_text(value, what)
    return value if value.strip() else None


def _check_header(name: Any, value: Any) -> None:
    if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
        raise ValidationError(f"{name!r} is not a valid header name", field="headers")
    if not isinstance(value, str):
        raise ValidationError(f"header {name} must be a string", field="headers")
    no_line_breaks(value, f"header {name}")
    lowered = name.lower()
    hint = _RESERVED_HEADERS.get(lowered)
    if hint is None and lowered.startswith("x-postlane-"):
        hint = _POSTLANE_HEADERS
    if hint is not None:
        raise ValidationError(f"header {name} cannot be set in headers ({hint})", field="headers")


_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")


def _check_message_id(value: str) -> str:
    value = value.strip()
    if not _MESSAGE_ID.fullmatch(value):
        raise ValidationError(
            f"Message-ID {value!r} must look like <unique@domain>", field="headers"
        )
    return value


def _prepare_raw(message: Message, queue_id: str, max_size: int, now: float | None) -> _Rendered:
    """A raw message as given, with the Message-ID, Date and From (its envelope sender) it
    lacks added, as Postfix's cleanup does, and Bcc, Resent-Bcc and Return-Path dropped."""
    if message.subject or message.text or message.html or message.headers or message.attachments:
        raise ValidationError(
            "a raw message carries its own subject, body and headers; "
            "send those fields or raw, not both",
            field="raw",
        )
    if isinstance(message.raw, str):
        raw = check_text(message.raw, "raw").encode("utf-8")
    else:
        raw = bytes(message.raw or b"")
    if b"\x00" in raw:
        raise ValidationError("raw contains a NUL character", field="raw")
    _check_size(raw, max_size)  # the bytes given (what postlane adds does not count)
    raw = _crlf(raw)
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    head, sep, _body = raw.partition(b"\r\n\r\n")
    if not sep:  # headers only (RFC 5322 3.5: the body is optional)
        raw += b"\r\n"
        head = raw[:-4]
    _check_header_size(head)
    _check_line_lengths(raw)
    # compat32: header values as plain strings; the modern policy re-parses every value it is
    # asked for, several times slower, and we only need addresses, Message-ID and Subject
    headers = BytesHeaderParser(policy=_HEADERS).parsebytes(head + b"\r\n\r\n")
    if headers.defects or not head or head[:1].isspace():
        raise ValidationError("the raw message's header section is malformed", field="raw")
    check_field_names(head)

    check_singletons(headers)
    from_header = first_address(headers.get_all("From") or [])
    if message.sender.strip() == NULL_SENDER:
        # a bounce, a DSN, an auto-reply (RFC 5321 4.5.5, RFC 3834): sent with the null
        # return path, so nothing ever answers it; its From names the Message-ID's domain
        if not from_header:
            raise ValidationError(
                "a message from the null sender <> needs a From header", field="from"
            )
        author = parse_address(from_header, "From header")
        envelope_sender = ""
    else:
        sender_text = message.sender or from_header
        if not sender_text:
            raise ValidationError(
                "no sender: give from, or a From header in the raw message", field="from"
            )
        author = parse_address(sender_text, "from")
        envelope_sender = author.address
    envelope = [*_as_list(message.to), *_as_list(message.cc), *_as_list(message.bcc)]
    if not envelope:
        envelope = [
            address
            for name in ("To", "Cc", "Bcc")
            for _, address in getaddresses([str(v) for v in headers.get_all(name) or []])
            if address
        ]
    recipients = _unique_recipients([parse_address(value, "to") for value in envelope])

    added = b""
    # as Postfix's cleanup does (messagedrop_headers): Bcc would tell every recipient who
    # else got it; a Return-Path is the receiving server's to add, from the envelope (RFC 5321
    # 4.4), and one given here would only mislead whoever reads the delivered copy
    for name in ("Bcc", "Resent-Bcc", "Return-Path"):
        if name in headers:
            raw = drop_header(raw, name.lower().encode("ascii"))
    message_id = headers.get("Message-ID")
    if message_id is None:
        message_id = f"<{queue_id}@{author.domain}>"
        added += b"Message-ID: " + message_id.encode("ascii") + b"\r\n"
    else:
        message_id = str(message_id).strip()
    if headers.get("Date") is None:
        added += b"Date: " + rfc5322_date(now).encode("ascii") + b"\r\n"
    if not headers.get_all("From"):  # RFC 5322 3.6 requires one; receivers refuse mail without
        added += b"From: " + envelope_sender.encode("utf-8") + b"\r\n"
    # missing headers go at the end of the header section (as Postfix's cleanup does), so trace
    # headers such as Received stay on top
    head, _, body = raw.partition(b"\r\n\r\n")
    content = head + b"\r\n" + added + b"\r\n" + body
    subject = decoded(headers.get("Subject"))
    return _Rendered(envelope_sender, recipients, subject, message_id, content)


def _without_boundaries(raw: bytes, body: bytes) -> bytes:
    """``body`` with the MIME boundaries ``raw`` declares taken out (a re-rendering draws new
    ones): the first :data:`MAX_FINGERPRINT_BOUNDARIES` parameters found, longest first."""
    found: set[bytes] = set()
    for number, match in enumerate(_BOUNDARY_PARAM.finditer(raw)):
        if number >= MAX_FINGERPRINT_BOUNDARIES:
            break
        found.add(match[1] or match[2])
    for boundary in sorted(found, key=lambda b: (-len(b), b)):
        body = body.replace(boundary, b"")
    return body


def _crlf(raw: bytes) -> bytes:
    """``raw`` with CRLF line ends. Most messages come so (an SMTP client's, a framework's):
    counted, not rewritten (the rewrite took 0.2 s of the event loop for 24 MB)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return raw
    return _LINE_ENDINGS.sub(b"\r\n", raw)


def _check_line_lengths(raw: bytes) -> None:
    """Refuse a line longer than RFC 5322 allows (``raw`` has CRLF line ends). (A regular
    expression, not a split into lines: 24 MB of empty lines would be 12 million objects.)"""
    long_line = _LONG_LINE.search(raw)
    if long_line is None:
        return
    number = raw.count(b"\n", 0, long_line.start()) + 1
    raise ValidationError(
        f"line {number} of the raw message is longer than {MAX_LINE} characters, the most RFC "
        "5322 2.1.1 allows (a relay would break it, and its DKIM signature with it): "
        "encode the part as quoted-printable or base64",
        field="raw",
    )


def _check_header_size(head: bytes) -> None:
    """Refuse a header section past :data:`MAX_HEADER_BYTES` or :data:`MAX_HEADER_FIELDS`
    before it is parsed (on the event loop)."""
    if len(head) > MAX_HEADER_BYTES:
        raise ValidationError(
            f"the raw message's header section is {len(head):,} bytes; at most "
            f"{MAX_HEADER_BYTES:,} are taken (put what is large in the body)",
            field="raw",
        )
    fields = 1 + len(_FIELD_START.findall(head))
    if fields > MAX_HEADER_FIELDS:
        raise ValidationError(
            f"the raw message has {fields:,} header fields; at most {MAX_HEADER_FIELDS:,} are "
            "taken",
            field="raw",
        )


def _as_list(values: Sequence[str] | str) -> list[str]:
    return [values] if isinstance(values, str) else list(values)
