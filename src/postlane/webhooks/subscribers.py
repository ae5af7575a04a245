"""In-process subscribers: an application that embeds postlane follows the event log in Python.

- :func:`follow_events`: an async iterator over the log, waiting for new events (a poll with a
  deadline, never a busy loop)::

      async for event in follow_events(app.store, after=last_seen, types=["bounced"]):
          await mark_bounced(event.recipient)
          last_seen = event.id

- :class:`EventSubscribers`: callables told each event, plain functions or coroutine
  functions. A plain one runs in a worker thread, so it may block (a Django ORM write); the
  subscribers get the events in log order, one at a time::

      subscribers = EventSubscribers(app.store)
      subscribers.connect(on_bounce, types=["bounced", "complained"])
      await subscribers.run(stop)        # until stop is set

Unlike webhooks, these keep no cursor in the store: a subscriber hears the events that happen
while its process runs (from the end of the log when ``run`` starts, unless told ``after``). A
consumer that must not miss one across restarts keeps the last event id it handled and passes it
back as ``after``, or uses a webhook.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from postlane.clock import Clock, SystemClock
from postlane.errors import NotFound, ValidationError
from postlane.events import EVENT_TYPES, Event, read_events
from postlane.store.base import HistoryStore

log = logging.getLogger("postlane.events")

#: a subscriber: told one event (its return value, awaited when it is awaitable, is ignored)
Subscriber = Callable[[Event], Any]


def check_types(types: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(types)
    unknown = sorted(set(chosen) - set(EVENT_TYPES))
    if unknown:
        raise ValidationError(
            f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})", field="type"
        )
    return chosen


async def latest_event_id(store: HistoryStore, *, page: int = 10_000) -> int | None:
    """The id of the last event in the log (None: the log is empty), read page by page."""
    last: int | None = None
    while True:
        try:
            events = await store.events_after(last, limit=page)
        except NotFound:  # the page's last event was purged meanwhile: start over
            last = None
            continue
        if not events:
            return last
        last = events[-1].id
        if len(events) < page:
            return last


async def follow_events(
    store: HistoryStore,
    after: int | Literal["latest"] | None = None,
    *,
    types: Sequence[str] = (),
    poll: float = 1.0,
    batch: int = 500,
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Event]:
    """The events after ``after`` (None: from the oldest kept; ``"latest"``: only new ones), of
    ``types`` (default all), for ever or until ``stop`` is set. Once caught up it looks again
    every ``poll`` seconds; nothing is yielded once ``stop`` is set. A cursor removed by
    retention meanwhile is logged, and following goes on from the oldest event kept; one this
    store never wrote raises :class:`~postlane.errors.NotFound`."""
    chosen = check_types(types)
    clock = clock or SystemClock()
    cursor = await latest_event_id(store) if after == "latest" else after
    while stop is None or not stop.is_set():
        try:
            events, cursor = await read_events(store, cursor, limit=batch, types=chosen)
        except NotFound:
            if cursor is None or not await _removed_by_retention(store, cursor):
                raise  # never written here: going on from the oldest would repeat the whole log
            log.warning(
                "events after %s were removed by retention before they were read; going on "
                "from the oldest event kept",
                cursor,
            )
            cursor = None
            continue
        for event in events:
            if stop is not None and stop.is_set():
                return  # nothing more once stopped, not the rest of the page
            yield event
        if len(events) < batch:
            await _wait(stop, clock, poll)


async def _removed_by_retention(store: HistoryStore, cursor: int) -> bool:
    """Whether a cursor the store does not keep is older than the oldest event it keeps (or
    it keeps none): retention removed it. One at or past the oldest kept was never written in
    this store (a cursor from another one, or a typo)."""
    oldest, _ = await read_events(store, None, limit=1)
    return not oldest or cursor < oldest[0].id


async def _wait(stop: asyncio.Event | None, clock: Clock, seconds: float) -> None:
    if stop is None:
        await clock.sleep(seconds)
        return
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(clock.sleep(seconds))]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


@dataclass(frozen=True)
class _Subscription:
    callback: Subscriber
    types: frozenset[str]


class EventSubscribers:
    """Callables told each event of the log while :meth:`run` runs (Django signals connect
    here: ``subscribers.connect(lambda event: mail_event.send(sender=None, event=event))``)."""

    def __init__(
        self,
        store: HistoryStore,
        *,
        after: int | Literal["latest"] | None = "latest",
        poll: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.after = after
        self.poll = poll
        self.clock = clock
        self._subscriptions: list[_Subscription] = []
        #: the last event told to the subscribers (None before the first)
        self.last_event_id: int | None = None

    def connect(self, callback: Subscriber, *, types: Iterable[str] = ()) -> Callable[[], None]:
        """Tell ``callback`` every event (of ``types``, default all); returns a function that
        disconnects it. A callback may be connected while :meth:`run` runs."""
        subscription = _Subscription(callback, frozenset(check_types(types)) or frozenset())

        def disconnect() -> None:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

        self._subscriptions.append(subscription)
        return disconnect

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the log and tell each event to the subscribers that want it, in order, until
        ``stop`` is set. A subscriber that raises is logged; the others and the next events go
        on."""
        async for event in follow_events(
            self.store, self.after, poll=self.poll, stop=stop, clock=self.clock
        ):
            for subscription in list(self._subscriptions):
                if subscription.types and event.type not in subscription.types:
                    continue
                await self._tell(subscription.callback, event)
            self.last_event_id = event.id
            self.after = event.id  # a second run goes on from here

    async def _tell(self, callback: Subscriber, event: Event) -> None:
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(event)
                return
            await asyncio.to_thread(callback, event)
        except Exception:
            log.exception("an event subscriber failed on event %s (%s)", event.id, event.type)
