"""Per-destination throttling: send as fast as each destination allows, and no faster.

Each destination (a provider such as ``google``, a recipient domain, or the relay itself) has:

- a **concurrency** cap (sends in flight) and a **rate** (a token bucket, messages/second), from
  ``[destinations.NAME]`` with ``[destinations.default]`` for the others (0 = no limit);
- an **adaptive rate**: a ``throttled`` reply sets the allowed rate to half of what was being
  sent (never below ``min_rate``), at most once a second; every successful send lets it creep
  back by ``increase`` messages/second per second (additive increase, multiplicative decrease:
  the rate settles just under what the destination accepts, with few refusals);
- a **pause**: after ``pause_after`` consecutive ``connection`` failures (refused, DNS, TLS), or
  when a ``[[shaping]]`` rule says so, nothing is sent to it until the pause ends; then one
  delivery probes: success opens it again, failure pauses it again for twice as long (up to
  ``max_pause``);
- a **held rate**: a ``[[shaping]]`` rule with ``action = "rate"`` sets the rate and holds it as
  a ceiling for the rule's ``duration`` (successes creep back up to it, never above); then the
  rate creeps back toward the configured limit as after a slow-down.

Limits hold for the whole fleet: every process sending to a limited destination tells the store
its demand about once a second (:meth:`Throttle.demands`) and takes the share of the rate and
of the concurrency its demand is of all live demands (:meth:`Throttle.set_shares`); a process
alone has all of it, and one that stops returns its share within a lease. Its token bucket runs
at its share, but what it sends back to wait for a rate it shares comes back due to every
process, so it is given the next slot of the fleet's schedule of that rate, in the store
(:class:`~postlane.fleet.FleetSchedule`), not a slot spaced at its own share.

The :class:`Throttle` is pure bookkeeping with explicit times; the worker's
:class:`~postlane.gate.ThrottleGate` is its only user: it asks :meth:`Throttle.admit` before
each send (``None``: go; a time: come back then, no attempt used), reports each result to
:meth:`Throttle.observe`, and persists what :meth:`Throttle.changes` returns so that ``stats``,
the HTTP API and other workers see pauses and rates.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from postlane.classify import ReplyClass, Verdict, one_line
from postlane.config import (
    Config,
    DestinationLimits,
    ShapingRule,
    ThrottleConfig,
    destination_limits,
    format_duration,
)
from postlane.fleet import FLEET_SURPLUS, PRESENCE, FleetProbe, FleetSchedule, parts_of
from postlane.records import DestinationStatus, FleetShares
from postlane.shaping import ShapingRules
from postlane.throttle_state import DestinationState

#: the reason recorded when an operator lifts a pause or slow-down (``queue flush``)
LIFTED = "lifted by an operator"
#: how the reason of a pause for a misconfiguration begins (alerts and metrics look for it)
MISCONFIGURED = "misconfigured: "
#: how a shaping rule's pause begins its reason
SHAPING_PAUSE = "shaping rule "
#: a shaping rule or a slow-down never acts on one destination more than once per this
DECREASE_INTERVAL = 1.0
#: deliveries sent back to wait are given slots at most this far ahead
MAX_SLOT_AHEAD = 120.0
#: when a destination's rate has grown this much past the rate its waiting deliveries were
#: spaced at, they are called back to be spaced again
HASTEN_FACTOR = 1.5
#: successes are counted over this window to know the rate that was actually being sent
MEASURE_WINDOW = 2.0
#: a destination's demand is what was asked of it over this window
DEMAND_WINDOW = 2.0
#: a recovering rate is recorded (for stats and the fleet) each time it has grown this much
RECORD_GROWTH = 1.25
#: a slow-down of a destination with no configured rate ends when it has not asked to slow
#: down for this long (it stayed "throttled" at its slowed rate in stats for good)
SLOW_DOWN_MEMORY = 300.0


class _Why(enum.Enum):
    """What a delivery that cannot go now waits for."""

    PAUSE = "pause"  # a pause, or the probe after one
    CAP = "cap"  # a concurrency cap
    RATE = "rate"  # a rate's next token


@dataclass(frozen=True)
class Admission:
    """The answer of :meth:`Throttle.admit`: ``at`` None means go now."""

    at: float | None
    #: set when a destination is paused (or probing after a pause): the gate defers that
    #: destination's whole backlog instead of sending deliveries back one by one
    paused_destination: str | None = None
    #: set when the wait is for a rate the fleet shares: ``at`` is then the earliest the
    #: delivery may come back, and its slot comes from the fleet's schedule
    fleet_schedule: FleetSchedule | None = None
    #: set when the delivery admitted would probe a destination after its pause: it goes only
    #: if this process is the fleet's prober
    fleet_probe: FleetProbe | None = None

    @property
    def admitted(self) -> bool:
        return self.at is None


class Throttle:
    def __init__(
        self,
        settings: ThrottleConfig,
        limits: dict[str, DestinationLimits] | None = None,
        rules: Sequence[ShapingRule] = (),
    ) -> None:
        self.settings = settings
        self._limits = dict(limits or {})
        self._destinations: dict[str, DestinationState] = {}
        self._rules = ShapingRules(rules)
        #: the share a destination not yet shared starts with: 1 / the processes sharing
        self._first_share = 1.0
        #: processes holding shares at the last :meth:`set_shares` (1: alone, as far as known)
        self._fleet = 1
        #: a pause began here, or the fleet's probe this process sent answered, since
        #: :meth:`changes` last ran: the fleet should hear at once
        self.news = False
        #: see :meth:`probe_outcomes`
        self._probe_outcomes: list[tuple[str, float, bool]] = []

    @classmethod
    def from_config(cls, config: Config) -> Throttle:
        return cls(config.throttle, config.destinations, config.shaping)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def _get(self, name: str) -> DestinationState:
        state = self._destinations.get(name)
        if state is None:
            limits = destination_limits(self._limits, name)
            state = DestinationState(
                name, limits, rate=limits.rate or None, share=self._first_share
            )
            self._destinations[name] = state
        return state

    # -- before a send -----------------------------------------------------------------------

    def admit(self, keys: Iterable[str], now: float, *, urgent: bool = False) -> Admission:
        """May a delivery go to all of ``keys`` now? If so its slot is taken (call
        :meth:`release` when the send is over). If not, :class:`Admission` says when to come
        back: deliveries sent back for a rate or a concurrency cap get successive slots, so a
        backlog is spread over time instead of coming back all at once. An ``urgent`` delivery
        (the high lane) gets the next slot ahead of that backlog, which moves back by one."""
        if not self.enabled:
            return Admission(None)
        states = [self._get(key) for key in keys]
        for state in states:
            state.asked.append(now)
        worst: tuple[float, DestinationState, _Why] | None = None
        for state in states:
            wait, why = self._wait(state, now)
            if wait > 0 and (worst is None or wait > worst[0]):
                worst = (wait, state, why)
        if worst is not None:
            wait, state, why = worst
            if why is _Why.PAUSE:
                return Admission(now + wait, paused_destination=state.name)
            if why is _Why.RATE and not urgent and self._fleet > 1 and state.rate is not None:
                # other processes claim what comes back due as much as this one: its slot is
                # the fleet's next, spaced at the fleet's rate (see FleetSchedule)
                interval = 1.0 / max(state.rate * (1.0 + FLEET_SURPLUS), 1e-6)
                schedule = FleetSchedule(state.name, interval)
                return Admission(now + wait, fleet_schedule=schedule)
            return Admission(self._slot(state, now, wait, urgent))
        probe = None
        for state in states:
            self._refill(state, now)
            if state.local_rate is not None:
                state.tokens -= 1.0
            state.in_flight += 1
            # the probe after a pause is the fleet's (whatever this process knows of the
            # others): unless known to be this process's already, the store says whose
            pause_end = state.paused_until
            if state.probing and pause_end is not None and state.fleet_probe != pause_end:
                probe = FleetProbe(state.name, pause_end)
        return Admission(None, fleet_probe=probe)

    def _slot(self, state: DestinationState, now: float, wait: float, urgent: bool) -> float:
        """When a delivery sent back to wait ``wait`` seconds (at least) comes back: the next
        free slot, spaced by :meth:`_interval`; an urgent one ahead of the others' slots."""
        if self._waiting_until(state) <= now:
            state.slotted_rate = state.rate
        interval = self._interval(state, now)
        if urgent:
            slot = min(max(now + wait, state.urgent_until), now + MAX_SLOT_AHEAD)
            state.urgent_until = slot + interval
            state.reserved_until = max(state.reserved_until, slot) + interval
            return slot
        slot = min(max(now + wait, state.reserved_until), now + MAX_SLOT_AHEAD)
        state.reserved_until = slot + interval
        return slot

    def fleet_slotted(self, key: str, at: float, now: float) -> None:
        """A delivery sent back to wait for ``key``'s rate was given the fleet's slot ``at``
        (so that, should the rate grow well past the one it was spaced at, it is called back:
        :meth:`to_hasten`)."""
        state = self._get(key)
        if self._waiting_until(state) <= now:
            state.slotted_rate = state.rate
        state.fleet_slotted_until = max(state.fleet_slotted_until, at)

    @staticmethod
    def _waiting_until(state: DestinationState) -> float:
        """The last slot given to a delivery that waits for ``state``, this process's or the
        fleet's."""
        return max(state.reserved_until, state.fleet_slotted_until)

    def fleet_cap(self, key: str) -> int | None:
        """The concurrency cap of ``key`` that other live processes share with this one (each
        send then takes a slot in the store: :meth:`ThrottleGate.admit`), or None: no cap, or
        this process alone."""
        if not self.enabled or self._fleet < 2:
            return None
        return self._get(key).limits.concurrency or None

    def fleet_full(self, key: str, now: float, *, urgent: bool = False) -> float:
        """The fleet's sends in flight to ``key`` fill its cap: undo the slot :meth:`admit`
        took here, and say when to come back (the next slot, as for this process's own cap)."""
        self.release([key])
        state = self._get(key)
        return self._slot(state, now, self._interval(state, now), urgent)

    def _wait(self, state: DestinationState, now: float) -> tuple[float, _Why]:
        """(seconds to wait, and what for)."""
        if state.paused_until is not None:
            if now < state.paused_until:
                return state.paused_until - now, _Why.PAUSE
            state.probing = True  # the pause is over: one delivery probes first
        if state.probing and state.in_flight >= 1:
            return min(5.0, self.settings.cool_down), _Why.PAUSE
        if state.probing and now < state.probe_wait_until:  # another process probes
            return state.probe_wait_until - now, _Why.PAUSE
        cap = state.limits.concurrency or None
        if cap is not None and state.slots is not None:
            cap = state.slots  # this process's part of the fleet's cap
        if cap is not None and state.in_flight >= cap:
            return self._interval(state, now), _Why.CAP
        rate = state.local_rate
        if rate is None:
            return 0.0, _Why.RATE
        self._refill(state, now)
        if state.tokens >= 1.0:
            return 0.0, _Why.RATE
        return (1.0 - state.tokens) / max(rate, 1e-6), _Why.RATE

    def _interval(self, state: DestinationState, now: float) -> float:
        """The spacing of slots given to waiting deliveries: the rate's, or for a concurrency
        cap the rate at which sends are finishing."""
        rate = state.local_rate
        if rate is not None:
            return 1.0 / max(rate, 1e-6)
        finishing = max(self._sent_rate(state, now), float(state.limits.concurrency or 1))
        return 1.0 / finishing

    def _refill(self, state: DestinationState, now: float) -> None:
        rate = state.local_rate
        if rate is None:
            return
        burst = max(1.0, rate)  # at most a second's worth saved up
        if state.refilled_at == 0.0 and self._fleet > 1:
            # joining processes that send already: nothing saved up (one send, then the rate).
            # A process starting late went out with a whole second of its share at once on
            # top of the others, before they had made room for it (a third worker started
            # 4 s after two others: 21-22 sends in a quarter second under 40/s, 89-91 in the
            # busiest two seconds, and the server refused one)
            state.refilled_at = now
        if now > state.refilled_at:
            state.tokens = min(burst, state.tokens + (now - state.refilled_at) * rate)
        state.refilled_at = now

    def release(self, keys: Iterable[str]) -> None:
        if not self.enabled:
            return
        for key in keys:
            state = self._get(key)
            state.in_flight = max(0, state.in_flight - 1)

    # -- after a send ------------------------------------------------------------------------

    def observe(self, key: str, verdict: Verdict, now: float) -> None:
        """Adapt ``key``'s limits to one reply."""
        if not self.enabled:
            return
        state = self._get(key)
        cls = verdict.cls
        if cls is ReplyClass.CONNECTION:
            if state.paused_until is not None and now < state.paused_until:
                return  # results of sends started before the pause: already counted
            state.failures += 1
            if state.probing:  # "1 connection failure(s)" read as a new, milder trouble
                reason = (
                    f"connection failure of the probe after pause {state.pause_level}: "
                    f"{one_line(verdict)}"
                )
                self._pause(state, now, reason)
            elif state.failures >= self.settings.pause_after:
                self._pause(
                    state, now, f"{state.failures} connection failure(s): {one_line(verdict)}"
                )
        elif cls is ReplyClass.THROTTLED:
            state.failures = 0
            self._slow_down(state, now, f"throttled: {one_line(verdict)}")
        else:
            state.failures = 0
            # the probe after a pause went through: open again. A success during a pause comes
            # from a send started before it, and lifts nothing.
            ended = state.paused_until is not None and state.paused_until <= now
            if state.probing or ended:
                self._probed(state, opened=True)
                state.probing = False
                state.own_pause = False
                state.paused_until = None
                state.pause_level = 0
                state.reason = None
                state.changed = True
            if cls is ReplyClass.DELIVERED:
                self._speed_up(state, now)
        self._apply_rules(state, verdict, now)

    def misconfigured(self, key: str, why: str, now: float) -> bool:
        """``key`` can never work until its configuration changes: paused for ``max_pause``
        with the reason ``misconfigured: why`` (a probe after it finds out whether it was
        fixed; an operator's flush lifts it at once). True when this starts the pause."""
        state = self._get(key)
        if state.paused_until is not None and now < state.paused_until:
            return False  # a send started before the pause: already known
        self._pause(state, now, f"{MISCONFIGURED}{why}", self.settings.max_pause)
        return True

    def _pause(
        self, state: DestinationState, now: float, reason: str, duration: float | None = None
    ) -> None:
        if duration is None:
            duration = min(self.settings.max_pause, self.settings.pause * 2**state.pause_level)
            state.pause_level += 1
        self._probed(state, opened=False)
        state.paused_until = now + duration
        state.own_pause = True
        state.probing = False
        state.failures = 0
        state.reason = reason
        state.changed = True
        self.news = True

    def _probed(self, state: DestinationState, *, opened: bool) -> None:
        """The fleet's probe this process sent after ``state``'s pause answered: the others
        hear it at once (:meth:`probe_outcomes`)."""
        if state.fleet_probe is not None:
            self._probe_outcomes.append((state.name, state.fleet_probe, opened))
            state.fleet_probe = None
            self.news = True

    def held_by(self, key: str) -> ReplyClass | None:
        """The class of the trouble that paused ``key``, while the pause or the probe after it
        lasts (None: not paused): ``throttled`` for a shaping rule's pause, else
        ``connection`` (connection failures, a misconfiguration; another process's pause
        adopted too, said by its reason)."""
        state = self._destinations.get(key)
        if state is None or state.paused_until is None:
            return None
        if (state.reason or "").startswith(SHAPING_PAUSE):
            return ReplyClass.THROTTLED
        return ReplyClass.CONNECTION

    # -- the fleet's probe after a pause ---------------------------------------------------------

    def probe_granted(self, key: str, pause_end: float) -> None:
        """This process is the fleet's prober of ``key`` after its pause that ended at
        ``pause_end``: the delivery admitted goes."""
        self._get(key).fleet_probe = pause_end

    def probe_elsewhere(self, key: str, now: float) -> float:
        """Another process probes ``key`` (or its probe failed, and a longer pause is
        recorded): undo the slot :meth:`admit` took and say when to ask again."""
        self.release([key])
        state = self._get(key)
        state.probe_wait_until = now + min(5.0, self.settings.cool_down)
        return state.probe_wait_until

    def opened_elsewhere(self, key: str) -> None:
        """Another process's probe after ``key``'s pause went through: open here too."""
        state = self._get(key)
        state.probing = False
        state.own_pause = False
        state.paused_until = None
        state.pause_level = 0
        state.failures = 0
        state.reason = None
        state.probe_wait_until = float("-inf")

    def probe_outcomes(self) -> list[tuple[str, float, bool]]:
        """(destination, end of the pause, opened) of the fleet's probes this process sent
        that answered since the last call, to record for the others."""
        outcomes, self._probe_outcomes = self._probe_outcomes, []
        return outcomes

    def _sent_rate(self, state: DestinationState, now: float) -> float:
        while state.sent and state.sent[0] < now - MEASURE_WINDOW:
            state.sent.popleft()
        return len(state.sent) / MEASURE_WINDOW

    def _slow_down(self, state: DestinationState, now: float, reason: str) -> None:
        state.throttled_at = now
        if now - state.last_decrease < DECREASE_INTERVAL:
            return
        state.last_decrease = now
        # what the fleet was sending: this process sends its share of it
        measured = self._sent_rate(state, now) / max(state.share, 1e-6)
        if state.rate is None:
            # no limit so far: what was being sent (at least what is in flight right now)
            current = max(measured, float(state.in_flight), 2 * self.settings.min_rate)
        else:
            current = min(state.rate, measured) if measured else state.rate
        new_rate = max(self.settings.min_rate, current / 2)
        self._cut(state, new_rate, now)
        state.reason = reason
        state.changed = True

    def _cut(self, state: DestinationState, rate: float, now: float) -> None:
        """Lower the rate from ``now`` on: the bucket is emptied, so the next send waits for
        the new rate (a destination that had no limit had no bucket to refill until now)."""
        state.rate = rate
        state.tokens = min(state.tokens, 0.0)
        state.refilled_at = now

    def _speed_up(self, state: DestinationState, now: float) -> None:
        state.sent.append(now)
        while state.sent[0] < now - MEASURE_WINDOW:
            state.sent.popleft()
        if state.rate is None:
            return
        # additive increase: `increase` messages/s per second of sending at the current rate.
        # This process sends its share of the fleet's successes, and each process keeps its own
        # estimate of the fleet's rate: each grows it as a lone sender would.
        state.rate += self.settings.increase / max(state.rate * state.share, 1e-6)
        ceiling = self._ceiling(state, now)
        recorded = state.recorded_rate
        if recorded is not None and state.rate >= recorded * RECORD_GROWTH:
            state.changed = True  # stats and the other processes see it come back, in steps
        if ceiling is not None and state.rate >= ceiling:
            state.rate = ceiling
            # back at the ceiling: the slow-down is over (a held rate keeps its rule's reason)
            reason = state.held_reason if state.held_rate is not None else None
            if state.reason != reason:
                state.reason = reason
                state.changed = True

    def _ceiling(self, state: DestinationState, now: float) -> float | None:
        """The most the rate may grow to now: the configured rate, or a shaping rule's held
        rate until it ends."""
        self._end_hold(state, now)
        if state.held_rate is None:
            return state.configured_rate
        return min(state.held_rate, state.configured_rate or state.held_rate)

    def _end_slow_down(self, state: DestinationState, now: float) -> None:
        """A destination with no configured rate (and no shaping rule's) that has not asked
        to slow down for :data:`SLOW_DOWN_MEMORY` is no longer limited (its own successes only
        raise the rate, never end the slow-down)."""
        if state.rate is None or state.configured_rate is not None or state.held_rate is not None:
            return
        if now - state.throttled_at <= SLOW_DOWN_MEMORY or state.paused_until is not None:
            return
        state.rate = None
        state.reason = None
        state.changed = True

    def _end_hold(self, state: DestinationState, now: float) -> None:
        """A shaping rule's rate has held for its duration: from now on the rate creeps back
        toward the configured rate, as after a slow-down."""
        if state.held_rate is None or now < state.held_until:
            return
        if state.reason == state.held_reason:
            at_ceiling = state.rate is None or state.rate >= (state.configured_rate or math.inf)
            state.reason = None if at_ceiling else f"recovering after {state.held_reason}"
            state.changed = True
        state.held_rate = None
        state.held_until = float("-inf")
        state.held_reason = None

    def _apply_rules(self, state: DestinationState, verdict: Verdict, now: float) -> None:
        for fired in self._rules.fired(state.name, verdict, now):
            if fired.rule.action == "pause":
                self._pause(state, now, f"{SHAPING_PAUSE}{fired.name}", fired.rule.duration)
            else:
                self._hold(state, now, fired.rule, f"shaping rule {fired.name}")

    def _hold(self, state: DestinationState, now: float, rule: ShapingRule, name: str) -> None:
        """Set ``rule``'s rate (never above the configured one) and hold it for its duration."""
        rate = min(rule.rate, state.configured_rate or rule.rate)
        self._cut(state, rate, now)
        state.held_rate = rate
        state.held_until = now + rule.duration
        state.held_reason = f"{name}: rate {rate}/s for {format_duration(rule.duration)}"
        state.reason = state.held_reason
        state.changed = True

    # -- the fleet's shares ----------------------------------------------------------------------

    def demands(self, now: float) -> dict[str, float]:
        """This process's demand on each limited destination it sends to, a slowed-down one
        included (sends asked for per second over the last :data:`DEMAND_WINDOW`, plus those
        in flight); a destination left alone for the window is not listed (its share goes
        back to the others)."""
        out = {}
        for state in self._destinations.values():
            while state.asked and state.asked[0] < now - DEMAND_WINDOW:
                state.asked.popleft()
            if state.limited and (state.asked or state.in_flight):
                asked = len(state.asked) / DEMAND_WINDOW
                if state.rate is not None:
                    # what comes back due goes to whichever process claims first, so a process
                    # that asks for more than its part of the rate says no more than that: a
                    # backlog claimed at once (thousands of asks in a second) takes no more
                    # than the others' share, and processes that all want more than their part
                    # share evenly instead of by the noise of who claimed first
                    asked = min(asked, state.rate / state.askers)
                out[state.name] = asked + state.in_flight
        out[PRESENCE] = 1.0
        return out

    def set_shares(self, shares: FleetShares, owner: str, now: float) -> None:
        """Take this process's part of each destination's limits (:func:`~postlane.fleet.parts_of`):
        a smaller part at once, a larger one a sync later; a destination seen for the first
        time starts with an even share among the processes sharing."""
        self._first_share = 1.0 / max(1, shares.owners)
        self._fleet = max(1, shares.owners)
        caps = {
            name: self._get(name).limits.concurrency for name in shares.demands if name != PRESENCE
        }
        for name, part in parts_of(shares, owner, now, caps).items():
            state = self._get(name)
            state.askers = part.askers
            # A fall takes effect at once, a rise only once the next sync says so too: each
            # process reads the others' demands as they were at their last sync, so when the
            # demands move (a process stopped, a backlog arrived) one whose view is fresher
            # would take more while another, not yet seeing that, keeps its own; together
            # they sent above the rate (48/s under 40/s for a second after a process died).
            # A sync later every process has lowered what it must, and the rise is safe. (A
            # destination seen for the first time had an even share of each.)
            cap = caps[name]
            before = state.offered or (state.share, int(cap * state.share) if cap else None)
            state.offered = (part.share, part.slots)
            state.share = min(part.share, before[0])
            state.slots = part.slots
            if part.slots is not None and before[1] is not None:
                state.slots = min(part.slots, before[1])

    @property
    def has_limits(self) -> bool:
        """Whether any destination has a configured rate or concurrency the fleet shares."""
        return self.enabled and any(
            limits.rate or limits.concurrency for limits in self._limits.values()
        )

    # -- queries and persistence -------------------------------------------------------------

    def cool_down(self, key: str, now: float) -> float:
        """How long a delivery refused with ``throttled`` waits: the cool-down, or longer when
        the destination is paused."""
        state = self._get(key)
        if state.paused_until is not None and state.paused_until > now:
            return max(self.settings.cool_down, state.paused_until - now)
        return self.settings.cool_down

    def pause_and_rate(self, key: str, now: float) -> tuple[float | None, float | None]:
        """``key``'s pause in force (its end) and rate: what a reply may change, read without
        building its status (this runs twice for every reply)."""
        state = self._destinations.get(key)
        if state is None:
            return None, None
        paused = state.paused_until if state.paused_until and state.paused_until > now else None
        return paused, state.rate

    def status_of(self, key: str, now: float) -> DestinationStatus | None:
        """``key``'s limits as they stand, if this process knows of it."""
        state = self._destinations.get(key)
        return None if state is None else self._status(state, now)

    def lifts(self, key: str) -> int:
        """How many operator lifts of ``key`` this process has adopted (a generation the store
        compares with its own count before deferring for ``key``)."""
        state = self._destinations.get(key)
        return 0 if state is None else state.lifts

    def fleet_room(self, key: str, now: float, pending: int = 0) -> tuple[int, float] | None:
        """While other processes share ``key``'s rate: how many sends this process's bucket
        lets go now beyond ``pending`` ones about to take their tokens, and, when none, how
        long until one may. None: the rate is not shared (or there is none)."""
        if not self.enabled or self._fleet < 2:
            return None
        state = self._get(key)
        rate = state.local_rate
        if rate is None:
            return None
        self._refill(state, now)
        room = state.tokens - pending
        if room >= 1.0:
            return int(room), 0.0
        return 0, (1.0 - room) / max(rate, 1e-6)

    def paused_until(self, key: str, now: float) -> float | None:
        state = self._destinations.get(key)
        if state is None or state.paused_until is None or state.paused_until <= now:
            return None
        return state.paused_until

    def lift(self, names: Iterable[str] | None = None) -> None:
        """End pauses and slow-downs (``queue flush``): as configured again."""
        wanted = None if names is None else set(names)
        for state in self._destinations.values():
            if wanted is None or state.name in wanted:
                self._lift(state)
                state.changed = True

    def _lift(self, state: DestinationState) -> None:
        if self._waiting_until(state) > 0.0:  # deliveries wait for slots at the old rate
            state.recall = True
        state.paused_until = None
        state.own_pause = False
        state.probing = False
        state.fleet_probe = None
        state.probe_wait_until = float("-inf")
        state.pause_level = 0
        state.failures = 0
        state.held_rate = None
        state.held_until = float("-inf")
        state.held_reason = None
        state.rate = state.configured_rate
        state.tokens = max(state.tokens, 1.0)
        state.reserved_until = 0.0
        state.fleet_slotted_until = 0.0
        state.urgent_until = 0.0
        state.reason = None

    def to_hasten(self, now: float) -> list[str]:
        """Destinations whose waiting deliveries were spaced for a rate well below today's, or
        whose limits were lifted: they should be made due now, to be spaced again (call about
        once a second)."""
        names = []
        for state in self._destinations.values():
            if state.recall:  # lifted: whatever it spaced may go now
                state.recall = False
                names.append(state.name)
                continue
            slotted = state.slotted_rate
            if self._waiting_until(state) <= now or slotted is None:
                continue
            if state.rate is None or state.rate >= HASTEN_FACTOR * slotted:
                state.reserved_until = now
                state.fleet_slotted_until = now
                state.urgent_until = min(state.urgent_until, now)
                state.slotted_rate = state.rate
                names.append(state.name)
        return names

    def changes(self, now: float) -> list[DestinationStatus]:
        """Destinations whose pause, rate or reason changed since the last call, to record.
        A pause is recorded by the process that began it only (see ``own_pause``): the store
        keeps a pause in force that a record without one does not mention."""
        self.news = False
        out = []
        for state in self._destinations.values():
            self._end_hold(state, now)
            self._end_slow_down(state, now)
            if state.changed:
                state.changed = False
                state.synced_at = now
                state.recorded_rate = state.rate
                status = self._status(state, now)
                if not state.own_pause and status.paused_until is not None:
                    status = replace(status, paused_until=None, reason=None)
                out.append(status)
        return out

    def adopt(self, status: DestinationStatus, now: float) -> None:
        """Take what another process (or an operator's flush) recorded: a lift recorded since
        we last looked, a longer pause in force (a fact for the whole fleet until it ends or
        is lifted, even in a record this process made itself since: the store keeps another's
        pause through it), a lower rate. Lifts are counted, not timed: a record read before a
        lift this process adopted already (it shows fewer) changes nothing."""
        state = self._get(status.destination)
        if status.lifts < state.lifts:
            return
        if status.lifts > state.lifts:  # once per lift, whatever we recorded since
            self._lift(state)
            state.lifts = status.lifts
        longer = state.paused_until is None or (status.paused_until or 0) > state.paused_until
        paused = status.paused_until is not None and status.paused_until > now
        if paused and longer:  # recorded after the lift (a record made before it is dropped)
            state.paused_until = status.paused_until
            state.own_pause = False
            state.probing = False
            state.reason = status.reason
        if status.reason == LIFTED:
            state.synced_at = max(state.synced_at, status.updated_at)
            return
        if status.updated_at <= state.synced_at:
            return
        state.synced_at = status.updated_at
        if status.rate is not None and (state.rate is None or status.rate < state.rate):
            state.rate = status.rate
            state.reason = status.reason
            # another process's slow-down: it lasts from when it was asked (SLOW_DOWN_MEMORY)
            state.throttled_at = max(state.throttled_at, status.updated_at)

    def statuses(self, now: float) -> list[DestinationStatus]:
        for state in self._destinations.values():
            self._end_hold(state, now)
        return [self._status(s, now) for s in self._destinations.values()]

    def _status(self, state: DestinationState, now: float) -> DestinationStatus:
        paused = state.paused_until if state.paused_until and state.paused_until > now else None
        return DestinationStatus(
            destination=state.name,
            rate=state.rate,
            configured_rate=state.configured_rate,
            paused_until=paused,
            reason=state.reason,
            in_flight=state.in_flight,
            concurrency=state.limits.concurrency or None,
            updated_at=now,
            lifts=state.lifts,
        )
