"""A scenario: what a provider answers, recipient by recipient, and how it is read from TOML.

``Scenario.load("flaky")`` reads a built-in scenario (``postlane/data/scenarios/``),
``Scenario.load("my.toml")`` a file. Reading is strict: an unknown key or a bad value is a
ConfigError naming the key (``scenario my.toml: rules[2] (spam).reply: ...``). The format is
described in ``docs/simulator.md``.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from postlane import toml_values
from postlane.classify import ReplyClass
from postlane.errors import ConfigError
from postlane.simulate.replies import BANNER_PLACEHOLDERS, Reply, check_placeholders

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

#: where the built-in scenarios live, inside the ``postlane.data`` package
_BUILTIN_DIR = "scenarios"


class Stage(StrEnum):
    """Where in the SMTP dialogue a reply is given."""

    CONNECT = "connect"  # instead of the greeting
    MAIL = "mail"  # MAIL FROM
    RCPT = "rcpt"  # RCPT TO
    DATA = "data"  # after the message, at the end of DATA
    #: after the session: the recipient was accepted, and a DSN (or a complaint) about it is
    #: sent to the envelope sender afterwards (postlane.simulate.feedback)
    LATER = "later"


class TLSMode(StrEnum):
    """Whether the server offers STARTTLS, and whether it insists on it."""

    OFF = "off"
    OFFERED = "offered"  # STARTTLS announced, plain text accepted too
    REQUIRED = "required"  # MAIL FROM before STARTTLS is refused (replies.tls_required)


Delay = tuple[float, float]

#: where a ``stage = "later"`` rule's reports go unless told otherwise: postlane's bounce
#: listener at its default address (``[bounces] listen``)
DEFAULT_REPORTS_TO = ("127.0.0.1", 2526)
#: how long after a message is accepted a ``stage = "later"`` rule reports, unless its
#: ``delay`` says otherwise: a second or two, as a relay's queue would take
DEFAULT_LATER_DELAY: Delay = (1.0, 2.0)


@dataclass(frozen=True)
class Rule:
    """What happens to recipients that match: a reply, a dropped connection, or acceptance
    (optionally slow), with some probability, at RCPT, at the end of DATA, or at MAIL; or
    acceptance, then a report sent ``delay`` later (stage "later"): a DSN carrying the reply,
    or a complaint."""

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
    #: stage "later": an ARF complaint (feedback type abuse) instead of a DSN
    complaint: bool = False

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
    #: (host, port) where the reports of stage "later" rules are delivered
    reports_to: tuple[str, int] = DEFAULT_REPORTS_TO

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

    @property
    def reports_later(self) -> bool:
        """Whether a rule sends reports after the session (stage "later")."""
        return any(rule.stage is Stage.LATER for rule in self.rules)


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


# a scenario's values are read as the configuration's are (toml_values), with a few of its own
_string = toml_values.string
_integer = toml_values.integer
_boolean = toml_values.boolean
_positive_integer = toml_values.positive_integer
_positive_number = toml_values.number_where(
    lambda value: 0 < value < math.inf, "a finite number above 0"
)
_probability = toml_values.number_where(
    lambda value: 0 <= value <= 1, "a probability between 0 and 1"
)


def _size(value: Any) -> int:
    """A size like the configuration's (``"35MB"``), or a number of bytes."""
    if isinstance(value, bool):
        raise toml_values.expected('a size like "25MB" or a number of bytes', value)
    if isinstance(value, int):
        if value < 1:
            raise toml_values.expected("a positive size", value)
        return value
    return toml_values.parse_size(_string(value))


def _delay(value: Any) -> Delay | None:
    """``"2s"``, or ``["100ms", "2s"]`` for a uniform range."""
    if isinstance(value, list):
        if len(value) != 2:
            raise toml_values.expected('a duration or a pair like ["100ms", "2s"]', value)
        low, high = (toml_values.duration(v) for v in value)
        if low > high:
            raise ValueError(f"the range {value!r} goes backwards")
    else:
        low = high = toml_values.duration(value)
    return None if high == 0 else (low, high)


def reports_address(value: Any) -> tuple[str, int]:
    """``"HOST:PORT"`` where reports are delivered: (host, port), the port from 1 to 65535."""
    host, port = toml_values.parse_listen(_string(value))
    if port == 0:
        raise toml_values.expected("HOST:PORT with a port from 1 to 65535", value)
    return host, port


def show_address(address: tuple[str, int]) -> str:
    """``host:port`` as written in a setting (``[::1]:2526`` for an IPv6 host)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _replies(value: Any) -> tuple[Reply, ...]:
    """A reply, or a list of replies one of which is picked at random each time."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected a reply or a list of replies, got an empty list")
    return tuple(Reply.parse(_string(item)) for item in items)


def _member(enum: type[E], allowed: Iterable[str] | None = None) -> Callable[[Any], E]:
    """A reader of one of ``enum``'s values (or of the ``allowed`` ones), giving the member."""
    read = toml_values.choice(*(allowed or (member.value for member in enum)))
    return lambda value: enum(read(value))


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
    "reports_to",
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
    "complaint",
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
            check_placeholders(text, BANNER_PLACEHOLDERS)
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
            tls=top.get("tls", _member(TLSMode), TLSMode.OFF),
            tls_cert=tls_cert,
            tls_key=tls_key,
            replies=self._server_replies(top),
            delays=self._delays(top),
            connect=self._connect(top),
            throttle=self._throttle(top),
            rules=self._rules(top),
            reports_to=top.get("reports_to", reports_address, DEFAULT_REPORTS_TO),
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
        stage = table.get("stage", _member(Stage, ("mail", "rcpt", "data")), Stage.RCPT)
        per = table.get("per", toml_values.choice("client", "recipient"), "client")
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
        stage = table.get("stage", _member(Stage, ("mail", "rcpt", "data", "later")), Stage.RCPT)
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
        complaint = table.get("complaint", _boolean, False)
        delay = table.get("delay", _delay, None)
        if stage is Stage.LATER:
            self._check_later(table, replies, drop, complaint)
            if "delay" not in table.data:
                delay = DEFAULT_LATER_DELAY
        elif complaint:
            raise table.error("complaint", 'a complaint comes later: it needs stage = "later"')
        cls = table.get("class", _member(ReplyClass), None)
        return Rule(
            name=name,
            stage=stage,
            conditions=conditions,
            replies=replies,
            drop=drop,
            probability=table.get("probability", _probability, 1.0),
            delay=delay,
            cls=cls,
            complaint=complaint,
        )

    @staticmethod
    def _check_later(
        table: _Table, replies: tuple[Reply, ...], drop: bool, complaint: bool
    ) -> None:
        """A stage "later" rule reports a 4xx/5xx reply in a DSN, or complains; nothing else."""
        if drop:
            raise table.error("drop", 'a rule at stage "later" has accepted: it cannot drop')
        if complaint and replies:
            raise table.error("complaint", "a rule either complains or reports a reply, not both")
        if not complaint and not replies:
            raise table.error(
                "reply", 'a rule at stage "later" needs a reply to report (or complaint = true)'
            )
        if any(reply.code < 400 for reply in replies):
            raise table.error(
                "reply",
                'at stage "later" a reply must be 4xx (a delayed DSN) or 5xx (a failed one)',
            )
