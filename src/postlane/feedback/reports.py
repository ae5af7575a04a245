"""Reading what comes back to a return path: the report inside a bounce, a complaint or an
automatic reply, before anything is matched or recorded. Pure: bytes in, a
:class:`ParsedReport` out, nothing about the store or the network.

What is understood, structure first, wording second:

DSN (RFC 3464, RFC 6533)
    ``multipart/report; report-type=delivery-status`` with a ``message/delivery-status`` (or
    ``message/global-delivery-status``) part: one :class:`RecipientStatus` per per-recipient
    block, from ``Action``, ``Status``, ``Diagnostic-Code``, ``Final-Recipient`` and
    ``Original-Recipient`` (its xtext decoded). What Postfix, Exim, Gmail, Microsoft 365 and
    most MTAs send today.
ARF (RFC 5965, RFC 6591)
    ``multipart/report; report-type=feedback-report``: a :class:`Complaint` from
    ``Feedback-Type``, ``Original-Rcpt-To``, ``Removal-Recipient``, ``User-Agent``,
    ``Source-IP``; ``abuse``, ``fraud``, ``virus`` and ``other`` are complaints, ``not-spam``
    and ``auth-failure`` (RFC 6591) are reports that are not.
Plain-text bounces
    What older MTAs and some providers send without a DSN part: qmail's QSBMF ("Hi. This is the
    qmail-send program at ..."), Exim's "This message was created automatically by mail
    delivery software", Microsoft's NDRs ("Delivery has failed to these recipients or groups",
    "Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound ...'"), Gmail's and
    Yahoo's text bounces, Sendmail's "The following addresses had permanent fatal errors".
    Each recipient is a line holding just an address (``<a@b>:``, ``  a@b``, ``a@b (a@b)``,
    ``Name<mailto:a@b>``) or a name in ``X-Failed-Recipients``; its diagnostic is the first
    SMTP reply (``550 5.1.1 ...``) or enhanced code (``(#5.1.1)``) in the text that follows it.
    Wording that says the server will go on trying makes it ``delayed``, else ``failed``.
Automatic replies
    Vacation and out-of-office answers (RFC 3834 ``Auto-Submitted: auto-replied``,
    ``X-Autoreply``, ``X-Autorespond``, ``Precedence: auto_reply``, subjects such as "Out of
    Office" and "Automatic reply") are understood as what they are: not bounces.

The original message a report is about is read from its ``message/rfc822`` or
``text/rfc822-headers`` part, or from the copy quoted after a plain bounce's separator line: its
``Message-ID`` (the fallback for matching when no VERP token names the delivery).

Bad input has an outcome, never an exception: malformed MIME is read as far as it goes,
headers that are not UTF-8 are read with replacement characters, and anything the parser
cannot take at all is :attr:`ReportKind.UNREADABLE` with the reason. Only the first
:data:`PARSE_LIMIT` bytes are read (every report format puts its report before the returned
message, which may be 25 MB).
"""

from __future__ import annotations

import base64
import binascii
import html
import quopri
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from email import policy
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses
from enum import StrEnum

__all__ = [
    "COMPLAINT_TYPES",
    "PARSE_LIMIT",
    "Action",
    "Complaint",
    "ParsedReport",
    "RecipientStatus",
    "ReportKind",
    "parse_report",
]

#: the most of a report that is parsed (the report parts come before the returned message)
PARSE_LIMIT = 1024 * 1024
#: MIME parts looked at, and how deep, before giving up on a message's structure
MAX_PARTS = 64
MAX_DEPTH = 4
#: the most kept of one diagnostic text
DIAGNOSTIC_LIMIT = 1000
#: ARF feedback types that are complaints about the mail (RFC 5965 section 7.3)
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})


class ReportKind(StrEnum):
    """What a received message turned out to be (also :attr:`postlane.feedback.Report.kind`)."""

    DSN = "dsn"
    ARF = "arf"
    PLAIN = "plain"
    AUTO_REPLY = "auto-reply"
    #: readable, but none of the above (a human's reply, spam, a newsletter)
    UNKNOWN = "unknown"
    #: not even readable as a message
    UNREADABLE = "unreadable"


class Action(StrEnum):
    """A DSN's ``Action`` field (RFC 3464 2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


@dataclass(frozen=True)
class RecipientStatus:
    """What a report says about one recipient: a DSN's per-recipient block, or the same read
    from a plain bounce."""

    action: Action
    #: the address the report names (``Final-Recipient``), lower-cased; None when a plain
    #: bounce names none
    recipient: str | None = None
    #: the address as the sender gave it (``Original-Recipient``), when the report has it
    original_recipient: str | None = None
    #: the enhanced status code (RFC 3463), e.g. ``5.1.1``
    status: str | None = None
    #: the remote server's reply, or the reporting MTA's explanation
    diagnostic: str | None = None
    remote_mta: str | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses this status may be about (original first: it is what was sent)."""
        found = (self.original_recipient, self.recipient)
        return tuple(dict.fromkeys(a for a in found if a))

    def reply(self) -> str:
        """The reply to classify, as a synchronous one would read: the diagnostic's own code
        with the ``Status`` code put after it when the text has none; a code made from the
        ``Status`` and the action when the diagnostic has no SMTP code at all (a
        ``X-Postfix; Host or domain name not found`` explanation)."""
        text = " ".join((self.diagnostic or "").split())
        match = _LEADING_CODE.match(text)
        if match is not None:
            code, rest = match.group(1), match.group(2)
            # a multi-line reply folded into one field repeats its codes on every line
            # ("550-5.1.1 ... 550-5.1.1 ... 550 5.1.1 ..."): read as its lines' text, as a
            # synchronous reply is
            rest = re.sub(rf"\s{code}[ -][245]\.\d{{1,3}}\.\d{{1,3}}(?=\s)", "", rest)
            if self.status and not _LEADING_ENHANCED.match(rest):
                return f"{code} {self.status} {rest}".rstrip()
            return f"{code} {rest}".rstrip()
        parts = (_code_for(self.status, self.action), self.status, text)
        return " ".join(part for part in parts if part)


@dataclass(frozen=True)
class Complaint:
    """An ARF report (RFC 5965): what kind, about whom, from whom."""

    feedback_type: str
    #: ``Original-Rcpt-To`` and ``Removal-Recipient`` (else the original's ``To``), lower-cased
    recipients: tuple[str, ...] = ()
    user_agent: str | None = None
    reporting_mta: str | None = None
    source_ip: str | None = None

    @property
    def is_complaint(self) -> bool:
        """Whether it reports the mail as unwanted (abuse, fraud, virus, other)."""
        return self.feedback_type in COMPLAINT_TYPES

    def describe(self) -> str:
        """One line for the recipient's history: ``complaint (abuse) by Yahoo!-Mail-Feedback``."""
        by = self.user_agent or self.reporting_mta
        return f"complaint ({self.feedback_type})" + (f" by {by}" if by else "")


@dataclass(frozen=True)
class ParsedReport:
    """What a received message says, before it is matched to a delivery."""

    kind: ReportKind
    recipients: tuple[RecipientStatus, ...] = ()
    complaint: Complaint | None = None
    #: the ``Message-ID`` of the original message the report is about, with its angle brackets
    message_id: str | None = None
    subject: str = ""
    #: the report's own ``From`` (``MAILER-DAEMON@...``, a feedback loop's address)
    author: str = ""
    #: which format or signal was recognised (``postfix``, ``qmail``, ``X-Autoreply``, ...), or
    #: why it could not be read
    note: str = ""
    #: the report's own ``Message-ID`` (the same when its sender sends it again)
    report_id: str | None = None


def _with_report_id(parsed: ParsedReport, message: Message) -> ParsedReport:
    found = _header(message, "message-id").strip()
    return replace(parsed, report_id=found) if _REPORT_ID.fullmatch(found) else parsed


#: a report's Message-ID worth telling a repeat by (a blank or odd one tells nothing)
_REPORT_ID = re.compile(r"<[^<>\s]{3,250}>")


def parse_report(content: bytes) -> ParsedReport:
    """Read a received message (see the module docstring); never raises."""
    try:
        message = BytesParser(policy=policy.compat32).parsebytes(content[:PARSE_LIMIT])
    except Exception as exc:  # the email package's parsers are lenient; this is a last resort
        return ParsedReport(ReportKind.UNREADABLE, note=f"not a readable message: {exc}")
    try:
        if len(content) > PARSE_LIMIT and message.get_content_type() == "multipart/report":
            # a report whose status part lies past the head read: never guessed from its prose
            parsed = _read(message)
            if parsed.kind not in (ReportKind.DSN, ReportKind.ARF):
                return ParsedReport(
                    ReportKind.UNREADABLE,
                    subject=parsed.subject,
                    author=parsed.author,
                    note=f"a report whose status part is past the first {PARSE_LIMIT:,} bytes "
                    "read (a huge first part)",
                )
            return _with_report_id(parsed, message)
        return _with_report_id(_read(message), message)
    except Exception as exc:  # a report is never lost to a parser bug: it is kept unreadable
        return ParsedReport(
            ReportKind.UNREADABLE,
            subject=_header(message, "subject"),
            note=f"could not be read: {type(exc).__name__}: {exc}",
        )


# -- structure ------------------------------------------------------------------------------------


def _read(message: Message) -> ParsedReport:
    subject = _header(message, "subject")
    author = _header(message, "from")
    parts = list(_parts(message))
    original = _original(parts)
    message_id = _message_id(original) if original is not None else None
    for part in parts:
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            text = _part_text(part)
            return ParsedReport(
                ReportKind.DSN,
                recipients=tuple(_dsn_recipients(text)),
                message_id=message_id or _in_reply_to(message),
                subject=subject,
                author=author,
                note=_reporter(text),
            )
    for part in parts:
        if part.get_content_type() == "message/feedback-report":
            complaint = _complaint(_part_text(part), original)
            return ParsedReport(
                ReportKind.ARF,
                complaint=complaint,
                message_id=message_id,
                subject=subject,
                author=author,
                note=complaint.user_agent or "",
            )
    notice, quoted = _split_quoted(_body_text(parts))
    if message_id is None and quoted:
        message_id = _message_id_in(quoted)
    specific = _first_marker(_SPECIFIC_MARKERS, notice)
    if specific is None:
        signal = _auto_reply_signal(message, subject)
        if signal is not None:
            return ParsedReport(ReportKind.AUTO_REPLY, subject=subject, author=author, note=signal)
    found = specific or _generic_bounce(message, subject, author, notice)
    if found is None:
        return ParsedReport(
            ReportKind.UNKNOWN, subject=subject, author=author, note="neither a report nor a bounce"
        )
    action = Action.DELAYED if _is_delay(notice, subject) else Action.FAILED
    failed = _addresses(message.get_all("x-failed-recipients") or [])
    return ParsedReport(
        ReportKind.PLAIN,
        recipients=tuple(_plain_recipients(notice, action, failed)),
        message_id=message_id or _in_reply_to(message),
        subject=subject,
        author=author,
        note=found,
    )


def _parts(message: Message) -> Iterator[Message]:
    """The message and its MIME parts, not descending into a returned message (whose own
    parts are the original's, not the report's), at most :data:`MAX_PARTS` of them."""
    stack = [(message, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, level = stack.pop(0)
        seen += 1
        yield part
        if part.get_content_maintype() == "multipart" and level < MAX_DEPTH:
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((sub, level + 1) for sub in payload if isinstance(sub, Message))


def _original(parts: Sequence[Message]) -> Message | None:
    """The returned original (its whole message, or its headers), if the report has it."""
    for part in parts:
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if kind in (
            "text/rfc822-headers",
            "message/rfc822-headers",
            "text/global-headers",
            "message/global-headers",  # RFC 6533 3
        ):
            return HeaderParser(policy=policy.compat32).parsestr(_part_text(part))
    return None


def _part_text(part: Message) -> str:
    """A part's content as text: decoded from its transfer encoding and charset (bytes that
    are not in the charset become replacement characters), lines ending in ``\n``."""
    return _decoded_part(part).replace("\r\n", "\n").replace("\r", "\n")


def _decoded_part(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/*: the email package parsed it into messages
        text = "\n".join(_fields_text(sub) for sub in payload if isinstance(sub, Message))
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        if encoding in ("base64", "quoted-printable"):
            encoded = _clean(text).encode("ascii", "ignore")
            try:
                if encoding == "base64":
                    decoded = base64.b64decode(encoded)
                else:
                    decoded = quopri.decodestring(encoded)
            except (binascii.Error, ValueError):
                return _clean(text)
            return decoded.decode("utf-8", "replace")
        return _clean(text)
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return _clean(str(payload or ""))
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", "replace")


def _fields_text(block: Message) -> str:
    """A parsed block back as text: its fields as they were written (folding kept), then
    whatever the parser could not read as fields (much cheaper than ``as_string()``)."""
    # raw_items: the values as received (8-bit bytes as surrogate escapes, which _clean
    # reads as UTF-8), not items(), which turns them into Header objects printing U+FFFD
    lines = [f"{name}: {value}" for name, value in block.raw_items()]
    # the bytes as received, as surrogate escapes too (get_payload() would put U+FFFD for 8-bit)
    body = None if block.is_multipart() else block.get_payload(decode=True)
    if isinstance(body, bytes) and body:
        lines.append("\n" + body.decode("ascii", "surrogateescape"))
    return "\n".join(lines) + "\n"


def _clean(text: str) -> str:
    """Text read with surrogate escapes (raw 8-bit bytes in headers) as proper text: UTF-8
    where it is UTF-8, replacement characters where it is not."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header(message: Message, name: str) -> str:
    """A header's value decoded (RFC 2047 words too), unfolded; '' when absent or unreadable."""
    value = message.get(name)
    if value is None:
        return ""
    try:
        text = str(make_header(decode_header(str(value))))
    except (LookupError, UnicodeError, ValueError, binascii.Error, MessageError):
        text = str(value)  # (a charset name that is not ASCII is a CharsetError)
    return " ".join(_clean(text).split())


_MESSAGE_ID = re.compile(r"<[^<>\s]+@[^<>\s]+>|[^<>\s@]+@[^<>\s@]+")


def _normal_message_id(value: str) -> str | None:
    match = _MESSAGE_ID.search(value)
    if match is None:
        return None
    found = match.group(0)
    return found if found.startswith("<") else f"<{found}>"


def _message_id(original: Message) -> str | None:
    return _normal_message_id(_header(original, "message-id"))


_QUOTED_MESSAGE_ID = re.compile(r"^message-id:[ \t]*(.+)$", re.IGNORECASE | re.MULTILINE)


def _message_id_in(quoted: str) -> str | None:
    match = _QUOTED_MESSAGE_ID.search(quoted)
    return _normal_message_id(match.group(1)) if match else None


def _in_reply_to(message: Message) -> str | None:
    """Exchange and some others name the original in the report's own ``In-Reply-To``."""
    return _normal_message_id(_header(message, "in-reply-to"))


def _addresses(values: Sequence[object]) -> list[str]:
    found = []
    for _, address in getaddresses([_clean(str(v)) for v in values]):
        address = address.strip().lower()
        if "@" in address:
            found.append(address)
    return found


# -- DSN ------------------------------------------------------------------------------------------

_FIELD = re.compile(r"^([!-9;-~]+)[ \t]*:[ \t]*(.*)$")


def _field_blocks(text: str) -> list[dict[str, list[str]]]:
    """A delivery-status body as blocks of fields (separated by blank lines), continuation
    lines unfolded, names lower-cased."""
    blocks: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            values = current[last]
            values[-1] = f"{values[-1]} {line.strip()}"
            continue
        match = _FIELD.match(line)
        if match is None:
            continue  # not a field (malformed): skipped, the rest is still read
        last = match.group(1).lower()
        current.setdefault(last, []).append(match.group(2).strip())
    if current:
        blocks.append(current)
    return blocks


def _first(block: dict[str, list[str]], name: str) -> str | None:
    values = block.get(name)
    return values[0] if values else None


def _typed_address(value: str | None, *, xtext: bool = False) -> str | None:
    """``rfc822; user@example.com`` (or ``utf-8; ...``) -> ``user@example.com``."""
    if not value:
        return None
    kind, semicolon, address = value.partition(";")
    if not semicolon:
        address, kind = kind, "rfc822"
    address = address.strip().strip("<>").strip()
    if xtext and kind.strip().lower() == "rfc822":
        address = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), address)
    return address.lower() if "@" in address else None


_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _dsn_recipients(text: str) -> Iterator[RecipientStatus]:
    for block in _field_blocks(text):
        if "action" not in block and "final-recipient" not in block:
            continue  # the per-message block
        action_text = (_first(block, "action") or "").lower().split()
        try:
            action = Action(action_text[0] if action_text else "failed")
        except ValueError:
            action = Action.FAILED  # an unknown action is read as the one that loses mail
        status_field = _first(block, "status") or ""
        status = _STATUS.search(status_field)
        diagnostic = _first(block, "diagnostic-code")
        if not diagnostic and "(" in status_field:  # "Status: 4.0.0 (host name lookup failure)"
            diagnostic = status_field.partition("(")[2].rstrip(")").strip()
        if diagnostic:
            kind, semicolon, rest = diagnostic.partition(";")
            if semicolon and " " not in kind.strip():  # "smtp; 550 ...", "X-Postfix; ..."
                diagnostic = rest.strip()
            diagnostic = diagnostic[:DIAGNOSTIC_LIMIT]
        yield RecipientStatus(
            action=action,
            recipient=_typed_address(_first(block, "final-recipient")),
            original_recipient=_typed_address(_first(block, "original-recipient"), xtext=True),
            status=status.group(0) if status else None,
            diagnostic=diagnostic or None,
            remote_mta=_typed_value(_first(block, "remote-mta")),
        )


def _typed_value(value: str | None) -> str | None:
    """``dns; mx.example.com`` -> ``mx.example.com``."""
    if not value:
        return None
    return value.partition(";")[2].strip() or value.strip() or None


def _reporter(text: str) -> str:
    """The ``Reporting-MTA`` of a delivery-status body's per-message block."""
    for block in _field_blocks(text)[:1]:
        return _typed_value(_first(block, "reporting-mta")) or ""
    return ""


# -- ARF ------------------------------------------------------------------------------------------


def _complaint(text: str, original: Message | None) -> Complaint:
    fields: dict[str, list[str]] = {}
    for block in _field_blocks(text):
        for name, values in block.items():
            fields.setdefault(name, []).extend(values)
    recipients = [
        address
        for name in ("original-rcpt-to", "removal-recipient")
        for value in fields.get(name, [])
        if (address := _typed_address(value)) is not None
    ]
    if not recipients and original is not None:
        recipients = _addresses(original.get_all("to") or [])
    feedback_type = (_first(fields, "feedback-type") or "").strip().lower()
    return Complaint(
        feedback_type=feedback_type.split()[0] if feedback_type else "",
        recipients=tuple(dict.fromkeys(recipients)),
        user_agent=_first(fields, "user-agent"),
        reporting_mta=_typed_value(_first(fields, "reporting-mta")),
        source_ip=_first(fields, "source-ip"),
    )


# -- plain-text bounces ---------------------------------------------------------------------------


def _body_text(parts: Sequence[Message]) -> str:
    """The report's own text: its first ``text/plain`` part, else its first ``text/html`` with
    the tags taken out."""
    html_part = None
    for part in parts:
        kind = part.get_content_type()
        if kind == "text/plain" and not part.get_filename():
            return _part_text(part)
        if kind == "text/html" and html_part is None:
            html_part = part
    if html_part is None:
        return ""
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", _part_text(html_part))
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</tr>", "\n", text)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


#: the line after which a plain bounce quotes the returned message
_QUOTED = re.compile(
    r"^[ \t]*(?:-{2,}[ \t]*below this line is a copy of the message"  # qmail
    r"|-{2,}[ \t]*this is a copy of the message"  # Exim
    r"|-{2,}[ \t]*(?:original|returned|undelivered) message"  # Gmail, Sendmail
    r"|original message headers:"  # Microsoft
    r"|-{2,}[ \t]*the header of the original message"
    r"|-{2,}[ \t]*(?:the )?(?:original )?message (?:text )?follows)",
    re.IGNORECASE | re.MULTILINE,
)


def _split_quoted(body: str) -> tuple[str, str]:
    """The notice, and the quoted copy of the returned message after its separator line."""
    match = _QUOTED.search(body)
    if match is None:
        return body, ""
    return body[: match.start()], body[match.end() :]


#: wording only an MTA's or a provider's bounce has: (format, pattern)
_SPECIFIC_MARKERS = [
    ("qmail", r"this is the qmail-send program"),
    ("exim", r"this message was created automatically by mail delivery software"),
    ("microsoft", r"delivery has failed to these recipients or (groups|distribution lists)"),
    ("microsoft", r"your message to .{1,200} couldn'?t be delivered"),
    ("microsoft", r"remote server returned '"),
    ("microsoft", r"delivery is delayed to these recipients or (groups|distribution lists)"),
    ("gmail", r"delivery to the following recipients? failed permanently"),
    ("gmail", r"delivery to the following recipients? has been delayed"),
    ("gmail", r"your message wasn'?t delivered to"),
    ("gmail", r"address couldn'?t be found,? or is unable to receive mail"),
    ("yahoo", r"sorry, we were unable to deliver your message to the following address"),
    ("postfix", r"this is the mail system at host"),
    ("sendmail", r"the following addresses had permanent fatal errors"),
    ("sendmail", r"-{3,}[ \t]*transcript of session follows"),
    ("courier", r"your message to the following recipients cannot be delivered"),
]
#: wording of bounces in general (only after automatic replies are ruled out)
_GENERIC_MARKERS = [
    ("generic", r"(message|mail) (could not|couldn'?t|cannot|was not|wasn'?t) (be )?delivered"),
    ("generic", r"undeliver(able|ed) (mail|message)"),
    ("generic", r"delivery (status notification|failure|has failed)"),
    ("generic", r"permanent (error|failure|fatal error)"),
    ("generic", r"mail delivery failed"),
]
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|returned to sender|delivery status notification|delivery fail"
    r"|mail delivery|failure notice|non.?delivery|could not be delivered|delayed mail"
    r"|warning: message|mail system error",
    re.IGNORECASE,
)
_DAEMON = re.compile(r"(?:^|[<\s\"])(mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.I)


def _first_marker(markers: Sequence[tuple[str, str]], text: str) -> str | None:
    head = text[:20_000]
    for name, pattern in markers:
        if re.search(pattern, head, re.IGNORECASE):
            return name
    return None


def _generic_bounce(message: Message, subject: str, author: str, notice: str) -> str | None:
    generic = _first_marker(_GENERIC_MARKERS, notice)
    from_daemon = _DAEMON.search(author) is not None
    has_reply = _REPLY.search(notice[:20_000]) is not None
    if generic is not None and (from_daemon or _BOUNCE_SUBJECT.search(subject) or has_reply):
        return generic
    if from_daemon and (_BOUNCE_SUBJECT.search(subject) or has_reply):
        return "mailer-daemon"
    if _BOUNCE_SUBJECT.search(subject) and has_reply and message.get("x-failed-recipients"):
        return "x-failed-recipients"
    return None


_DELAY = re.compile(
    r"delivery status notification \(delay\)|has not (yet )?been delivered|been delayed"
    r"|will (continue to |keep )?(re)?try|delivery attempts will continue|still (being )?(re)?tr"
    r"|warning: message .{0,80} delayed|delayed mail|message delayed|delivery is delayed",
    re.IGNORECASE,
)
_PERMANENT = re.compile(
    r"permanent|failed permanently|given up|gave up|could not be delivered|couldn'?t be delivered"
    r"|delivery has failed|undeliverable|wasn'?t delivered|were unable to deliver|fatal error"
    r"|will not (try|retry|be retried)",
    re.IGNORECASE,
)


def _is_delay(notice: str, subject: str) -> bool:
    """Whether a plain bounce says the server is still trying (a delay warning)."""
    text = f"{subject}\n{notice[:20_000]}"
    return _DELAY.search(text) is not None and _PERMANENT.search(text) is None


_ADDRESS = r"[^\s<>()\[\]\"',;:@]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"
#: a line naming one recipient: "<a@b>:", "  a@b", "a@b (a@b)", "Name<mailto:a@b>", "a@b: text"
_RECIPIENT_LINE = re.compile(
    rf"^[ \t]*(?:[^<:\n@]{{0,80}}<)?(?:mailto:)?({_ADDRESS})>?"
    rf"(?:[ \t]*\([^)\n]*\))?(?:[ \t]*:(?:[ \t].*)?)?[ \t]*$",
    re.MULTILINE,
)
#: an SMTP reply inside prose: "550 5.1.1 text", "#550 5.2.3 text", "550-5.7.1 text"
_REPLY = re.compile(
    r"(?<![\w.:/#-])#?([45][0-9][0-9])(?:[ -]#?([245]\.[0-9]{1,3}\.[0-9]{1,3}))?(?:\s|:\s)"
)
#: an enhanced code alone, as qmail writes it: "(#5.1.1)"
_ENHANCED_ONLY = re.compile(r"#([245]\.[0-9]{1,3}\.[0-9]{1,3})")
_LEADING_CODE = re.compile(r"#?([245][0-9][0-9])(?:[ :-]+|$)(.*)")
_LEADING_ENHANCED = re.compile(r"#?[245]\.[0-9]{1,3}\.[0-9]{1,3}\b")
_NOT_RECIPIENT = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.I)


def _plain_recipients(
    notice: str, action: Action, failed_header: Sequence[str]
) -> Iterator[RecipientStatus]:
    """Recipients and their diagnostics from a bounce's prose (see the module docstring)."""
    text = notice[:100_000]
    blocks: dict[str, list[str]] = {}
    current: str | None = None
    start = 0
    for match in _RECIPIENT_LINE.finditer(text):
        address = match.group(1).lower()
        if _NOT_RECIPIENT.match(address) or address == current:
            continue
        if current is not None:
            blocks[current].append(text[start : match.start()])
        current, start = address, match.start()
        blocks.setdefault(address, [])
    if current is not None:
        blocks[current].append(text[start:])
    for address in failed_header:
        blocks.setdefault(address, [])
    if not blocks:
        yield _status_from(action, None, text)
        return
    for address, pieces in blocks.items():
        # a recipient named only by X-Failed-Recipients gets the notice's diagnostic
        yield _status_from(action, address, "\n".join(pieces) or text)


def _status_from(action: Action, address: str | None, text: str) -> RecipientStatus:
    reply = _REPLY.search(text)
    if reply is not None:
        paragraph = re.split(r"\n[ \t]*\n", text[reply.start() :], maxsplit=1)[0]
        diagnostic = " ".join(paragraph.split()).lstrip("#").rstrip("#' .").strip()
        if diagnostic.endswith(")") and "(" not in diagnostic:  # "(reason: 550 ...)"
            diagnostic = diagnostic[:-1]
        status = reply.group(2)
    else:
        enhanced = _ENHANCED_ONLY.search(text)
        status = enhanced.group(1) if enhanced else None
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        diagnostic = " ".join(" ".join(lines[:6]).split())
    return RecipientStatus(
        action=action,
        recipient=address,
        status=status.lstrip("#") if status else None,
        diagnostic=diagnostic[:DIAGNOSTIC_LIMIT] or None,
    )


def _code_for(status: str | None, action: Action) -> str:
    """The basic code a reply with only an enhanced code (or none) stands for: 550 for a bad
    address or mailbox (x.1.x, x.2.x), else 554 (an unexplained 5xx never suppresses the
    recipient), 450/451 for a transient one, 250 for a success."""
    first = status[0] if status else {"delayed": "4", "failed": "5"}.get(action.value, "2")
    subject = status.split(".")[1] if status else ""
    if first == "5":
        return "550" if subject in ("1", "2") else "554"
    if first == "4":
        return "450" if subject in ("1", "2") else "451"
    return "250"


# -- automatic replies ----------------------------------------------------------------------------

_AUTO_SUBJECT = re.compile(
    r"^(?:(?:re|aw|sv|fw|fwd)\s*:\s*)*(?:auto(?:matic)?[ _-]?(?:reply|response|answer|antwort)"
    r"|autoreply|autoresponse|out of (?:the )?office|ooo\b|on vacation|vacation|away from"
    r"|abwesenheit|r[ée]ponse automatique|respuesta autom[aá]tica|risposta automatica"
    r"|fuera de la oficina|absent|automatisch antwoord|afwezig)",
    re.IGNORECASE,
)


def _auto_reply_signal(message: Message, subject: str) -> str | None:
    """The header or subject that says ``message`` is an automatic reply, or None."""
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder", "x-vacation"):
        if message.get(name) is not None:
            return name
    precedence = _header(message, "precedence").lower()
    if precedence in ("auto_reply", "auto-reply"):
        return f"Precedence: {precedence}"
    if _AUTO_SUBJECT.search(subject):
        return "subject"
    auto_submitted = _header(message, "auto-submitted").lower()
    if auto_submitted.startswith("auto-replied"):
        return "Auto-Submitted: auto-replied"
    return None
