"""What an SMTP command line may hold, for postlane's SMTP server
(:mod:`postlane.ingest.smtp_protocol`): the limits on its length, and the MAIL and RCPT paths
and ESMTP parameters it carries. Pure functions, parsed as aiosmtpd parses them."""

from __future__ import annotations

import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

__all__ = [
    "COMMAND_LIMIT",
    "LINE_LIMIT",
    "MAIL_LIMIT",
    "PATH_SYNTAX",
    "is_one_word",
    "is_utf8",
    "parse_parameters",
    "parse_path",
]

#: the longest command line (RFC 5321 4.5.3.1.4), with what SIZE and SMTPUTF8 add to MAIL
COMMAND_LIMIT = 512
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10
#: a line this long without its end is cut off unread, then answered 500 (aiosmtpd's limit)
LINE_LIMIT = 1001
#: the reply to a MAIL or RCPT path that cannot be parsed, by its keyword (ESMTP adds to it)
PATH_SYNTAX = {
    "FROM:": "501 Syntax: MAIL FROM: <address>",
    "TO:": "501 Syntax: RCPT TO: <address>",
}


def is_utf8(text: str) -> bool:
    """Whether a command's text was valid UTF-8 (invalid bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_one_word(name: str) -> bool:
    """A HELO/EHLO name is one word (RFC 5321: a domain or an address literal): no space, no
    control character. A bare CR in it would become a header break in the Received line."""
    return not any(ord(c) < 33 or ord(c) == 127 for c in name)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: a plain ``<local@domain>`` path, which needs no RFC 5322 parser
_PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z")

# RFC 5321 4.1.2's Mailbox where it is not a plain one: a Quoted-string local part (qtextSMTP
# and quoted-pairSMTP, with UTF-8 as RFC 6531 3.3 adds) or an address-literal domain (dcontent
# between brackets; that it is an IP address is parse_address's check), after an optional
# source route (A-d-l, read and ignored as RFC 5321 4.1.1.3 asks).
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"'
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_DOT_STRING = rf"{_ATEXT}(?:\.{_ATEXT})*"
_DOMAIN = r"[A-Za-z0-9\x80-\U0010ffff-]+(?:\.[A-Za-z0-9\x80-\U0010ffff-]+)*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ROUTE = rf"(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?"
_QUOTED_OR_LITERAL = rf"(?:{_QUOTED}@(?:{_DOMAIN}|{_LITERAL})|{_DOT_STRING}@{_LITERAL})"
_STRICT_PATH = re.compile(rf"\s*<{_ROUTE}({_QUOTED_OR_LITERAL})>(.*)\Z")
_STRICT_BARE = re.compile(rf"\s*({_QUOTED_OR_LITERAL})(?:\s+(.*))?\Z")
_QUOTED_LOCAL = re.compile(rf"({_QUOTED})@")
_UNESCAPE = re.compile(r"\\(.)")
_NEEDS_NO_QUOTES = re.compile(_DOT_STRING + r"\Z")


def parse_path(arg: str) -> tuple[str | None, str]:
    """The address of a MAIL or RCPT path and what follows it (the parameters); the address is
    None when the path cannot be parsed, ``"<>"`` for the null path. As aiosmtpd parses it, with
    a fast path for the plain ``<local@domain>`` nearly all mail uses.

    A quoted local part (``<"john doe"@example.com>``) or an address literal
    (``<user@[192.0.2.1]>``) is taken only as RFC 5321 4.1.2 writes it, and comes back with the
    least quoting (``<"john"@example.com>`` is ``john@example.com``); what the lenient RFC 5322
    parser would quote or bracket itself (``<john doe@example.com>``, an unbalanced quote) is
    malformed."""
    if not arg:
        return "", ""
    match = _PLAIN_PATH.match(arg)
    if match is not None:
        return match.group(1), match.group(2).strip()
    match = _STRICT_PATH.match(arg) or _STRICT_BARE.match(arg)
    if match is not None:
        return _least_quoting(match.group(1)), (match.group(2) or "").strip()
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, ""
    addr_spec, read = str(address.addr_spec), arg[: len(arg) - len(rest)]
    if '"' in read or "[" in read or addr_spec.startswith('"'):
        # quoting or a literal not as RFC 5321 writes it (that form matched above), or a local
        # part the parser quoted itself (``john doe``): never read as another address
        return None, ""
    return addr_spec, str(rest).strip()


def _least_quoting(address: str) -> str:
    """RFC 5321 4.1.2: every quoted form is the same address, and the least quoting is sent:
    ``"john"@x`` -> ``john@x``; ``"a\\ b"@x`` -> ``"a b"@x``."""
    match = _QUOTED_LOCAL.match(address)
    if match is None:
        return address
    local = _UNESCAPE.sub(r"\1", match.group(1)[1:-1])
    domain = address[match.end() :]
    if _NEEDS_NO_QUOTES.match(local):
        return f"{local}@{domain}"
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"@{domain}'


def parse_parameters(words: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 5321 4.1.2), or None if one is malformed."""
    result: dict[str, str | bool] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result
