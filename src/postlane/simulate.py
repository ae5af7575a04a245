"""The provider simulator: an SMTP server that answers the way real providers do.

``postlane simulate`` listens for SMTP and plays a *scenario*, a TOML file (or one of the built-in
ones in ``postlane/data/scenarios/``) saying what a provider answers, recipient by recipient:
accept; defer with 451; throttle a client above a rate with Gmail's ``421-4.7.28``; hard-bounce
with ``550-5.1.1``; block for spam, reputation or DMARC; report a full mailbox; refuse a message
that is too large; answer slowly; drop the connection after DATA without a reply; require
STARTTLS; or turn every connection away. When it stops it reports, as JSON, what it accepted and
how it answered, so a benchmark or a test can check a queue against it: nothing lost, nothing
delivered twice (duplicates by Message-ID), throttling obeyed (accepted messages per second).

Pieces::

    Scenario          a parsed scenario file; Scenario.load("flaky") or Scenario.load("my.toml").
                      Strict: an unknown key or a bad value is a ConfigError naming the key.
    Simulator         the server on the running event loop: await start() -> (host, port),
                      await wait() (until --max-messages), await stop(), report() -> dict
    simulate_command  ``postlane simulate``

The server is aiosmtpd, created per connection by ``loop.create_server``, with hooks that play the
scenario. Random decisions (probabilities, delay ranges, which of several replies) come from one
``random.Random(seed)``: the same seed and the same client traffic give the same answers. It is
built not to be the bottleneck of a benchmark: each reply template is classified once, messages
are not parsed (the Message-ID is found by a bytes search of the header block), duplicates are
remembered as hashes, and nothing is written to disk unless ``store_dir`` is given.

The scenario format is described in ``docs/simulator.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import ssl
import string
import struct
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, AnyStr, TypeVar

import click
from aiosmtpd.smtp import SMTP, Envelope, Session

from postlane.classify import ReplyClass, classify
from postlane.clock import Clock, SystemClock, iso
from postlane.config import parse_duration, parse_listen, parse_size
from postlane.errors import ConfigError
from postlane.ingest.smtpd import FastSMTP

__all__ = [
    "Connect",
    "Delays",
    "Reply",
    "Rule",
    "Scenario",
    "ServerReplies",
    "Simulator",
    "Stage",
    "TLSMode",
    "Throttle",
    "builtin_scenarios",
    "find_message_id",
    "simulate_command",
]

T = TypeVar("T")

#: where the built-in scenarios live, inside the ``postlane.data`` package
_BUILTIN_DIR = "scenarios"
#: how many duplicated (Message-ID, recipient) pairs the report lists
_DUPLICATE_EXAMPLES = 10
#: per-key throttle buckets kept before full ones are forgotten
_MAX_BUCKETS = 100_000
#: the Message-ID is looked for in this much of a message, at most
_HEADER_LIMIT = 256 * 1024


class Stage(StrEnum):
    """Where in the SMTP dialogue a reply is given."""

    CONNECT = "connect"  # instead of the greeting
    MAIL = "mail"  # MAIL FROM
    RCPT = "rcpt"  # RCPT TO
    DATA = "data"  # after the message, at the end of DATA


class TLSMode(StrEnum):
    OFF = "off"
    OFFERED = "offered"  # STARTTLS announced, plain text accepted too
    REQUIRED = "required"  # MAIL FROM before STARTTLS is refused (replies.tls_required)


# -- reply templates ---------------------------------------------------------------------------

#: the placeholders a reply may use, filled in when it is sent
PLACEHOLDERS = {
    "id": "the session's id (Gmail shows one like it in every reply)",
    "queue_id": "the number the next accepted message gets, in hex",
    "ip": "the client's IP address",
    "hostname": "the scenario's hostname",
    "sender": "the envelope sender (MAIL FROM)",
    "sender_domain": "the envelope sender's domain",
    "address": "the recipient (at DATA: the first recipient)",
    "local": "the recipient's local part",
    "domain": "the recipient's domain",
    "time": "the time, in seconds since the epoch",
}
_BANNER_PLACEHOLDERS = frozenset({"id", "hostname", "time"})
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])(?:[ -](.*))?\Z", re.DOTALL)


def _check_placeholders(template: str, allowed: Iterable[str]) -> bool:
    """Whether ``template`` has placeholders; ValueError on an unknown or malformed one."""
    allowed = frozenset(allowed)
    found = False
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError(
            f"unbalanced braces in {template!r} (write {{{{ and }}}} for literal braces)"
        ) from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            known = ", ".join("{" + p + "}" for p in sorted(allowed))
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known})")
        found = True
    return found


@dataclass(frozen=True)
class Reply:
    """One reply as the server sends it: lines joined by CRLF, each starting with the code
    (``550-5.1.1 ...`` on all lines but the last, ``550 5.1.1 ...`` on the last)."""

    template: str
    code: int
    templated: bool

    @classmethod
    def parse(cls, text: str) -> Reply:
        """A reply from a scenario; ValueError saying what is wrong with it."""
        lines = [line.strip() for line in text.strip().splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError("a reply cannot be empty")
        code = ""
        out = []
        for number, line in enumerate(lines):
            match = _REPLY_LINE.match(line)
            if match is None:
                raise ValueError(f"{line!r} does not start with a reply code (200-599)")
            if not code:
                code = match.group(1)
            elif match.group(1) != code:
                raise ValueError(f"every line of a reply repeats its code {code}: {line!r}")
            separator = " " if number == len(lines) - 1 else "-"
            out.append(f"{code}{separator}{match.group(2) or ''}".rstrip())
        template = "\r\n".join(out)
        return cls(template, int(code), _check_placeholders(template, PLACEHOLDERS))

    def render(self, values: Mapping[str, str]) -> str:
        return self.template.format_map(values) if self.templated else self.template


# -- the scenario ------------------------------------------------------------------------------

Delay = tuple[float, float]


@dataclass(frozen=True)
class Rule:
    """What happens to recipients that match: a reply, a dropped connection, or acceptance
    (optionally slow), with some probability, at RCPT, at the end of DATA, or at MAIL."""

    name: str
    stage: Stage
    #: (subject index, pattern): 0 address, 1 local part, 2 domain, 3 sender
    conditions: tuple[tuple[int, re.Pattern[str]], ...]
    #: one is picked at random; none means accept
    replies: tuple[Reply, ...]
    drop: bool
    probability: float
    delay: Delay | None
    #: the class a correct client puts these replies in (documentation, checked by the tests)
    cls: ReplyClass | None

    def matches(self, subject: tuple[str, str, str, str]) -> bool:
        return all(pattern.search(subject[index]) for index, pattern in self.conditions)


@dataclass(frozen=True)
class Throttle:
    """A token bucket per client IP (or per recipient): ``rate`` messages a second, bursts of
    ``burst``; over it, ``replies`` at ``stage``."""

    rate: float
    burst: int
    stage: Stage
    per: str
    replies: tuple[Reply, ...]


@dataclass(frozen=True)
class Connect:
    """What a new connection meets: closed at once (``refuse``), or a reply instead of the
    greeting (``probability``); a 421 is followed by closing, anything else is repeated to every
    command until QUIT."""

    refuse: float = 0.0
    probability: float = 0.0
    replies: tuple[Reply, ...] = ()


@dataclass(frozen=True)
class Delays:
    """Seconds to wait before answering, per stage; a pair is a uniform range."""

    greeting: Delay | None = None
    ehlo: Delay | None = None
    mail: Delay | None = None
    rcpt: Delay | None = None
    data: Delay | None = None


def _default_reply(text: str) -> tuple[Reply, ...]:
    return (Reply.parse(text),)


@dataclass(frozen=True)
class ServerReplies:
    """The server's own replies, in the wording of the provider imitated (Postfix by default)."""

    mail: tuple[Reply, ...] = _default_reply("250 2.1.0 Ok")
    rcpt: tuple[Reply, ...] = _default_reply("250 2.1.5 Ok")
    data: tuple[Reply, ...] = _default_reply("250 2.0.0 Ok: queued as {queue_id}")
    too_large: tuple[Reply, ...] = _default_reply("552 5.3.4 Error: message file too big")
    tls_required: tuple[Reply, ...] = _default_reply(
        "530 5.7.0 Must issue a STARTTLS command first"
    )


_DEFAULT_THROTTLE_REPLY = "421 4.7.0 {hostname} rate limit exceeded for {ip}, try again later"


@dataclass(frozen=True)
class Scenario:
    """A provider's behaviour, read from TOML (see ``docs/simulator.md``)."""

    name: str
    description: str = ""
    #: where it came from: "built-in" or the file's path
    source: str = "built-in"
    seed: int | None = None
    hostname: str = "mx.simulator.postlane.test"
    banner: str = "ESMTP postlane simulator"
    max_size: int = 35 * 1024 * 1024
    tls: TLSMode = TLSMode.OFF
    tls_cert: Path | None = None
    tls_key: Path | None = None
    replies: ServerReplies = ServerReplies()
    delays: Delays = Delays()
    connect: Connect = Connect()
    throttle: Throttle | None = None
    rules: tuple[Rule, ...] = ()

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> Scenario:
        """A built-in scenario by name (``"flaky"``), or a scenario file."""
        text = os.fspath(name_or_path)
        builtins = builtin_scenarios()
        looks_like_path = text.endswith(".toml") or os.sep in text or "/" in text
        if not looks_like_path and text in builtins:
            resource = resources.files("postlane.data").joinpath(_BUILTIN_DIR, f"{text}.toml")
            return cls.from_toml(resource.read_text("utf-8"), name=text, source="built-in")
        path = Path(text)
        if not path.is_file():
            if looks_like_path:
                raise ConfigError(f"scenario {text}: no such file")
            raise ConfigError(
                f"unknown scenario {text!r} (built-in: {', '.join(builtins)}; or give a .toml file)"
            )
        try:
            content = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"scenario {text}: cannot read ({exc})") from None
        return cls.from_toml(content, name=path.stem, source=str(path), base_dir=path.parent)

    @classmethod
    def from_toml(
        cls, text: str, *, name: str, source: str, base_dir: Path | None = None
    ) -> Scenario:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"scenario {source}: not valid TOML ({exc})") from None
        return cls.from_dict(data, name=name, source=source, base_dir=base_dir)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        name: str = "custom",
        source: str = "(dict)",
        base_dir: Path | None = None,
    ) -> Scenario:
        """A scenario from parsed TOML; ConfigError naming the first bad or unknown key."""
        return _ScenarioReader(source, base_dir or Path.cwd()).read(data, name)

    def with_seed(self, seed: int | None) -> Scenario:
        return self if seed is None else replace(self, seed=seed)


def builtin_scenarios() -> list[str]:
    """The names of the built-in scenarios, sorted."""
    folder = resources.files("postlane.data").joinpath(_BUILTIN_DIR)
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    )


# -- reading a scenario ------------------------------------------------------------------------


class _Table:
    """One TOML table of a scenario: typed getters, and a one-line error for an unknown key."""

    def __init__(self, data: Any, path: str, source: str, known: Iterable[str]) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, dict):
            raise self.error(None, "must be a table")
        self.data: dict[str, Any] = data
        known = list(known)
        for key in data:
            if key not in known:
                raise self.error(key, f"unknown key (known here: {', '.join(known)})")

    def error(self, key: str | None, problem: str) -> ConfigError:
        where = ".".join(part for part in (self.path, key) if part)
        return ConfigError(f"scenario {self.source}: {where or 'top level'}: {problem}")

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def table(self, key: str, known: Iterable[str]) -> _Table:
        path = f"{self.path}.{key}" if self.path else key
        return _Table(self.data.get(key, {}), path, self.source, known)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return float(value)


def _positive_integer(value: Any) -> int:
    if _integer(value) < 1:
        raise ValueError(f"expected an integer of at least 1, got {value!r}")
    return int(value)


def _probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"expected a probability between 0 and 1, got {value!r}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "25MB" or a number of bytes, got {value!r}')
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"expected a positive size, got {value!r}")
        return value
    return parse_size(_string(value))


def _delay(value: Any) -> Delay | None:
    """``"2s"``, or ``["100ms", "2s"]`` for a uniform range."""
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError(f'expected a duration or a pair like ["100ms", "2s"], got {value!r}')
        low, high = (parse_duration(_string(v)) for v in value)
        if low > high:
            raise ValueError(f"the range {value!r} goes backwards")
    else:
        low = high = parse_duration(_string(value))
    return None if high == 0 else (low, high)


def _replies(value: Any) -> tuple[Reply, ...]:
    """A reply, or a list of replies one of which is picked at random each time."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected a reply or a list of replies, got an empty list")
    return tuple(Reply.parse(_string(item)) for item in items)


def _choice(enum: type[StrEnum], allowed: Iterable[str] | None = None) -> Callable[[Any], Any]:
    names = [member.value for member in enum] if allowed is None else list(allowed)

    def convert(value: Any) -> Any:
        if value not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {value!r}")
        return enum(value)

    return convert


def _patterns(value: Any) -> re.Pattern[str]:
    """Shell globs (``"bounce*"``) or ``/regular expressions/``, any of which may match;
    case-insensitive. A glob matches the whole text, a regular expression anywhere in it."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected a pattern or a list of patterns, got an empty list")
    parts = []
    for item in items:
        text = _string(item)
        if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
            parts.append(f"(?:{text[1:-1]})")
        else:
            parts.append(rf"(?:\A{fnmatch.translate(text)})")
    try:
        return re.compile("|".join(parts), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"bad regular expression ({exc})") from None


_TOP_KEYS = (
    "name",
    "description",
    "seed",
    "hostname",
    "banner",
    "max_size",
    "tls",
    "tls_cert",
    "tls_key",
    "replies",
    "delays",
    "connect",
    "throttle",
    "rules",
)
_RULE_KEYS = (
    "name",
    "class",
    "stage",
    "address",
    "local",
    "domain",
    "sender",
    "reply",
    "drop",
    "probability",
    "delay",
)
_SUBJECTS = {"address": 0, "local": 1, "domain": 2, "sender": 3}


class _ScenarioReader:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def read(self, data: Mapping[str, Any], default_name: str) -> Scenario:
        top = _Table(dict(data), "", self.source, _TOP_KEYS)

        def banner(value: Any) -> str:
            text = _string(value)
            _check_placeholders(text, _BANNER_PLACEHOLDERS)
            return text

        def path(value: Any) -> Path:
            return self.base_dir / Path(_string(value)).expanduser()

        tls_cert = top.get("tls_cert", path, None)
        tls_key = top.get("tls_key", path, None)
        if tls_key is not None and tls_cert is None:
            raise top.error("tls_key", "is set without tls_cert")
        defaults = Scenario(name=default_name)
        return Scenario(
            name=top.get("name", _string, default_name),
            description=top.get("description", _string, ""),
            source=self.source,
            seed=top.get("seed", _integer, None),
            hostname=top.get("hostname", _string, defaults.hostname),
            banner=top.get("banner", banner, defaults.banner),
            max_size=top.get("max_size", _size, defaults.max_size),
            tls=top.get("tls", _choice(TLSMode), TLSMode.OFF),
            tls_cert=tls_cert,
            tls_key=tls_key,
            replies=self._server_replies(top),
            delays=self._delays(top),
            connect=self._connect(top),
            throttle=self._throttle(top),
            rules=self._rules(top),
        )

    def _server_replies(self, top: _Table) -> ServerReplies:
        names = ("mail", "rcpt", "data", "too_large", "tls_required")
        table = top.table("replies", names)
        defaults = ServerReplies()
        values = {name: table.get(name, _replies, getattr(defaults, name)) for name in names}
        for name in ("mail", "rcpt", "data"):
            if any(reply.code >= 300 for reply in values[name]):
                raise table.error(name, "must be a 2xx reply (refusals are rules)")
        for name in ("too_large", "tls_required"):
            if any(reply.code < 400 for reply in values[name]):
                raise table.error(name, "must be a 4xx or 5xx reply")
        return ServerReplies(**values)

    def _delays(self, top: _Table) -> Delays:
        names = ("greeting", "ehlo", "mail", "rcpt", "data")
        table = top.table("delays", names)
        return Delays(**{name: table.get(name, _delay, None) for name in names})

    def _connect(self, top: _Table) -> Connect:
        table = top.table("connect", ("refuse", "reply", "probability"))
        no_replies: tuple[Reply, ...] = ()
        replies = table.get("reply", _replies, no_replies)
        probability = table.get("probability", _probability, 1.0 if replies else 0.0)
        if probability > 0 and not replies:
            raise table.error("probability", "is set without a reply")
        if any(reply.code < 400 for reply in replies):
            raise table.error("reply", "must be a 4xx or 5xx reply (the greeting is 220)")
        return Connect(table.get("refuse", _probability, 0.0), probability, replies)

    def _throttle(self, top: _Table) -> Throttle | None:
        if "throttle" not in top.data:
            return None
        table = top.table("throttle", ("rate", "burst", "stage", "per", "reply"))
        if "rate" not in table.data:
            raise table.error("rate", "is required (messages per second)")
        rate = table.get("rate", _positive_number, 1.0)
        stage = table.get("stage", _choice(Stage, ("mail", "rcpt", "data")), Stage.RCPT)
        per = table.get("per", _string, "client")
        if per not in ("client", "recipient"):
            raise table.error("per", f"expected client or recipient, got {per!r}")
        if per == "recipient" and stage is not Stage.RCPT:
            raise table.error("per", 'a throttle per recipient needs stage = "rcpt"')
        replies = table.get("reply", _replies, _replies(_DEFAULT_THROTTLE_REPLY))
        if any(reply.code < 400 for reply in replies):
            raise table.error("reply", "must be a 4xx or 5xx reply")
        burst = table.get("burst", _positive_integer, max(1, math.ceil(rate)))
        return Throttle(rate, burst, stage, per, replies)

    def _rules(self, top: _Table) -> tuple[Rule, ...]:
        entries = top.data.get("rules", [])
        if not isinstance(entries, list):
            raise top.error("rules", "must be an array of tables ([[rules]])")
        return tuple(self._rule(entry, number) for number, entry in enumerate(entries, 1))

    def _rule(self, entry: Any, number: int) -> Rule:
        path = f"rules[{number}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            path = f"{path} ({entry['name']})"
        table = _Table(entry, path, self.source, _RULE_KEYS)
        name = table.get("name", _string, f"rules[{number}]")
        stage = table.get("stage", _choice(Stage, ("mail", "rcpt", "data")), Stage.RCPT)
        conditions = tuple(
            (index, table.get(key, _patterns, re.compile("")))
            for key, index in _SUBJECTS.items()
            if key in table.data
        )
        if stage is Stage.MAIL and any(index != _SUBJECTS["sender"] for index, _ in conditions):
            raise table.error("stage", 'a rule at stage "mail" can only match the sender')
        no_replies: tuple[Reply, ...] = ()
        replies = table.get("reply", _replies, no_replies)
        drop = table.get("drop", _boolean, False)
        if drop and replies:
            raise table.error("drop", "a rule either replies or drops the connection, not both")
        cls = table.get("class", _choice(ReplyClass), None)
        return Rule(
            name=name,
            stage=stage,
            conditions=conditions,
            replies=replies,
            drop=drop,
            probability=table.get("probability", _probability, 1.0),
            delay=table.get("delay", _delay, None),
            cls=cls,
        )


# -- TLS ---------------------------------------------------------------------------------------


def _self_signed(hostname: str) -> tuple[bytes, bytes] | None:
    """A throwaway certificate and key (PEM) for ``hostname``, or None without ``cryptography``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _tls_context(scenario: Scenario) -> ssl.SSLContext | None:
    if scenario.tls is TLSMode.OFF:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if scenario.tls_cert is not None:
        try:
            context.load_cert_chain(scenario.tls_cert, scenario.tls_key or scenario.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"scenario {scenario.source}: tls_cert/tls_key: cannot load ({exc})"
            ) from None
        return context
    pem = _self_signed(scenario.hostname)
    if pem is None:
        raise ConfigError(
            f"scenario {scenario.name}: tls = {scenario.tls.value!r} needs a certificate: set "
            "tls_cert and tls_key, or install the cryptography package to make a self-signed one"
        )
    with tempfile.TemporaryDirectory(prefix="postlane-simulate-") as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(pem[0])
        key.write_bytes(pem[1])
        context.load_cert_chain(cert, key)
    return context


# -- what the report counts --------------------------------------------------------------------


def find_message_id(content: bytes) -> bytes | None:
    """The Message-ID header's value (unfolded, trimmed), found without parsing the message."""
    end = len(content) if len(content) < _HEADER_LIMIT else _HEADER_LIMIT
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = content.find(separator, 0, end)
        if found >= 0:
            end = found
    head = content[:end]
    lowered = head.lower()
    if lowered.startswith(b"message-id:"):
        start = len(b"message-id:")
    else:
        found = lowered.find(b"\nmessage-id:")
        if found < 0:
            return None
        start = found + len(b"\nmessage-id:")
    stop = head.find(b"\n", start)
    # a folded header continues on lines that start with white space
    while stop >= 0 and head[stop + 1 : stop + 2] in (b" ", b"\t"):
        stop = head.find(b"\n", stop + 1)
    value = b" ".join(head[start : len(head) if stop < 0 else stop].split())
    return value or None


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class _Stats:
    """Counters behind the report, kept cheap: a handful of increments per reply."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started_at = clock.now()
        self.stopped_at: float | None = None
        self.connections = 0
        self.messages = 0
        self.recipients = 0
        self.dropped = 0
        self.without_message_id = 0
        self.accepted_by_domain: Counter[str] = Counter()
        self.refused_by_domain: Counter[str] = Counter()
        self.by_stage: Counter[tuple[str, str]] = Counter()
        self.by_code: Counter[str] = Counter()
        self.per_second: list[int] = []
        # (Message-ID, recipient) pairs, as hashes: seen once, and seen again
        self._seen: set[int] = set()
        self._duplicates: Counter[int] = Counter()
        self._examples: list[tuple[int, str, str]] = []
        # reply template -> (class, "code enhanced"), classified the first time it is sent
        self._keys: dict[str, tuple[str, str]] = {}

    def count_reply(self, stage: Stage, reply: Reply, text: str) -> None:
        key = self._keys.get(reply.template)
        if key is None:
            verdict = classify(text)
            code = f"{verdict.code} {verdict.enhanced}" if verdict.enhanced else str(verdict.code)
            key = self._keys[reply.template] = (verdict.cls.value, code)
        self.by_stage[(stage.value, key[0])] += 1
        self.by_code[key[1]] += 1

    def count_no_reply(self, stage: Stage) -> None:
        """A connection closed by the scenario instead of a reply."""
        self.by_stage[(stage.value, ReplyClass.CONNECTION.value)] += 1
        self.by_code["none (closed)"] += 1
        if stage is not Stage.CONNECT:
            self.dropped += 1

    def refuse(self, recipients: Iterable[str]) -> None:
        for address in recipients:
            self.refused_by_domain[_domain_of(address)] += 1

    def accept(self, recipients: Sequence[str], content: bytes) -> None:
        self.messages += 1
        self.recipients += len(recipients)
        for address in recipients:
            self.accepted_by_domain[_domain_of(address)] += 1
        message_id = find_message_id(content)
        if message_id is None:
            self.without_message_id += 1
        else:
            for address in recipients:
                key = hash((message_id, address.lower()))
                if key not in self._seen:
                    self._seen.add(key)
                    continue
                self._duplicates[key] += 1
                if self._duplicates[key] == 1 and len(self._examples) < _DUPLICATE_EXAMPLES:
                    shown = message_id.decode("utf-8", "replace")
                    self._examples.append((key, shown, address))
        second = max(0, int(self.clock.now() - self.started_at))
        per_second = self.per_second
        if second >= len(per_second):
            per_second.extend([0] * (second + 1 - len(per_second)))
        per_second[second] += 1

    def report(self) -> dict[str, Any]:
        end = self.stopped_at if self.stopped_at is not None else self.clock.now()
        elapsed = max(0.0, end - self.started_at)
        by_stage: dict[str, dict[str, int]] = {stage.value: {} for stage in Stage}
        total: Counter[str] = Counter()
        for (stage, cls), count in sorted(self.by_stage.items()):
            by_stage[stage][cls] = count
            total[cls] += count
        domains = sorted(set(self.accepted_by_domain) | set(self.refused_by_domain))
        return {
            "started_at": iso(self.started_at),
            "stopped_at": iso(self.stopped_at),
            "elapsed_seconds": round(elapsed, 3),
            "connections": self.connections,
            "messages": self.messages,
            "recipients": self.recipients,
            "dropped": self.dropped,
            "without_message_id": self.without_message_id,
            "domains": {
                domain: {
                    "accepted": self.accepted_by_domain[domain],
                    "refused": self.refused_by_domain[domain],
                }
                for domain in domains
            },
            "duplicates": {
                "message_ids": len(self._duplicates),
                "deliveries": sum(self._duplicates.values()),
                "first": [
                    {"message_id": shown, "recipient": address, "count": 1 + self._duplicates[key]}
                    for key, shown, address in self._examples
                ],
            },
            "replies": {
                "total": dict(sorted(total.items())),
                "by_stage": by_stage,
                "by_code": dict(sorted(self.by_code.items())),
            },
            "rate": {
                "bucket_seconds": 1,
                "accepted": list(self.per_second),
                "peak": max(self.per_second, default=0),
                "mean": round(self.messages / elapsed, 3) if elapsed > 0 else 0.0,
            },
        }


class _TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.burst, now))
        if now > at:
            tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


# -- the SMTP side -----------------------------------------------------------------------------


class _Transaction(Envelope):
    """aiosmtpd's envelope, with what the scenario decided for this transaction."""

    def __init__(self) -> None:
        super().__init__()
        #: the first data-stage rule a recipient matched: it decides the end of DATA
        self.data_rule: Rule | None = None
        self.throttle_checked = False
        self.throttled = False


class _ProviderSMTP(FastSMTP):
    """aiosmtpd's server with the scenario's connect behaviour, its wording for aiosmtpd's own
    refusals, and RFC 5321's "421 closes the channel", which real providers follow."""

    def __init__(self, provider: _Provider, session_id: str, **kwargs: Any) -> None:
        super().__init__(provider, **kwargs)
        self.provider = provider
        self.session_id = session_id
        self.client_ip = ""

    def _create_envelope(self) -> _Transaction:
        return _Transaction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call, after STARTTLS
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
            self.provider.session_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.provider.session_closed(self)

    async def _handle_client(self) -> None:
        refusal = await self.provider.greet(self)
        if refusal is None:
            await super()._handle_client()
        elif refusal and not refusal.startswith("421"):
            await self._repeat_until_quit(refusal)

    async def _repeat_until_quit(self, refusal: str) -> None:
        """RFC 5321 3.1: after a 554 greeting the server answers every command but QUIT with
        the refusal, and waits for QUIT."""
        for _ in range(100):
            try:
                line = await self._reader.readuntil()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                break
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 Bye")
                break
            await self.push(refusal)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the scenario closed the connection: nothing more is said
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        text = self.provider.own_wording(self, text)
        await super().push(text)
        if text.startswith("421"):
            transport = self.transport
            if transport is not None:
                transport.close()

    def refuse_at_once(self) -> None:
        """Close with a TCP reset, before any greeting: the client sees a refused connection."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()


#: aiosmtpd's own replies that a provider words differently, and the stage they answer
_AIOSMTPD_TOO_LARGE = {
    "552 Error: message size exceeds fixed maximum message size": Stage.MAIL,
    "552 Error: Too much mail data": Stage.DATA,
}


class _Provider:
    """The aiosmtpd handler: plays the scenario, counts what it answers."""

    def __init__(
        self,
        scenario: Scenario,
        rng: random.Random,
        clock: Clock,
        stats: _Stats,
        *,
        store_dir: Path | None,
        max_messages: int | None,
        on_limit: Callable[[], None],
    ) -> None:
        self.scenario = scenario
        self.rng = rng
        self.clock = clock
        self.stats = stats
        self.store_dir = store_dir
        self.max_messages = max_messages
        self.on_limit = on_limit
        self.delays = scenario.delays
        throttle = scenario.throttle
        self.throttle = throttle
        self.buckets = _TokenBuckets(throttle.rate, throttle.burst) if throttle else None
        self.mail_rules = tuple(rule for rule in scenario.rules if rule.stage is Stage.MAIL)
        self.rcpt_rules = tuple(rule for rule in scenario.rules if rule.stage is not Stage.MAIL)
        self.sessions: set[_ProviderSMTP] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._stored = 0

    # -- sessions

    def session_opened(self, server: _ProviderSMTP) -> None:
        self.sessions.add(server)
        self.idle.clear()

    def session_closed(self, server: _ProviderSMTP) -> None:
        self.sessions.discard(server)
        if not self.sessions:
            self.idle.set()

    # -- chance, time and wording

    def chance(self, probability: float) -> bool:
        return probability >= 1.0 or (probability > 0.0 and self.rng.random() < probability)

    def pick(self, replies: tuple[Reply, ...]) -> Reply:
        return replies[0] if len(replies) == 1 else self.rng.choice(replies)

    async def pause(self, delay: Delay | None) -> None:
        if delay is not None:
            low, high = delay
            await self.clock.sleep(low if low == high else self.rng.uniform(low, high))

    def render(
        self, reply: Reply, server: _ProviderSMTP, envelope: Envelope | None, address: str
    ) -> str:
        if not reply.templated:
            return reply.template
        sender = str(envelope.mail_from or "") if envelope is not None else ""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        return reply.render(
            {
                "id": server.session_id,
                "queue_id": f"{self.stats.messages + 1:010X}",
                "ip": server.client_ip,
                "hostname": self.scenario.hostname,
                "sender": sender,
                "sender_domain": sender.rpartition("@")[2],
                "address": address,
                "local": local,
                "domain": domain,
                "time": str(int(self.clock.now())),
            }
        )

    def say(
        self,
        stage: Stage,
        reply: Reply,
        server: _ProviderSMTP,
        envelope: Envelope | None,
        address: str = "",
    ) -> str:
        text = self.render(reply, server, envelope, address)
        self.stats.count_reply(stage, reply, text)
        return text

    def drop(self, stage: Stage, server: _ProviderSMTP) -> str:
        self.stats.count_no_reply(stage)
        if server.transport is not None:
            server.transport.close()
        return "451 4.3.0 never sent: the connection is closed"

    def own_wording(self, server: _ProviderSMTP, text: str) -> str:
        """aiosmtpd's size refusals, in the scenario's wording."""
        stage = _AIOSMTPD_TOO_LARGE.get(text)
        if stage is None:
            return text
        envelope = server.envelope
        recipients = list(envelope.rcpt_tos) if envelope is not None else []
        if stage is Stage.DATA:
            self.stats.refuse(recipients)
        first = recipients[0] if recipients else ""
        return self.say(stage, self.pick(self.scenario.replies.too_large), server, envelope, first)

    # -- the dialogue

    async def greet(self, server: _ProviderSMTP) -> str | None:
        """Before the greeting: None to greet; else the reply sent instead of the greeting (a
        421 closes the connection, anything else is repeated until QUIT), or "" if the
        connection was closed without a word."""
        connect = self.scenario.connect
        await self.pause(self.delays.greeting)
        if self.chance(connect.refuse):
            self.stats.count_no_reply(Stage.CONNECT)
            server.refuse_at_once()
            return ""
        if connect.replies and self.chance(connect.probability):
            text = self.say(Stage.CONNECT, self.pick(connect.replies), server, None)
            await server.push(text)
            return text
        return None

    async def handle_HELO(
        self, server: _ProviderSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        await self.pause(self.delays.ehlo)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: _ProviderSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        await self.pause(self.delays.ehlo)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self,
        server: _ProviderSMTP,
        session: Session,
        envelope: _Transaction,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self.pause(self.delays.mail)
        scenario = self.scenario
        if scenario.tls is TLSMode.REQUIRED and session.ssl is None:
            return self.say(Stage.MAIL, self.pick(scenario.replies.tls_required), server, envelope)
        throttle, buckets = self.throttle, self.buckets
        if (
            throttle is not None
            and buckets is not None
            and throttle.stage is Stage.MAIL
            and not buckets.take(server.client_ip, self.clock.now())
        ):
            return self.say(Stage.MAIL, self.pick(throttle.replies), server, envelope)
        accept = scenario.replies.mail
        subject = ("", "", "", address)
        for rule in self.mail_rules:
            if rule.matches(subject) and self.chance(rule.probability):
                await self.pause(rule.delay)
                if rule.drop:
                    return self.drop(Stage.MAIL, server)
                if rule.replies:
                    reply = self.pick(rule.replies)
                    if reply.code >= 300:
                        return self.say(Stage.MAIL, reply, server, envelope)
                    accept = (reply,)
                break
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.say(Stage.MAIL, self.pick(accept), server, envelope)

    async def handle_RCPT(
        self,
        server: _ProviderSMTP,
        session: Session,
        envelope: _Transaction,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        throttle, buckets = self.throttle, self.buckets
        if throttle is not None and buckets is not None and throttle.stage is Stage.RCPT:
            if throttle.per == "recipient":
                throttled = not buckets.take(address.lower(), self.clock.now())
            else:
                # one token per message, taken at its first recipient
                if not envelope.throttle_checked:
                    envelope.throttle_checked = True
                    envelope.throttled = not buckets.take(server.client_ip, self.clock.now())
                throttled = envelope.throttled
            if throttled:
                await self.pause(self.delays.rcpt)
                self.stats.refuse((address,))
                return self.say(Stage.RCPT, self.pick(throttle.replies), server, envelope, address)

        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        subject = (address, local, domain, str(envelope.mail_from or ""))
        rule = None
        for candidate in self.rcpt_rules:
            if candidate.matches(subject) and self.chance(candidate.probability):
                rule = candidate
                break
        delay = self.delays.rcpt
        if rule is not None and rule.stage is Stage.RCPT and rule.delay is not None:
            delay = rule.delay
        await self.pause(delay)

        accept = self.scenario.replies.rcpt
        if rule is not None:
            if rule.stage is Stage.DATA:
                if envelope.data_rule is None:
                    envelope.data_rule = rule
            elif rule.drop:
                return self.drop(Stage.RCPT, server)
            elif rule.replies:
                reply = self.pick(rule.replies)
                if reply.code >= 300:
                    self.stats.refuse((address,))
                    return self.say(Stage.RCPT, reply, server, envelope, address)
                accept = (reply,)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return self.say(Stage.RCPT, self.pick(accept), server, envelope, address)

    async def handle_DATA(
        self, server: _ProviderSMTP, session: Session, envelope: _Transaction
    ) -> str:
        rule = envelope.data_rule
        delay = self.delays.data
        if rule is not None and rule.delay is not None:
            delay = rule.delay
        await self.pause(delay)
        recipients: list[str] = list(envelope.rcpt_tos)
        first = recipients[0]
        throttle, buckets = self.throttle, self.buckets
        if (
            throttle is not None
            and buckets is not None
            and throttle.stage is Stage.DATA
            and not buckets.take(server.client_ip, self.clock.now())
        ):
            self.stats.refuse(recipients)
            return self.say(Stage.DATA, self.pick(throttle.replies), server, envelope, first)
        accept = self.scenario.replies.data
        if rule is not None:
            if rule.drop:
                return self.drop(Stage.DATA, server)
            if rule.replies:
                reply = self.pick(rule.replies)
                if reply.code >= 300:
                    self.stats.refuse(recipients)
                    return self.say(Stage.DATA, reply, server, envelope, first)
                accept = (reply,)
        content = envelope.original_content or b""
        if self.store_dir is not None:
            self._stored += 1
            path = self.store_dir / f"{self._stored:08d}.eml"
            sender = str(envelope.mail_from or "")
            try:
                await asyncio.to_thread(_write_eml, path, sender, recipients, content)
            except OSError as exc:
                reply = Reply.parse(f"451 4.3.0 cannot store the message ({exc.strerror})")
                return self.say(Stage.DATA, reply, server, envelope, first)
        text = self.say(Stage.DATA, self.pick(accept), server, envelope, first)
        self.stats.accept(recipients, content)
        if self.max_messages is not None and self.stats.messages >= self.max_messages:
            self.on_limit()
        return text


def _write_eml(path: Path, sender: str, recipients: Sequence[str], content: bytes) -> None:
    envelope = f"Return-Path: <{sender}>\r\nX-Envelope-To: {', '.join(recipients)}\r\n"
    path.write_bytes(envelope.encode("utf-8", "surrogateescape") + content)


# -- the simulator -----------------------------------------------------------------------------


class Simulator:
    """A provider simulator on the running event loop.

    ::

        async with Simulator(Scenario.load("bounces")) as simulator:
            host, port = simulator.address
            ...  # deliver to host:port
        print(simulator.report())
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        seed: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        max_messages: int | None = None,
    ) -> None:
        self.scenario = scenario.with_seed(seed)
        if self.scenario.seed is None:
            self.scenario = self.scenario.with_seed(random.SystemRandom().randrange(2**32))
        self.host = host
        self.port = port
        self.clock: Clock = clock or SystemClock()
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.max_messages = max_messages
        self._server: asyncio.Server | None = None
        self._stats: _Stats | None = None
        self._provider: _Provider | None = None
        self._finished: asyncio.Event | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on, once started."""
        if self._address is None:
            raise RuntimeError("the simulator is not started")
        return self._address

    async def start(self) -> tuple[str, int]:
        """Listen; returns (host, port), the port chosen by the system if 0 was asked for."""
        scenario = self.scenario
        tls_context = await asyncio.to_thread(_tls_context, scenario)
        if self.store_dir is not None:
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--store-dir {self.store_dir}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        finished = self._finished = asyncio.Event()
        stats = self._stats = _Stats(self.clock)
        provider = self._provider = _Provider(
            scenario,
            random.Random(scenario.seed),
            self.clock,
            stats,
            store_dir=self.store_dir,
            max_messages=self.max_messages,
            on_limit=finished.set,
        )
        banner_templated = _check_placeholders(scenario.banner, _BANNER_PLACEHOLDERS)

        def factory() -> SMTP:
            stats.connections += 1
            session_id = f"{stats.connections:x}si{scenario.seed or 0:x}"
            banner = scenario.banner
            if banner_templated:
                banner = banner.format(
                    id=session_id,
                    hostname=scenario.hostname,
                    time=int(self.clock.now()),
                )
            return _ProviderSMTP(
                provider,
                session_id,
                hostname=scenario.hostname,
                ident=banner,
                data_size_limit=scenario.max_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=tls_context,
                loop=loop,
            )

        try:
            self._server = await loop.create_server(factory, self.host, self.port)
        except OSError as exc:
            raise ConfigError(
                f"--listen {self.host}:{self.port}: cannot listen ({exc.strerror or exc})"
            ) from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = (str(host), int(port))
        return self._address

    async def wait(self) -> None:
        """Until ``max_messages`` messages were accepted, or :meth:`stop` is called."""
        if self._finished is None:
            raise RuntimeError("the simulator is not started")
        await self._finished.wait()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop listening; give open sessions ``grace`` seconds to QUIT, then close them."""
        server, provider = self._server, self._provider
        if server is None or provider is None:
            return
        self._server = None
        server.close()
        if grace > 0 and provider.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(provider.idle.wait(), grace)
        sessions = list(provider.sessions)
        tasks = [s._handler_coroutine for s in sessions if s._handler_coroutine is not None]
        for session in sessions:
            if session.transport is not None:
                session.transport.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()
        if self._stats is not None:
            self._stats.stopped_at = self.clock.now()
        if self._finished is not None:
            self._finished.set()

    def report(self) -> dict[str, Any]:
        """What happened so far (see ``docs/simulator.md`` for the fields)."""
        scenario = self.scenario
        head: dict[str, Any] = {
            "scenario": scenario.name,
            "source": scenario.source,
            "seed": scenario.seed,
            "listen": None if self._address is None else "{}:{}".format(*self._address),
        }
        if self._stats is None:
            return head
        return head | self._stats.report()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# -- the command -------------------------------------------------------------------------------


async def _run(
    simulator: Simulator, duration: float | None, announce: Callable[[str, int], None]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    # before listening: a client may connect, and a script signal, as soon as the port is open
    for signum in signals:
        loop.add_signal_handler(signum, interrupted.set)
    waiters: list[asyncio.Task[Any]] = []
    try:
        host, port = await simulator.start()
        announce(host, port)
        waiters = [
            asyncio.create_task(interrupted.wait()),
            asyncio.create_task(simulator.wait()),
        ]
        await asyncio.wait(waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for signum in signals:
            loop.remove_signal_handler(signum)
        # a client that got its last 250 usually says QUIT at once: let it
        await simulator.stop(grace=1.0)
    return simulator.report()


@click.command("simulate")
@click.option(
    "--listen",
    default="127.0.0.1:2525",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to listen (port 0: any free port, printed at start).",
)
@click.option(
    "--scenario",
    default="accept",
    show_default=True,
    metavar="NAME|FILE",
    help="A built-in scenario (see --list) or a scenario TOML file.",
)
@click.option("--report", "report_path", metavar="FILE", help="Also write the report to FILE.")
@click.option("--duration", metavar="DURATION", help='Stop after this long, e.g. "30s".')
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop once N messages were accepted.",
)
@click.option("--store-dir", metavar="DIR", help="Save each accepted message as DIR/NNNNNNNN.eml.")
@click.option("--seed", type=int, help="Seed for the scenario's randomness (overrides its own).")
@click.option("--list", "list_only", is_flag=True, help="List the built-in scenarios and exit.")
def simulate_command(
    listen: str,
    scenario: str,
    report_path: str | None,
    duration: str | None,
    max_messages: int | None,
    store_dir: str | None,
    seed: int | None,
    list_only: bool,
) -> None:
    """A provider simulator: an SMTP server that answers like Gmail, Microsoft, Yahoo or Postfix.

    Runs until Ctrl-C or SIGTERM (or --duration, or --max-messages), then prints a JSON report
    on stdout: messages accepted, per domain, duplicates by Message-ID, replies by class, and
    accepted messages per second.
    """
    if list_only:
        for name in builtin_scenarios():
            click.echo(f"{name:16} {Scenario.load(name).description}")
        return
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    seconds: float | None = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--duration") from None
    if report_path is not None and not Path(report_path).resolve().parent.is_dir():
        raise click.BadParameter(f"no directory for {report_path}", param_hint="--report")
    loaded = Scenario.load(scenario)
    simulator = Simulator(
        loaded, host=host, port=port, seed=seed, store_dir=store_dir, max_messages=max_messages
    )

    def announce(bound_host: str, bound_port: int) -> None:
        click.echo(
            f"postlane simulate: scenario {loaded.name} (seed {simulator.scenario.seed}) "
            f"listening on {bound_host}:{bound_port}; Ctrl-C to stop",
            err=True,
        )

    report = asyncio.run(_run(simulator, seconds, announce))
    document = json.dumps(report, indent=2, ensure_ascii=False)
    click.echo(document)
    if report_path is not None:
        try:
            Path(report_path).write_text(document + "\n", encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(
                f"cannot write the report to {report_path}: {exc.strerror}"
            ) from None
