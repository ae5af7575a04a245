"""postlane's event log as Django signals (:mod:`postlane.django.signals`).

Two ways the events reach the receivers:

- :class:`EventRelay`, what ``manage.py postlane_events [--follow]`` runs: reads the log from a
  cursor, through the HTTP API (``POSTLANE_URL``: :meth:`postlane.Client.events`) or from the
  store itself (``POSTLANE_CONFIG``: the local store, or the outbox's PostgreSQL), sends the
  signals for each event in log order, and saves the cursor in a file (written atomically: a
  temporary file, fsync, rename) so that a restart goes on where it stopped. Delivery is **at
  least once**: after a crash, the events relayed since the last save (at most about a second's
  worth, or the event a receiver was handling) are told again; deduplicate on ``event["id"]``
  when that matters.
- :func:`connect_subscribers`: a process that embeds postlane
  (:class:`~postlane.webhooks.subscribers.EventSubscribers`) sends the same signals in process,
  with no cursor of its own.

A receiver that raises (any ``Exception``) is tried again, alone (the receivers that succeeded
are not told twice), up to ``POSTLANE_EVENTS_RETRIES`` times (3) after
``POSTLANE_EVENTS_RETRY_DELAY`` seconds (1), doubling; if it still fails, the failure is logged
(logger ``postlane.django.events``, with the event id, type and receiver) and the relay goes on
with the next event: one broken receiver never stops the others or the log. With
``stop_on_error`` (``--stop-on-error``) the relay stops at that event instead, its cursor before
it, so that the next run tells it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from postlane.errors import NotFound, PostlaneError
from postlane.toml_values import is_decimal

if TYPE_CHECKING:
    from postlane.config import Config
    from postlane.webhooks.subscribers import EventSubscribers

__all__ = [
    "CursorFile",
    "CursorFileError",
    "EventRelay",
    "EventSource",
    "HttpEventSource",
    "ReceiverFailed",
    "ReceiverFailure",
    "StoreEventSource",
    "connect_subscribers",
    "tell",
]

log = logging.getLogger("postlane.django.events")

#: an event as ``GET /v1/events`` gives it
EventJSON = dict[str, Any]

DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 1.0
#: the most events read per page: what ``GET /v1/events`` gives at most (``limit``)
MAX_BATCH = 1000
#: the cursor is saved at least this often while events are relayed (and at the end of a page)
SAVE_INTERVAL = 1.0


class CursorFileError(PostlaneError):
    """The cursor file cannot be read, written or locked."""

    code = "cursor_file"


@dataclass(frozen=True)
class ReceiverFailure:
    """A receiver that still raised after its retries."""

    receiver: str
    error: Exception


class ReceiverFailed(PostlaneError):
    """``stop_on_error``: a receiver failed on an event; the cursor stays before it."""

    code = "receiver_failed"

    def __init__(self, event: EventJSON, failures: Sequence[ReceiverFailure]) -> None:
        names = ", ".join(f"{f.receiver} ({type(f.error).__name__}: {f.error})" for f in failures)
        super().__init__(
            f"event {event.get('id')} ({event.get('type')}): {names} failed; the cursor stays "
            "before this event, so the next run tells it again"
        )
        self.event = event
        self.failures = list(failures)


class _Stopped(Exception):
    """Stopped while waiting to retry a receiver: the event is not done."""


# -- telling one event -----------------------------------------------------------------------------


def _name(receiver: Any) -> str:
    module = getattr(receiver, "__module__", None)
    name = getattr(receiver, "__qualname__", None) or repr(receiver)
    return f"{module}.{name}" if module else name


def _call(receiver: Any, signal: Any, sender: Any, event: EventJSON) -> None:
    from asgiref.sync import async_to_sync, iscoroutinefunction

    if iscoroutinefunction(receiver):
        async_to_sync(receiver)(signal=signal, sender=sender, event=event)
    else:
        receiver(signal=signal, sender=sender, event=event)


def tell(
    event: EventJSON,
    *,
    sender: Any,
    retries: int = DEFAULT_RETRIES,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    wait: Callable[[float], bool] | None = None,
) -> list[ReceiverFailure]:
    """Send :data:`~postlane.django.signals.mail_event`, then the signal of the event's type,
    for one event. A receiver that raises is called again, alone, up to ``retries`` times,
    after ``retry_delay`` seconds, doubling; ``wait(seconds)`` waits and returns True when the
    caller is stopping (then :class:`_Stopped` is raised: the event is not done). Returns the
    receivers that failed every try, each logged."""
    from postlane.django.signals import SIGNALS, mail_event

    pause = wait or _sleep
    failures: list[ReceiverFailure] = []
    signals = [mail_event]
    if event.get("type") in SIGNALS:
        signals.append(SIGNALS[event["type"]])
    for signal in signals:
        for receiver, result in signal.send_robust(sender=sender, event=event):
            if not isinstance(result, Exception):
                continue
            error: Exception = result
            for attempt in range(1, retries + 1):
                delay = retry_delay * 2 ** (attempt - 1)
                log.warning(
                    "receiver %s failed on event %s (%s): %s: %s; trying again in %.1f s "
                    "(%d of %d)",
                    _name(receiver),
                    event.get("id"),
                    event.get("type"),
                    type(error).__name__,
                    error,
                    delay,
                    attempt,
                    retries,
                )
                if pause(delay):
                    raise _Stopped
                try:
                    _call(receiver, signal, sender, event)
                except Exception as exc:
                    error = exc
                else:
                    break
            else:
                log.error(
                    "receiver %s failed on event %s (%s) after %d %s; going on without it",
                    _name(receiver),
                    event.get("id"),
                    event.get("type"),
                    retries + 1,
                    "try" if retries == 0 else "tries",
                    exc_info=error,
                )
                failures.append(ReceiverFailure(_name(receiver), error))
    return failures


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _close_old_connections() -> None:
    """What Django does around each request: drop database connections that broke or outlived
    ``CONN_MAX_AGE``, so a long-running relay keeps working after a database restart."""
    from django.db import close_old_connections  # type: ignore[import-untyped]

    close_old_connections()


# -- where the events come from --------------------------------------------------------------------


class EventSource(Protocol):
    """A page of the event log after a cursor (:class:`NotFound` when retention removed it)."""

    description: str

    def read(self, after: str | None, limit: int, types: Sequence[str]) -> list[EventJSON]: ...

    def close(self) -> None: ...


class HttpEventSource:
    """A postlane server's ``GET /v1/events`` (an admin token), through :class:`postlane.Client`
    (which retries connection failures, timeouts and 503). The server's refusal of the token
    (401, 403) is a :class:`~postlane.django.SettingsError` naming ``token_setting``, the
    Django setting the token came from, with ``token_hint`` after the server's reason."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 10,
        *,
        token_setting: str = "POSTLANE_TOKEN",
        token_hint: str = "",
        **client: Any,
    ) -> None:
        from postlane.django import http_client

        self.client = http_client(url, token, timeout, **client)
        self.description = url
        self.token_setting = token_setting
        self.token_hint = token_hint

    def read(self, after: str | None, limit: int, types: Sequence[str]) -> list[EventJSON]:
        from postlane.django import token_refused

        try:
            page = self.client.events(after, limit=limit, types=types)
        except PostlaneError as exc:
            refused = token_refused(exc, self.token_setting, self.token_hint)
            if refused is None:
                raise
            raise refused from None
        return list(page["events"])

    def close(self) -> None:
        self.client.close()


class StoreEventSource:
    """postlane's store itself (:class:`postlane.Postlane`), for a Django project that runs the
    local store or the outbox."""

    def __init__(self, config: Config | str | None) -> None:
        from postlane.django import open_local

        self.postlane = open_local(config)
        self.description = _store_description(self.postlane.config)

    def read(self, after: str | None, limit: int, types: Sequence[str]) -> list[EventJSON]:
        page = self.postlane.events(after, limit=limit, types=types)
        return [event.as_json() for event in page.events]

    def close(self) -> None:
        self.postlane.close()


def _store_description(config: Config) -> str:
    """The store as ``postlane serve`` names it when it starts: a SQLite file by its absolute
    path (``store.url`` may be relative to the configuration file), a PostgreSQL URL without
    its password."""
    url = config.store.url
    if url.startswith("sqlite://"):
        from postlane.store import sqlite_path

        return f"sqlite:///{sqlite_path(url, config.base_dir)}"
    from postlane.store.postgres import masked

    return masked(url)


# -- the cursor ------------------------------------------------------------------------------------


class CursorFile:
    """The id of the last event relayed, in a small JSON file (``{"after": "1042"}``), written
    atomically: a crash leaves the old cursor or the new one, never a torn file. While a relay
    runs it holds a lock beside it (``PATH.lock``), so two relays never share a cursor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> str | None:
        """The cursor saved (None: no file yet, start from the oldest event kept)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CursorFileError(f"cannot read the cursor file {self.path}: {exc}") from None
        try:
            data = json.loads(text)
            after = data["after"]
        except (ValueError, KeyError, TypeError):
            raise CursorFileError(
                f"the cursor file {self.path} is not postlane's ({text[:60]!r}): remove it to "
                "start from the oldest event kept, or pass --after ID"
            ) from None
        if after is None:
            return None
        if not is_decimal(str(after)):
            raise CursorFileError(f"the cursor file {self.path} holds a bad event id {after!r}")
        return str(after)

    def save(self, after: str | None) -> None:
        """Write ``after`` durably: a temporary file in the same folder, fsync, rename over the
        cursor file, fsync the folder."""
        folder = self.path.parent
        body = json.dumps({"after": after, "saved_at": time.time()}) + "\n"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(body)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            _fsync_folder(folder)
        except OSError as exc:
            raise CursorFileError(f"cannot write the cursor file {self.path}: {exc}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``PATH.lock`` (an advisory lock, released when the process ends, whatever the
        way); :class:`CursorFileError` when another relay holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CursorFileError(f"cannot open the lock file {lock_path}: {exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CursorFileError(
                    f"another postlane_events is running with the cursor file {self.path} "
                    f"(it holds {lock_path})"
                ) from None
            yield
        finally:
            os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows): the rename is what matters
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the relay -------------------------------------------------------------------------------------


class EventRelay:
    """Reads the event log from ``source`` after the cursor, and sends the Django signals for
    each event in order (see the module docstring); what ``manage.py postlane_events`` runs.

    ``after`` overrides the cursor file's position; ``cursor`` None keeps no cursor (tests,
    one-off replays). :meth:`run` returns how many events were relayed."""

    def __init__(
        self,
        source: EventSource,
        cursor: CursorFile | None,
        *,
        after: str | None = None,
        types: Sequence[str] = (),
        batch: int = 100,
        poll: float = 1.0,
        retries: int = DEFAULT_RETRIES,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        stop_on_error: bool = False,
        stop: threading.Event | None = None,
        on_event: Callable[[EventJSON, list[ReceiverFailure]], None] | None = None,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1 to {MAX_BATCH}")
        if not (math.isfinite(poll) and poll > 0):
            # stop.wait(0) returns at once: a following relay would spin the CPU for ever
            raise ValueError("poll must be a number of seconds above 0")
        if retries < 0 or retry_delay < 0:
            raise ValueError("retries and retry_delay must be 0 or more")
        self.source = source
        self.cursor = cursor
        self.types = tuple(types)
        self.batch = batch
        self.poll = poll
        self.retries = retries
        self.retry_delay = retry_delay
        self.stop_on_error = stop_on_error
        self.stop = stop or threading.Event()
        self.on_event = on_event
        #: the last event relayed (its id), what the cursor file is given
        self.after: str | None = after if after is not None else self._load()
        #: where :attr:`after` came from, for a cursor the store never wrote
        self._origin = (
            "given as after" if after is not None or cursor is None else f"read from {cursor.path}"
        )
        self._saved: str | None = self.after
        self._saved_at = time.monotonic()
        #: events relayed, and of them the ones with a receiver that failed every try
        self.relayed = 0
        self.failed = 0

    def _load(self) -> str | None:
        return self.cursor.load() if self.cursor is not None else None

    def run(self, *, follow: bool = False) -> int:
        """Relay every event after the cursor until caught up (``follow``: then wait for new
        ones, looking every ``poll`` seconds, until :attr:`stop` is set). The cursor is saved
        on the way and at the end, however :meth:`run` ends."""
        with self.cursor.locked() if self.cursor is not None else contextlib.nullcontext():
            try:
                while not self.stop.is_set():
                    caught_up = self._page()
                    if caught_up and (not follow or self.stop.wait(self.poll)):
                        break
            finally:
                self._save()
        return self.relayed

    def _page(self) -> bool:
        """Relay one page; True once caught up (or stopping)."""
        try:
            events = self.source.read(self.after, self.batch, self.types)
        except NotFound as exc:
            if self.after is None or not self._removed_by_retention(self.after):
                raise NotFound(f"{exc.message} (the cursor {self._origin})") from None
            log.warning(
                "the events after %s were removed by retention ([store] event_retention) "
                "before they were relayed; going on from the oldest event kept",
                self.after,
            )
            self.after = None
            return False
        _close_old_connections()
        for event in events:
            if self.stop.is_set():
                return True
            try:
                failures = tell(
                    event,
                    sender=EventRelay,
                    retries=self.retries,
                    retry_delay=self.retry_delay,
                    wait=self.stop.wait,
                )
            except _Stopped:
                return True
            if failures and self.stop_on_error:
                raise ReceiverFailed(event, failures)
            self.after = str(event["id"])
            self.relayed += 1
            self.failed += bool(failures)
            if self.on_event is not None:
                self.on_event(event, failures)
            if time.monotonic() - self._saved_at >= SAVE_INTERVAL:
                self._save()
        _close_old_connections()
        self._save()
        return len(events) < self.batch

    def _removed_by_retention(self, after: str) -> bool:
        """Whether a cursor the store does not keep is older than the oldest event it keeps
        (or it keeps none): retention removed it, and reading on from the oldest kept loses
        nothing that is still there. A cursor at or past the oldest kept was never written
        in this store (a cursor from another one, or a typo): going on from the oldest would
        tell every receiver the whole log again, so that is an error."""
        oldest = self.source.read(None, 1, ())
        return not oldest or int(after) < int(oldest[0]["id"])

    def _save(self) -> None:
        if self.cursor is None or self.after == self._saved:
            return
        self.cursor.save(self.after)
        self._saved = self.after
        self._saved_at = time.monotonic()


# -- in process ------------------------------------------------------------------------------------


def connect_subscribers(
    subscribers: EventSubscribers,
    *,
    types: Sequence[str] = (),
    retries: int = DEFAULT_RETRIES,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> Callable[[], None]:
    """Send the Django signals for the events ``subscribers`` follows (an application that
    embeds postlane); returns a function that disconnects. The signals are sent from a worker
    thread (the receivers may use the ORM), one event at a time, in order; a failing receiver
    is retried and logged as in :func:`tell`. Like every ``EventSubscribers``, this keeps no
    cursor: it tells what happens while ``subscribers.run`` runs."""
    from postlane.webhooks.subscribers import EventSubscribers as Subscribers

    def relay(event: Any) -> None:
        _close_old_connections()
        try:
            tell(event.as_json(), sender=Subscribers, retries=retries, retry_delay=retry_delay)
        finally:
            _close_old_connections()

    return subscribers.connect(relay, types=types)
