"""The delivery worker: claim, gate, send, decide, record; shut down gracefully.

One asyncio task claims due deliveries in batches (lane quotas from :mod:`postlane.lanes`) while
at most ``concurrency`` deliveries are in flight; each claimed message is delivered by its own
task: what is past ``max_age`` or ``max_attempts`` is dead-lettered without a try, the
:class:`~postlane.gate.ThrottleGate` admits the rest or sends it back to wait, the transport
sends, each reply is classified, reported to the gate and decided by the
:class:`~postlane.policy.Policy`. Results go to a recorder that writes them in batches, each
outcome with its attempt, in one transaction. Leases are renewed while sends run. On stop
(SIGTERM, Ctrl-C), claiming stops, in-flight sends get ``shutdown_grace`` to finish and whatever
is left is handed back unattempted.

Nothing a transport does stalls the queue: an unexpected exception becomes an attempt classed
``temporary`` with its text recorded, and the worker goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, Unpack

from postlane.classify import ReplyClass, Verdict
from postlane.clock import Clock, SystemClock
from postlane.config import Config, DeliveryConfig, ThrottleConfig
from postlane.errors import StoreUnavailable
from postlane.gate import ThrottleGate
from postlane.lanes import HighDemand, LaneScheduler
from postlane.leases import ClockWatch, clock_skew, lease_owner_id, owner_is_dead
from postlane.logs import OutageLog, log_attempt, log_expiry
from postlane.message import Lane, RecipientState
from postlane.policy import Action, Decision, Policy, untried
from postlane.recorder import Recorder
from postlane.records import (
    WAITING_FOR_DESTINATION,
    AttemptRecord,
    ClaimedMessage,
    Delivery,
    Outcome,
)
from postlane.store.base import Store
from postlane.throttle import Throttle
from postlane.transports.base import Envelope, Response, Transport, interrupted
from postlane.waits import first_of

log = logging.getLogger("postlane.worker")
#: one line per delivery attempt (never the address's local part, never the content)

#: how often finished messages past their retention are removed
PURGE_INTERVAL = 600.0
#: how long a worker waits before its first claim for processes starting beside it to show
#: up in the fleet's shares of destinations' limits (only when there are such limits)
JOIN_DELAY = 1.0
#: once the store answers again after housekeeping found it could not, no lease is reaped for
#: this long: every live worker of the fleet lost the store too, and renews its leases within
#: a second of its return (:meth:`Worker._renew_leases`). Leases that ran out during an outage
#: longer than they are were reaped at once by the first host back, and what their live
#: workers had sent was sent again
REAP_AFTER_OUTAGE = 5.0
#: while the store cannot answer, the first wait before claiming again, and the longest
STORE_RETRY_FIRST = 0.5
STORE_RETRY_MAX = 10.0
#: on stop, how long the results of finished sends are waited for beyond what is left of
#: ``shutdown_grace`` while the store cannot answer
RECORD_AT_STOP = 5.0


@dataclass(frozen=True)
class DecidedAttempt:
    """One try and what the policy decided after it, as observers are told it."""

    lane: Lane
    destination: str
    verdict: Verdict
    decision: Decision
    #: when the recipient joined the queue (delivery latency counts from here): its message's
    #: arrival, or its ``send_at`` when it was scheduled (a campaign scheduled for tomorrow is
    #: not a day late), or its requeue from the dead-letter queue
    created_at: float
    now: float


class DeliveryObserver(Protocol):
    """Told about every decided try (metrics implement this)."""

    def attempted(self, attempt: DecidedAttempt) -> None: ...

    def dead_without_try(self, cls: ReplyClass) -> None:
        """A recipient dead-lettered before a try (max_age or max_attempts already reached)."""
        ...


class _NoObserver:
    def attempted(self, attempt: DecidedAttempt) -> None:
        return None

    def dead_without_try(self, cls: ReplyClass) -> None:
        return None


@dataclass(frozen=True)
class Retention:
    """How long what is finished is kept, in seconds (``[store]``, ``[bounces]``)."""

    #: sent messages
    sent: float
    #: dead letters
    dead: float
    #: the event log (None: forever)
    events: float | None = None
    #: reports that matched no delivery (None: forever)
    unmatched: float | None = None


class WorkerOptions(TypedDict, total=False):
    """What :meth:`Worker.from_config` takes beside the configuration (see :class:`Worker`)."""

    clock: Clock | None
    observer: DeliveryObserver | None
    owner: str | None
    wake: asyncio.Event | None


class Worker:
    """Delivers what the store has due through one transport."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        policy: Policy,
        *,
        delivery: DeliveryConfig | None = None,
        clock: Clock | None = None,
        lanes: LaneScheduler | None = None,
        observer: DeliveryObserver | None = None,
        owner: str | None = None,
        wake: asyncio.Event | None = None,
        retention: Retention | None = None,
        throttle: Throttle | None = None,
        log_recipients: str = "none",
    ) -> None:
        self.store = store
        #: how attempt lines show recipients ([log] recipients: none, hash, full)
        self.log_recipients = log_recipients
        self.transport = transport
        self.policy = policy
        self.settings = delivery or DeliveryConfig()
        self.clock = clock or SystemClock()
        self.lanes = lanes or LaneScheduler()
        self.observer: DeliveryObserver = observer or _NoObserver()
        self.owner = owner or lease_owner_id()
        #: set by in-process enqueues so an idle worker claims at once
        self.wake = wake or asyncio.Event()
        #: how long finished messages, events and unmatched reports are kept; None: forever
        self.retention = retention
        self.gate = ThrottleGate(
            throttle or Throttle(ThrottleConfig(enabled=False)),
            store,
            transport,
            self.clock,
            self.wake,
            owner=self.owner,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        #: of which high-lane deliveries (the reserve is kept for them)
        self._in_flight_high = 0
        #: messages claimed whose admission has not run yet (see :meth:`ThrottleGate.relay_room`)
        self._unadmitted: set[str] = set()
        #: slots the other lanes never take, sized to the high lane's recent traffic
        self._high_demand = HighDemand(self.settings.concurrency)
        self._slot_freed = asyncio.Event()
        self.recorder = Recorder(store, self.owner, self.clock, self.settings.lease)
        self.sent = 0
        self.attempts = 0
        #: True while run() delivers (for /readyz)
        self.running = False

    @property
    def throttle(self) -> Throttle:
        return self.gate.throttle

    @classmethod
    def from_config(
        cls, config: Config, store: Store, transport: Transport, **options: Unpack[WorkerOptions]
    ) -> Worker:
        """A worker as ``config`` says: its retry policy, lanes, retention and throttle; the
        ``options`` go to the worker as they are."""
        return cls(
            store,
            transport,
            Policy.from_config(config),
            delivery=config.delivery,
            lanes=LaneScheduler.from_config(config),
            retention=Retention(
                config.store.retention,
                config.store.dead_retention,
                events=config.store.event_retention,
                unmatched=config.bounces.unmatched_retention,
            ),
            throttle=Throttle.from_config(config),
            log_recipients=config.log.recipients,
            **options,
        )

    # -- running ---------------------------------------------------------------------------------

    async def reclaim_dead_owners(self) -> int:
        """End at once the leases held by dead processes of this host, and make them due."""
        dead = [owner for owner in await self.store.lease_owners() if owner_is_dead(owner)]
        now = self.clock.now()
        if dead:
            await self.store.expire_owner_leases(dead, now)
        reaped = await self.store.reap_expired_leases(now, keep=self.owner)
        if dead:
            # as housekeeping says it: what they were sending may have gone out already
            log.warning(
                "%d delivery(ies) returned from %d stopped process(es) on this host that had "
                "not recorded a result: those recipients may get the message twice",
                reaped,
                len(dead),
            )
        elif reaped:  # leases of another host's, or an older postlane's, that ran out
            log.warning(
                "%d delivery(ies) returned whose leases had lapsed without a recorded result "
                "(their process stopped, or lost the store): those recipients may get the "
                "message twice",
                reaped,
            )
        return reaped

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, then shut down gracefully."""
        self.running = True
        self.recorder.start()
        await self._join_fleet(stop)
        helpers = [
            asyncio.create_task(self._renew_leases(stop), name="postlane-lease-renewal"),
            asyncio.create_task(self._housekeeping(stop), name="postlane-housekeeping"),
            asyncio.create_task(self._follow_destinations(stop), name="postlane-destinations"),
        ]
        try:
            await self._claim_loop(stop)
        finally:
            self.running = False
            for helper in helpers:
                helper.cancel()
            await self._shutdown()

    async def _join_fleet(self, stop: asyncio.Event) -> None:
        """Before the first claim, when destinations have limits the fleet shares: say this
        worker is here, and give processes starting beside it a moment to say so too, so that
        none takes a whole destination's rate for itself in its first second."""
        if not self.gate.throttle.has_limits:
            return
        try:
            await self.gate.sync()
            await first_of(stop.wait(), timeout=JOIN_DELAY)
            await self.gate.sync()
        except Exception:
            log.exception("could not join the fleet's shares of destinations' limits")

    async def run_until_idle(self) -> int:
        """Deliver everything due now, wait for it to be recorded, return (arq's "burst" mode).
        Returns the number of attempts made. Useful for tests with an injected clock."""
        self.recorder.start()
        before = self.attempts
        await self.sync_throttle()
        await self.store.expire_due(self.clock.now())
        try:
            while True:
                if await self.store.wait_for_destination_news(0):
                    # a pause or a lift was recorded (or a deferral met a lift this worker
                    # had not adopted, and made its delivery due): adopt it before claiming
                    # again, as a running worker's _follow_destinations does
                    await self.sync_throttle()
                claimed = await self._claim_batch()
                if not claimed and not self._tasks:
                    break
                if not claimed:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                await self._wait_for_slot()
        finally:
            await self._drain_tasks(timeout=None)
            await self.recorder.stop()
            await self.sync_throttle()
        return self.attempts - before

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        """Claim until ``stop``; while the store cannot answer (a lost PostgreSQL connection, a
        failover, a full disk), wait and claim again, longer each time up to
        :data:`STORE_RETRY_MAX`, instead of ending the process: the store's return resumes
        delivery with nobody restarting anything. Sends under way go on."""
        wait = STORE_RETRY_FIRST
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self._claims(stop)
                return
            except StoreUnavailable as exc:
                if time.monotonic() - started > STORE_RETRY_MAX * 6:
                    wait = STORE_RETRY_FIRST  # it had worked a while: a new outage
                log.warning("the store cannot answer: %s; claiming again in %.1f s", exc, wait)
                await first_of(stop.wait(), timeout=wait)
                wait = min(wait * 2, STORE_RETRY_MAX)

    async def _claims(self, stop: asyncio.Event) -> None:
        """Claim in batches while there is room; when the slots are nearly all busy, wait for
        one to free or for new mail. New mail (an enqueue here, a NOTIFY, the poll) is claimed
        as soon as one slot is free, not when a batch's worth are: it may be a password reset,
        and the high lane's reserve is waiting for it."""
        poll = self.settings.poll_interval
        threshold = self._batch_threshold()
        nudged = False
        while not stop.is_set():
            free = self.settings.concurrency - self._in_flight
            if self._free_for_any_lane() >= threshold or (free > 0 and nudged):
                nudged = False
                if await self._claim_batch():
                    continue
                if self._free_for_any_lane() >= threshold:
                    await self._idle(stop, poll)
                    nudged = True
                    continue
            # busy: wait for a slot to free, or for new mail to claim with the free ones
            nudged = nudged or self.wake.is_set()
            self._slot_freed.clear()
            self.wake.clear()
            await first_of(
                stop.wait(),
                self._slot_freed.wait(),
                self.wake.wait(),
                self.store.wait_for_work(poll),
                timeout=poll,
            )
            if self.wake.is_set() or not self._slot_freed.is_set():
                nudged = True  # new mail, or the poll interval passed

    async def _idle(self, stop: asyncio.Event, poll: float) -> None:
        """Nothing due now: sleep until new mail, the next due time, or the poll interval."""
        next_due = await self.store.next_due_at()
        paused = self.gate.relay_paused_until()
        if paused is not None:
            next_due = paused if next_due is None else max(next_due, paused)
        room = self.gate.relay_room(len(self._unadmitted))
        if next_due is not None and room is not None and room[0] == 0:
            next_due = max(next_due, self.clock.now() + room[1])  # this process's next token
        timeout = poll
        if next_due is not None:
            timeout = max(0.0, min(poll, next_due - self.clock.now()))
        self.wake.clear()
        # the store hears enqueues (PostgreSQL: LISTEN/NOTIFY from other processes' too)
        await first_of(
            stop.wait(),
            self.wake.wait(),
            self.store.wait_for_work(timeout),
            timeout=timeout,
        )

    def _batch_threshold(self) -> int:
        """Free slots worth a claim of their own (a claim per freed slot would cost a store
        round trip per delivery)."""
        return max(1, min(self.settings.batch_size, self.settings.concurrency) // 4)

    def _held_for_high(self) -> int:
        """Free slots that only high mail may take now (see :class:`HighDemand`)."""
        return max(0, self._high_demand.kept(self.clock.now()) - self._in_flight_high)

    def _free_for_any_lane(self) -> int:
        return self.settings.concurrency - self._in_flight - self._held_for_high()

    async def _wait_for_slot(self) -> None:
        threshold = self._batch_threshold()
        while self._free_for_any_lane() < threshold and self._in_flight:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    def relay_paused_until(self) -> float | None:
        """While the relay itself is paused, nothing is claimed at all."""
        return self.gate.relay_paused_until()

    async def _claim_batch(self) -> int:
        free = self.settings.concurrency - self._in_flight
        if free <= 0 or self.gate.relay_paused_until() is not None:
            return 0
        limit = min(free, self.settings.batch_size)
        room = self.gate.relay_room(len(self._unadmitted))
        if room is not None:
            limit = min(limit, room[0])
            if limit <= 0:
                return 0
        quotas = self.lanes.quotas(limit)
        now = self.clock.now()
        # the high lane's slots: those kept from the others (its recent traffic), and those of
        # [delivery] high_reserve beyond, which they may borrow while no high mail is due
        kept = self._held_for_high()
        borrowable = self.settings.reserve_for_high - self._in_flight_high - kept
        claimed = await self.store.claim_due(
            self.owner,
            quotas,
            limit=limit,
            now=now,
            lease_until=now + self.settings.lease,
            reserved={Lane.HIGH: borrowable},
            kept={Lane.HIGH: kept},
        )
        got: Counter[Lane] = Counter()
        total = 0
        for message in claimed:
            got[message.lane] += len(message.deliveries)
            total += len(message.deliveries)
        self.lanes.claimed(quotas, got)
        for message in await self._without_suppressed(claimed):
            self._start(message)
        return total

    async def _without_suppressed(self, claimed: Sequence[ClaimedMessage]) -> list[ClaimedMessage]:
        """Recipients put on the suppression list after their message was queued (a hard
        bounce of another message, an operator, an unsubscribe from their lane's mail) are
        recorded ``suppressed``, never sent."""
        # a suppression holds for every sender or for one sender domain, and for every lane or
        # some (an unsubscribe from bulk mail): each delivery asks with its message's sender
        # and lane, all in one look-up
        deliveries = [(m, d) for m in claimed for d in m.deliveries]
        hits = await self.store.suppressed_mail(
            [(d.address, m.sender, m.lane) for m, d in deliveries], now=self.clock.now()
        )
        stopped = {d.id for (_m, d), hit in zip(deliveries, hits, strict=True) if hit}
        if not stopped:
            return list(claimed)
        outcomes = []
        kept = []
        for message in claimed:
            keep = tuple(d for d in message.deliveries if d.id not in stopped)
            outcomes += [
                untried(d, RecipientState.SUPPRESSED, "on the suppression list")
                for d in message.deliveries
                if d.id in stopped
            ]
            if keep:
                kept.append(dataclasses.replace(message, deliveries=keep))
        await self.recorder.record(outcomes)
        return kept

    def _start(self, message: ClaimedMessage) -> None:
        size = len(message.deliveries)
        high = size if message.lane is Lane.HIGH else 0
        self._in_flight += size
        self._in_flight_high += high
        self._unadmitted.add(message.queue_id)
        if high:
            self._high_demand.started(self._in_flight_high, self.clock.now())
        task = asyncio.create_task(
            self._deliver(message), name=f"postlane-deliver-{message.queue_id}"
        )
        self._tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            self._unadmitted.discard(message.queue_id)  # cancelled before its admission
            self._in_flight -= size
            self._in_flight_high -= high
            self._slot_freed.set()

        task.add_done_callback(finished)

    # -- one message -----------------------------------------------------------------------------

    async def _deliver(self, message: ClaimedMessage) -> None:
        """Claimed → gate → send → decide → record, for one message's deliveries."""
        now = self.clock.now()
        outcomes: list[Outcome] = []
        alive: list[Delivery] = []
        for delivery in message.deliveries:
            refusal = self.policy.refuse_before_sending(
                message.lane, attempts=delivery.attempts, created_at=delivery.created_at, now=now
            )
            if refusal is None:
                alive.append(delivery)
                continue
            # under its last reply's class (the reply stays its last response), or, never
            # tried, that of the trouble that held it back (a relay paused for connection
            # failures: 'dlq requeue --class connection' after the outage takes it with those
            # that were tried), as its dead letter shows it
            cls = delivery.last_class or self.gate.held_by(message, delivery)
            outcomes.append(untried(delivery, RecipientState.DEAD, refusal, cls))
            self.observer.dead_without_try(cls or ReplyClass.TEMPORARY)
            log_expiry(message, delivery, refusal, cls, self.log_recipients)
        try:
            clearance = await self.gate.admit(message, alive, now)
        finally:
            self._unadmitted.discard(message.queue_id)
        if clearance.waiting:
            await self.store.defer_unattempted(
                self.owner, clearance.waiting, now, WAITING_FOR_DESTINATION
            )
        if clearance.to_send:
            try:
                outcomes.extend(await self._send(message, clearance.to_send))
            finally:
                await self.gate.release(clearance)
        await self.recorder.record(outcomes)

    async def _send(self, message: ClaimedMessage, deliveries: Sequence[Delivery]) -> list[Outcome]:
        envelope = Envelope(
            queue_id=message.queue_id,
            sender=message.sender,
            recipients=tuple(d.address for d in deliveries),
            content=message.content,
            message_id=message.message_id,
            idempotency_key=message.idempotency_key,
            lane=message.lane.value,
            delivery_ids=tuple(d.id for d in deliveries),
        )
        started = time.monotonic()
        try:
            responses = await self.transport.send(envelope)
            if len(responses) != len(deliveries):
                raise RuntimeError(
                    f"transport {self.transport.name} returned {len(responses)} responses "
                    f"for {len(deliveries)} recipients"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # invariant 9: an unknown failure is a temporary attempt
            log.exception("transport %s failed unexpectedly", self.transport.name)
            text = (
                f"unexpected error in transport {self.transport.name}: {type(exc).__name__}: {exc}"
            )
            responses = [
                Response(None, text, self.transport.name, failure=ReplyClass.TEMPORARY)
                for _ in deliveries
            ]
        duration_ms = int((time.monotonic() - started) * 1000)
        now = self.clock.now()
        return [
            self._decide(message, delivery, response, duration_ms, now)
            for delivery, response in zip(deliveries, responses, strict=True)
        ]

    def _decide(
        self,
        message: ClaimedMessage,
        delivery: Delivery,
        response: Response,
        duration_ms: int,
        now: float,
    ) -> Outcome:
        """One reply: the gate adapts the limits to it, the policy decides what follows."""
        verdict = response.verdict()
        cool_down = self.gate.observe(
            message,
            delivery,
            verdict,
            response.retry_after,
            now,
            response.misconfigured,
            per_recipient=response.per_recipient,
        )
        decision = self.policy.decide(
            verdict,
            lane=message.lane,
            attempts=delivery.attempts,
            deferrals=delivery.deferrals,
            created_at=delivery.created_at,
            now=now,
            cool_down=cool_down,
            flushed=delivery.flushed,
        )
        self.attempts += 1
        if decision.action is Action.SEND:
            self.sent += 1
        log_attempt(
            message,
            delivery,
            verdict,
            decision,
            duration_ms,
            self.log_recipients,
            response.misconfigured,
        )
        self.observer.attempted(
            DecidedAttempt(
                message.lane, delivery.destination, verdict, decision, delivery.created_at, now
            )
        )
        attempt = AttemptRecord(
            at=now,
            cls=verdict.cls,
            code=verdict.code,
            enhanced=verdict.enhanced,
            text=verdict.text or response.text,
            relay=response.relay,
            destination=delivery.destination,
            duration_ms=duration_ms,
            counted=decision.counted,
        )
        return decision.outcome(delivery, attempt)

    # -- leases, housekeeping, shutdown ------------------------------------------------------------

    async def _renew_leases(self, stop: asyncio.Event) -> None:
        """Renew this worker's leases every third of a lease; after a failure, every second
        until the store answers again (a lease that ran out meanwhile is still this worker's:
        housekeeping never reaps its own, so its sends are recorded, not made again)."""
        interval = max(self.settings.lease / 3, 0.05)
        wait = interval
        outage = OutageLog(log, "leases not renewed (trying again every second)")
        while not stop.is_set():
            await first_of(stop.wait(), timeout=wait)
            wait = interval
            if not self._in_flight:
                continue
            try:
                await self.store.renew_leases(self.owner, self.clock.now() + self.settings.lease)
            except StoreUnavailable as exc:  # one line: the claims and records say it too
                outage.failed(exc)
                wait = min(1.0, interval)
                continue
            except Exception:
                log.exception("could not renew leases")
                continue
            outage.answered()

    def _housekeeping_interval(self) -> float:
        return max(min(self.settings.lease / 2, 1.0), 0.05)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Return deliveries of dead workers (lease expired) and remove old finished messages."""
        interval = self._housekeeping_interval()
        last_purge = 0.0
        reap_from = 0.0  # (monotonic) see REAP_AFTER_OUTAGE
        clock = ClockWatch()
        outage = OutageLog(log, "housekeeping")
        while not stop.is_set():
            try:
                if time.monotonic() >= reap_from:
                    await self._reap()
                if clock.due():
                    clock.saw(await clock_skew(self.store, self.clock))
                expired = await self.store.expire_due(self.clock.now())
                if expired:
                    log.info("%d delivery(ies) expired before they could be sent", expired)
                if time.monotonic() - last_purge > PURGE_INTERVAL:
                    last_purge = time.monotonic()
                    await self._purge()
                outage.answered()
            except StoreUnavailable as exc:  # said in one line: the claims say it too
                outage.failed(exc)
                reap_from = time.monotonic() + REAP_AFTER_OUTAGE
            except Exception:
                log.exception("housekeeping failed")
            await first_of(stop.wait(), timeout=interval)

    async def _reap(self) -> None:
        """Make due again what workers that stopped without recording a result held."""
        reaped = await self.store.reap_expired_leases(self.clock.now(), keep=self.owner)
        if reaped:
            log.warning("%d delivery(ies) returned after their worker's lease ran out", reaped)
            self.wake.set()

    async def _follow_destinations(self, stop: asyncio.Event) -> None:
        """Sync destinations' pauses, rates and fleet shares with the store about once a
        second, and at once on news: a pause begun here, a pause or a lift recorded by
        another process or an operator. So a pause one worker learns stops the fleet within
        moments, and a flush starts it again as soon."""
        interval = self._housekeeping_interval()
        outage = OutageLog(log, "destinations' limits not synced")
        while not stop.is_set():
            try:
                await self.sync_throttle()
                outage.answered()
                if await self.gate.wait_for_news(interval):
                    self.wake.set()  # a lift may have made mail due: claim again
            except StoreUnavailable as exc:
                outage.failed(exc)
                await first_of(stop.wait(), timeout=interval)
            except Exception:
                log.exception("could not sync destinations' limits with the store")
                await first_of(stop.wait(), timeout=interval)

    async def sync_throttle(self) -> None:
        """Persist this worker's pauses and slow-downs; adopt other processes' and operators'."""
        await self.gate.sync()

    async def _purge(self) -> None:
        keep = self.retention
        if keep is None:
            return
        now = self.clock.now()
        removed = await self.store.purge_finished(now, keep.sent, keep.dead)
        if removed:
            log.info("removed %d finished message(s) past their retention", removed)
        if keep.events is not None:
            removed = await self.store.purge_events(now - keep.events)
            if removed:
                log.info("removed %d event(s) past [store] event_retention", removed)
        if keep.unmatched is not None:
            removed = await self.store.purge_unmatched(now - keep.unmatched)
            if removed:
                log.info("removed %d unmatched report(s) past their retention", removed)

    async def _drain_tasks(self, timeout: float | None) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _shutdown(self) -> None:
        started = time.monotonic()
        in_flight = len(self._tasks)
        if in_flight:
            log.info(
                "stopping: waiting up to %.0fs for %d send(s) in flight",
                self.settings.shutdown_grace,
                in_flight,
            )
        before = interrupted.after_handover
        await self._drain_tasks(timeout=self.settings.shutdown_grace)
        cut = interrupted.after_handover - before
        if cut:
            log.warning(
                "stopping cut off %d send(s) after the message was handed over (the server had "
                "it, its reply had not come): they are tried again, so those recipients may get "
                "it twice; a longer delivery.shutdown_grace avoids this",
                cut,
            )
        # what the grace left, and a little more: the results of sends that went through are
        # worth waiting for, but a store that does not answer must not keep the process up
        grace = self.settings.shutdown_grace - (time.monotonic() - started)
        unrecorded = await self.recorder.stop(timeout=max(grace, RECORD_AT_STOP))
        if unrecorded:
            log.error(
                "stopping without recording %d outcome(s): the store cannot answer; those "
                "recipients are sent again once their leases lapse",
                unrecorded,
            )
        try:
            returned = await self.store.hand_back(self.owner, None, self.clock.now())
        except StoreUnavailable as exc:
            log.warning(
                "could not hand back this worker's deliveries (%s): they are tried again once "
                "their leases lapse",
                exc,
            )
        else:
            if returned:
                log.info("handed back %d delivery(ies) to be tried again", returned)
        try:
            await self.gate.leave_fleet()
        except StoreUnavailable as exc:
            log.warning("could not give back this worker's shares of limits (%s)", exc)
        except Exception:
            log.exception("could not give back this worker's shares of destinations' limits")
