"""Configuration: one TOML file, environment overrides, and defaults that work with no file at all.

Lookup order: ``--config PATH``, else ``$POSTLANE_CONFIG``, else ``./postlane.toml``, else the
built-in defaults. Durations are strings (``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``),
sizes too (``"25MB"``). Any unknown key or bad value is a :class:`ConfigError` naming the key.

Environment overrides: ``POSTLANE_<SECTION>_<KEY>`` for any scalar key (``POSTLANE_STORE_URL``,
``POSTLANE_DELIVERY_RELAY``), and ``POSTLANE_API_TOKEN``, which adds one bearer token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from postlane import toml_values
from postlane.errors import ConfigError
from postlane.message import Lane

# The value syntax lives in toml_values; postlane's modules import these four from here.
from postlane.toml_values import format_duration as format_duration
from postlane.toml_values import parse_duration as parse_duration
from postlane.toml_values import parse_listen as parse_listen
from postlane.toml_values import parse_size as parse_size

T = TypeVar("T")

# the readers of each setting's value (ValueError saying what was expected; see toml_values)
_str = toml_values.string
_bool = toml_values.boolean
_duration = toml_values.duration
_size = toml_values.size
_choice = toml_values.choice
_int = toml_values.integer_where(lambda number: number >= 0, "a non-negative integer")
_positive_int = toml_values.positive_integer
_fraction = toml_values.number_where(lambda value: 0 <= value <= 1, "a number between 0 and 1")
_rate = toml_values.number_where(
    lambda value: not value < 0, "messages per second (a number >= 0; 0 = no limit)"
)


def _listen(value: Any) -> str:
    parse_listen(_str(value))
    return str(value)


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected a non-empty list of durations like ["1m", "5m"], got {value!r}')
    return tuple(_duration(item) for item in value)


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(_str(item) for item in value)


def _networks(value: Any) -> tuple[str, ...]:
    networks = _strings(value)
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ValueError(f"{net!r} is not a network like 127.0.0.0/8") from exc
    return networks


def _users(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f'expected a table like {{ app = "password" }}, got {value!r}')
    return {str(name): _str(secret) for name, secret in value.items()}


def _opt(parse: Any) -> Any:
    def parse_optional(value: Any) -> Any:
        return None if value in (None, "") else parse(value)

    return parse_optional


def _setting(default: Any, parse: Any, *, env: bool = True) -> Any:
    if isinstance(default, list | dict | tuple):
        frozen = tuple(default) if isinstance(default, list | tuple) else dict(default)
        return field(default_factory=lambda: frozen, metadata={"parse": parse, "env": env})
    return field(default=default, metadata={"parse": parse, "env": env})


@dataclass(frozen=True)
class StoreConfig:
    url: str = _setting("sqlite:///postlane.db", _str)
    #: sent (and suppressed) messages are removed this long after their last delivery
    retention: float = _setting(7 * 86400.0, _duration)
    #: dead letters are removed this long after they died, unless requeued first
    dead_retention: float = _setting(30 * 86400.0, _duration)


@dataclass(frozen=True)
class DeliveryConfig:
    relay: str = _setting("capture://postlane-capture", _str)
    concurrency: int = _setting(100, _positive_int)
    lease: float = _setting(60.0, _duration)
    #: deliveries claimed per store round trip
    batch_size: int = _setting(50, _positive_int)
    #: how long SIGTERM waits for in-flight sends before handing the rest back
    shutdown_grace: float = _setting(30.0, _duration)
    #: fallback poll when no wake-up arrives (other processes enqueueing into SQLite)
    poll_interval: float = _setting(1.0, _duration)
    connect_timeout: float = _setting(30.0, _duration)
    command_timeout: float = _setting(120.0, _duration)
    #: messages sent over one SMTP connection before it is closed and replaced
    messages_per_connection: int = _setting(100, _positive_int)
    #: open connections kept per relay or MX host
    connections_per_host: int = _setting(20, _positive_int)
    helo_name: str | None = _setting(None, _opt(_str))
    tls_verify: bool = _setting(True, _bool)
    #: CA bundle for outbound TLS (default: the system's)
    tls_ca: str | None = _setting(None, _opt(_str))
    username: str | None = _setting(None, _opt(_str))
    password: str | None = _setting(None, _opt(_str))
    #: direct MX delivery: destinations whose certificate must verify ("example.com" and its
    #: subdomains, ".example.org" for subdomains only, "google", or "*" for all)
    require_tls: tuple[str, ...] = _setting((), _strings, env=False)


@dataclass(frozen=True)
class RetryConfig:
    delays: tuple[float, ...] = _setting((60.0, 300.0, 900.0, 3600.0, 14400.0), _durations)
    max_attempts: int = _setting(8, _positive_int)
    max_age: float = _setting(2 * 86400.0, _duration)
    #: each delay is spread by up to this fraction either way, so retries do not come in waves
    jitter: float = _setting(0.1, _fraction)


@dataclass(frozen=True)
class LaneConfig:
    """Per-lane overrides of [retry]; None means "as [retry] says"."""

    delays: tuple[float, ...] | None = _setting(None, _opt(_durations))
    max_attempts: int | None = _setting(None, _opt(_positive_int))
    max_age: float | None = _setting(None, _opt(_duration))
    #: share of each claim kept for this lane when others are busy (never starved)
    share: float | None = _setting(None, _opt(_fraction))


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _setting("127.0.0.1:8025", _listen)
    #: bearer tokens with the "admin" scope: everything, operations included
    tokens: tuple[str, ...] = _setting((), _strings, env=False)
    #: bearer tokens with the "send" scope: enqueue, and read back their own messages
    send_tokens: tuple[str, ...] = _setting((), _strings, env=False)
    #: the web dashboard at / (admin tokens log in; without tokens, loopback clients only)
    dashboard: bool = _setting(True, _bool)


def _timeout(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


@dataclass(frozen=True)
class SmtpConfig:
    listen: str = _setting("127.0.0.1:2587", _listen)
    trusted_networks: tuple[str, ...] = _setting(("127.0.0.0/8", "::1/128"), _networks)
    users: dict[str, str] = _setting({}, _users, env=False)  # noqa: RUF009 (a field())
    tls_cert: str | None = _setting(None, _opt(_str))
    tls_key: str | None = _setting(None, _opt(_str))
    max_size: int = _setting(25 * 1000 * 1000, _size)
    hostname: str | None = _setting(None, _opt(_str))
    # -- limits of the submission listener (see docs/ingest.md) --
    #: each command must arrive within this of the last one (RFC 5321 4.5.3.2.7), else 421
    command_timeout: float = _setting(300.0, _timeout)
    #: the whole message, from DATA's 354 to its final dot (RFC 5321 4.5.3.2.6)
    data_timeout: float = _setting(600.0, _timeout)
    #: connections open at once; one more gets 421 at once and is closed
    max_connections: int = _setting(100, _positive_int)
    #: connections open at once from one address outside trusted_networks
    max_connections_per_address: int = _setting(20, _positive_int)
    #: failed AUTH attempts allowed from one address (an IPv6 /64), and from all addresses,
    #: within auth_failure_window; beyond them AUTH is refused without checking the password
    auth_failures_per_address: int = _setting(10, _positive_int)
    auth_failures_total: int = _setting(100, _positive_int)
    auth_failure_window: float = _setting(900.0, _timeout)


def _regex(value: Any) -> str:
    text = _str(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


@dataclass(frozen=True)
class ThrottleConfig:
    """Per-destination limits and adaptive slow-down (see postlane.throttle)."""

    enabled: bool = _setting(True, _bool)
    #: look up MX hosts to recognise providers behind custom domains ("auto": when relay = "mx")
    mx_lookup: str = _setting("auto", _choice("auto", "true", "false"))
    #: messages/s a destination may still be allowed when it keeps saying "slow down"
    min_rate: float = _setting(0.2, _rate)
    #: messages/s added back per second of successful sends after a slow-down
    increase: float = _setting(0.5, _rate)
    #: how long a throttled delivery waits before it is tried again
    cool_down: float = _setting(60.0, _duration)
    #: consecutive connection failures that pause a destination
    pause_after: int = _setting(3, _positive_int)
    #: the first pause; each failed probe doubles it, up to max_pause
    pause: float = _setting(30.0, _duration)
    max_pause: float = _setting(1800.0, _duration)


@dataclass(frozen=True)
class DestinationLimits:
    """``[destinations.NAME]``: limits of one destination (a provider like ``google``, a domain,
    ``default`` for all others, or ``relay`` for the relay itself)."""

    concurrency: int = _setting(0, _int)
    rate: float = _setting(0.0, _rate)
    #: messages sent over one SMTP connection to this destination (or relay) before it is
    #: closed and replaced (0: as [delivery] messages_per_connection)
    messages_per_connection: int = _setting(0, _int)
    #: recipient domains that belong to this provider (extends data/providers.toml)
    domains: tuple[str, ...] = _setting((), _strings, env=False)
    #: MX host suffixes that identify this provider
    mx_suffixes: tuple[str, ...] = _setting((), _strings, env=False)


def destination_limits(
    destinations: Mapping[str, DestinationLimits], name: str
) -> DestinationLimits:
    """The limits of destination ``name``: its own ``[destinations.NAME]`` table, else
    ``[destinations.default]`` (a table of its own replaces the default one as a whole)."""
    default = destinations.get("default", DestinationLimits())
    return destinations.get(name, default)


@dataclass(frozen=True)
class ShapingRule:
    """``[[shaping]]``: a reply pattern and what to do about it (KumoMTA-style automation)."""

    #: regular expression searched in the reply text (case-insensitive)
    match: str | None = _setting(None, _opt(_regex))
    #: enhanced status code, or its prefix ("4.7.28", "5.7.")
    enhanced: str | None = _setting(None, _opt(_str))
    #: only for these destinations (names; empty: any)
    destinations: tuple[str, ...] = _setting((), _strings, env=False)
    action: str = _setting("pause", _choice("pause", "rate"))
    #: how long the pause or the rate holds
    duration: float = _setting(600.0, _duration)
    #: the rate to set (messages/s) for action = "rate"
    rate: float = _setting(1.0, _rate)
    #: act after this many matches within `within`
    after: int = _setting(1, _positive_int)
    within: float = _setting(300.0, _duration)


@dataclass(frozen=True)
class DkimKey:
    """``[dkim."example.com"]``: sign mail from this domain (and its subdomains)."""

    selector: str = _setting("", _str)
    #: PEM file of the private key (``postlane dkim keygen`` writes one)
    private_key: str = _setting("", _str)


@dataclass(frozen=True)
class Route:
    """``[[routes]]``: which relay a delivery goes through, by lane, sender domain or recipient
    domain (each narrows; globs allowed); the first matching route wins, else [delivery] relay."""

    lane: tuple[str, ...] = _setting((), _strings, env=False)
    sender_domain: tuple[str, ...] = _setting((), _strings, env=False)
    recipient_domain: tuple[str, ...] = _setting((), _strings, env=False)
    relay: str = _setting("", _str)
    #: used while the relay (its destination) is paused
    fallback: str | None = _setting(None, _opt(_str))


@dataclass(frozen=True)
class AlertsConfig:
    #: Alertmanager-compatible endpoint for firing and resolved alerts (none: log only)
    webhook: str | None = _setting(None, _opt(_str))
    #: how often serve records the history and evaluates the rules
    interval: float = _setting(60.0, _duration)
    #: how long the recorded history (one row per lane per minute) is kept
    history: float = _setting(7 * 86400.0, _duration)


@dataclass(frozen=True)
class LogConfig:
    #: "text" (one readable line per event) or "json" (one JSON object per line)
    format: str = _setting("text", _choice("text", "json"))
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    #: one line per delivery attempt (id, domain, destination, class, code, duration)
    attempts: bool = _setting(True, _bool)


_LANE_SECTIONS = tuple(lane.value for lane in Lane)


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    lanes: dict[str, LaneConfig] = field(
        default_factory=lambda: {name: LaneConfig() for name in _LANE_SECTIONS}
    )
    http: HttpConfig = field(default_factory=HttpConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    destinations: dict[str, DestinationLimits] = field(default_factory=dict)
    shaping: tuple[ShapingRule, ...] = ()
    dkim: dict[str, DkimKey] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    #: where the configuration came from, for messages ("built-in defaults" when no file)
    source: str = "built-in defaults"
    #: the directory relative paths are resolved against
    base_dir: Path = field(default_factory=Path.cwd)

    def resolve_path(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate


_SECTIONS: dict[str, type[Any]] = {
    "store": StoreConfig,
    "delivery": DeliveryConfig,
    "retry": RetryConfig,
    "http": HttpConfig,
    "smtp": SmtpConfig,
    "throttle": ThrottleConfig,
    "alerts": AlertsConfig,
    "log": LogConfig,
}


def _build_section(cls: type[Any], table: Any, prefix: str, env: Mapping[str, str]) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix}: expected a table ([{prefix}]), got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {prefix}.{key} (known keys in [{prefix}]: {known})")
        values[key] = _parse_value(fields[key], raw, f"{prefix}.{key}")
    env_prefix = "POSTLANE_" + prefix.replace(".", "_").upper() + "_"
    for name, text in env.items():
        if not name.startswith(env_prefix):
            continue
        key = name[len(env_prefix) :].lower()
        target = fields.get(key)
        if target is None:
            raise ConfigError(f"unknown setting {name} (no key {prefix}.{key} to override)")
        values[key] = _parse_env(target, text, name)
    return cls(**values)


def _parse_value(spec: dataclasses.Field[Any], raw: Any, name: str) -> Any:
    try:
        return spec.metadata["parse"](raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _parse_env(spec: dataclasses.Field[Any], text: str, name: str) -> Any:
    """Environment values are strings: try the string, then what the TOML value would have been."""
    if not spec.metadata.get("env", True):
        raise ConfigError(f"{name}: this key cannot be set from the environment")
    candidates: list[Any] = [text]
    if text.isdigit():
        candidates.append(int(text))
    if text.lower() in ("true", "false"):
        candidates.append(text.lower() == "true")
    candidates.append([part.strip() for part in text.split(",") if part.strip()])
    first_error: ConfigError | None = None
    for raw in candidates:
        try:
            return _parse_value(spec, raw, name)
        except ConfigError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Read the configuration the way the CLI does (see the module docstring)."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    chosen: Path | None = None
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise ConfigError(f"configuration file {chosen} does not exist")
    elif env.get("POSTLANE_CONFIG"):
        chosen = Path(env["POSTLANE_CONFIG"])
        if not chosen.is_file():
            raise ConfigError(f"configuration file {chosen} (from $POSTLANE_CONFIG) does not exist")
    elif (cwd / "postlane.toml").is_file():
        chosen = cwd / "postlane.toml"
    data: dict[str, Any] = {}
    if chosen is not None:
        try:
            data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {chosen}: {exc.strerror}") from None
    return config_from_dict(
        data,
        env=env,
        source=str(chosen) if chosen else "built-in defaults",
        base_dir=(chosen.resolve().parent if chosen else cwd),
    )


def config_from_dict(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str = "built-in defaults",
    base_dir: Path | None = None,
) -> Config:
    """Build a :class:`Config` from an already-parsed TOML document (tests use this directly)."""
    env = {} if env is None else env
    tables = {"lanes", "destinations", "shaping", "dkim", "routes"}
    unknown = set(data) - set(_SECTIONS) - tables
    if unknown:
        known = ", ".join(sorted([*_SECTIONS, *tables]))
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (known sections: {known})")
    sections = {
        name: _build_section(cls, data.get(name, {}), name, env) for name, cls in _SECTIONS.items()
    }
    lanes_table = data.get("lanes", {})
    if not isinstance(lanes_table, Mapping):
        raise ConfigError("lanes: expected tables like [lanes.high]")
    for name in lanes_table:
        if name not in _LANE_SECTIONS:
            raise ConfigError(f"unknown lane [lanes.{name}] (lanes are high, normal, low)")
    lanes = {
        name: _build_section(LaneConfig, lanes_table.get(name, {}), f"lanes.{name}", env)
        for name in _LANE_SECTIONS
    }
    destinations = _tables_by_name(data, "destinations", DestinationLimits, "google")
    shaping = _array_of_tables(data, "shaping", ShapingRule, _check_shaping)
    dkim = {
        domain.lower(): key
        for domain, key in _tables_by_name(
            data, "dkim", DkimKey, '"example.com"', _check_dkim
        ).items()
    }
    routes = _array_of_tables(data, "routes", Route, _check_route)
    http: HttpConfig = sections["http"]
    if env.get("POSTLANE_API_TOKEN"):
        http = dataclasses.replace(http, tokens=(*http.tokens, env["POSTLANE_API_TOKEN"]))
    smtp: SmtpConfig = sections["smtp"]
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError("smtp.tls_cert and smtp.tls_key must be set together")
    return Config(
        store=sections["store"],
        delivery=sections["delivery"],
        retry=sections["retry"],
        lanes=lanes,
        http=http,
        smtp=smtp,
        throttle=sections["throttle"],
        alerts=sections["alerts"],
        log=sections["log"],
        destinations=destinations,
        shaping=shaping,
        dkim=dkim,
        routes=routes,
        source=source,
        base_dir=base_dir or Path.cwd(),
    )


def _tables_by_name(
    data: Mapping[str, Any],
    name: str,
    cls: type[T],
    example: str,
    check: Callable[[T, str], None] | None = None,
) -> dict[str, T]:
    """``[name.KEY]`` tables (``[destinations.google]``), each read as a ``cls`` and passed to
    ``check``, which raises ConfigError for what the keys alone cannot say."""
    tables = data.get(name, {})
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{name}: expected tables like [{name}.{example}]")
    items: dict[str, T] = {}
    for key, table in tables.items():
        where = f"{name}.{key}"
        item = _build_section(cls, table, where, {})
        if check is not None:
            check(item, where)
        items[str(key)] = item
    return items


def _array_of_tables(
    data: Mapping[str, Any], name: str, cls: type[T], check: Callable[[T, str], None]
) -> tuple[T, ...]:
    """``[[name]]`` tables (``[[routes]]``), each read as a ``cls`` and passed to ``check``."""
    entries = data.get(name, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{name}: expected [[{name}]] tables")
    items = []
    for number, table in enumerate(entries, 1):
        where = f"{name}[{number}]"
        item = _build_section(cls, table, where, {})
        check(item, where)
        items.append(item)
    return tuple(items)


def _check_shaping(rule: ShapingRule, where: str) -> None:
    if rule.match is None and rule.enhanced is None:
        raise ConfigError(f"{where}: give match (a regex) or enhanced (a code)")


def _check_dkim(key: DkimKey, where: str) -> None:
    if not key.selector or not key.private_key:
        raise ConfigError(f"{where}: give selector and private_key")


def _check_route(route: Route, where: str) -> None:
    if not route.relay:
        raise ConfigError(f"{where}: give relay (where this route's mail goes)")
    for lane in route.lane:
        if lane not in _LANE_SECTIONS:
            raise ConfigError(f"{where}.lane: unknown lane {lane!r}")
