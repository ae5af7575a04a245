"""A Django email backend: ``send_mail``, ``EmailMessage`` and ``EmailMultiAlternatives`` go
through postlane's durable queue instead of a blocking SMTP conversation in the request::

    # settings.py
    EMAIL_BACKEND = "postlane.django.EmailBackend"

Where a message goes, by settings (see docs/frameworks.md):

- default: a postlane store on this host, ``postlane.Postlane(config_path=POSTLANE_CONFIG)``,
  opened once per process and shared by its threads;
- ``POSTLANE_URL`` (and ``POSTLANE_TOKEN``, ``POSTLANE_TIMEOUT``): a postlane server over HTTP,
  through :class:`postlane.Client` (which retries safely);
- ``POSTLANE_OUTBOX = True``: into postlane's tables *inside the current database transaction*
  of ``DATABASES[POSTLANE_OUTBOX_DATABASE]`` (PostgreSQL), with
  :func:`postlane.outbox.enqueue_in_transaction_sync`: the mail commits, or rolls back, with
  the request's own writes.

Django renders the MIME message itself (so everything Django can express survives: attachments,
alternatives, cc, reply-to, extra headers, encodings); postlane gets those bytes with the
envelope: the sender ``from_email`` and the recipients to + cc + bcc. Bcc never appears in the
headers. Per message, the headers ``X-Postlane-Lane``, ``X-Postlane-Idempotency-Key``,
``X-Postlane-Metadata`` (a JSON object), ``X-Postlane-Send-At`` and ``X-Postlane-Expires-At``
(ISO 8601 with a zone, or Unix seconds) choose the lane, the idempotency key, the metadata and
the schedule;
they are removed before the message is stored. ``POSTLANE_DEFAULT_LANE`` is the lane otherwise.

``send_messages`` returns how many messages postlane accepted (a duplicate idempotency key
counts: that message is queued already) and sets ``message.postlane_id`` on each. With
``fail_silently``, postlane's errors (a refused message, an unreachable server) are swallowed;
database errors in outbox mode never are, since they concern the caller's transaction.

What happens to the mail afterwards (queued, sent, bounced, ...) reaches the application as
Django signals, :data:`postlane.django.signals.mail_event` and one signal per event type, sent by
``manage.py postlane_events [--follow]`` (add ``"postlane.django"`` to ``INSTALLED_APPS``) or in
process by :func:`postlane.django.events.connect_subscribers` (:mod:`postlane.django.events`).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.mail.backends.base import BaseEmailBackend  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]

from postlane.config import Config, load_config
from postlane.django.signals import mail_event
from postlane.errors import ConfigError, NotFound, PostlaneError, ValidationError
from postlane.message import Message, parse_lane
from postlane.records import EnqueueResult

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "LANE_HEADER",
    "METADATA_HEADER",
    "EmailBackend",
    "mail_event",
    "reset",
    "to_postlane_message",
]

LANE_HEADER = "X-Postlane-Lane"
IDEMPOTENCY_KEY_HEADER = "X-Postlane-Idempotency-Key"
METADATA_HEADER = "X-Postlane-Metadata"
#: ISO 8601 with a zone, or Unix seconds (docs/scheduling.md)
SEND_AT_HEADER = "X-Postlane-Send-At"
EXPIRES_AT_HEADER = "X-Postlane-Expires-At"
#: headers that steer postlane: read, then removed before the message is stored
_CONTROL_NAMES = (
    LANE_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    METADATA_HEADER,
    SEND_AT_HEADER,
    EXPIRES_AT_HEADER,
)
_CONTROL_HEADERS = frozenset(name.lower() for name in _CONTROL_NAMES)
#: never in what recipients see (Django leaves Bcc out, but an app may put it in ``headers=``)
_STRIPPED = (*_CONTROL_NAMES, "Bcc")


# -- converting a Django message -----------------------------------------------------------------


def to_postlane_message(email: Any, default_lane: str = "normal") -> Message:
    """A postlane :class:`~postlane.Message` from a Django ``EmailMessage`` (or a subclass):
    Django's own rendering as ``raw``, the envelope from ``from_email`` and ``recipients()``,
    lane, idempotency key and metadata from the ``X-Postlane-*`` headers (which are removed).
    Raises :class:`~postlane.ValidationError` for a bad lane or metadata header."""
    controls: dict[str, str] = {}
    for name, value in (email.extra_headers or {}).items():
        lowered = str(name).lower()
        if lowered in _CONTROL_HEADERS:
            controls[lowered] = str(value)
        elif lowered.startswith("x-postlane-"):
            # a typo must not send mail in the wrong lane, nor show the header to recipients
            raise ValidationError(
                f"unknown control header {name} (known: {', '.join(_CONTROL_NAMES)})",
                field="headers",
            )
    mime = email.message()
    for name in _STRIPPED:
        del mime[name]
    metadata: dict[str, Any] | None = None
    if METADATA_HEADER.lower() in controls:
        try:
            metadata = json.loads(controls[METADATA_HEADER.lower()])
        except ValueError as exc:
            raise ValidationError(
                f"{METADATA_HEADER} is not JSON: {exc}", field="metadata"
            ) from None
        if not isinstance(metadata, dict):
            raise ValidationError(f"{METADATA_HEADER} must be a JSON object", field="metadata")
    lane = controls.get(LANE_HEADER.lower(), "").strip() or default_lane
    key = controls.get(IDEMPOTENCY_KEY_HEADER.lower(), "").strip() or None
    return Message(
        sender=email.from_email or "",
        to=list(email.recipients()),
        raw=mime.as_bytes(),
        lane=parse_lane(lane),
        idempotency_key=key,
        metadata=metadata,
        send_at=controls.get(SEND_AT_HEADER.lower(), "").strip() or None,
        expires_at=controls.get(EXPIRES_AT_HEADER.lower(), "").strip() or None,
    )


# -- where messages go ---------------------------------------------------------------------------


class _Sender(Protocol):
    def send(self, message: Message) -> EnqueueResult: ...

    def close(self) -> None: ...


class _LocalSender:
    """A postlane store on this host (the sync :class:`~postlane.Postlane`, thread-safe)."""

    def __init__(self, config: Config | str | None) -> None:
        from postlane.blocking import Postlane

        if isinstance(config, Config):
            self.postlane = Postlane(config)
        else:
            self.postlane = Postlane(config_path=config)

    def send(self, message: Message) -> EnqueueResult:
        return self.postlane.send(message)

    def close(self) -> None:
        self.postlane.close()


class _HttpSender:
    """A postlane server over HTTP, through :class:`postlane.Client` (thread-safe)."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        from postlane.client import Client

        self.client = Client(url, token=token, timeout=timeout)

    def send(self, message: Message) -> EnqueueResult:
        return self.client.send(message)

    def close(self) -> None:
        self.client.close()


class _OutboxSender:
    """postlane's tables in Django's own PostgreSQL database, written in the caller's current
    transaction (a new connection per thread is Django's; nothing here is shared)."""

    def __init__(self, alias: str, config: Config) -> None:
        from postlane.store.postgres import split_schema

        if not config.store.url.startswith(("postgresql://", "postgres://")):
            raise ImproperlyConfigured(
                "POSTLANE_OUTBOX = True needs postlane's store.url to be the PostgreSQL "
                f"database of DATABASES[{alias!r}] (it is {config.store.url.split(':')[0]}://"
                f"... in {config.source}): otherwise no worker would ever see the mail"
            )
        conninfo, self.schema = split_schema(config.store.url)
        self.alias = alias
        self.max_size = config.smtp.max_size
        self.dbname = _dbname(conninfo)

    def send(self, message: Message) -> EnqueueResult:
        import psycopg
        from django.db import connections  # type: ignore[import-untyped]

        from postlane.outbox import enqueue_in_transaction_sync

        connection = connections[self.alias]
        if connection.vendor != "postgresql":
            raise ImproperlyConfigured(
                f"POSTLANE_OUTBOX = True needs DATABASES[{self.alias!r}] to be PostgreSQL "
                f"(it is {connection.vendor})"
            )
        connection.ensure_connection()
        raw = connection.connection
        if not isinstance(raw, psycopg.Connection):
            raise ImproperlyConfigured(
                "POSTLANE_OUTBOX = True needs Django's PostgreSQL backend on psycopg 3 "
                f"(found {type(raw).__module__}.{type(raw).__name__})"
            )
        if self.dbname and raw.info.dbname != self.dbname:
            raise ImproperlyConfigured(
                f"POSTLANE_OUTBOX: DATABASES[{self.alias!r}] is the database "
                f"{raw.info.dbname!r} but postlane's store.url names {self.dbname!r}: the "
                "workers would never see the mail"
            )
        return enqueue_in_transaction_sync(raw, message, schema=self.schema, max_size=self.max_size)

    def close(self) -> None:
        return None


def _dbname(conninfo: str) -> str | None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        name = conninfo_to_dict(conninfo).get("dbname")
    except Exception:  # libpq's parser; an unparsable URL fails loudly at the first enqueue
        return None
    return str(name) if name else None


# One sender per process and configuration: opening a store (or an HTTP connection pool) for
# every message would be slow, and the senders are thread-safe. The pid is part of the key so
# that a process forked after the first send (a pre-forking server) opens its own.
_senders: dict[tuple[Any, ...], _Sender] = {}
_senders_lock = threading.Lock()


def _shared(key: tuple[Any, ...], build: Callable[[], _Sender]) -> _Sender:
    key = (os.getpid(), *key)
    with _senders_lock:
        sender = _senders.get(key)
        if sender is None:
            sender = _senders[key] = build()
        return sender


def reset() -> None:
    """Close and forget this process's shared postlane stores and clients. Called when a
    ``POSTLANE_*`` setting changes (``override_settings`` in tests) and at exit."""
    with _senders_lock:
        senders = [s for key, s in _senders.items() if key[0] == os.getpid()]
        _senders.clear()
    for sender in senders:
        sender.close()


atexit.register(reset)


def _on_setting_changed(*, setting: str, **_: Any) -> None:
    if setting.startswith("POSTLANE_"):
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="postlane.django.reset")


def _config_setting() -> Config | str | None:
    value = getattr(settings, "POSTLANE_CONFIG", None)
    if value is None or isinstance(value, Config):
        return value
    if isinstance(value, str | Path):
        return str(value) or None
    raise ImproperlyConfigured("POSTLANE_CONFIG must be a path or a postlane.Config")


def _sender() -> _Sender:
    """The sender the settings choose (see the module docstring)."""
    config = _config_setting()
    url = getattr(settings, "POSTLANE_URL", None)
    if getattr(settings, "POSTLANE_OUTBOX", False):
        if url:
            raise ImproperlyConfigured("set POSTLANE_OUTBOX or POSTLANE_URL, not both")
        alias = getattr(settings, "POSTLANE_OUTBOX_DATABASE", "default")
        return _shared(
            ("outbox", alias, id(config) if isinstance(config, Config) else config),
            lambda: _OutboxSender(alias, _load(config)),
        )
    if url:
        token = getattr(settings, "POSTLANE_TOKEN", None)
        try:
            timeout = float(getattr(settings, "POSTLANE_TIMEOUT", 10))
        except (TypeError, ValueError):
            raise ImproperlyConfigured("POSTLANE_TIMEOUT must be a number of seconds") from None
        return _shared(("http", url, token, timeout), lambda: _HttpSender(url, token, timeout))
    key = id(config) if isinstance(config, Config) else config
    return _shared(("local", key), lambda: _LocalSender(config))


def _load(config: Config | str | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]
    """Django's ``EMAIL_BACKEND``, sending through postlane (see the module docstring)."""

    def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Hand each message to postlane; returns how many were accepted (stored)."""
        if not email_messages:
            return 0
        default_lane = getattr(settings, "POSTLANE_DEFAULT_LANE", None) or "normal"
        try:
            parse_lane(default_lane)
        except ValidationError as exc:
            raise ImproperlyConfigured(f"POSTLANE_DEFAULT_LANE: {exc.message}") from None
        try:
            sender = _sender()
        except PostlaneError as exc:
            if self.fail_silently and not isinstance(exc, ConfigError):
                return 0
            raise  # a wrong configuration is never silent
        accepted = 0
        for email in email_messages:
            if not email.recipients():
                continue  # as Django's SMTP backend: nothing to send
            try:
                result = sender.send(to_postlane_message(email, default_lane))
            except PostlaneError as exc:
                if self.fail_silently and not _misconfigured(exc):
                    continue
                raise
            email.postlane_id = result.id
            accepted += 1
        return accepted


def _misconfigured(exc: PostlaneError) -> bool:
    """An error that says the settings are wrong, never the message: it is never silent (a
    wrong token, a URL that reaches no postlane route, a configuration error)."""
    return isinstance(exc, (ConfigError, NotFound)) or exc.code in ("unauthorized", "forbidden")
