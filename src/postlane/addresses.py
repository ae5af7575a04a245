"""Addresses and header text as postlane accepts them: one address checked with
email-validator (display names, IDNA domains, SMTPUTF8 local parts), and text refused when it
could break a header or a store (line breaks, NUL, lone surrogates). Every front door parses
addresses through :func:`parse_address`."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from postlane.errors import ValidationError

__all__ = ["Mailbox", "check_text", "mailboxes", "no_line_breaks", "parse_address"]


#: everything str.splitlines() breaks on: the email package treats them all as line ends
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
#: what no text postlane stores may hold: NUL (SMTP and PostgreSQL refuse it, C readers stop at
#: it) and lone surrogates (half a UTF-16 pair: not Unicode text, cannot be written as UTF-8)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def check_text(value: str, what: str) -> str:
    """Refuse a text holding a NUL character or a lone surrogate, naming the field. Every front
    door (Python API, HTTP, SMTP, CLI) stores text only through this check."""
    found = _UNSTORABLE.search(value)
    if found is not None:
        char = found.group()
        kind = "a NUL character" if char == "\x00" else f"a lone surrogate {char!r}"
        raise ValidationError(f"{what} contains {kind}", field=what)
    return value


def no_line_breaks(value: str, what: str) -> str:
    """Refuse header values that could start a new header line (header injection)."""
    check_text(value, what)
    for char in value:
        if char in _LINE_BREAKS:
            raise ValidationError(
                f"{what} contains a line break (header injection refused)", field=what
            )
        if (char < " " and char != "\t") or char == "\x7f":
            raise ValidationError(f"{what} contains a control character {char!r}", field=what)
    return value


@dataclass(frozen=True)
class Mailbox:
    display_name: str
    address: str  # addr-spec, domain lower-cased
    local_part: str
    domain: str  # ASCII (IDNA) form, lower-cased


def parse_address(value: str, what: str = "address") -> Mailbox:
    """Validate one address (``a@b.example`` or ``Name <a@b.example>``) with email-validator."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} is empty", field=what)
    no_line_breaks(value, what)  # also refuses NUL and lone surrogates
    found = _validated(value.strip())
    if isinstance(found, str):
        raise ValidationError(f"{what} {value!r} is not a valid address: {found}", field=what)
    return found


@functools.lru_cache(maxsize=4096)
def _validated(value: str) -> Mailbox | str:
    """email-validator's verdict (cached: senders repeat), or why the address is invalid."""
    if value.endswith(">") and "<" in value:
        name, _, _ = value.rpartition("<")
        name = name.strip()
        if name and not name.isascii() and not name.startswith('"'):
            # RFC 6532 allows UTF-8 display names; email-validator wants them quoted
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            value = f'"{quoted}" <{value.rpartition("<")[2]}'
    try:
        valid = validate_email(
            value, check_deliverability=False, allow_smtputf8=True, allow_display_name=True
        )
    except EmailNotValidError as exc:
        return str(exc)
    domain = (valid.ascii_domain or valid.domain).lower()
    return Mailbox(
        display_name=valid.display_name or "",
        address=f"{valid.local_part}@{domain}",
        local_part=valid.local_part,
        domain=domain,
    )


def mailboxes(values: Sequence[str] | str, what: str) -> list[Mailbox]:
    if isinstance(values, str):
        values = [values]
    return [parse_address(value, what) for value in values]
