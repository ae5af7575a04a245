"""The Python API: what an application, the CLI and the HTTP API all call.

:class:`AsyncPostlane` for asyncio code, :class:`Postlane` for everything else (a Django view, a
script): the same methods, without ``await``. Both read the configuration the way the CLI does
(``postlane.toml``, ``$POSTLANE_CONFIG``, or the built-in defaults: SQLite in the working
directory)::

    import postlane

    mail = postlane.Postlane()
    mail.send(sender="app@example.com", to=["ada@example.net"], subject="Welcome", text="Hi!")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from postlane.clock import Clock, SystemClock
from postlane.config import Config, destination_limits, load_config
from postlane.cursors import (
    DeadLetterKey,
    MessageKey,
    Page,
    SuppressionKey,
    decode_cursor,
    encode_cursor,
)
from postlane.destinations import DestinationMap
from postlane.errors import NoQueue, NotFound, SuppressedRecipients, ValidationError, kind_of
from postlane.events import Event
from postlane.exports import read_export
from postlane.inputs import as_message, check_id, check_string, event_id, message_from_fields
from postlane.message import Lane, Message, PreparedMessage, prepare
from postlane.queue_actions import ACTION_STATES, QueueAction, Requeued, action_states
from postlane.records import (
    SUPPRESSION_REASONS,
    Cancelled,
    DeadGroup,
    DeadLetter,
    DestinationStatus,
    EnqueueResult,
    ExportedMessage,
    MessageView,
    SelectionCount,
    Selector,
    ShapeRow,
    Stats,
    Suppression,
)
from postlane.relay_pause import RelayPause
from postlane.selectors import suppression_lanes, suppression_scope
from postlane.store import Store, open_store_url
from postlane.transports import shared_destination, shared_destinations
from postlane.waits import to_its_end

T = TypeVar("T")
#: listings are bounded; a caller wanting more pages narrows the selector
MAX_LIMIT = 10_000
#: the suppression list reads further (small rows, and no selector to narrow it): entries
#: past 10,000 were cut off without a word (a scale audit)
MAX_SUPPRESSIONS = 100_001


#: qshape's age buckets (minutes: 5 10 20 40 80 160 320 640 1280), in seconds
QSHAPE_EDGES: tuple[float, ...] = tuple(60.0 * m for m in (5, 10, 20, 40, 80, 160, 320, 640, 1280))


class AsyncPostlane:
    """postlane for asyncio code. Open it (``async with`` or :meth:`open`) before use."""

    def __init__(
        self,
        config: Config | str | Path | None = None,
        *,
        config_path: str | Path | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        create: bool | None = None,
    ) -> None:
        """``config``: a :class:`Config`, or the path of a configuration file (as
        ``config_path``). ``create=False``: the store must exist already (a SQLite file that
        does not is a :class:`~postlane.errors.StoreUnavailable` when opened, not a new empty
        queue) at this postlane's schema (an older one is refused, not migrated: an
        operator's command never upgrades a store under running older postlanes). By default
        the store is made (or migrated) when the configuration names it (a file, or a
        :class:`Config` given), and must exist when no configuration file was found: then
        ``./postlane.db`` is only a guess from the working directory, and mail stored in a
        new queue there would wait for a worker that never comes (as the CLI refuses to)."""
        if isinstance(config, (str, Path)):
            config, config_path = None, config
        given = config is not None
        self.config = config if config is not None else load_config(config_path)
        #: no configuration named the store: ./postlane.db is a guess (see :meth:`open`)
        self._guessed = not (given or self.config.from_file)
        if create is None:
            create = not self._guessed
        self.clock: Clock = clock or SystemClock()
        self.store: Store = store or open_store_url(
            self.config.store.url, base_dir=self.config.base_dir, create=create
        )
        #: set after every enqueue, so a worker in this process wakes at once
        self.wake = asyncio.Event()
        #: the worker running in this process, if any (for /readyz)
        self.worker: Any = None
        #: the webhook sender serve runs beside the worker (None: no [[webhooks.out]])
        self.webhooks: Any = None
        self.destinations = DestinationMap.from_config(self.config)
        self._opened = False

    async def open(self) -> AsyncPostlane:
        if not self._opened:
            try:
                await self.store.open()
            except NoQueue as exc:
                if not self._guessed:
                    raise
                raise NoQueue(
                    f"{exc.message}; if postlane runs elsewhere, name its configuration: "
                    "Postlane('path/to/postlane.toml'), or $POSTLANE_CONFIG"
                ) from None
            self._opened = True
        return self

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.store.close()

    async def __aenter__(self) -> AsyncPostlane:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------------

    def prepare(self, message: Message, *, max_size: int | None = None) -> PreparedMessage:
        """Validate and render a message (raises :class:`ValidationError`), storing nothing.
        ``max_size``: its limit in bytes when not the configured one (``smtp.max_size``)."""
        limit = self.config.smtp.max_size if max_size is None else max_size
        return prepare(message, max_size=limit, now=self.clock.now())

    async def send(
        self, message: Message | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> EnqueueResult:
        """Enqueue one message; returns once it is durably stored.

        Pass a :class:`Message`, its fields as keywords (``sender``, ``to``, ``subject``,
        ``text``, ``html``, ``lane``, ``idempotency_key``, ...), or a mapping of them (the
        HTTP API's JSON shape: ``"from"`` for the sender), as :class:`postlane.Client` takes."""
        if message is None:
            message = message_from_fields(fields)
        elif fields:
            raise TypeError("pass a Message or keyword fields, not both")
        results = await self.send_prepared([self.prepare(as_message(message))])
        return results[0]

    async def send_many(
        self, messages: Sequence[Message | Mapping[str, Any]]
    ) -> list[EnqueueResult]:
        """Enqueue several messages (each a :class:`Message` or a mapping) in one durable
        commit. All are validated first: one bad message refuses the whole batch and stores
        nothing."""
        if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Iterable):
            raise ValidationError(
                "send_many takes a list of messages (postlane.Message or mappings), "
                f"not {kind_of(messages)}"
            )
        return await self.send_prepared([self.prepare(as_message(m)) for m in messages])

    async def send_prepared(self, prepared: Sequence[PreparedMessage]) -> list[EnqueueResult]:
        prepared = await self._with_destinations(prepared)
        results = await self.store.enqueue(prepared, self.clock.now())
        self.wake.set()
        return results

    async def _with_destinations(
        self, prepared: Sequence[PreparedMessage]
    ) -> Sequence[PreparedMessage]:
        """Each recipient's destination (a provider, or its domain), from the table and, with
        MX lookups on, from its domain's MX hosts."""
        domains = {r.domain for message in prepared for r in message.recipients}
        found = await self.destinations.resolve(domains)
        return [
            dataclasses.replace(
                message,
                recipients=tuple(
                    dataclasses.replace(r, destination=found.get(r.domain, r.domain))
                    for r in message.recipients
                ),
            )
            for message in prepared
        ]

    # -- reading ---------------------------------------------------------------------------------

    async def get(self, queue_id: str, *, history: bool = True) -> MessageView:
        view = await self.store.get_message(check_id(queue_id), history=history)
        [shown] = await self.as_due([view])
        return shown

    async def _relay_pause(self) -> RelayPause | None:
        """The recorded pause of the relay every delivery goes through, while it lasts (None:
        no such relay, routes choose one per message, or it is not paused)."""
        if self._relay_name() is None:
            return None
        return self._relay_pause_in(await self.store.destination_states())

    def _relay_name(self) -> str | None:
        return None if self.config.routes else shared_destination(self.config.delivery.relay)

    def _relay_pause_in(self, statuses: Sequence[DestinationStatus]) -> RelayPause | None:
        name, now = self._relay_name(), self.clock.now()
        for status in statuses:
            if status.destination == name and (status.paused_until or 0) > now:
                return RelayPause(name, status.paused_until or now)
        return None

    async def as_due(self, views: Sequence[MessageView]) -> list[MessageView]:
        """``views`` with their waiting recipients' next attempts as they will be: no sooner
        than the end of the relay's pause (:class:`RelayPause`)."""
        return RelayPause.views(await self._relay_pause() if views else None, views)

    async def content(self, queue_id: str) -> bytes:
        return await self.store.get_content(check_id(queue_id))

    async def cancel(self, queue_id: str, *, submitter: str | None = None) -> Cancelled:
        """Cancel what of a message has not gone yet (a scheduled reminder, a digest no longer
        wanted): its recipients waiting (queued, scheduled, deferred, held) are removed, each
        with a ``deleted`` event; one being sent right now is not (its result decides), nor
        one already final. A message left with no recipient goes too. ``submitter``: cancel
        only a message that caller handed in (another's is :class:`NotFound`, as the API's
        send tokens see it). Raises :class:`NotFound` for a message that does not exist."""
        cancelled = await self.store.cancel_message(
            check_id(queue_id), submitter=submitter, now=self.clock.now()
        )
        if cancelled is None:  # another's is as if it did not exist
            raise NotFound(f"no message with id {queue_id}")
        return cancelled

    async def messages(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[MessageView]:
        """Messages matching ``selector`` (default: those not yet finished), oldest first."""
        pause = await self._relay_pause()  # read once: for the states selected and shown
        selector = RelayPause.selection(pause, selector or Selector())
        views = await self.store.list_messages(selector, limit=_limit(limit))
        return RelayPause.views(pause, views)

    async def stats(self) -> Stats:
        stats = await self.store.stats(self.clock.now())
        recorded_states = await self.store.destination_states()
        destinations = [self._with_limits(d) for d in recorded_states]
        # a destination held at its configured limits has nothing recorded (nothing slowed or
        # paused it) but is what an operator asks about when its mail waits: listed too
        recorded = {d.destination for d in destinations}
        destinations += [
            self._with_limits(DestinationStatus(name, None, None, None, None))
            for name, limits in self.config.destinations.items()
            if name != "default" and name not in recorded and (limits.rate or limits.concurrency)
        ]
        relay = self._relay_name()
        if relay is not None:
            # every delivery being sent goes through the relay (the store counts them by their
            # recipients' destinations: the relay's row said 0 with 20 in flight)
            sending = sum(lane.sending for lane in stats.lanes.values())
            if relay not in {d.destination for d in destinations}:
                unrecorded = DestinationStatus(relay, None, None, None, None)
                destinations.append(self._with_limits(unrecorded))
            destinations = [
                dataclasses.replace(d, in_flight=sending) if d.destination == relay else d
                for d in destinations
            ]
        now = self.clock.now()
        busy = tuple(
            d
            for d in destinations
            if d.in_flight
            or d.rate is not None
            or d.concurrency is not None
            or (d.paused_until or 0) > now
        )
        stats = dataclasses.replace(stats, destinations=busy)
        pause = self._relay_pause_in(recorded_states)
        return stats if pause is None else pause.stats(stats)

    def _with_limits(self, status: DestinationStatus) -> DestinationStatus:
        """A destination's recorded state with its configured limits (the store keeps only
        what changed them): its ``rate`` is the configured one while nothing slowed it."""
        limits = destination_limits(self.config.destinations, status.destination)
        configured = limits.rate or None
        return dataclasses.replace(
            status,
            configured_rate=configured,
            concurrency=limits.concurrency or None,
            rate=status.rate if status.rate is not None else configured,
        )

    async def dead_letters(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[DeadLetter]:
        return await self.store.list_dead(selector or Selector(), limit=_limit(limit))

    async def message_page(
        self, selector: Selector | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> Page[MessageView]:
        """A page of the messages :meth:`messages` lists, in arrival order, from ``cursor`` (a
        page's ``next_cursor``; None: the first page). Raises :class:`ValidationError` (field
        ``cursor``) for a cursor no page of this listing gave."""
        after = 0 if cursor is None else decode_cursor(cursor, MessageKey).after_row
        pause = await self._relay_pause()
        views, next_after = await self.store.page_messages(
            RelayPause.selection(pause, selector or Selector()), after=after, limit=_limit(limit)
        )
        views = RelayPause.views(pause, views)
        return Page(views, None if next_after is None else encode_cursor(MessageKey(next_after)))

    async def dead_letter_page(
        self, selector: Selector | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> Page[DeadLetter]:
        """A page of the dead letters, newest death first, from ``cursor`` (as
        :meth:`message_page`)."""
        after = None if cursor is None else decode_cursor(cursor, DeadLetterKey)
        limit = _limit(limit)
        found = await self.store.list_dead(selector or Selector(), limit=limit + 1, after=after)
        if len(found) <= limit:
            return Page(found, None)
        last = found[limit - 1]
        return Page(found[:limit], encode_cursor(DeadLetterKey(last.dead_at, last.delivery_id)))

    async def dead_letter(self, queue_id: str) -> list[DeadLetter]:
        return await self.store.get_dead(check_id(queue_id))

    # -- operator actions --------------------------------------------------------------------------

    async def summarize(self, action: QueueAction, selector: Selector) -> list[SelectionCount]:
        """What ``action`` would touch: counts by lane, domain, state and last reply class.
        Raises :class:`NotFound` for a message id that does not exist."""
        for queue_id in selector.ids:
            await self.store.get_message(check_id(queue_id), history=False)
        selector = await self._selection_for(action, selector)
        return await self.store.summarize(selector, action_states(action, selector))

    async def _selection_for(self, action: QueueAction, selector: Selector) -> Selector:
        """A flush leaves mail scheduled for later alone unless ``selector.scheduled``: it is
        not late, and a 3 a.m. ``postqueue -f`` must not send tomorrow's campaign. A requeue
        that names no message (a sweep: ``--all``, a class, a domain, a dashboard group)
        leaves mail past its ``expires_at`` dead: a one-time code is not resent by a clean-up
        after an outage (naming its message overrides the time). States are read as the
        views show them (:meth:`RelayPause.selection`)."""
        selector = RelayPause.selection(await self._relay_pause(), selector)
        if action is QueueAction.FLUSH and not selector.scheduled:
            return dataclasses.replace(selector, send_at_by=self.clock.now())
        if action is QueueAction.REQUEUE and not selector.ids:
            return dataclasses.replace(selector, expires_after=self.clock.now())
        return selector

    async def act(
        self,
        action: QueueAction,
        selector: Selector,
        *,
        export: IO[str] | None = None,
        progress: Callable[[int], None] | None = None,
        slice_size: int = 500,
        being_sent: Callable[[int], None] | None = None,
    ) -> int:
        """Apply ``action`` to every delivery ``selector`` picks, a slice at a time; returns how
        many changed. With ``export``, each slice is written there (JSON Lines, flushed to disk)
        before it is deleted, so an exported delete can always be undone with :meth:`import_`.
        A hold (or release) of deliveries being sent applies once their tries are recorded: they
        are counted among those changed, and ``being_sent`` is told how many of a slice they
        were (a hold does not hold one its try delivers).

        A requeue refuses, as :meth:`requeue` does without ``unsuppress``, dead letters whose
        addresses are suppressed (:class:`SuppressedRecipients`): whoever asks (the dashboard,
        the HTTP API), they would be marked ``suppressed`` and never attempted."""
        if action is QueueAction.REQUEUE:
            suppressed = await self.suppressed_dead_letters(selector)
            if suppressed:
                raise SuppressedRecipients(suppressed)
        selector = await self._selection_for(action, selector)
        states = action_states(action, selector)
        # a flush lifts the pauses of what it selects once it has made that due (and counted
        # it: lifting first would turn deferred mail queued before a ``--state deferred``
        # flush reads it); the lift then calls back whatever of theirs a worker pushed back
        lifting = await self._pauses_to_lift(selector) if action is QueueAction.FLUSH else ()
        changed = 0
        async for ids in self._delivery_ids(selector, states, slice_size):
            if export is not None:
                for record in await self.store.export_deliveries(ids):
                    export.write(json.dumps(record.as_json(), separators=(",", ":")) + "\n")
                export.flush()
                with contextlib.suppress(OSError, ValueError):
                    os.fsync(export.fileno())
            (count, noted), cancelled = await to_its_end(self._apply(action, ids, states))
            changed += count + noted
            if noted and being_sent is not None:
                being_sent(noted)
            if progress is not None:
                progress(changed)
            if cancelled:  # after the slice's count: an interrupted action says it whole
                raise asyncio.CancelledError
        if lifting is None:
            await self.store.lift_destinations(None, self.clock.now())
        elif lifting:
            await self.lift_destinations(lifting)
        return changed

    async def _delivery_ids(
        self, selector: Selector, states: Sequence[str], slice_size: int
    ) -> AsyncIterator[list[int]]:
        """The ids of the deliveries in ``states`` that ``selector`` picks, in id order, a
        slice of at most ``slice_size`` at a time (each read after the one before is used)."""
        after = 0
        while ids := await self.store.select_delivery_ids(
            selector, states, after=after, limit=slice_size
        ):
            yield ids
            after = ids[-1]

    async def _pauses_to_lift(self, selector: Selector) -> set[str] | None:
        """The destinations whose pause (and slow-down) a flush lifts: those it touches, all of
        them (None) when the selector does not narrow by domain or id (``postqueue -f``).

        The destinations are those stored with the selected deliveries at enqueue, so a domain
        that reached a provider through its MX hosts lifts that provider's pause; deliveries
        being sent count too (their destination may be what holds the rest back). So do the
        relays and provider APIs the configuration sends through (``relay``, ``ses``, ...),
        whose pause holds back every delivery that goes through them."""
        if not selector.domains and not selector.ids and not selector.recipient:
            return None
        states = (*ACTION_STATES[QueueAction.FLUSH], "sending")
        names = set(await self.store.selected_destinations(selector, states))
        if names or selector.domains:
            names |= shared_destinations(self.config)
        for domain in selector.domains:  # named by the operator, even with nothing waiting
            names |= {domain, self.destinations.for_domain(domain)}
        return names

    async def lift_destinations(self, names: Iterable[str]) -> int:
        """Lift the pauses and slow-downs of ``names`` and make due what they held back (not
        what waits for a retry of its own); returns how many recipients that made due. A
        relay's (or a provider API's) pause or rate sent its mail back to wait under the
        recipients' destinations, not under the relay's name: lifting it calls back every
        delivery waiting for a destination."""
        lifted = sorted(set(names))
        shared = bool(set(lifted) & shared_destinations(self.config))
        return await self.store.lift_destinations(lifted, self.clock.now(), every_waiting=shared)

    async def _apply(
        self, action: QueueAction, ids: list[int], states: Sequence[str]
    ) -> tuple[int, int]:
        """How many of ``ids`` ``action`` changed, and how many being sent it noted for once
        their tries are recorded (a hold or a release)."""
        now = self.clock.now()
        noted = 0
        if action is QueueAction.FLUSH:
            count = await self.store.flush(ids, now)
        elif action is QueueAction.HOLD:
            count, noted = await self.store.hold(ids, now)
        elif action is QueueAction.RELEASE:
            count, noted = await self.store.release(ids, now)
        elif action is QueueAction.REQUEUE:
            # each requeue is recorded with how long it was dead (the recovery-time metric)
            count = len(await self.store.requeue_dead(ids, now))
        else:  # DELETE, PURGE
            count = await self.store.delete_deliveries(ids, states)
        if action in (QueueAction.FLUSH, QueueAction.RELEASE, QueueAction.REQUEUE):
            self.wake.set()
        return count, noted

    async def requeue(
        self,
        selector: Selector,
        *,
        unsuppress: bool = False,
        progress: Callable[[int], None] | None = None,
        unsuppressed: Callable[[str], None] | None = None,
        slice_size: int = 500,
    ) -> Requeued:
        """Requeue the dead letters ``selector`` picks, saying what will happen to them.

        A dead letter whose address is on the suppression list (a hard bounce's, usually)
        would be marked ``suppressed`` by the worker at once, never attempted: unless
        ``unsuppress``, such a requeue is refused with :class:`SuppressedRecipients` naming the
        addresses, and nothing changes. With ``unsuppress``, a slice at a time, the suppression
        of its addresses is lifted (new mail to them is sent again too; ``unsuppressed`` is told
        each address as it goes), then the slice is requeued: stopped half-way, what was lifted
        was requeued with it (lifting them all first, then requeueing, emptied the list of a
        requeue a scale audit stopped with Ctrl-C, and requeued nothing)."""
        for queue_id in selector.ids:  # an unknown id is an error, as for every action
            await self.store.get_message(check_id(queue_id), history=False)
        if not unsuppress:
            # act refuses, naming them, if the addresses of some are suppressed
            requeued = await self.act(QueueAction.REQUEUE, selector, progress=progress)
            return Requeued(requeued, ())
        selector = await self._selection_for(QueueAction.REQUEUE, selector)
        states = action_states(QueueAction.REQUEUE, selector)
        lifted: list[str] = []
        changed = 0
        async for ids in self._delivery_ids(selector, states, slice_size):
            # only the entries that stop these letters: an unsubscribe from the bulk lane
            # stays when a password reset's mistaken bounce is lifted
            for address in await self.store.lift_suppressions(await self._suppressed_mail(ids)):
                lifted.append(address)
                if unsuppressed is not None:
                    unsuppressed(address)
            (count, _), cancelled = await to_its_end(self._apply(QueueAction.REQUEUE, ids, states))
            changed += count
            if progress is not None:
                progress(changed)
            if cancelled:
                raise asyncio.CancelledError
        return Requeued(changed, tuple(lifted))

    async def _suppressed_mail(self, delivery_ids: Sequence[int]) -> list[tuple[str, str, Lane]]:
        """The (address, sender, lane) of those among these dead letters the suppression list
        stops: an entry for every sender or for the letter's sender domain (a complaint about
        its mail), for every lane or the letter's (an unsubscribe from bulk mail stops only
        its lanes: a dead letter of another lane is requeued as it is, its entry left alone)."""
        letters = await self.store.list_dead(
            Selector(delivery_ids=tuple(delivery_ids)), limit=len(delivery_ids)
        )
        mail = [(d.address, d.sender, d.lane) for d in letters]
        stopped = await self.store.suppressed_mail(mail)
        return [one for one, hit in zip(mail, stopped, strict=True) if hit]

    async def _suppressed_among(self, delivery_ids: Sequence[int]) -> list[str]:
        """The addresses on the suppression list among these dead letters."""
        return sorted({one[0] for one in await self._suppressed_mail(delivery_ids)})

    async def suppressed_dead_letters(
        self, selector: Selector, *, slice_size: int = 500
    ) -> list[str]:
        """The addresses on the suppression list among the dead letters a requeue of
        ``selector`` would pick."""
        selector = await self._selection_for(QueueAction.REQUEUE, selector)
        states = action_states(QueueAction.REQUEUE, selector)
        found: set[str] = set()
        async for ids in self._delivery_ids(selector, states, slice_size):
            found.update(await self._suppressed_among(ids))
        return sorted(found)

    async def import_(
        self,
        lines: Iterable[str],
        *,
        progress: Callable[[int], None] | None = None,
        batch_size: int | None = 100,
    ) -> int:
        """Bring back what ``queue delete --export`` wrote; returns recipients restored.

        Records are stored ``batch_size`` messages per transaction as they are read (None: all
        in one transaction). A bad line raises :class:`ValidationError` naming it, with the
        batches before it already stored: run :func:`check_export` over the lines first for
        all or nothing (the CLI and the HTTP API do). Importing again is harmless: messages and
        recipients already present are skipped, so an import cut short is completed by
        running it again."""
        restored = 0
        batch: list[ExportedMessage] = []
        for record in read_export(lines):
            batch.append(record)
            if batch_size is not None and len(batch) >= batch_size:
                restored += await self.store.import_messages(batch, self.clock.now())
                batch = []
                if progress is not None:
                    progress(restored)
        if batch:
            restored += await self.store.import_messages(batch, self.clock.now())
        if progress is not None:
            progress(restored)
        self.wake.set()
        return restored

    async def dead_groups(
        self, selector: Selector | None = None, *, limit: int = 100
    ) -> list[DeadGroup]:
        return await self.store.dead_groups(selector or Selector(), limit=_limit(limit))

    async def shape(
        self, edges: Sequence[float] = QSHAPE_EDGES, *, limit: int = 50
    ) -> list[ShapeRow]:
        return await self.store.shape(self.clock.now(), edges, limit=_limit(limit))

    # -- events --------------------------------------------------------------------------------

    async def events(
        self, after: str | int | None = None, *, limit: int = 100, types: Sequence[str] = ()
    ) -> EventPage:
        """Events after the event ``after`` (None or 0, the cursor before any event: from the
        oldest kept), in the order they were committed, at most ``limit``, of ``types``
        (default: all); the page's ``next`` is the cursor to read on from, "0" while the log
        has nothing yet. Raises :class:`ValidationError` for a bad cursor or type,
        :class:`NotFound` for a cursor whose event retention removed (``[store]
        event_retention``)."""
        from postlane.events import EVENT_TYPES, read_events

        if isinstance(types, str):  # one type, not its letters
            types = (types,)
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise ValidationError(
                f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})",
                field="type",
            )
        cursor = event_id(after)
        try:
            found, following = await read_events(
                self.store, cursor or None, limit=_limit(limit), types=types
            )
        except NotFound:
            raise NotFound(
                f"event {cursor} is not kept (removed by [store] event_retention, or never "
                "written: a cursor from another store?); start again "
                "from after=0 to read from the oldest event kept"
            ) from None
        return EventPage(found, str(following or 0))

    # -- suppression -----------------------------------------------------------------------------

    async def suppressions(self, *, limit: int = 1000) -> list[Suppression]:
        """The suppression list, newest first: up to ``limit`` entries, at most
        :data:`MAX_SUPPRESSIONS` (one more than the CLI shows, so that it can say more match)."""
        _limit(limit)  # at least 1
        return await self.store.list_suppressions(limit=min(limit, MAX_SUPPRESSIONS))

    async def suppressions_of(self, addresses: Iterable[str]) -> list[Suppression]:
        """Every entry of these addresses on the suppression list (one per scope and reason),
        newest first: what an operator looks up to lift one, however long the list."""
        wanted = list(addresses)
        for address in wanted:
            check_string(address, "address")
        return await self.store.suppressions_of(wanted) if wanted else []

    async def suppression_page(
        self, *, cursor: str | None = None, limit: int = 1000
    ) -> Page[Suppression]:
        """A page of the suppression list, newest first, from ``cursor`` (as
        :meth:`message_page`)."""
        after = None if cursor is None else decode_cursor(cursor, SuppressionKey)
        limit = _limit(limit)
        found = await self.store.list_suppressions(limit=limit + 1, after=after)
        if len(found) <= limit:
            return Page(found, None)
        last = found[limit - 1]
        key = SuppressionKey(last.created_at, last.address, last.scope, last.reason or "")
        return Page(found[:limit], encode_cursor(key))

    async def suppress(
        self,
        address: str,
        *,
        reason: str | None = None,
        scope: str | None = None,
        expires_at: datetime | str | float | None = None,
        detail: str | None = None,
        source: str = "operator",
        lanes: Iterable[Lane | str] | None = None,
    ) -> bool:
        """Put ``address`` on the suppression list: ``reason`` one of hard_bounce, complaint,
        unsubscribe or manual (the default; any other text is kept as the ``detail`` of a
        manual entry), for every sender (``scope`` "*", the default) or for one sender domain,
        for mail of every lane (``lanes`` None, the default) or of those named, until
        ``expires_at`` (None: for good). False when it was already there in that scope, for
        that reason, for those lanes; an entry there for fewer lanes is widened to these. Each
        reason is an entry of its own: a hard bounce after an unsubscribe is a second entry,
        and removing it leaves the unsubscribe."""
        from postlane.addresses import parse_address
        from postlane.clock import parse_when

        check_string(address, "address")
        check_string(source, "source")
        for value, name in ((reason, "reason"), (detail, "detail")):
            if value is not None:
                check_string(value, name)
        mailbox = parse_address(address, "address", any_length=True)
        if reason is not None and reason not in SUPPRESSION_REASONS:
            detail = f"{reason}; {detail}" if detail else reason
            reason = None
        until = parse_when(expires_at, "expires_at")
        stopped = suppression_lanes(lanes)
        now = self.clock.now()
        if until is not None and until <= now:
            raise ValidationError("expires_at has already passed", field="expires_at")
        return await self.store.add_suppression(
            Suppression(
                address=mailbox.address,
                created_at=now,
                source=source,
                reason=reason or "manual",
                scope=suppression_scope(scope),
                expires_at=until,
                detail=detail,
                lanes=stopped,
            )
        )

    async def unsuppress(
        self, address: str, *, scope: str | None = None, reason: str | None = None
    ) -> bool:
        """Take ``address`` off the list: in one scope, or (None) in every scope; its entries
        for one ``reason`` (a mistaken ``hard_bounce``, leaving an ``unsubscribe``), or (None)
        all. The address is read as :meth:`suppress` stores it (``"john"@example.com`` is
        ``john@example.com``); text that is no address is looked up as it is, so any entry
        can be removed."""
        from postlane.addresses import parse_address

        check_string(address, "address")
        for value, name in ((scope, "scope"), (reason, "reason")):
            if value is not None:
                check_string(value, name)
        try:
            address = parse_address(address, "address", any_length=True).address
        except ValidationError:
            address = address.strip()
        if reason is not None and reason not in SUPPRESSION_REASONS:
            raise ValidationError(
                f"reason must be one of {', '.join(SUPPRESSION_REASONS)}, not {reason!r}",
                field="reason",
            )
        return await self.store.remove_suppression(
            address, None if scope is None else suppression_scope(scope), reason
        )


@dataclasses.dataclass(frozen=True)
class EventPage:
    """A page of the event log, and the cursor to read on from (``next``: the last event's id,
    or the cursor given when there was nothing new: "0", before any event, for an empty log)."""

    events: list[Event]
    next: str

    def as_json(self) -> dict[str, Any]:
        return {"events": [event.as_json() for event in self.events], "next": self.next}


def _limit(limit: int) -> int:
    """A listing's limit: at most one past :data:`MAX_LIMIT`, so that a caller showing the
    largest listing, and reading one more to learn whether more match, learns it (a scale
    audit: at ``--limit 10000`` the CLI read 10,000, and its footer passed for the queue's
    total)."""
    if limit < 1:
        raise ValidationError("limit must be at least 1")
    return min(limit, MAX_LIMIT + 1)
