"""The throttle gate: which of a claimed message's deliveries may go now, and what each reply
says about the limits it went through.

The gate owns the worker's :class:`~postlane.throttle.Throttle` and the pause state recorded in
the store. The worker asks it once per message (:meth:`ThrottleGate.admit`), gives the slots
back when the send is over (:meth:`ThrottleGate.release`), reports every reply
(:meth:`ThrottleGate.observe`) and syncs it with the store about once a second
(:meth:`ThrottleGate.sync`), and at once when a pause begins here or another process records
a pause or a lift (:meth:`ThrottleGate.wait_for_news`). Nothing else touches the throttle.

Keys. A delivery needs a slot from its destination and, when it goes through a relay or a
provider account (the transport's ``shared_destination_for``), from that relay too: one for all
of a message's recipients through it, as they go in one transaction. A reply is charged to the
relay when relaying (the relay answered), else to the destination
(:meth:`ThrottleGate.feedback_key`).

Pauses. A paused destination's whole backlog is deferred to the end of its pause, once per
pause, instead of deliveries being sent back one by one. Before deferring, the gate reads the
destination's recorded state again: an operator may have lifted the pause from another process
(``queue flush``), and what the flush made due must go now, not at the end of the old pause.
That read alone cannot settle it: a lift may commit between it and the deferral, after the
lift's own call-back of waiting mail passed over the deliveries this worker still held. So every
deferral carries the number of operator lifts of its destination the gate knew of when it
decided (:class:`~postlane.records.Deferral`, taken before anything in :meth:`ThrottleGate.admit`
awaits), and the store, which counts lifts, makes due at once what was decided on a pause lifted
since. The transport is told which relays are paused (``follow_pauses``), so a router takes a
route's fallback meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from postlane.classify import ReplyClass, Verdict
from postlane.clock import Clock, when_utc
from postlane.fleet import PRESENCE
from postlane.message import Lane
from postlane.records import (
    WAITING_FOR_DESTINATION,
    ClaimedMessage,
    Deferral,
    Delivery,
    DestinationStatus,
    ProbeTurn,
    paused_reason,
)
from postlane.store.base import Store
from postlane.throttle import MAX_SLOT_AHEAD, MISCONFIGURED, Admission, Throttle
from postlane.transports.base import Transport
from postlane.waits import first_of

#: the worker's log: operators read pauses and deferrals beside the worker's other lines
log = logging.getLogger("postlane.worker")

#: how long a process's share of a destination's limits lasts unless renewed (it renews about
#: once a second; a process that dies gives its share back within this)
SHARE_LEASE = 3.0
#: the fleet's slots of a rate are taken from the store this many seconds' worth at a time
#: (one write for many deliveries sent back to wait)
SLOT_BLOCK = 0.25
#: the fleet's probe after a pause is its process's to finish for this long at most (then, or
#: as soon as that process stops renewing its shares, another may probe)
PROBE_LEASE = 60.0


@dataclass
class _SlotBlock:
    """Successive slots of a destination's rate taken from the fleet's schedule, given to
    this process's deliveries one by one."""

    first: float
    count: int
    interval: float
    used: int = 0

    def take(self, earliest: float) -> float | None:
        """The next slot not before ``earliest``; None when none is left. (A rate that moved
        meanwhile applies from the next block: a block lasts a fraction of a second.)"""
        skip = math.ceil((earliest - self.first) / self.interval - 1e-9)
        self.used = max(self.used, skip)
        if self.used >= self.count:
            return None
        self.used += 1
        return self.first + (self.used - 1) * self.interval


@dataclass
class Clearance:
    """What :meth:`ThrottleGate.admit` lets through of one message's deliveries."""

    #: go now: their slots are taken until :meth:`ThrottleGate.release`
    to_send: list[Delivery] = field(default_factory=list)
    #: sent back to wait, using no attempt (each with the lifts of what it waits for that the
    #: gate knew of when it decided)
    waiting: list[Deferral] = field(default_factory=list)
    #: the relays whose slot this message holds (one each, whatever its recipients)
    relays: list[str] = field(default_factory=list)
    #: the slots taken in the store for caps the fleet shares (a name per slot)
    fleet: list[str] = field(default_factory=list)


@dataclass(eq=False)
class ThrottleGate:
    """Admission, feedback and pause state of one worker's deliveries through ``transport``."""

    throttle: Throttle
    store: Store
    transport: Transport
    clock: Clock
    #: set whenever the gate makes waiting deliveries due (the worker's claim loop waits on it)
    wake: asyncio.Event
    #: this process's name in the fleet's shares of destinations' limits
    owner: str = ""
    #: the end of the pause each paused destination's backlog was deferred to
    _deferred_until: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    #: set when a reply here began a pause: the fleet should hear of it now (:meth:`sync`)
    _news: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    #: store slots the store could not take back yet (given again at the next sync)
    _owed: list[str] = field(default_factory=list, init=False, repr=False)
    #: slots of the fleet's schedule of each shared rate taken and not all given yet
    _slots: dict[str, _SlotBlock] = field(default_factory=dict, init=False, repr=False)
    _taking_slots: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        #: the relay (or provider account) every delivery goes through, None when routed
        self.relay = self.transport.shared_destination
        self.transport.follow_pauses(self.is_paused)

    # -- keys --------------------------------------------------------------------------------

    def relay_for(self, message: ClaimedMessage, delivery: Delivery) -> str | None:
        """The relay (or provider account) ``delivery`` goes through: the transport's, or the
        route's when routing."""
        return self.transport.shared_destination_for(
            message.lane.value, message.sender, delivery.domain
        )

    def held_by(self, message: ClaimedMessage, delivery: Delivery) -> ReplyClass | None:
        """The class of the trouble that has ``delivery``'s relay or destination paused (or
        probing after a pause): what kept it from going (None: nothing)."""
        relay = self.relay_for(message, delivery)
        held = self.throttle.held_by(relay) if relay is not None else None
        return held or self.throttle.held_by(delivery.destination)

    def feedback_key(self, message: ClaimedMessage, delivery: Delivery) -> str:
        """Whose limits a slow-down or a connection failure speaks about: the relay's when
        relaying (the relay answered), else the destination's."""
        return self.relay_for(message, delivery) or delivery.destination

    def is_paused(self, name: str) -> bool:
        """Whether destination (or relay) ``name`` is paused now."""
        return self.throttle.paused_until(name, self.clock.now()) is not None

    def relay_paused_until(self) -> float | None:
        """The end of the pause of the relay every delivery goes through: meanwhile nothing is
        claimed at all."""
        if self.relay is None:
            return None
        return self.throttle.paused_until(self.relay, self.clock.now())

    def relay_room(self, pending: int) -> tuple[int, float] | None:
        """While other processes share the rate of the relay every delivery goes through: how
        many deliveries this one may claim now (what its bucket lets go beyond the ``pending``
        messages it claimed and has yet to admit), and, when none, how long until it may claim
        again. What comes back due goes to whichever process claims first, so one that claimed
        past its bucket only sent the rest back to the end of the fleet's schedule, while
        another, its share unspent, found nothing due and saved its tokens up to spend them at
        once on top of the others' (the fleet sent 44-48/s for seconds under a limit of 40/s).
        Claimed no faster than its bucket lets go, the backlog stays queued in order for
        whichever process can send it. None: no shared relay rate (claim as usual)."""
        if self.relay is None:
            return None
        return self.throttle.fleet_room(self.relay, self.clock.now(), pending)

    # -- before a send -----------------------------------------------------------------------

    async def admit(
        self, message: ClaimedMessage, deliveries: Sequence[Delivery], now: float
    ) -> Clearance:
        """Take slots for what may go of ``deliveries`` (of ``message``) now; say when the rest
        should come back. Call :meth:`release` with the answer once the send is over."""
        clearance = Clearance()
        try:
            return await self._admit(message, deliveries, now, clearance)
        except Exception:
            await self._give(clearance.fleet)  # a store slot held by no send would stay taken
            raise

    async def _admit(
        self,
        message: ClaimedMessage,
        deliveries: Sequence[Delivery],
        now: float,
        clearance: Clearance,
    ) -> Clearance:
        by_relay: dict[str | None, list[Delivery]] = {}
        for delivery in deliveries:
            by_relay.setdefault(self.relay_for(message, delivery), []).append(delivery)
        # the operator lifts known now, before any await: every decision below rests on what
        # the throttle knew then or learns later, never earlier (a lift adopted meanwhile only
        # makes a deferral due at once, needlessly but safely)
        keys = {d.destination for d in deliveries} | {r for r in by_relay if r is not None}
        lifts = {key: self.throttle.lifts(key) for key in keys}
        urgent = message.lane is Lane.HIGH  # ahead of the other lanes' waiting deliveries
        #: paused destinations whose recorded state was read again for this message
        checked: set[str] = set()
        for relay, group in by_relay.items():
            # a relay takes a message's recipients in one transaction: one slot for all of them
            if relay is not None:
                admission = await self._probe_turn(
                    self.throttle.admit([relay], now, urgent=urgent), now
                )
                if admission.at is None:
                    admission = await self._fleet_slot(relay, now, clearance, urgent)
                if admission.at is not None:
                    at = await self._come_back_at(admission, now)
                    clearance.waiting.extend(Deferral(d.id, at, relay, lifts[relay]) for d in group)
                    continue
            admitted = []
            for delivery in group:
                name = delivery.destination
                admission = await self._admit_to(name, now, checked, lifts[name], urgent=urgent)
                if admission.at is None:
                    admission = await self._fleet_slot(name, now, clearance, urgent)
                if admission.at is None:
                    admitted.append(delivery)
                else:
                    at = await self._come_back_at(admission, now)
                    clearance.waiting.append(Deferral(delivery.id, at, name, lifts[name]))
            if relay is not None:
                if admitted:
                    clearance.relays.append(relay)
                else:
                    self.throttle.release([relay])
                    await self._give_fleet_slots(clearance, [relay])
            clearance.to_send.extend(admitted)
        return clearance

    async def _fleet_slot(
        self, name: str, now: float, clearance: Clearance, urgent: bool
    ) -> Admission:
        """With other processes sharing ``name``'s concurrency cap, the slot this process's
        throttle gave is only its own: the send also takes one in the store, where every
        process's sends in flight are counted, so that the cap holds for all of them together
        at every moment (their shares of it settle only a sync later). Refused: the throttle's
        slot goes back and the delivery waits for the next one."""
        cap = self.throttle.fleet_cap(name)
        if cap is None:
            return Admission(None)
        if await self.store.take_fleet_slot(self.owner, name, cap, now, now + SHARE_LEASE):
            clearance.fleet.append(name)
            return Admission(None)
        return Admission(self.throttle.fleet_full(name, now, urgent=urgent))

    async def _come_back_at(self, admission: Admission, now: float) -> float:
        """When a delivery the throttle sent back comes back: the throttle's slot, or, for a
        rate other processes share, the next slot of the fleet's schedule of that rate. What
        comes back due is claimed by whichever process claims first, so the slots must add up
        to the rate for the fleet: each process spacing its own at its share made a schedule
        as thin as the shares were when it was made, and kept it (a process that claimed most
        of a backlog while its share was small spaced it all at that share)."""
        assert admission.at is not None
        schedule = admission.fleet_schedule
        if schedule is None:
            return admission.at
        name, interval = schedule.destination, schedule.interval
        async with self._taking_slots:  # one block at a time: none is left half given
            block = self._slots.get(name)
            at = None if block is None else block.take(admission.at)
            if at is None:
                count = max(1, math.ceil(SLOT_BLOCK / interval))
                first = await self.store.take_destination_slots(
                    name, count, admission.at, interval, now + MAX_SLOT_AHEAD
                )
                block = self._slots[name] = _SlotBlock(first, count, interval)
                at = block.take(first)
                assert at is not None
        self.throttle.fleet_slotted(name, at, now)
        return at

    async def _give_fleet_slots(self, clearance: Clearance, names: Sequence[str]) -> None:
        """Give back the store's slots of ``names`` that ``clearance`` holds."""
        given = []
        for name in names:
            if name in clearance.fleet:
                clearance.fleet.remove(name)
                given.append(name)
        await self._give(given)

    async def _give(self, names: Sequence[str]) -> None:
        """Slots back to the fleet; ones the store could not take back now are given with the
        next :meth:`sync` (until then they count as in flight: never more than the cap)."""
        names = [*self._owed, *names]
        self._owed = []
        if not names:
            return
        try:
            await self.store.give_fleet_slots(self.owner, names)
        except Exception:
            self._owed = names
            log.exception(
                "could not give back %d send slot(s); trying at the next sync", len(names)
            )

    async def release(self, clearance: Clearance) -> None:
        """Give back the slots :meth:`admit` took: the send is over."""
        await self._give(clearance.fleet)
        clearance.fleet = []
        self.throttle.release(clearance.relays)
        self.throttle.release([d.destination for d in clearance.to_send])

    async def _admit_to(
        self, destination: str, now: float, checked: set[str], lifts: int, *, urgent: bool = False
    ) -> Admission:
        """The throttle's answer for one delivery. When the destination is paused, its
        recorded state is read again first (once per message, in ``checked``): a pause an
        operator lifted from another process is adopted and the delivery goes; otherwise the
        destination's backlog is deferred to the end of the pause, unless the store has
        recorded more lifts of it than ``lifts`` (those the gate knew of when it began)."""
        admission = await self._probe_turn(
            self.throttle.admit([destination], now, urgent=urgent), now
        )
        paused = admission.paused_destination
        if paused is None or admission.at is None:
            return admission
        lifted = paused not in checked and await self._pause_lifted(paused, now)
        checked.add(paused)
        if not lifted:
            lifted = not await self._defer_backlog(paused, admission.at, now, lifts)
        if not lifted:
            return admission
        return await self._probe_turn(self.throttle.admit([destination], now, urgent=urgent), now)

    async def _probe_turn(self, admission: Admission, now: float) -> Admission:
        """An admission that would probe a destination after its pause, while other processes
        share it: one probe for the fleet. The store says whether this process probes (it
        goes), another does (it waits, the destination's backlog with it, and asks again
        after a while) or already found the destination open (it goes)."""
        probe = admission.fleet_probe
        if probe is None:
            return admission
        name = probe.destination
        try:
            turn = await self.store.take_probe(
                name,
                self.owner,
                probe.pause_end,
                now,
                PROBE_LEASE,
                presence_until=now + SHARE_LEASE,
            )
        except BaseException:
            self.throttle.release([name])  # the slot admit took: no send holds it
            raise
        if turn is ProbeTurn.PROBE:
            self.throttle.probe_granted(name, probe.pause_end)
            return admission
        if turn is ProbeTurn.OPEN:
            self.throttle.opened_elsewhere(name)
            log.info("destination %s: open again (another process's probe went through)", name)
            return admission
        return Admission(self.throttle.probe_elsewhere(name, now), paused_destination=name)

    async def _defer_backlog(self, destination: str, until: float, now: float, lifts: int) -> bool:
        """Push a paused destination's backlog to the end of its pause (once per pause).
        Returns False when the pause turned out lifted meanwhile (an operator's flush that
        committed before the deferral, which the store then refuses: ``lifts`` are the lifts
        the decision knew of): the lift is adopted, and what the flush made due goes now. A
        lift that commits after the deferral calls the backlog back itself."""
        if self._deferred_until.get(destination, 0.0) >= until:
            return True
        self._deferred_until[destination] = until
        reason = paused_reason(destination)
        moved = await self.store.defer_destination(destination, until, now, reason, lifts=lifts)
        if moved is None:
            self._deferred_until.pop(destination, None)
            await self._adopt_recorded(destination, now)  # now, not at the next sync
            log.info("destination %s: pause lifted by an operator", destination)
            return False
        if moved:
            log.info("destination %s paused: %d waiting delivery(ies) deferred", destination, moved)
        return True

    async def _pause_lifted(self, destination: str, now: float) -> bool:
        """Read ``destination``'s recorded state again and adopt it: True when an operator's
        flush (another process, not yet adopted by :meth:`sync`) has lifted the pause this
        gate still holds. Deliveries the flush made due must not be pushed back to the end of
        the pause it ended."""
        if self.throttle.paused_until(destination, now) is None:
            return False
        await self._adopt_recorded(destination, now)
        if self.throttle.paused_until(destination, now) is not None:
            return False
        self._deferred_until.pop(destination, None)
        log.info("destination %s: pause lifted by an operator", destination)
        return True

    async def _adopt_recorded(self, destination: str, now: float) -> None:
        """Read ``destination``'s recorded state and adopt it (a lift, a pause, a rate)."""
        for status in await self.store.destination_states():
            if status.destination == destination:
                self.throttle.adopt(status, now)

    # -- after a send ------------------------------------------------------------------------

    def observe(
        self,
        message: ClaimedMessage,
        delivery: Delivery,
        verdict: Verdict,
        retry_after: float | None,
        now: float,
        misconfigured: str | None = None,
        *,
        per_recipient: bool = False,
    ) -> float | None:
        """Adapt the limits to one reply, and return how long its delivery must wait before a
        retry: the server's ``Retry-After``, else for a slow-down the cool-down of whoever
        asked for it (None: the retry schedule alone decides). A reply that says the relay is
        misconfigured pauses it (its mail waits, held, until an operator fixes and flushes it
        or the pause ends and a probe finds it fixed). ``per_recipient``: the reply was to
        this recipient's RCPT TO alone (see ``Response.per_recipient``)."""
        feedback = self.feedback_key(message, delivery)
        if per_recipient and verdict.cls is ReplyClass.THROTTLED and _of_the_recipient(verdict):
            # a relay's "slow down" to one RCPT TO about the mailbox or address (RFC 3463
            # X.1.X, X.2.X: "4.2.1 receiving mail at a rate...") speaks of that recipient's
            # destination; one about the sender's rate ("4.7.1 rate limit exceeded for
            # sender", a policy daemon at RCPT) or the transaction's ("4.5.3 too many
            # recipients") speaks of the relay, as does one with no enhanced code
            feedback = delivery.destination
        before = self.throttle.pause_and_rate(feedback, now)
        if misconfigured is not None:
            if self.throttle.misconfigured(feedback, misconfigured, now):
                log.error("%s is misconfigured: %s; its mail waits", feedback, misconfigured)
            wait: float | None = self.throttle.cool_down(feedback, now)
        else:
            self.throttle.observe(feedback, verdict, now)
            if feedback != delivery.destination and verdict.cls is ReplyClass.DELIVERED:
                self.throttle.observe(delivery.destination, verdict, now)
            wait = retry_after
            if retry_after is None and verdict.cls is ReplyClass.THROTTLED:
                wait = self.throttle.cool_down(feedback, now)
        if self.throttle.news:  # a pause began: the fleet hears of it at once
            self._news.set()
        if self.throttle.pause_and_rate(feedback, now) != before:
            _log_change(feedback, before, self.throttle.status_of(feedback, now))
        return wait

    # -- the store ---------------------------------------------------------------------------

    async def sync(self) -> None:
        """Persist this worker's pauses and slow-downs; adopt other processes' and operators'.
        Deliveries spaced for a rate well below today's are made due again (and the worker
        woken)."""
        now = self.clock.now()
        if not self.throttle.enabled:
            # no limits to share, but the presence that says this process runs: a migration
            # is refused while one does (docs/upgrading.md)
            await self.store.share_destinations(self.owner, {PRESENCE: 1.0}, now, now + SHARE_LEASE)
            return
        await self._save_changes(now)
        for status in await self.store.destination_states():
            self.throttle.adopt(status, now)
        for name in self.throttle.to_hasten(now):  # a lift adopted just now included
            # the relay's rate governs every destination: call back all that wait for it
            destination = None if name == self.relay else name
            if destination is None:
                self._slots.clear()
            else:
                self._slots.pop(name, None)
            if await self.store.hasten(destination, now, WAITING_FOR_DESTINATION):
                self.wake.set()
        if self._owed:
            await self._give([])
        await self._end_probes()
        shares = await self.store.share_destinations(
            self.owner, self.throttle.demands(now), now, now + SHARE_LEASE
        )
        self.throttle.set_shares(shares, self.owner, now)

    async def wait_for_news(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for news to sync at once rather than at the next
        periodic :meth:`sync`: a pause this worker began, or a pause or lift another process
        (or an operator) recorded. True when there was some."""
        if not self._news.is_set():
            await first_of(self._news.wait(), self._stored_news(timeout), timeout=timeout)
        heard = self._news.is_set()
        self._news.clear()
        return heard

    async def _stored_news(self, timeout: float) -> None:
        if await self.store.wait_for_destination_news(timeout):
            self._news.set()

    async def leave_fleet(self) -> None:
        """Record this process's pauses and what its probes found, then give its shares back
        at once (a graceful stop). The fleet waits for a probe's outcome while its process
        lives; one that left without saying would have another process probe again at once
        (seen in a fleet test stopped just after a failed probe: two probes for one pause)."""
        if self.throttle.enabled:
            await self._save_changes(self.clock.now())
            await self._end_probes()
        await self.store.forget_shares(self.owner)

    async def _save_changes(self, now: float) -> None:
        """Record the pauses and rates this process changed since it last recorded them."""
        changes = self.throttle.changes(now)
        if changes:
            await self.store.save_destination_states(changes)

    async def _end_probes(self) -> None:
        """Record what this process's probes after pauses found."""
        for name, pause_end, opened in self.throttle.probe_outcomes():
            await self.store.end_probe(name, self.owner, pause_end, opened)


def _of_the_recipient(verdict: Verdict) -> bool:
    """Whether a reply's enhanced status code is about the recipient's address or mailbox."""
    return (verdict.enhanced or "").split(".")[1:2] in (["1"], ["2"])


def _log_change(
    name: str, before: tuple[float | None, float | None], after: DestinationStatus | None
) -> None:
    """One line when a reply pauses a destination, slows it down or opens it again: what an
    operator greps the log for ("paused", "slowed"), with why. ``before``: its pause in force
    and rate before the reply."""
    if after is None:
        return
    paused_before, rate_before = before
    if after.paused_until is not None and after.paused_until != paused_before:
        if (after.reason or "").startswith(MISCONFIGURED):
            return  # logged as an error where it is found
        log.warning(
            "destination %s paused until %s (all its mail waits, then one probe goes): %s",
            name,
            when_utc(after.paused_until),
            after.reason or "",
            extra={"event": "destination_paused", "destination": name, "until": after.paused_until},
        )
    elif paused_before is not None and after.paused_until is None:
        log.info("destination %s open again: a probe went through", name)
    elif (
        after.rate is not None
        and after.paused_until is None
        and (after.configured_rate is None or after.rate < after.configured_rate)
        and (rate_before is None or after.rate < rate_before)
    ):
        log.info(
            "destination %s slowed down to %.2f/s: %s",
            name,
            after.rate,
            after.reason or "",
            extra={"event": "destination_slowed", "destination": name, "rate": after.rate},
        )
