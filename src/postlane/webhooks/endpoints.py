"""Outbound webhook endpoints as the configuration gives them: ``[[webhooks.out]]`` tables.

::

    [[webhooks.out]]
    url = "https://app.example.com/hooks/mail"
    secret = "whsec_..."          # or a list: the first signs, all are sent (key rotation)
    events = ["sent", "bounced", "complained", "dead"]   # default: all
    allow_private = false         # true to post to loopback/private addresses
    name = "app"                  # default: from the URL's host and path
    timeout = "15s"               # per request
    concurrency = 8               # requests in flight to this endpoint

Every mistake is a :class:`~postlane.errors.ConfigError` naming the key
(``webhooks.out[1].secret: ...``), raised when the configuration is read, not at the first event.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from postlane import toml_values
from postlane.errors import ConfigError, NotFound
from postlane.events import EVENT_TYPES
from postlane.webhooks.addresses import literal_address_refusal

SECRET_PREFIX = "whsec_"
#: the Standard Webhooks specification: "Random. At least 24 bytes (192 bits, 512 maximum)"
SECRET_BYTES = (24, 64)
#: recommended by the specification: "somewhere between 15 and 30s"
DEFAULT_TIMEOUT = 15.0
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 64
KEYS = ("url", "secret", "events", "allow_private", "name", "timeout", "concurrency")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_secret() -> str:
    """A fresh signing secret as the specification serializes it (32 random bytes)."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def parse_secret(text: str) -> bytes:
    """``whsec_<base64>`` -> the key bytes. Raises ValueError saying what is wrong."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(
            f'expected "{SECRET_PREFIX}" followed by base64 (the Standard Webhooks format); '
            "make one with: python -c \"import base64, os; print('whsec_' + "
            'base64.b64encode(os.urandom(32)).decode())"'
        )
    encoded = text[len(SECRET_PREFIX) :].strip()
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not valid base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(
            f"the key is {len(key)} bytes; the specification asks for {low} to {high} random "
            "bytes (32 is a good choice)"
        )
    return key


def _secrets(value: Any) -> tuple[bytes, ...]:
    if isinstance(value, str):
        return (parse_secret(value),)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(parse_secret(item) for item in value)
    raise ValueError(
        'expected "whsec_..." or a list of them (the first signs; the others are still sent '
        "while receivers move to the new one)"
    )


def _events(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise toml_values.expected("a list of event types", value)
    if not value:
        raise ValueError("expected at least one event type (leave the key out for all)")
    unknown = sorted(set(value) - set(EVENT_TYPES))
    if unknown:
        raise ValueError(f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})")
    return frozenset(value)


def _timeout(value: Any) -> float:
    seconds = toml_values.duration(value)
    if seconds <= 0:
        raise toml_values.expected("a duration above zero", value)
    return seconds


_concurrency = toml_values.integer_where(
    lambda n: 0 < n <= MAX_CONCURRENCY, f"an integer from 1 to {MAX_CONCURRENCY}"
)


@dataclass(frozen=True)
class URLParts:
    """What a request to the endpoint needs from its URL."""

    scheme: str
    host: str
    port: int
    #: the request target: path and query
    target: str
    #: the Host header (the port only when it is not the scheme's own)
    authority: str


def check_url(url: str, allow_private: bool) -> URLParts:
    """Parse and check an endpoint URL. Raises ValueError saying what is wrong."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError(f"spaces and control characters have no place in a URL: {url!r}")
    if not url.isascii():
        raise ValueError(
            f"write the URL in ASCII (the host in punycode, the path percent-encoded): {url!r}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"the URL names no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "credentials do not belong in the URL (they would show in logs); the signature "
            "tells the receiver the request comes from postlane"
        )
    if parts.fragment:
        raise ValueError(f"a URL fragment (#...) is never sent: {url!r}")
    refused = literal_address_refusal(host, allow_private)
    if refused is not None:
        raise ValueError(
            f"{refused}: webhooks go to public addresses only (allow_private = true allows "
            "loopback and private addresses, e.g. an application on this host)"
        )
    default_port = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    return URLParts(
        scheme=scheme,
        host=host,
        port=port or default_port,
        target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        authority=shown if port in (None, default_port) else f"{shown}:{port}",
    )


def derived_name(url: str) -> str:
    """An endpoint's default name, from its URL's host and path:
    ``https://app.example.com/hooks/mail`` -> ``app.example.com-hooks-mail``."""
    parts = urlsplit(url)
    text = f"{parts.hostname or ''}-{parts.port or ''}-{parts.path}".lower()
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.")[:64] or "webhook"


@dataclass(frozen=True)
class WebhookEndpoint:
    """One ``[[webhooks.out]]`` table, checked."""

    name: str
    url: str
    #: signing keys, the current one first (never shown: not in repr)
    secrets: tuple[bytes, ...] = field(repr=False)
    #: the event types it receives
    events: frozenset[str] = frozenset(EVENT_TYPES)
    allow_private: bool = False
    #: seconds for one request, connecting included
    timeout: float = DEFAULT_TIMEOUT
    #: requests in flight at once (events of one message are always sent one after another)
    concurrency: int = DEFAULT_CONCURRENCY

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ConfigError(f"webhook endpoint {self.name}: give a secret")
        try:
            self.parts  # noqa: B018 (checks the URL now, not at the first event)
        except ValueError as exc:
            raise ConfigError(f"webhook endpoint {self.name}: {exc}") from None

    @cached_property
    def parts(self) -> URLParts:
        return check_url(self.url, self.allow_private)

    def wants(self, event_type: str) -> bool:
        return event_type in self.events

    def as_json(self) -> dict[str, Any]:
        """What an operator sees (never the secret)."""
        return {
            "name": self.name,
            "url": self.url,
            "events": [t for t in EVENT_TYPES if t in self.events],
            "allow_private": self.allow_private,
            "timeout_seconds": self.timeout,
            "concurrency": self.concurrency,
        }

    @classmethod
    def from_table(cls, table: Any, where: str = "webhooks.out") -> WebhookEndpoint:
        """Read one ``[[webhooks.out]]`` table; :class:`ConfigError` naming the key."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table ([[webhooks.out]]), got {table!r}")
        for key in table:
            if key not in KEYS:
                raise ConfigError(
                    f"unknown key {where}.{key} (known keys in [[webhooks.out]]: "
                    f"{', '.join(sorted(KEYS))})"
                )
        for key in ("url", "secret"):
            if key not in table:
                raise ConfigError(f"{where}: give {key}")

        def read(key: str, reader: Any, default: Any) -> Any:
            if key not in table:
                return default
            try:
                return reader(table[key])
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None

        allow_private = read("allow_private", toml_values.boolean, False)
        url = read("url", toml_values.string, "")
        read("url", lambda value: check_url(value, allow_private), None)
        name = read("name", toml_values.string, None)
        if name is not None and not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}.name: expected letters, digits, '.', '_' or '-' (at most 64, starting "
                f"with a letter or digit), got {name!r}"
            )
        return cls(
            name=name or derived_name(url),
            url=url,
            secrets=read("secret", _secrets, ()),
            events=read("events", _events, frozenset(EVENT_TYPES)),
            allow_private=allow_private,
            timeout=read("timeout", _timeout, DEFAULT_TIMEOUT),
            concurrency=read("concurrency", _concurrency, DEFAULT_CONCURRENCY),
        )


def endpoints_from_config(entries: Any, where: str = "webhooks.out") -> tuple[WebhookEndpoint, ...]:
    """Every ``[[webhooks.out]]`` table (``entries`` is the TOML array), checked, names unique."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: expected [[webhooks.out]] tables")
    endpoints: list[WebhookEndpoint] = []
    for number, table in enumerate(entries, 1):
        endpoint = WebhookEndpoint.from_table(table, f"{where}[{number}]")
        for earlier in endpoints:
            if earlier.name == endpoint.name:
                raise ConfigError(
                    f"{where}[{number}]: another endpoint is already named {endpoint.name!r}; "
                    "give each a distinct name (its place in the event log is kept by name)"
                )
        endpoints.append(endpoint)
    return tuple(endpoints)


def endpoint_named(endpoints: Sequence[WebhookEndpoint], name: str) -> WebhookEndpoint:
    """The configured endpoint called ``name``; :class:`~postlane.errors.NotFound` otherwise."""
    for endpoint in endpoints:
        if endpoint.name == name:
            return endpoint
    known = ", ".join(e.name for e in endpoints) or "none is configured"
    raise NotFound(f"no webhook endpoint is named {name!r} (known: {known})")
