"""Configuration: one TOML file, environment overrides, and defaults that work with no file at all.

Lookup order: ``--config PATH``, else ``$POSTLANE_CONFIG``, else ``./postlane.toml``, else the
built-in defaults. Durations are strings (``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``),
sizes too (``"25MB"``). Any unknown key or bad value is a :class:`ConfigError` naming the key,
and no message shows a secret (:mod:`postlane.redact`).

Where values come from, besides the file's own:

- ``${VAR}`` in any string value is replaced by the environment variable (``$$`` is a ``$``;
  ``${VAR:-default}`` when it may be unset); an unset variable is an error naming the key.
- ``KEY_file = "PATH"`` for a secret-bearing key (the relay URL, the store URL, passwords,
  tokens, users, webhook secrets) reads the value from that file, trimmed: Docker and
  Kubernetes secrets.
- ``POSTLANE_<SECTION>_<KEY>`` (and ``POSTLANE_LANES_<LANE>_<KEY>``) overrides any key of the
  fixed sections, ``_FILE`` forms included (``POSTLANE_DELIVERY_PASSWORD_FILE``); lists are
  comma-separated. ``POSTLANE_API_TOKEN`` adds one bearer token. Named tables and arrays of
  tables (``[destinations.NAME]``, ``[dkim."DOMAIN"]``, ``[[routes]]``, ``[[shaping]]``) have no
  environment form: a ``POSTLANE_DESTINATIONS_...`` variable is refused (use ``${VAR}`` in the
  file), as is any variable naming a section, or nearly, that is not a key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from postlane import toml_values
from postlane.config_reader import Reader
from postlane.errors import ConfigError
from postlane.feedback.providers.config import (
    PROVIDERS,
    ProviderWebhooks,
    provider_webhooks_from_config,
)
from postlane.message import Lane
from postlane.redact import redact
from postlane.sender_bindings import SendToken, send_tokens, user_senders

# The value syntax lives in toml_values; postlane's modules import these four from here.
from postlane.toml_values import format_duration as format_duration
from postlane.toml_values import parse_duration as parse_duration
from postlane.toml_values import parse_listen as parse_listen
from postlane.toml_values import parse_size as parse_size
from postlane.webhooks.endpoints import WebhookEndpoint, endpoints_from_config

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
_listen = toml_values.listen
_durations = toml_values.durations
_strings = toml_values.strings
_networks = toml_values.networks
_users = toml_values.string_table
_mail_domain = toml_values.mail_domain
_regex = toml_values.regex
_http_url = toml_values.http_url
_relay = toml_values.relay_url
_store_url = toml_values.store_url
_unsubscribe_url = toml_values.unsubscribe_url

# the relay forms by scheme, as the documentation writes them
RELAY_FORMS = toml_values.RELAY_FORMS


def _opt(parse: Any) -> Any:
    def parse_optional(value: Any) -> Any:
        return None if value in (None, "") else parse(value)

    return parse_optional


def _setting(default: Any, parse: Any, *, env: bool = True, file: bool = False) -> Any:
    """A key: its default and its reader. ``env=False``: no environment form. ``file``: it
    may hold credentials, so ``KEY_file`` reads it from a file (secret keys always may:
    :func:`postlane.redact.is_secret_key`)."""
    metadata = {"parse": parse, "env": env, "file": file}
    if isinstance(default, list | dict | tuple):
        frozen = tuple(default) if isinstance(default, list | tuple) else dict(default)
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class StoreConfig:
    url: str = _setting("sqlite:///postlane.db", _store_url, file=True)
    #: sent (and suppressed) messages are removed this long after their last delivery
    retention: float = _setting(7 * 86400.0, _duration)
    #: dead letters are removed this long after they died, unless requeued first
    dead_retention: float = _setting(30 * 86400.0, _duration)
    #: events (GET /v1/events, webhooks) are kept this long; a webhook endpoint failing for
    #: longer misses the older ones
    event_retention: float = _setting(30 * 86400.0, _duration)


#: the shortest lease: renewed every third of it, a shorter one lapses at the first pause of a
#: busy process or store, and the mail is sent again (an audit's "0s" sent each message 8 times)
MIN_LEASE = 1.0


def _lease(value: Any) -> float:
    seconds = _duration(value)
    if seconds < MIN_LEASE:
        raise ValueError(
            f"expected at least {MIN_LEASE:g}s, got {value!r}: a delivery whose lease lapses "
            "while it is being sent is sent again (the default, 60s, suits nearly everyone)"
        )
    return seconds


@dataclass(frozen=True)
class DeliveryConfig:
    relay: str = _setting("capture://postlane-capture", _relay, file=True)
    concurrency: int = _setting(100, _positive_int)
    #: how long a claimed delivery stays a worker's without being renewed (every third of it);
    #: past it, another worker sends it again
    lease: float = _setting(60.0, _lease)
    #: deliveries claimed per store round trip
    batch_size: int = _setting(50, _positive_int)
    #: in-flight slots kept for the high lane (low and normal borrow them only while no high
    #: mail is due); None: a tenth of ``concurrency``, at least one when it is 2 or more
    high_reserve: int | None = _setting(None, _opt(_int))
    #: how long SIGTERM waits for in-flight sends before handing the rest back
    shutdown_grace: float = _setting(30.0, _duration)
    #: fallback poll when no wake-up arrives (other processes enqueueing into SQLite)
    poll_interval: float = _setting(1.0, _duration)
    connect_timeout: float = _setting(30.0, _duration)
    command_timeout: float = _setting(120.0, _duration)
    #: the reply to the message's final dot (RFC 5321 4.5.3.2.6 and Postfix: 10 minutes; a
    #: reply given up on is ambiguous, and the message is sent again)
    data_timeout: float = _setting(600.0, _duration)
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
    require_tls: tuple[str, ...] = _setting((), _strings)

    @property
    def reserve_for_high(self) -> int:
        """In-flight slots kept for the high lane (``high_reserve``, or its default)."""
        if self.high_reserve is not None:
            return min(self.high_reserve, self.concurrency - 1)
        return 0 if self.concurrency < 2 else max(1, self.concurrency // 10)


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


def _timeout(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _setting("127.0.0.1:8025", _listen)
    #: bearer tokens with the "admin" scope: everything, operations included
    tokens: tuple[str, ...] = _setting((), _strings)
    #: bearer tokens with the "send" scope: enqueue, and read back their own messages; each
    #: may be bound to the sender domains it may send from
    send_tokens: tuple[SendToken, ...] = _setting((), send_tokens)
    #: the web dashboard at / (admin tokens log in; without tokens, loopback clients only)
    dashboard: bool = _setting(True, _bool)
    # -- limits of the HTTP listener (docs/security.md) --
    #: a request's head (request line and headers) must arrive within this, else 408
    header_timeout: float = _setting(10.0, _timeout)
    #: how long a kept-alive connection may wait for its next request
    keep_alive: float = _setting(5.0, _timeout)
    #: a request body that stalls this long (no byte arriving) is dropped with 408
    body_timeout: float = _setting(30.0, _timeout)
    #: open connections at most (0: half the process's file descriptors, 64 to 1,000)
    max_connections: int = _setting(0, _int)
    #: bytes of request bodies read or worked on at once in the process (0: one largest batch
    #: and a message); past it a request gets 503 busy, unread
    max_request_bytes: int = _setting(0, _size)
    #: a dashboard login lasts this long, however it is used
    session_lifetime: float = _setting(43200.0, _timeout)


def _public_senders(http: HttpConfig) -> set[str]:
    """The sender domains of ``[http] send_tokens``. Read under a secret key they were
    remembered as secrets, but they are none: a relay's host name or an error holding one is
    shown as written (a token is masked still, even one written as a domain)."""
    tokens = {*http.tokens, *(token.token for token in http.send_tokens)}
    return {d for token in http.send_tokens for d in token.senders or ()} - tokens


@dataclass(frozen=True)
class SmtpConfig:
    listen: str = _setting("127.0.0.1:2587", _listen)
    trusted_networks: tuple[str, ...] = _setting(("127.0.0.0/8", "::1/128"), _networks)
    users: dict[str, str] = _setting({}, _users)  # noqa: RUF009 (a field())
    #: users bound to the sender domains they may send from (envelope and From header);
    #: users not named here may send from any domain
    user_senders: dict[str, tuple[str, ...]] = _setting({}, user_senders)  # noqa: RUF009
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


@dataclass(frozen=True)
class BouncesConfig:
    """Asynchronous bounces and complaints (docs/bounces.md): with a ``domain``, every
    recipient gets its own return path there (VERP) and serve listens for what comes back."""

    #: the return-path domain (its MX points at the listener); none: no VERP, no listener
    domain: str | None = _setting(None, _opt(_mail_domain))
    listen: str = _setting("127.0.0.1:2526", _listen)
    max_size: int = _setting(25 * 1000 * 1000, _size)
    #: a client idle this long, or one message's reading and recording, is cut off
    timeout: float = _setting(300.0, _timeout)
    max_connections: int = _setting(100, _positive_int)
    #: clients connected at once from one address (an IPv6 /64); the next is told 421
    max_connections_per_address: int = _setting(10, _positive_int)
    #: local parts at the domain taken without a token: a feedback loop's address ("fbl")
    report_addresses: tuple[str, ...] = _setting((), _strings)
    #: apply a report without a VERP token that the original's Message-ID matches (a message
    #: sent to that recipient alone); off: kept for review. A Message-ID is no proof: anyone
    #: who knows or guesses one could bounce or complain for its recipient
    match_message_id: bool = _setting(False, _bool)
    #: where a complaint suppresses its recipient: "sender-domain" (mail from the complained-
    #: about sender's domain) or "global" (all mail)
    complaint_scope: str = _setting("sender-domain", _choice("sender-domain", "global"))
    #: reports that matched no delivery are kept this long for a look (postlane feedback)
    unmatched_retention: float = _setting(30 * 86400.0, _duration)


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
    domains: tuple[str, ...] = _setting((), _strings)
    #: MX host suffixes that identify this provider
    mx_suffixes: tuple[str, ...] = _setting((), _strings)


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
    destinations: tuple[str, ...] = _setting((), _strings)
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
    #: a second signature beside the RSA one, Ed25519 (RFC 8463): its selector and PEM file
    #: (``postlane dkim keygen --algorithm ed25519``)
    ed25519_selector: str = _setting("", _str)
    ed25519_private_key: str = _setting("", _str)


@dataclass(frozen=True)
class Route:
    """``[[routes]]``: which relay a delivery goes through, by lane, sender domain or recipient
    domain (each narrows; globs allowed); the first matching route wins, else [delivery] relay."""

    lane: tuple[str, ...] = _setting((), _strings)
    sender_domain: tuple[str, ...] = _setting((), _strings)
    recipient_domain: tuple[str, ...] = _setting((), _strings)
    relay: str = _setting("", _relay, file=True)
    #: used while the relay (its destination) is paused
    fallback: str | None = _setting(None, _opt(_relay), file=True)


def _alert_interval(value: Any) -> float:
    seconds = _timeout(value)
    if seconds > 300.0:
        raise ValueError(
            f"expected at most 5m, got {value!r}: the rules' samples stand for 5 minutes (as "
            "Prometheus's lookback), so a longer interval would leave no rule firing"
        )
    return seconds


@dataclass(frozen=True)
class AlertsConfig:
    #: Alertmanager-compatible endpoint for firing and resolved alerts (none: log only)
    webhook: str | None = _setting(None, _opt(_http_url), file=True)
    #: how often serve records the history and evaluates the rules (at most 5 minutes: a
    #: sample stands for the present that long, as in Prometheus, so a longer gap would break
    #: every rule's ``for``)
    interval: float = _setting(60.0, _alert_interval)
    #: how long the recorded history (one row per lane per minute) is kept
    history: float = _setting(7 * 86400.0, _duration)


def _unsubscribe_lanes(value: Any) -> tuple[str, ...]:
    lanes = _strings(value)
    for lane in lanes:
        if lane not in _LANE_SECTIONS:
            raise ValueError(f"unknown lane {lane!r} (lanes are high, normal, low)")
    return tuple(dict.fromkeys(lanes))


@dataclass(frozen=True)
class UnsubscribeConfig:
    """One-click unsubscribe (RFC 8058, docs/unsubscribe.md): with a ``url``, mail in ``lanes``
    carries ``List-Unsubscribe: <url/TOKEN>`` and ``List-Unsubscribe-Post``, and serve answers
    ``POST /u/TOKEN``, which suppresses that recipient."""

    #: the public base of the links (the reverse proxy passes ``url/TOKEN`` to ``/u/TOKEN``);
    #: none: no unsubscribe headers, no endpoint
    url: str | None = _setting(None, _opt(_unsubscribe_url))
    #: the lanes whose mail carries the headers (bulk mail; never password resets)
    lanes: tuple[str, ...] = _setting(("low",), _unsubscribe_lanes)
    #: what an unsubscribe stops: "sender-domain" (mail from that message's sender domain) or
    #: "global" (all mail to the address)
    scope: str = _setting("sender-domain", _choice("sender-domain", "global"))


def parse_processes(value: Any) -> int:
    """``[serve] processes`` (and ``serve --processes``): a positive integer, or ``"auto"`` for
    one process per core."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (a container's)
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1
    if isinstance(value, str) and toml_values.is_decimal(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise toml_values.expected('a positive integer or "auto"', value)
    return value


@dataclass(frozen=True)
class ServeConfig:
    #: ``postlane serve`` processes sharing the ports and the store ("auto": one per core);
    #: above 1, a supervisor process starts them and restarts any that dies (docs/deploy.md)
    processes: int = _setting(1, parse_processes)


@dataclass(frozen=True)
class LogConfig:
    #: "text" (one readable line per event) or "json" (one JSON object per line)
    format: str = _setting("text", _choice("text", "json"))
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    #: one line per delivery attempt (id, domain, destination, class, code, duration)
    attempts: bool = _setting(True, _bool)
    #: the recipient in each attempt line: "none" (the domain only: the default), "hash"
    #: (a pseudonym: the first 16 hex digits of the SHA-256 of the lower-cased address, the
    #: same in every line) or "full" (the address)
    recipients: str = _setting("none", _choice("none", "hash", "full"))


_LANE_SECTIONS = tuple(lane.value for lane in Lane)


#: :attr:`Config.source` when no configuration file was read
NO_FILE = "built-in defaults"


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
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    unsubscribe: UnsubscribeConfig = field(default_factory=UnsubscribeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    destinations: dict[str, DestinationLimits] = field(default_factory=dict)
    shaping: tuple[ShapingRule, ...] = ()
    dkim: dict[str, DkimKey] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    #: ``[[webhooks.out]]``: the application's endpoints for signed event webhooks
    webhooks_out: tuple[WebhookEndpoint, ...] = ()
    #: ``[webhooks.ses]``, ``[webhooks.sendgrid]``, ...: the providers' signed event webhooks
    provider_webhooks: ProviderWebhooks = field(default_factory=ProviderWebhooks)
    #: where the configuration came from, for messages (:data:`NO_FILE` when no file)
    source: str = NO_FILE
    #: the directory relative paths are resolved against
    base_dir: Path = field(default_factory=Path.cwd)
    #: every secret the configuration holds (passwords, tokens, URL credentials, the contents
    #: of ``*_file`` keys), for :meth:`redact`
    secrets: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def from_file(self) -> bool:
        """Whether a configuration file was read (else the built-in defaults, and the store
        is a guess from the working directory)."""
        return self.source != NO_FILE

    def resolve_path(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def redact(self, text: str) -> str:
        """``text`` (an error message, a log line) with this configuration's secrets masked."""
        return redact(text, self.secrets)

    def __repr__(self) -> str:  # a traceback or a debug log may show it: no secret in it
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return self.redact(f"Config({shown})")


_SECTIONS: dict[str, type[Any]] = {
    "store": StoreConfig,
    "delivery": DeliveryConfig,
    "retry": RetryConfig,
    "http": HttpConfig,
    "smtp": SmtpConfig,
    "bounces": BouncesConfig,
    "throttle": ThrottleConfig,
    "alerts": AlertsConfig,
    "unsubscribe": UnsubscribeConfig,
    "log": LogConfig,
    "serve": ServeConfig,
}


#: environment variables postlane reads that are not keys of the file
_OTHER_VARIABLES = frozenset(
    {"POSTLANE_CONFIG", "POSTLANE_DEBUG", "POSTLANE_API_TOKEN", "POSTLANE_WORKER_METRICS"}
)
#: what Kubernetes (and Docker links) put in every pod's environment for a Service named
#: ``postlane-smtp`` and the like: never configuration
_SERVICE_LINK = re.compile(
    r"POSTLANE_[A-Z0-9_]*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)"
    r"(_(ADDR|PORT|PROTO))?)?)"
)
#: sections of named tables or arrays of tables: no environment form (``${VAR}`` in the file)
_TABLE_SECTIONS = ("destinations", "dkim", "routes", "shaping", "webhooks")


def _environment_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """The ``POSTLANE_*`` variables that set keys: {``"delivery"`` or ``"lanes.high"``: {key:
    (variable, text)}}. A variable naming a section without a key of it, a named table's
    section, or a near miss of a section (``POSTLANE_DELIVRY_RELAY``) is refused; others are
    not the configuration's (``POSTLANE_CONFIG``, the Django integration's, the tests')."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for variable, text in env.items():
        if not variable.startswith("POSTLANE_") or variable in _OTHER_VARIABLES:
            continue
        if _SERVICE_LINK.fullmatch(variable):
            continue  # Kubernetes' and Docker's links to a service named postlane-...
        word, _, key = variable[len("POSTLANE_") :].lower().partition("_")
        if word == "lanes":
            lane, _, key = key.partition("_")
            if lane not in _LANE_SECTIONS:
                raise ConfigError(f"unknown setting {variable} (lanes are high, normal, low)")
            section = f"lanes.{lane}"
        elif word in _SECTIONS:
            section = word
        elif word in _TABLE_SECTIONS:
            raise ConfigError(
                f"unknown setting {variable}: [{word}] tables cannot be set from the "
                f'environment; write them in the file, where "${{VAR}}" reads a variable '
                f'(e.g. rate = "${{GOOGLE_RATE}}")'
            )
        else:
            near = difflib.get_close_matches(
                word, [*_SECTIONS, "lanes", *_TABLE_SECTIONS], n=1, cutoff=0.8
            )
            if near:
                raise ConfigError(
                    f"unknown setting {variable} (there is no section [{word}]: "
                    f"POSTLANE_{near[0].upper()}_...?)"
                )
            continue
        if not key:
            raise ConfigError(f"unknown setting {variable} (POSTLANE_{word.upper()}_KEY)")
        found.setdefault(section, {})[key] = (variable, text)
    return found


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
            raise ConfigError(f"configuration file {chosen} {_missing(chosen)}")
    elif env.get("POSTLANE_CONFIG"):
        chosen = Path(env["POSTLANE_CONFIG"])
        if not chosen.is_file():
            raise ConfigError(
                f"configuration file {chosen} (from $POSTLANE_CONFIG) {_missing(chosen)}"
            )
    elif (cwd / "postlane.toml").is_file():
        chosen = cwd / "postlane.toml"
    data: dict[str, Any] = {}
    if chosen is not None:
        try:
            data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{chosen}: not a TOML file (not UTF-8 text)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {chosen}: {exc.strerror}") from None
    return config_from_dict(
        data,
        env=env,
        source=str(chosen) if chosen else NO_FILE,
        base_dir=(chosen.resolve().parent if chosen else cwd),
    )


def _missing(path: Path) -> str:
    """Why ``path`` is no configuration file."""
    return "is a directory, not a file" if path.is_dir() else "does not exist"


def config_from_dict(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str = NO_FILE,
    base_dir: Path | None = None,
) -> Config:
    """Build a :class:`Config` from an already-parsed TOML document (tests use this directly).
    ``env`` is the environment (``${VAR}`` and the ``POSTLANE_*`` overrides); none by default."""
    env = {} if env is None else env
    base_dir = base_dir or Path.cwd()
    reader: Reader | None = None
    try:
        reader = Reader(env, base_dir, _environment_overrides(env))
        reader.remember_tree(data)
        return _read(data, reader, source, base_dir)
    except ConfigError as exc:
        # the net under the readers' care: no secret met so far shows in the message
        secrets = reader.secrets if reader is not None else set()
        raise ConfigError(redact(exc.message, secrets)) from None


def _keep_bound_send_tokens(http: Any, overrides: Mapping[str, tuple[str, str]]) -> None:
    """The environment replaces a key of the file; for send tokens bound to sender domains
    that would silently unbind them (a deployment's secret variable re-opening what the file
    closed): refused, saying how to keep both."""
    tokens = http.get("send_tokens") if isinstance(http, Mapping) else None
    bound = isinstance(tokens, list) and any(isinstance(t, Mapping) for t in tokens)
    replacing = [
        overrides[key][0] for key in ("send_tokens", "send_tokens_file") if key in overrides
    ]
    if bound and replacing:
        raise ConfigError(
            f"{replacing[0]} would replace [http] send_tokens, whose tokens are bound to sender "
            'domains, and unbind them: give the token in the file instead, as token = "${VAR}"'
        )


def _read(data: Mapping[str, Any], reader: Reader, source: str, base_dir: Path) -> Config:
    tables = {"lanes", *_TABLE_SECTIONS}
    unknown = set(data) - set(_SECTIONS) - tables
    if unknown:
        known = ", ".join(sorted([*_SECTIONS, *tables]))
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (known sections: {known})")
    _keep_bound_send_tokens(data.get("http", {}), reader.overrides.get("http", {}))
    sections = {
        name: reader.section(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()
    }
    lanes_table = data.get("lanes", {})
    if not isinstance(lanes_table, Mapping):
        raise ConfigError("lanes: expected tables like [lanes.high]")
    for name in lanes_table:
        if name not in _LANE_SECTIONS:
            raise ConfigError(f"unknown lane [lanes.{name}] (lanes are high, normal, low)")
    lanes = {
        name: reader.section(LaneConfig, lanes_table.get(name, {}), f"lanes.{name}")
        for name in _LANE_SECTIONS
    }
    destinations = reader.tables_by_name(data, "destinations", DestinationLimits, "google")
    shaping = reader.array_of_tables(data, "shaping", ShapingRule, _check_shaping)
    dkim = {
        _dkim_domain(domain): key
        for domain, key in reader.tables_by_name(
            data, "dkim", DkimKey, '"example.com"', _check_dkim
        ).items()
    }
    routes = reader.array_of_tables(data, "routes", Route, _check_route)
    webhooks_out = _webhooks_out(data, reader)
    provider_webhooks = provider_webhooks_from_config(
        data.get("webhooks", {}), lambda table, where, keys: reader.resolved(table, where, keys)
    )
    api_token = reader.env.get("POSTLANE_API_TOKEN")
    if api_token:
        reader.remember("tokens", api_token)
        http: HttpConfig = sections["http"]
        sections["http"] = dataclasses.replace(http, tokens=(*http.tokens, api_token))
    smtp: SmtpConfig = sections["smtp"]
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError("smtp.tls_cert and smtp.tls_key must be set together")
    for user in smtp.user_senders:
        if user not in smtp.users:
            near = difflib.get_close_matches(user, list(smtp.users), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(
                f"smtp.user_senders: {user} is not one of smtp.users{hint}: bind the users that "
                "log in"
            )
    return Config(
        **sections,
        lanes=lanes,
        destinations=destinations,
        shaping=shaping,
        dkim=dkim,
        routes=routes,
        webhooks_out=webhooks_out,
        provider_webhooks=provider_webhooks,
        source=source,
        base_dir=base_dir,
        secrets=frozenset(reader.secrets - _public_senders(sections["http"])),
    )


#: the tables ``[webhooks]`` may hold
_WEBHOOK_TABLES = ("out", *PROVIDERS)


def _webhooks_out(data: Mapping[str, Any], reader: Reader) -> tuple[WebhookEndpoint, ...]:
    """``[[webhooks.out]]`` tables: each value's ``${VAR}`` expanded, ``secret_file`` read
    (and the secret remembered, so no error shows it), then checked as an endpoint."""
    section = data.get("webhooks", {})
    if not isinstance(section, Mapping):
        raise ConfigError("webhooks: expected tables like [[webhooks.out]]")
    unknown = sorted(set(section) - set(_WEBHOOK_TABLES))
    if unknown:
        raise ConfigError(
            f"unknown table [webhooks.{unknown[0]}] (known: {', '.join(_WEBHOOK_TABLES)})"
        )
    entries = section.get("out", [])
    if not isinstance(entries, list):
        raise ConfigError("webhooks.out: expected [[webhooks.out]] tables")
    tables = []
    for number, table in enumerate(entries, 1):
        where = f"webhooks.out[{number}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table ([[webhooks.out]]), got {table!r}")
        tables.append(reader.resolved(table, where, ("secret",)))
    return endpoints_from_config(tables, "webhooks.out")


def _check_shaping(rule: ShapingRule, where: str) -> None:
    if rule.match is None and rule.enhanced is None:
        raise ConfigError(f"{where}: give match (a regex) or enhanced (a code)")


def _dkim_domain(name: str) -> str:
    """The domain a ``[dkim."DOMAIN"]`` table signs for, lower-cased (a typo signs nothing)."""
    try:
        _mail_domain(name.encode("idna").decode("ascii"))
    except (ValueError, UnicodeError):
        raise ConfigError(
            f'[dkim."{name}"]: {name!r} is not a domain name (the table is [dkim."example.com"])'
        ) from None
    return name.lower()


def _check_dkim(key: DkimKey, where: str) -> None:
    if not key.selector or not key.private_key:
        raise ConfigError(f"{where}: give selector and private_key")
    if bool(key.ed25519_selector) != bool(key.ed25519_private_key):
        raise ConfigError(f"{where}: give ed25519_selector and ed25519_private_key, or neither")


def _check_route(route: Route, where: str) -> None:
    if not route.relay:
        raise ConfigError(f"{where}: give relay (where this route's mail goes)")
    for lane in route.lane:
        if lane not in _LANE_SECTIONS:
            raise ConfigError(f"{where}.lane: unknown lane {lane!r}")
