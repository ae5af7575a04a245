"""``manage.py postlane_events [--follow]``: postlane's event log as Django signals
(:mod:`postlane.django.signals`), from a cursor saved in ``POSTLANE_EVENTS_CURSOR_FILE``.

Where the events are read: ``POSTLANE_URL`` set, a postlane server's ``GET /v1/events`` (with
``POSTLANE_EVENTS_TOKEN``, else ``POSTLANE_TOKEN``: an admin token); otherwise the store of
``POSTLANE_CONFIG`` itself (the local store, or the outbox's PostgreSQL). See
:mod:`postlane.django.events` for the order, the cursor and failing receivers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core.management.base import (  # type: ignore[import-untyped]
    BaseCommand,
    CommandError,
    CommandParser,
)

from postlane.errors import PostlaneError

if TYPE_CHECKING:
    from postlane.django.events import HttpEventSource
from postlane.events import EVENT_TYPES
from postlane.toml_values import is_decimal


def _setting(name: str, default: Any) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else value


def _seconds(value: Any) -> float | None:
    """``value`` as a number of seconds above 0, or None: a wait of 0 (or less) returns at
    once, and a following relay would look again and again, spinning the CPU."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _poll_option(text: str) -> float:
    seconds = _seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return seconds


def _batch_option(text: str) -> int:
    from postlane.django.events import MAX_BATCH

    try:
        batch = int(text)
    except ValueError:
        batch = 0
    if not 1 <= batch <= MAX_BATCH:
        # the HTTP API's limit: said here, rather than as the API's "limit" field
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BATCH}, got {text!r}")
    return batch


def _poll_setting() -> float:
    value = _setting("POSTLANE_EVENTS_POLL", 1.0)
    seconds = _seconds(value)
    if seconds is None:
        raise CommandError(
            f"POSTLANE_EVENTS_POLL must be a number of seconds above 0, got {value!r}"
        )
    return seconds


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Send postlane's events (queued, sent, bounced, ...) as Django signals "
        "(postlane.django.signals), in order, from the cursor in POSTLANE_EVENTS_CURSOR_FILE; "
        "until caught up, or for ever with --follow."
    )
    #: call_command(..., stop=threading.Event()) ends a --follow (tests, an embedding app)
    stealth_options = ("stop",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--follow",
            "-f",
            action="store_true",
            help="Once caught up, keep waiting for new events (SIGTERM or Ctrl-C stops).",
        )
        parser.add_argument(
            "--cursor-file",
            metavar="PATH",
            help="Where the cursor is kept (default: the POSTLANE_EVENTS_CURSOR_FILE setting).",
        )
        parser.add_argument(
            "--after",
            metavar="ID",
            help="Start after this event instead of the saved cursor (which then moves on "
            "from here).",
        )
        parser.add_argument(
            "--type",
            dest="types",
            action="append",
            choices=EVENT_TYPES,
            default=[],
            help="Only events of this type (repeatable; the others are passed over).",
        )
        parser.add_argument(
            "--batch",
            type=_batch_option,
            default=100,
            help="Events read per request, 1 to 1000 (default 100).",
        )
        parser.add_argument(
            "--poll",
            type=_poll_option,
            default=None,
            help="--follow: seconds between looks once caught up (default "
            "POSTLANE_EVENTS_POLL, 1).",
        )
        parser.add_argument(
            "--stop-on-error",
            action="store_true",
            help="Stop at an event a receiver still fails on after its retries (exit status "
            "1, the cursor before it) instead of logging it and going on.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from postlane.django import _config_setting, timeout_setting
        from postlane.django.events import (
            CursorFile,
            EventRelay,
            EventSource,
            ReceiverFailure,
            StoreEventSource,
        )

        cursor_path = options["cursor_file"] or _setting("POSTLANE_EVENTS_CURSOR_FILE", None)
        if not cursor_path:
            raise CommandError(
                "set POSTLANE_EVENTS_CURSOR_FILE (or pass --cursor-file PATH): where "
                "postlane_events keeps its place in the event log across restarts"
            )
        after = options["after"]
        if after is not None and not is_decimal(str(after)):
            raise CommandError(f"--after must be an event id, got {after!r}")
        verbosity = int(options.get("verbosity", 1))

        def on_event(event: dict[str, Any], failures: list[ReceiverFailure]) -> None:
            if verbosity >= 2:
                failed = f"  ({len(failures)} receiver(s) failed)" if failures else ""
                self.stdout.write(
                    f"{event['id']}  {event['type']}  {event['message_id']}  "
                    f"{event.get('recipient') or '-'}{failed}"
                )

        poll = options["poll"] if options["poll"] is not None else _poll_setting()
        stop: threading.Event = options.get("stop") or threading.Event()
        url = _setting("POSTLANE_URL", None)
        source: EventSource
        try:
            if url:
                source = self._http_source(url, timeout_setting())
            else:
                source = StoreEventSource(_config_setting())
        except PostlaneError as exc:
            raise CommandError(str(exc)) from None
        restore = self._stop_on_sigterm(stop) if options["follow"] else None
        try:
            relay = EventRelay(
                source,
                CursorFile(Path(cursor_path)),
                after=after,
                types=options["types"],
                batch=options["batch"],
                poll=poll,
                retries=int(_setting("POSTLANE_EVENTS_RETRIES", 3)),
                retry_delay=float(_setting("POSTLANE_EVENTS_RETRY_DELAY", 1.0)),
                stop_on_error=options["stop_on_error"],
                stop=stop,
                on_event=on_event,
            )
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the cursor is saved
                relay.run(follow=options["follow"])
        except PostlaneError as exc:
            raise CommandError(str(exc)) from None
        finally:
            if restore is not None:
                restore()
            source.close()
        if verbosity >= 1:
            failed = f", {relay.failed} with a failing receiver" if relay.failed else ""
            self.stdout.write(
                f"{relay.relayed} event(s) relayed from {source.description}{failed}; "
                f"cursor {relay.after or '(start)'}"
            )

    @staticmethod
    def _http_source(url: str, timeout: float) -> HttpEventSource:
        """``GET /v1/events`` of ``POSTLANE_URL`` with ``POSTLANE_EVENTS_TOKEN``, else
        ``POSTLANE_TOKEN`` (an application's send token, usually: the hint says which setting
        wants the admin token)."""
        from postlane.django.events import HttpEventSource

        token = _setting("POSTLANE_EVENTS_TOKEN", None)
        if token is not None:
            return HttpEventSource(
                url, token=token, timeout=timeout, token_setting="POSTLANE_EVENTS_TOKEN"
            )
        return HttpEventSource(
            url,
            token=_setting("POSTLANE_TOKEN", None),
            timeout=timeout,
            token_setting="POSTLANE_TOKEN",
            token_hint=" (POSTLANE_EVENTS_TOKEN is not set, so postlane_events used "
            "POSTLANE_TOKEN: set POSTLANE_EVENTS_TOKEN to a token with the admin scope)",
        )

    @staticmethod
    def _stop_on_sigterm(stop: threading.Event) -> Any:
        """SIGTERM (a service manager's stop) ends a --follow after the current event; only the
        main thread can install a handler (call_command from another thread uses ``stop``)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            # set from another thread: the handler may run while this thread holds the
            # event's own lock (inside stop.wait), and setting it here would deadlock
            threading.Thread(target=stop.set, name="postlane-events-stop").start()

        signal.signal(signal.SIGTERM, on_sigterm)

        def restore() -> None:
            signal.signal(signal.SIGTERM, previous)

        return restore
