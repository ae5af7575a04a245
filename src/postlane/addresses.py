"""Addresses and header text as postlane accepts them: one address checked with
email-validator (display names, IDNA domains, SMTPUTF8 local parts, RFC 5321 quoted local parts
and address literals), and text refused when it could break a header or a store (line breaks,
NUL, lone surrogates). Every front door parses addresses through :func:`parse_address`.

The normal form of an address (:attr:`Mailbox.address`): what is stored, sent in ``MAIL FROM``
and ``RCPT TO``, written in headers, and compared (case-insensitively) by suppressions,
idempotency and duplicate recipients:

- the local part as given, but quoted only when it must be (RFC 5321 4.1.2: every quoted form
  is equivalent, and the one with the least quoting is the one sent): ``"john"@example.com`` is
  ``john@example.com``; ``"john doe"@example.com`` and ``"a@b"@example.com`` keep their
  quotes, with a backslash only before ``"`` and ``\\``;
- the domain lower-cased, in its ASCII (IDNA) form;
- an address literal as RFC 5321 4.1.3 writes it, the IPv6 address compressed:
  ``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``. Only IPv4 and IPv6 literals exist; any
  other text in brackets is refused.
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from postlane.errors import ValidationError

__all__ = [
    "Mailbox",
    "check_text",
    "mailboxes",
    "no_line_breaks",
    "parse_address",
    "unquote_local_part",
]


#: RFC 5321 4.5.3.1.1: a local part is at most 64 octets (email-validator checks it only in its
#: strict mode); counted in the normal form, as sent in RCPT TO, in UTF-8 for SMTPUTF8
MAX_LOCAL_PART = 64
#: an address an error repeats is cut to this many characters: an SMTP reply line holds 512
#: octets (RFC 5321 4.5.3.1.5), and a refusal need not repeat a megabyte of input
SHOWN_ADDRESS = 100
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
    #: addr-spec in its normal form (the module docstring): what is sent and stored
    address: str
    #: as in ``address``: quoted (``"john doe"``) only when it must be
    local_part: str
    #: ASCII (IDNA) form, lower-cased; an address literal lower-cased too (``[ipv6:2001:db8::1]``):
    #: the key that destinations, selectors and the store compare
    domain: str

    @property
    def is_literal(self) -> bool:
        """Whether the domain is an address literal (``[192.0.2.1]``): mail for it goes to that
        address, with no DNS lookup (RFC 5321 5.1)."""
        return self.domain.startswith("[")

    @property
    def unquoted_local_part(self) -> str:
        """The local part without its quotes and backslashes (``john doe``), as the email
        package's ``Address(username=...)`` takes it."""
        return unquote_local_part(self.local_part)


def unquote_local_part(local_part: str) -> str:
    """``"john doe"`` -> ``john doe`` (backslash escapes undone); a dot-atom as it is."""
    if len(local_part) >= 2 and local_part.startswith('"') and local_part.endswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local_part[1:-1])
    return local_part


_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def parse_address(value: str, what: str = "address", *, any_length: bool = False) -> Mailbox:
    """Validate one address (``a@b.example``, ``Name <a@b.example>``, ``"john doe"@b.example``,
    ``a@[192.0.2.1]``) with email-validator, and give its normal form. ``any_length``: a local
    part over :data:`MAX_LOCAL_PART` octets passes where nothing is sent to it: mail queued
    before postlane refused them, brought back by ``queue import`` (the receiving server
    decides), and the suppression list."""
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} is missing: give an address (app@example.com)", field=what)
    if not value.strip():
        raise ValidationError(f"{what} is empty", field=what)
    no_line_breaks(value, what)  # also refuses NUL and lone surrogates
    found = _validated(value.strip(), None if any_length else MAX_LOCAL_PART)
    if isinstance(found, str) and len(several := _several(value)) > 1:
        # "b@example.net, c@example.net" where one address goes: email-validator only says
        # "invalid characters: ',', '@', SPACE"
        raise ValidationError(
            f"{what} {_shown(value)} holds {len(several)} addresses: give one address each "
            f"(a list for several recipients)",
            field=what,
        )
    if isinstance(found, str):
        raise ValidationError(f"{what} {_shown(value)} is not a valid address: {found}", field=what)
    return found


def _shown(value: str) -> str:
    """``value`` as an error repeats it: quoted, and cut with an ellipsis past
    :data:`SHOWN_ADDRESS` characters."""
    if len(value) <= SHOWN_ADDRESS:
        return repr(value)
    quoted = repr(value[:SHOWN_ADDRESS])
    return f"{quoted[:-1]}...{quoted[-1]}"


@functools.lru_cache(maxsize=4096)
def _validated(value: str, max_local_part: int | None) -> Mailbox | str:
    """email-validator's verdict (cached: senders repeat), or why the address is invalid."""
    if value.endswith(">"):
        split = _display_name_split(value)
        if split is not None:
            name, addr_spec = split
            if name and not name.isascii() and not name.startswith('"'):
                # RFC 6532 allows UTF-8 display names; email-validator wants them quoted
                quoted = name.replace("\\", "\\\\").replace('"', '\\"')
                value = f'"{quoted}" <{addr_spec}>'
    try:
        valid = validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_display_name=True,
            allow_quoted_local=True,  # RFC 5321 4.1.2 Quoted-string
            allow_domain_literal=True,  # RFC 5321 4.1.3 address literals
        )
    except EmailNotValidError as exc:
        return str(exc)
    octets = len(valid.local_part.encode("utf-8"))
    if max_local_part is not None and octets > max_local_part:
        return (
            f"the part before the @ is {octets} octets; RFC 5321 4.5.3.1.1 allows at most "
            f"{MAX_LOCAL_PART}"
        )
    # a literal comes normalised ("[IPv6:" and the address compressed); a name in ASCII form
    written = valid.ascii_domain or valid.domain
    domain = written.lower()
    if not domain.startswith("["):
        written = domain
    return Mailbox(
        display_name=valid.display_name or "",
        address=f"{valid.local_part}@{written}",
        local_part=valid.local_part,
        domain=domain,
    )


def _display_name_split(value: str) -> tuple[str, str] | None:
    """``Name <addr-spec>`` -> (``Name``, ``addr-spec``), splitting at the first ``<`` outside
    quotes (a quoted local part may hold one: ``"a<b"@example.com``); None without one."""
    quoted = escaped = False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "<" and not quoted:
            return value[:index].strip(), value[index + 1 : -1]
    return None


def mailboxes(values: Sequence[str] | str, what: str) -> list[Mailbox]:
    if isinstance(values, str):
        values = [values]
    return [parse_address(value, what) for value in values]


def _several(value: str) -> list[str]:
    """The addresses a comma-separated list names (one or none for anything else)."""
    if "," not in value:
        return []
    return [address for _, address in email.utils.getaddresses([value]) if "@" in address]
