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

A wrong setting raises :class:`SettingsError`, which is both postlane's
:class:`~postlane.ConfigError` and Django's ``ImproperlyConfigured`` and names the setting to fix
(``POSTLANE_URL``, ``POSTLANE_TOKEN``, ``POSTLANE_CONFIG``, ...); ``fail_silently`` never hides it.

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
import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.mail.backends.base import BaseEmailBackend  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]

from postlane.config import Config, load_config
from postlane.django.signals import mail_event
from postlane.errors import (
    ConfigError,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.message import Message, parse_lane
from postlane.records import EnqueueResult

if TYPE_CHECKING:
    import psycopg

    from postlane.blocking import Postlane
    from postlane.client import Client

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "LANE_HEADER",
    "METADATA_HEADER",
    "EmailBackend",
    "SettingsError",
    "cancel",
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
#: the error codes of a server that refuses the token (its JSON code, or the bare status of a
#: proxy in front of it)
_TOKEN_REFUSED = frozenset({"unauthorized", "forbidden", "http_401", "http_403"})


# -- the settings --------------------------------------------------------------------------------


class SettingsError(ConfigError, ImproperlyConfigured):  # type: ignore[misc]
    """A ``POSTLANE_*`` setting that is wrong: malformed, naming nothing, or refused by the
    server it points at (a token answered with 401 or 403). It is postlane's
    :class:`~postlane.ConfigError` (so a :class:`~postlane.PostlaneError`) and Django's
    ``ImproperlyConfigured`` alike, so either ``except`` catches it; the message names the
    setting, and :attr:`setting` holds it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def token_refused(exc: PostlaneError, setting: str, hint: str = "") -> SettingsError | None:
    """The server's refusal of the token in ``setting`` as a :class:`SettingsError` (a 401 or
    403 says the settings are wrong, not the request), or None for any other error."""
    if exc.code not in _TOKEN_REFUSED:
        return None
    return SettingsError(setting, f"{setting}: {exc.message}{hint}")


def timeout_setting() -> float:
    """``POSTLANE_TIMEOUT``, the seconds each HTTP try may take (10)."""
    value = getattr(settings, "POSTLANE_TIMEOUT", None)
    if value is None:
        return 10.0
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):  # NaN fails both
        raise SettingsError(
            "POSTLANE_TIMEOUT",
            f"POSTLANE_TIMEOUT must be a number of seconds above 0, got {value!r}",
        )
    return timeout


def http_client(url: str, token: str | None, timeout: float, **options: Any) -> Client:
    """The :class:`postlane.Client` of ``POSTLANE_URL`` (``options`` are the client's own); a
    URL it refuses (no ``http://``, ``/v1`` at the end) is a :class:`SettingsError` naming the
    setting."""
    from postlane.client import Client

    try:
        return Client(url, token=token, timeout=timeout, **options)
    except ConfigError as exc:
        raise SettingsError("POSTLANE_URL", f"POSTLANE_URL: {exc.message}") from None


def open_local(config: Config | str | None) -> Postlane:
    """The postlane of ``POSTLANE_CONFIG`` (a :class:`~postlane.config.Config`, a path, or None:
    ``$POSTLANE_CONFIG``, else ``./postlane.toml``), opened. A configuration file names its
    store, which is made when missing; with none found, the store must exist already, since a
    new queue in the working directory would wait for a worker that never comes. Either
    mistake is a :class:`SettingsError` naming ``POSTLANE_CONFIG``: the store's own message
    names the command line's ways (``--config``), not Django's."""
    from postlane.blocking import Postlane

    try:
        if isinstance(config, Config):
            return Postlane(config)
        return Postlane(config_path=config)
    except ConfigError as exc:
        raise SettingsError("POSTLANE_CONFIG", f"POSTLANE_CONFIG: {exc.message}") from None
    except StoreUnavailable:
        missing = _missing_queue(config)
        if missing is None:
            raise
        raise SettingsError(
            "POSTLANE_CONFIG",
            f"there is no queue at {missing}, and no configuration names one (POSTLANE_CONFIG "
            f"is not set, nor $POSTLANE_CONFIG, and there is no {Path.cwd() / 'postlane.toml'}): "
            'set POSTLANE_CONFIG = "/path/to/postlane.toml" in the Django settings, the file '
            "postlane serve runs with",
        ) from None


def _missing_queue(config: Config | str | None) -> Path | None:
    """The SQLite file postlane guessed, and did not find, when no configuration file was
    found (None: the store failed for another reason)."""
    from postlane.store import sqlite_path

    if config is not None:
        return None
    loaded = load_config(None)
    if loaded.from_file or not loaded.store.url.startswith("sqlite://"):
        return None
    path = sqlite_path(loaded.store.url, loaded.base_dir)
    return None if path.exists() else path


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

    def cancel(self, queue_id: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _LocalSender:
    """A postlane store on this host (the sync :class:`~postlane.Postlane`, thread-safe)."""

    def __init__(self, config: Config | str | None) -> None:
        self.postlane = open_local(config)

    def send(self, message: Message) -> EnqueueResult:
        return self.postlane.send(message)

    def cancel(self, queue_id: str) -> dict[str, Any]:
        return self.postlane.cancel(queue_id).as_json()

    def close(self) -> None:
        self.postlane.close()


class _HttpSender:
    """A postlane server over HTTP, through :class:`postlane.Client` (thread-safe)."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.client = http_client(url, token, timeout)
        self.url = url

    def send(self, message: Message) -> EnqueueResult:
        try:
            return self.client.send(message)
        except NotFound as exc:
            # a path in front of /v1/messages that is not postlane's: no message is at fault
            raise SettingsError(
                "POSTLANE_URL", f"POSTLANE_URL: {self.url} reaches no postlane: {exc.message}"
            ) from None
        except PostlaneError as exc:
            refused = token_refused(exc, "POSTLANE_TOKEN")
            if refused is None:
                raise
            raise refused from None

    def cancel(self, queue_id: str) -> dict[str, Any]:
        return self.client.cancel(queue_id)

    def close(self) -> None:
        self.client.close()


class _OutboxSender:
    """postlane's tables in Django's own PostgreSQL database, written in the caller's current
    transaction (a new connection per thread is Django's; nothing here is shared)."""

    def __init__(self, alias: str, config: Config) -> None:
        from postlane.store.postgres import split_schema

        if not config.store.url.startswith(("postgresql://", "postgres://")):
            raise SettingsError(
                "POSTLANE_OUTBOX",
                "POSTLANE_OUTBOX = True needs postlane's store.url to be the PostgreSQL "
                f"database of DATABASES[{alias!r}] (it is {config.store.url.split(':')[0]}://"
                f"... in {config.source}): otherwise no worker would ever see the mail",
            )
        conninfo, self.schema = split_schema(config.store.url)
        self.alias = alias
        self.max_size = config.smtp.max_size
        self.dbname = _dbname(conninfo)

    def send(self, message: Message) -> EnqueueResult:
        from postlane.outbox import enqueue_in_transaction_sync

        with self._tables("then send again"):
            return enqueue_in_transaction_sync(
                self._connection(), message, schema=self.schema, max_size=self.max_size
            )

    def cancel(self, queue_id: str) -> dict[str, Any]:
        """On the caller's connection too: a cancel sees the mail its transaction sent, and
        a rollback undoes it, as it undoes a send."""
        from postlane.outbox import cancel_in_transaction_sync

        with self._tables("then cancel again"):
            cancelled = cancel_in_transaction_sync(self._connection(), queue_id, schema=self.schema)
        return cancelled.as_json()

    def _connection(self) -> psycopg.Connection[Any]:
        """The psycopg connection of Django's database, checked to be postlane's."""
        import psycopg
        from django.db import connections  # type: ignore[import-untyped]

        connection = connections[self.alias]
        if connection.vendor != "postgresql":
            raise SettingsError(
                "POSTLANE_OUTBOX_DATABASE",
                f"POSTLANE_OUTBOX = True needs DATABASES[{self.alias!r}] "
                f"(POSTLANE_OUTBOX_DATABASE) to be PostgreSQL (it is {connection.vendor})",
            )
        connection.ensure_connection()
        raw = connection.connection
        if not isinstance(raw, psycopg.Connection):
            raise SettingsError(
                "POSTLANE_OUTBOX",
                "POSTLANE_OUTBOX = True needs Django's PostgreSQL backend on psycopg 3 "
                f"(found {type(raw).__module__}.{type(raw).__name__})",
            )
        if self.dbname and raw.info.dbname != self.dbname:
            raise SettingsError(
                "POSTLANE_OUTBOX_DATABASE",
                f"POSTLANE_OUTBOX: DATABASES[{self.alias!r}] (POSTLANE_OUTBOX_DATABASE) is the "
                f"database {raw.info.dbname!r} but postlane's store.url names {self.dbname!r}: "
                "the workers would never see the mail",
            )
        return raw

    @contextlib.contextmanager
    def _tables(self, then: str) -> Iterator[None]:
        """postlane's tables missing (a schema no postlane opened) as a SettingsError."""
        import psycopg

        from postlane.outbox import missing_tables

        try:
            yield
        except psycopg.errors.UndefinedTable as exc:
            raise SettingsError(
                "POSTLANE_OUTBOX",
                f"POSTLANE_OUTBOX: {missing_tables(self.schema)} ({then}: this transaction failed)",
            ) from exc

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


def cancel(queue_id: str) -> dict[str, Any]:
    """Cancel what of a message has not gone yet (``message.postlane_id``: a scheduled
    reminder no longer wanted), through the postlane the settings choose: ``{"id",
    "cancelled", "left"}``, how many recipients were removed and those it left (already sent,
    or being sent at that moment) with their states; see docs/scheduling.md. Raises
    :class:`~postlane.NotFound` for a message that does not exist (or, over HTTP with a send
    token, that this application did not send)."""
    return _sender().cancel(queue_id)


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
    raise SettingsError(
        "POSTLANE_CONFIG",
        f"POSTLANE_CONFIG must be a path or a postlane.Config, got {type(value).__name__}",
    )


def _sender() -> _Sender:
    """The sender the settings choose (see the module docstring)."""
    config = _config_setting()
    url = getattr(settings, "POSTLANE_URL", None)
    if getattr(settings, "POSTLANE_OUTBOX", False):
        if url:
            raise SettingsError("POSTLANE_URL", "set POSTLANE_OUTBOX or POSTLANE_URL, not both")
        alias = getattr(settings, "POSTLANE_OUTBOX_DATABASE", "default")
        return _shared(
            ("outbox", alias, id(config) if isinstance(config, Config) else config),
            lambda: _OutboxSender(alias, _load(config)),
        )
    if url:
        token = getattr(settings, "POSTLANE_TOKEN", None)
        timeout = timeout_setting()
        return _shared(("http", url, token, timeout), lambda: _HttpSender(url, token, timeout))
    key = id(config) if isinstance(config, Config) else config
    return _shared(("local", key), lambda: _LocalSender(config))


def _load(config: Config | str | None) -> Config:
    if isinstance(config, Config):
        return config
    try:
        return load_config(config)
    except ConfigError as exc:
        raise SettingsError("POSTLANE_CONFIG", f"POSTLANE_CONFIG: {exc.message}") from None


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
            raise SettingsError(
                "POSTLANE_DEFAULT_LANE", f"POSTLANE_DEFAULT_LANE: {exc.message}"
            ) from None
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
                # wrong settings (a refused token, a URL that reaches no postlane) are a
                # SettingsError by now, a ConfigError: never silent, unlike a refused message
                if self.fail_silently and not isinstance(exc, ConfigError):
                    continue
                if isinstance(exc, ValidationError) and exc.field == "from":
                    raise _named_sender_setting(exc, email.from_email) from None
                raise
            email.postlane_id = result.id
            accepted += 1
        return accepted


def _named_sender_setting(refused: ValidationError, sender: str) -> ValidationError:
    """A sender refused because it is Django's default (``root@localhost`` for
    ``mail_admins``, ``webmaster@localhost`` for ``send_mail``): the refusal names the setting
    that chose it (a day-one user got email-validator's "It should have a period" alone)."""
    for name in ("SERVER_EMAIL", "DEFAULT_FROM_EMAIL"):
        if sender and sender == getattr(settings, name, None):
            return ValidationError(
                f"{refused.message} (Django's {name} chose it: set {name} to an address of yours)",
                field="from",
            )
    return refused
