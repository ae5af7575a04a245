"""The store's protocols: durable state, leases, transitions and queries, and nothing about SMTP
or HTTP. One :class:`Store` made of role protocols (as pgqueuer's ports), so each part of
postlane can say which role it needs: delivery (claims, leases, results), operator views and
actions, throttle state, recorded history and alerts, and the suppression list.

One implementation written once (:mod:`postlane.store.sqlstore`) over two databases:
:mod:`postlane.store.sqlite` (the embedded default) and :mod:`postlane.store.postgres`. One
contract test suite runs unchanged against both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from postlane.cursors import DeadLetterKey, SuppressionKey
from postlane.events import Event, WebhookEndpointState
from postlane.feedback import DeliveryRef, Feedback, FeedbackResult, Report, UnmatchedFeedback
from postlane.message import Lane, PreparedMessage
from postlane.records import (
    Cancelled,
    ClaimedMessage,
    DeadGroup,
    DeadLetter,
    Deferral,
    DestinationStatus,
    EnqueueResult,
    ExportedMessage,
    FleetShares,
    MessageView,
    Outcome,
    ProbeTurn,
    Sample,
    SelectionCount,
    Selector,
    ShapeRow,
    Stats,
    Suppression,
)
from postlane.store.sql import Migration

#: the text of the ``deleted`` event of a recipient an operator deleted before it was sent
DELETED_BY_OPERATOR = "deleted by an operator"
#: ... and of one its application cancelled (``DELETE /v1/messages/ID``, ``cancel()``)
CANCELLED_BY_APPLICATION = "cancelled by the application"


class DeliveryStore(Protocol):
    """What ingest and workers need: enqueue, claim under a lease, record results, reap."""

    async def enqueue(self, messages: Sequence[PreparedMessage], now: float) -> list[EnqueueResult]:
        """Store messages durably; return only after the commit. Idempotency keys belong to
        their submitter: a message whose submitter already stored its key creates nothing and
        returns the first message's id, ``duplicate`` set; with a different payload it raises
        :class:`postlane.errors.IdempotencyConflict` and nothing is stored. Recipients on the
        suppression list are stored ``suppressed`` and never attempted; a ``send_at`` in the
        future makes the recipients due then. Each recipient gets its ``queued`` (or
        ``suppressed``) event."""
        ...

    async def claim_due(
        self,
        owner: str,
        quotas: Sequence[tuple[Lane, int]],
        *,
        limit: int,
        now: float,
        lease_until: float,
        reserved: Mapping[Lane, int] | None = None,
        kept: Mapping[Lane, int] | None = None,
    ) -> list[ClaimedMessage]:
        """Lease due deliveries: up to each lane's quota in the order given, then more from the
        lanes in that order until ``limit`` in all. Oldest due first within a lane; messages
        come back in lane order. ``reserved`` slots of ``limit`` (a worker's share kept for the
        high lane) go to no other lane unless that lane has nothing more due; ``kept`` slots go
        to no other lane beyond its quota (left free for that lane's next mail)."""
        ...

    async def record(self, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
        """Apply outcomes of deliveries leased by ``owner`` (each with its attempt record, all in
        one transaction). A delivery no longer leased by ``owner`` (deleted, reaped) is skipped.
        Returns how many were applied."""
        ...

    async def renew_leases(self, owner: str, lease_until: float) -> int: ...

    async def hand_back(self, owner: str, delivery_ids: Sequence[int] | None, now: float) -> int:
        """Return leased deliveries unattempted (graceful shutdown): no attempt is recorded."""
        ...

    async def reap_expired_leases(self, now: float, *, keep: str | None = None) -> int:
        """Make deliveries whose lease ran out due again, recording an attempt with an unknown
        outcome (the worker may have sent before it died). Not the leases of ``keep``: the
        reaping worker's own, which it renews while it lives (one that ran out while the store
        could not answer is a send it still has to record, not one to make again)."""
        ...

    async def expire_owner_leases(self, owners: Sequence[str], now: float) -> int:
        """End now the leases of owners known to be dead (a restarted single-host serve)."""
        ...

    async def lease_owners(self) -> list[str]: ...

    async def next_due_at(self) -> float | None:
        """The earliest next attempt time among waiting deliveries (None: nothing waits)."""
        ...

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an enqueue to commit; True when one did (claim
        again), False on timeout. An idle worker's wake-up, in place of a blind sleep: SQLite
        hears this process's enqueues, PostgreSQL every process's (LISTEN/NOTIFY)."""
        ...

    async def expire_due(self, now: float) -> int:
        """Dead-letter waiting deliveries whose ``expires_at`` has passed (reason and event
        ``expired``); returns how many. Claims never lease an expired delivery."""
        ...

    async def purge_finished(self, now: float, retention: float, dead_retention: float) -> int:
        """Remove finished messages past their retention; returns how many."""
        ...


class OperatorStore(Protocol):
    """What the CLI, the HTTP API and the dashboard read and do to the queue."""

    async def get_message(self, queue_id: str, *, history: bool = False) -> MessageView:
        """Raises :class:`postlane.errors.NotFound`."""
        ...

    async def get_content(self, queue_id: str) -> bytes: ...

    async def list_messages(self, selector: Selector, *, limit: int) -> list[MessageView]: ...

    async def page_messages(
        self, selector: Selector, *, after: int, limit: int
    ) -> tuple[list[MessageView], int | None]:
        """Messages with a selected recipient in arrival order (each at its first selected
        recipient's row), after the cursor ``after`` (0 for the first page): the page and the
        next page's cursor (None on the last page). Walks the primary key and stops at the
        page's end, so a page costs the same at any depth. No message is on two pages; one
        enqueued after a page was read comes after it (on PostgreSQL, an enqueue whose
        transaction was still open then may sit behind it: row ids are taken before commit)."""
        ...

    async def stats(self, now: float) -> Stats: ...

    async def list_dead(
        self, selector: Selector, *, limit: int, after: DeadLetterKey | None = None
    ) -> list[DeadLetter]:
        """Dead letters, newest death first (then by row): the first ``limit`` after the keyset
        ``after`` (None: from the first), so a listing pages without skipping or repeating."""
        ...

    async def get_dead(self, queue_id: str) -> list[DeadLetter]: ...

    # Bulk actions walk the selection in slices of delivery ids (select, then act on those ids),
    # so a million-row delete never holds a write lock for long, can show progress, and exports
    # exactly what it deletes. Each action re-checks the state it applies to, so racing a worker
    # is safe: a delivery that moved on meanwhile is left alone.

    async def select_delivery_ids(
        self, selector: Selector, states: Sequence[str], *, after: int, limit: int
    ) -> list[int]:
        """Ids of deliveries matching ``selector`` in ``states``, above ``after``, ascending."""
        ...

    async def selected_destinations(self, selector: Selector, states: Sequence[str]) -> list[str]:
        """The destinations (stored at enqueue, MX lookups included) of the selected deliveries
        in ``states``: what a flush must lift."""
        ...

    async def summarize(self, selector: Selector, states: Sequence[str]) -> list[SelectionCount]:
        """What an action would touch: counts by lane, domain, state and last reply class."""
        ...

    async def export_deliveries(self, delivery_ids: Sequence[int]) -> list[ExportedMessage]:
        """Full records (content, recipients among ``delivery_ids``, histories) by message."""
        ...

    async def flush(self, delivery_ids: Sequence[int], now: float) -> int:
        """Queued or deferred deliveries become due now."""
        ...

    async def hold(self, delivery_ids: Sequence[int], now: float) -> tuple[int, int]:
        """Queued or deferred deliveries become held; one being sent is held after its try
        (unless the try delivers it). Returns how many were held, and how many being sent
        were noted."""
        ...

    async def release(self, delivery_ids: Sequence[int], now: float) -> tuple[int, int]:
        """Held deliveries become due now (mail scheduled for later: at its time); one being
        sent has its pending hold cancelled. Returns how many were released, and how many
        being sent had a hold cancelled."""
        ...

    async def delete_deliveries(
        self, delivery_ids: Sequence[int], states: Sequence[str], *, why: str = DELETED_BY_OPERATOR
    ) -> int:
        """Remove deliveries still in ``states`` (with their attempts); a message left without
        any goes too. A delivery that moved to another state meanwhile is left alone. Each one
        removed before it was sent gets a ``deleted`` event saying ``why``."""
        ...

    async def cancel_message(
        self, queue_id: str, *, submitter: str | None = None, now: float
    ) -> Cancelled | None:
        """Remove what of a message still waits (queued, deferred, held), each with a
        ``deleted`` event "cancelled by the application", in one transaction; what it left
        with their states. None for no such message, or one ``submitter`` did not hand in."""
        ...

    async def requeue_dead(self, delivery_ids: Sequence[int], now: float) -> list[float]:
        """Dead deliveries get a fresh start (attempts 0, due now, max_age counted from now);
        returns how long each had been dead (for the recovery-time metric)."""
        ...

    async def import_messages(self, messages: Sequence[ExportedMessage], now: float) -> int:
        """Bring back exported messages with their ids, Message-IDs, content and histories;
        recipients that were waiting or being sent come back due now. Returns how many
        recipients were restored (one already present is skipped)."""
        ...

    async def dead_groups(self, selector: Selector, *, limit: int) -> list[DeadGroup]:
        """Dead letters grouped by class, domain and normalised reply, largest group first."""
        ...

    async def shape(self, now: float, edges: Sequence[float], *, limit: int) -> list[ShapeRow]:
        """Waiting recipients by domain and age bucket (qshape); ``edges`` in seconds."""
        ...


class ThrottleStore(Protocol):
    """Destinations' shared state: pauses and rates, and the deliveries waiting on them."""

    async def defer_unattempted(
        self, owner: str, deferrals: Sequence[Deferral], now: float, reason: str
    ) -> int:
        """Hand leased deliveries back to wait until the given times, using no attempt (their
        destination cannot take them now). One whose ``waits_for`` has more operator lifts
        recorded than the deferral knew of is made due now instead (see :class:`Deferral`);
        the process then hears of it as news (:meth:`wait_for_destination_news`)."""
        ...

    async def defer_destination(
        self, destination: str, until: float, now: float, reason: str, *, lifts: int | None = None
    ) -> int | None:
        """Push every waiting delivery of a paused destination to the end of its pause; how
        many moved. With ``lifts`` (the operator lifts of it the caller knew of), nothing moves
        and None is returned when more are recorded: the pause was lifted meanwhile."""
        ...

    async def hasten(self, destination: str | None, now: float, reason: str) -> int:
        """Make due now the deliveries of ``destination`` (all, when None) that wait with
        ``reason`` (sent back for a slot): their destination can take them sooner now."""
        ...

    async def save_destination_states(self, statuses: Sequence[DestinationStatus]) -> None:
        """Record destinations' pauses and rates, for other processes and for ``stats``."""
        ...

    async def destination_states(self) -> list[DestinationStatus]:
        """Recorded pauses and rates, with how many deliveries are being sent to each."""
        ...

    async def share_destinations(
        self, owner: str, demands: Mapping[str, float], now: float, lease_until: float
    ) -> FleetShares:
        """Renew this process's demands on limited destinations until ``lease_until``; return
        every live demand on them and how many processes hold shares: each process takes the
        share of a destination's rate and concurrency its demand is of the total."""
        ...

    async def forget_shares(self, owner: str) -> None: ...

    async def take_fleet_slot(
        self, owner: str, destination: str, cap: int, now: float, lease_until: float
    ) -> bool:
        """One more send in flight to ``destination`` for process ``owner``, if the live sends
        in flight of every process stay within ``cap``: True when granted (then
        :meth:`give_fleet_slots` once the send is over). Sends of a process that stopped
        renewing its shares (:meth:`share_destinations`) no longer count."""
        ...

    async def give_fleet_slots(self, owner: str, destinations: Sequence[str]) -> None:
        """Sends :meth:`take_fleet_slot` granted are over, one per name given."""
        ...

    async def take_destination_slots(
        self, destination: str, count: int, earliest: float, interval: float, latest: float
    ) -> float:
        """``count`` successive slots of ``destination``'s rate, ``interval`` apart, for
        deliveries the fleet's processes send back to wait: from the fleet's next free slot,
        or ``earliest`` if later, never past ``latest``. Returns the first; the next call
        continues after the last. One schedule for every process, so what comes back due adds
        up to the rate whoever claims it. :meth:`hasten` and :meth:`lift_destinations` start
        it again."""
        ...

    async def take_probe(
        self,
        destination: str,
        owner: str,
        pause_end: float,
        now: float,
        timeout: float,
        *,
        presence_until: float,
    ) -> ProbeTurn:
        """When ``destination``'s pause (which ended at ``pause_end``) is over, one process of
        the fleet probes: PROBE for the first to ask (or the one probing already), WAIT while
        another live process's probe is under way (for ``timeout`` seconds at most) or after
        it failed (its longer pause is recorded), OPEN once it went through
        (:meth:`end_probe`). A probe of an earlier pause, or of a process that stopped
        renewing its shares, is over. Taking the probe renews the taker's presence in the
        fleet until ``presence_until``."""
        ...

    async def end_probe(self, destination: str, owner: str, pause_end: float, opened: bool) -> None:
        """The outcome of ``owner``'s probe of ``destination`` after the pause that ended at
        ``pause_end``: open again, or failed."""
        ...

    async def wait_for_destination_news(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a destination to be paused or lifted; True when
        one was (read the states again), False on timeout. Every process's news on PostgreSQL
        (LISTEN/NOTIFY, heard while this process also waits for work, as a worker does
        between claims); this process's on SQLite (others' are read at the next sync)."""
        ...

    async def lift_destinations(
        self, destinations: Sequence[str] | None, now: float, *, every_waiting: bool = False
    ) -> int:
        """End pauses and slow-downs (all when None) and make due what they held back (the
        backlog a pause pushed back, what waits for a rate or cap; with ``every_waiting`` or
        None, what waits for any destination); returns how many deliveries became due."""
        ...


class HistoryStore(Protocol):
    """The event log, the recorded history behind charts and alert rules, and the alerts'
    shared state."""

    async def events_after(
        self, after: int | None, *, limit: int, types: Sequence[str] = ()
    ) -> list[Event]:
        """Events after the event ``after`` (None or 0: from the oldest kept), in commit order, at
        most ``limit``; only of ``types`` when given. An event is written in the transaction of
        the change it tells, so none is lost or invented by a crash, and none ever appears
        behind a cursor a reader has passed (on PostgreSQL too, across processes). Raises
        :class:`postlane.errors.NotFound` for a cursor no longer kept."""
        ...

    async def purge_events(self, before: float) -> int:
        """Forget events older than ``before``; returns how many."""
        ...

    async def record_samples(self, samples: Sequence[Sample]) -> bool:
        """Record one minute's samples; False when another process recorded it first."""
        ...

    async def samples(self, since: float) -> list[Sample]:
        """The recorded history from ``since`` on, oldest first."""
        ...

    async def finished_between(self, start: float, end: float) -> tuple[int, int, int]:
        """(delivered, dead-lettered, of which hard bounces) in ``[start, end)``."""
        ...

    async def event_types_between(
        self, start: float, end: float, types: Sequence[str]
    ) -> Mapping[str, int]:
        """Events of ``types`` in ``[start, end)`` counted by type (a minute's complaints)."""
        ...

    async def attempt_classes_between(self, start: float, end: float) -> Mapping[str, int]:
        """Attempts in ``[start, end)`` counted by class (a minute's deferrals, soft bounces)."""
        ...

    async def destination_replies(self, since: float) -> list[tuple[str, str, int]]:
        """Attempts since ``since``: (destination, class, count)."""
        ...

    async def purge_samples(self, before: float) -> int: ...

    async def claim_recoveries(self, since: float, *, limit: int = 1000) -> list[float]:
        """Take up to ``limit`` recorded recoveries (requeued dead letters delivered), oldest
        first: each is taken once, by whichever process asks first. Returns the seconds each
        was dead, of those recovered at ``since`` or later (older ones are dropped: history
        from before this process's metrics began)."""
        ...

    async def recoveries_after(self, after_id: int) -> list[tuple[int, float]]:
        """Requeued dead letters recorded after row ``after_id``: (row id, seconds dead)."""
        ...

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        """Record that an alert fires (or resolves); True only for the caller that changed it,
        so one process notifies."""
        ...

    async def alerts_firing(self) -> list[tuple[str, float]]: ...


class SuppressionStore(Protocol):
    """The suppression list: addresses never to be sent to."""

    async def list_suppressions(
        self, *, limit: int, after: SuppressionKey | None = None
    ) -> list[Suppression]:
        """The list, newest first (then by address, scope and reason; expired entries
        included: they say when they ended): the first ``limit`` after the keyset ``after``
        (None: from the first)."""
        ...

    async def suppressions_of(self, addresses: Sequence[str]) -> list[Suppression]:
        """Every entry of these addresses (case aside), newest first, expired ones too."""
        ...

    async def add_suppression(self, suppression: Suppression) -> bool:
        """Add an entry; False when the address is already suppressed in that scope, for that
        reason, for those lanes (the first entry wins, unless it has expired). Each reason is
        an entry of its own (a hard bounce after an unsubscribe from bulk mail is a second
        entry: removing it leaves the unsubscribe); one that stops lanes the entry of its
        scope and reason does not (an unsubscribe from one kind of mail, then another) widens
        it to them, and to the later expiry of the two."""
        ...

    async def remove_suppression(
        self, address: str, scope: str | None = None, reason: str | None = None
    ) -> bool:
        """Take an address off the list, in one scope or (None) in every scope, for one
        reason or (None) every reason."""
        ...

    async def is_suppressed(
        self,
        addresses: Sequence[str],
        *,
        sender: str = "",
        lane: Lane | None = None,
        now: float | None = None,
    ) -> Mapping[str, bool]:
        """Which addresses mail of ``lane`` from ``sender`` must not go to: suppressed for
        every sender or for ``sender``'s domain, for every lane or for ``lane`` (None: any
        entry counts), and (with ``now``) not expired."""
        ...

    async def lift_suppressions(self, mail: Sequence[tuple[str, str, Lane]]) -> list[str]:
        """Remove the entries that stop mail of ``lane`` from ``sender`` to ``address`` (for
        every sender or for the sender's domain), for each ``(address, sender, lane)`` (a
        requeue of dead letters that lifts their suppression); entries that stop other lanes
        only, or another sender's mail, stay. The addresses that had some, sorted."""
        ...

    async def suppressed_mail(
        self, mail: Sequence[tuple[str, str, Lane | None]], *, now: float | None = None
    ) -> list[bool]:
        """:meth:`is_suppressed` for many mails at once, each its own ``(address, sender,
        lane)``: whether an entry stops it, in the order given; one look-up for all."""
        ...


class FeedbackStore(Protocol):
    """What is heard after the first hop: DSNs, complaints, provider events, unsubscribes."""

    async def delivery_refs(self, delivery_ids: Sequence[int]) -> list[DeliveryRef]:
        """The deliveries with these ids that exist (a token names one by id)."""
        ...

    async def find_deliveries(
        self, address: str, *, queue_id: str | None = None, message_id: str | None = None
    ) -> list[DeliveryRef]:
        """The deliveries to ``address`` of the message with postlane's id ``queue_id``, or
        with the Message-ID header ``message_id``."""
        ...

    async def sole_deliveries(self, address: str, message_id: str) -> list[DeliveryRef]:
        """The deliveries to ``address`` of messages with the Message-ID header
        ``message_id`` that had no other recipient (whose Message-ID no one else saw)."""
        ...

    async def record_feedback(self, items: Sequence[Feedback], now: float) -> list[FeedbackResult]:
        """Apply feedback, each item in the same transaction as its state change (a sent
        recipient becomes ``bounced`` or ``complained``; a repeat changes nothing), history
        entry, event and suppression."""
        ...

    async def record_unmatched(self, report: Report, reason: str, now: float) -> int:
        """Keep a report nothing matched, for the operator, saying why; returns its id."""
        ...

    async def list_unmatched(self, *, limit: int) -> list[UnmatchedFeedback]:
        """Unmatched reports, newest first, without their contents."""
        ...

    async def get_unmatched(self, report_id: int) -> UnmatchedFeedback:
        """One unmatched report with its content; raises :class:`NotFound`."""
        ...

    async def purge_unmatched(self, before: float) -> int: ...

    async def delete_unmatched(self, report_id: int) -> bool:
        """Forget one unmatched report (an operator applied it); False if it was not kept."""
        ...


class AccessStore(Protocol):
    """What every process of the store must agree on about access: the keys they share, the
    dashboard sessions logged out."""

    async def secret(self, name: str, now: float) -> bytes:
        """A random key made once and shared by every process of this store."""
        ...

    async def end_session(self, session_id: str, until: float, now: float) -> None:
        """A dashboard session was logged out: refuse it everywhere until ``until`` (when it
        would have expired anyway); forgets the logouts whose ``until`` has passed."""
        ...

    async def session_ended(self, session_id: str, now: float) -> bool:
        """The session was logged out (and has not yet expired)."""
        ...


class WebhookStore(Protocol):
    """Outbound webhook endpoints: their place in the event log, failures, pauses, leases."""

    async def claim_webhook_endpoint(
        self, name: str, owner: str, *, now: float, lease_until: float, start_after: int
    ) -> WebhookEndpointState | None:
        """Lease an endpoint (made at ``start_after`` the first time); None while another
        process holds it. Claiming again renews the lease."""
        ...

    async def release_webhook_endpoint(self, name: str, owner: str) -> None: ...

    async def webhook_delivered(
        self, name: str, owner: str, *, previous: int, cursor: int, count: int, now: float
    ) -> bool:
        """The endpoint acknowledged events up to ``cursor``: its cursor moves from
        ``previous`` (compare-and-set); False when no longer held or no longer ``previous``."""
        ...

    async def webhook_failed(
        self, name: str, owner: str, *, error: str, paused_until: float, now: float
    ) -> bool: ...

    async def webhook_endpoints(self) -> list[WebhookEndpointState]: ...

    async def replay_webhook(self, name: str, *, after: int, now: float) -> bool:
        """Send again from the event after ``after``."""
        ...

    async def forget_webhook_endpoints(self, keep: Sequence[str]) -> int: ...


class Store(
    DeliveryStore,
    OperatorStore,
    ThrottleStore,
    HistoryStore,
    SuppressionStore,
    FeedbackStore,
    WebhookStore,
    AccessStore,
    Protocol,
):
    """Everything the queue keeps. Every method is one transaction."""

    #: where the data lives, for messages (never includes a password)
    description: str

    @property
    def migration(self) -> Migration | None:
        """What :meth:`open` did to the schema (None: nothing, or not opened yet)."""
        ...

    async def open(self) -> None:
        """Connect, and bring the schema to the current version (migrations run here), or
        refuse an older schema when the store was made with ``create=False``."""
        ...

    async def close(self) -> None: ...

    async def database_clock(self) -> float | None:
        """The database server's clock now (Unix seconds); None for a store that is a file of
        this host (its clock is this host's). Hosts compare leases with their own clocks, so
        one far from it risks the others' leases (:func:`postlane.leases.clock_skew`)."""
        ...

    async def check(self, now: float) -> None:
        """Make one small write now; raises :class:`postlane.errors.StoreUnavailable` when the
        store cannot take writes (a full disk, a corrupted file, a lost server)."""
        ...
