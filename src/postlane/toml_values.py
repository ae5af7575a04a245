"""The values postlane's TOML files hold, and the readers that check them.

Durations (``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``), sizes (``"25MB"``) and
``HOST:PORT`` addresses are parsed here, for the configuration, the simulator's scenario files,
the command line and the HTTP API alike.

A *reader* takes a value as :mod:`tomllib` gave it and returns it typed, or raises ValueError
saying what it expected (``expected a string, got 5``); the caller names the key. The
configuration (:mod:`postlane.config`) and the scenarios (:mod:`postlane.simulate.scenario`) read
through the same readers, so one kind of value is checked one way, in the same words.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from postlane.redact import mask_url, misplaced_userinfo

T = TypeVar("T")
#: checks one TOML value and returns it typed; ValueError saying what it expected
Reader = Callable[[Any], T]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


# -- the syntax of durations, sizes and addresses ----------------------------------------------


def is_decimal(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (ASCII digits, at least one): ``isdigit``
    alone is also true of "²" and other digits that ``int()`` refuses, so an outside value
    checked with it could still raise."""
    return text.isascii() and text.isdigit()


def parse_duration(text: str) -> float:
    """``"1h30m"`` -> 5400.0 seconds. Raises ValueError on anything else."""
    text = text.strip()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise expected('a duration like "500ms", "30s", "5m", "1h" or "2d"', text)
    return total


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for humans: 5400 -> ``"1h30m"``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out = []
    rest = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out[:2]) or "0s"


def parse_size(text: str) -> int:
    """``"25MB"`` -> 25000000 bytes (KB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise expected('a size like "25MB" or "512KiB"', text)
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8025"`` or ``"[::1]:8025"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise expected('HOST:PORT like "127.0.0.1:8025"', text)
    if not 0 <= int(port) <= 65535:
        raise expected("HOST:PORT with a port from 1 to 65535 (0: any free port)", text)
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


# -- readers -----------------------------------------------------------------------------------


class UnexpectedValue(ValueError):
    """The error of every reader: ``expected {what}, got {value!r}``. It keeps ``what`` and
    ``value`` apart, so a secret's error can say what was expected without showing the value
    (:meth:`without_value`)."""

    def __init__(self, what: str, value: Any) -> None:
        super().__init__(f"expected {what}, got {value!r}")
        self.what = what
        self.value = value

    def without_value(self) -> str:
        """``expected {what}, got {the kind of value}`` (``got an integer``)."""
        return f"expected {self.what}, got {kind_of(self.value)}"


def expected(what: str, value: Any) -> UnexpectedValue:
    """The error of every reader: ``expected {what}, got {value!r}``."""
    return UnexpectedValue(what, value)


def kind_of(value: Any) -> str:
    """What kind of TOML value ``value`` is, in words: ``a string``, ``an integer``, ..."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def of_type(kind: type[T], what: str) -> Reader[T]:
    """A reader taking values of ``kind`` as they are."""

    def read(value: Any) -> T:
        if not isinstance(value, kind):
            raise expected(what, value)
        return value

    return read


string: Reader[str] = of_type(str, "a string")
boolean: Reader[bool] = of_type(bool, "true or false")


def integer(value: Any) -> int:
    """A TOML integer (``true`` is not 1 here, though Python says so)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise expected("an integer", value)
    return value


def integer_where(accept: Callable[[int], bool], what: str) -> Reader[int]:
    """A reader of integers that ``accept`` approves, e.g. ``integer_where(lambda n: n > 0, "a
    positive integer")``."""

    def read(value: Any) -> int:
        number = integer(value)
        if not accept(number):
            raise expected(what, number)
        return number

    return read


def number_where(accept: Callable[[float], bool], what: str) -> Reader[float]:
    """A reader of numbers, integer or float (never a boolean), that ``accept`` approves."""

    def read(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not accept(value):
            raise expected(what, value)
        return float(value)

    return read


positive_integer = integer_where(lambda number: number > 0, "a positive integer")


def duration(value: Any) -> float:
    """A duration string, in seconds (a bare number is refused: seconds or minutes?)."""
    if not isinstance(value, str):
        raise expected('a duration string like "30s" or "2d"', value)
    return parse_duration(value)


def size(value: Any) -> int:
    """A size string, in bytes."""
    if not isinstance(value, str):
        raise expected('a size string like "25MB"', value)
    return parse_size(value)


def choice(*allowed: str) -> Reader[str]:
    """A reader of one of the ``allowed`` strings."""

    def read(value: Any) -> str:
        if value not in allowed:
            raise expected(f"one of {', '.join(allowed)}", value)
        return str(value)

    return read


def listen(value: Any) -> str:
    """A listening address, ``host:port`` (checked, kept as written)."""
    parse_listen(string(value))
    return str(value)


def durations(value: Any) -> tuple[float, ...]:
    """A non-empty list of duration strings, in seconds."""
    if not isinstance(value, list) or not value:
        raise expected('a non-empty list of durations like ["1m", "5m"]', value)
    return tuple(duration(item) for item in value)


def strings(value: Any) -> tuple[str, ...]:
    """A list of strings."""
    if not isinstance(value, list):
        raise expected("a list of strings", value)
    return tuple(string(item) for item in value)


def networks(value: Any) -> tuple[str, ...]:
    """A list of IP networks (``127.0.0.0/8``), checked, kept as written."""
    given = strings(value)
    for net in given:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ValueError(f"{net!r} is not a network like 127.0.0.0/8") from exc
    return given


def string_table(value: Any) -> dict[str, str]:
    """A table of strings by name (``{ app = "password" }``)."""
    if not isinstance(value, Mapping):
        raise expected('a table like { app = "password" }', value)
    return {str(name): string(secret) for name, secret in value.items()}


def mail_domain(value: Any) -> str:
    """A domain name, lower-cased, without a final dot."""
    text = string(value).strip().lower().rstrip(".")
    labels = text.split(".")
    if len(labels) < 2 or not all(
        re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels
    ):
        raise ValueError(f"expected a domain name like bounces.example.com, got {value!r}")
    return text


def regex(value: Any) -> str:
    """A regular expression (checked, kept as written)."""
    text = string(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


def http_url(value: Any) -> str:
    """An ``http://`` or ``https://`` URL (shown masked when refused)."""
    text = string(value)
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise expected("an http:// or https:// URL", mask_url(text))
    return text


# -- URLs of the configuration -------------------------------------------------------------

#: the relay forms, as the documentation writes them, by scheme (``transports.SCHEMES`` has a
#: transport for each; a test keeps the two in step)
RELAY_FORMS: dict[str, str] = {
    "smtp": "smtp://[user:pass@]host[:port]",
    "smtps": "smtps://host[:port]",
    "mx": '"mx"',
    "capture": "capture:///path",
    "sendgrid": "sendgrid://KEY",
    "postmark": "postmark://TOKEN",
    "mailgun": "mailgun://KEY@DOMAIN",
    "ses": "ses://ACCESS:SECRET@REGION",
}


def relay_url(value: Any) -> str:
    """A relay URL of a known form; an SMTP relay's host and port are checked here too (a
    provider's credentials and options when its transport is built: ``postlane.transports``)."""
    text = string(value)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if text.lower() == "mx" or (sep and scheme == "mx"):
        return text
    if not sep or scheme not in RELAY_FORMS:
        forms = list(RELAY_FORMS.values())
        raise expected(", ".join(forms[:-1]) + " or " + forms[-1], mask_url(text))
    if scheme in ("smtp", "smtps"):
        check_userinfo(scheme, rest, mask_url(text))
        check_host_and_port(rest, mask_url(text))
    return text


def check_userinfo(scheme: str, rest: str, shown: str) -> None:
    """Refuse a user name or password holding, as written, what ends the URL's user info for
    its reader (``/``, and for a relay ``?`` or ``#`` too): a piece of the password would be
    read as a port or a path."""
    if misplaced_userinfo(rest, scheme):
        ends = "/" if scheme.startswith("postgres") else "/, ? or #"
        raise ValueError(
            f"{shown!r}: the user name or password holds {ends}, which end a URL's user "
            "info: percent-encode them (/ as %2F, ? as %3F, # as %23, @ as %40)"
        )


def check_host_and_port(rest: str, shown: str) -> None:
    """The host and the port (1 to 65535, in decimal) of ``[user:pass@]host[:port][/...]``."""
    host_port = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    if host_port.startswith("["):  # [IPv6]:port
        host, _, after = host_port[1:].partition("]")
        port = after[1:] if after.startswith(":") else None
    else:
        host, colon, port_text = host_port.rpartition(":")
        host, port = (host, port_text) if colon else (host_port, None)
    if not host:
        raise ValueError(f"no host in {shown!r}")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port {port!r} in {shown!r} (a number from 1 to 65535)")


def store_url(value: Any) -> str:
    text = string(value)
    if not text.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise expected(
            '"sqlite:///path.db" or "postgresql://user:pass@host:5432/db"',
            mask_url(text),
        )
    if not text.startswith("sqlite://"):
        scheme, _, rest = text.partition("://")
        check_userinfo(scheme, rest, mask_url(text))
    return text


def unsubscribe_url(value: Any) -> str:
    """An https URL (http only to a loopback host: a test, a proxy on this machine), without
    query, fragment or credentials: the base each recipient's ``<url>/<token>`` link is made
    from."""
    text = string(value).strip().rstrip("/")
    shown = mask_url(text)
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        credentials = parts.username is not None or parts.password is not None
    except ValueError:
        raise expected("an https:// URL", shown) from None
    plain = text.isascii() and not any(c in text for c in ' <>"\\') and len(text) <= 400
    if parts.scheme not in ("https", "http") or not host or parts.query or parts.fragment:
        raise expected(
            'an https:// URL without query or fragment, like "https://mail.example.com/unsubscribe"',
            shown,
        )
    if credentials or not plain:
        raise expected(
            "an https:// URL of at most 400 ASCII characters, without credentials or spaces", shown
        )
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"{shown!r}: mail providers only take https:// unsubscribe links (http:// is allowed "
            "for loopback hosts, to test)"
        )
    return text


def is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
