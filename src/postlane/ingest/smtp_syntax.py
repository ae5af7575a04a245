"""What an SMTP command line may hold, for postlane's SMTP server
(:mod:`postlane.ingest.smtp_protocol`): the limits on its length, and the MAIL and RCPT paths
and ESMTP parameters it carries. Pure functions, parsed as aiosmtpd parses them."""

from __future__ import annotations

import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

__all__ = ["COMMAND_LIMIT", "LINE_LIMIT", "MAIL_LIMIT", "parse_parameters", "parse_path"]

#: the longest command line (RFC 5321 4.5.3.1.4), with what SIZE and SMTPUTF8 add to MAIL
COMMAND_LIMIT = 512
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10
#: a line this long without its end is cut off unread, then answered 500 (aiosmtpd's limit)
LINE_LIMIT = 1001

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: a plain ``<local@domain>`` path, which needs no RFC 5322 parser
_PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z")


def parse_path(arg: str) -> tuple[str | None, str]:
    """The address of a MAIL or RCPT path and what follows it (the parameters); the address is
    None when the path cannot be parsed, ``"<>"`` for the null path. As aiosmtpd parses it, with
    a fast path for the plain ``<local@domain>`` nearly all mail uses."""
    if not arg:
        return "", ""
    match = _PLAIN_PATH.match(arg)
    if match is not None:
        return match.group(1), match.group(2).strip()
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, ""
    return str(address.addr_spec), str(rest).strip()


def parse_parameters(words: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 5321 4.1.2), or None if one is malformed."""
    result: dict[str, str | bool] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result
