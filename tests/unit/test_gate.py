"""The throttle gate with a fake clock: admission within a destination's rate and cap (and a
time to come back when refused), one relay slot per message, a paused destination's backlog
deferred once per pause, an operator's lift read back from a real SQLite store, and whose
limits a reply speaks about. Nothing sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass, Verdict
from postlane.clock import FakeClock
from postlane.config import DestinationLimits, ThrottleConfig
from postlane.fleet import FLEET_SURPLUS
from postlane.gate import Clearance, ThrottleGate
from postlane.message import Lane
from postlane.records import (
    WAITING_FOR_DESTINATION,
    ClaimedMessage,
    Delivery,
    DestinationStatus,
)
from postlane.store.sqlite import SQLiteStore
from postlane.throttle import Throttle
from postlane.transports.base import BaseTransport, Envelope, PauseCheck, Response
from postlane.transports.router import Router, RouteRule
from tests.conftest import make_config

T0 = FakeClock().now()
OK = Verdict(ReplyClass.DELIVERED, 250, "2.0.0", "ok")
SLOW = Verdict(ReplyClass.THROTTLED, 421, "4.7.28", "rate limited")
DOWN = Verdict(ReplyClass.CONNECTION, None, None, "connection refused")
LATER = Verdict(ReplyClass.TEMPORARY, 503, None, "503 service unavailable")


class Relay(BaseTransport):
    """All a gate asks of a transport: the relay it goes through, and a pause check to follow.
    (Sending is the worker's business, not the gate's.)"""

    def __init__(self, shared: str | None = None) -> None:
        self.name = f"test://{shared}"
        self.shared_destination = shared
        self.is_paused: PauseCheck | None = None

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        self.is_paused = is_paused

    async def send(self, envelope: Envelope) -> list[Response]:
        raise AssertionError("the gate never sends")


class CountingStore(SQLiteStore):
    """A real SQLite store that counts the backlog deferrals it is asked for."""

    deferred: list[tuple[str, float]]

    async def defer_destination(
        self, destination: str, until: float, now: float, reason: str, *, lifts: int | None = None
    ) -> int | None:
        self.deferred.append((destination, until))
        return await super().defer_destination(destination, until, now, reason, lifts=lifts)


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    store = CountingStore(tmp_path / "gate.db")
    store.deferred = []
    async with AsyncPostlane(make_config(tmp_path), store=store, clock=clock) as app:
        yield app


def gate(
    app: AsyncPostlane,
    transport: BaseTransport | None = None,
    limits: dict[str, DestinationLimits] | None = None,
    **settings: float,
) -> ThrottleGate:
    throttle = Throttle(ThrottleConfig(**settings), limits)  # type: ignore[arg-type]
    return ThrottleGate(throttle, app.store, transport or Relay(), app.clock, asyncio.Event())


_ids = itertools.count(1)


def message(*addresses: str, lane: Lane = Lane.NORMAL) -> ClaimedMessage:
    """A claimed message (not in the store): each recipient's destination is its domain."""
    deliveries = tuple(
        Delivery(next(_ids), a, a.rpartition("@")[2], a.rpartition("@")[2], 0, 0, T0)
        for a in addresses
    )
    return ClaimedMessage("q", lane, "app@example.com", "<m@x>", None, T0, b"x", deliveries)


async def admit(g: ThrottleGate, m: ClaimedMessage) -> Clearance:
    return await g.admit(m, m.deliveries, g.clock.now())


def ids(deliveries: Sequence[Delivery]) -> list[int]:
    return [d.id for d in deliveries]


def waits(clearance: Clearance) -> list[tuple[int, float]]:
    """(delivery id, when it comes back) of what ``clearance`` sends back to wait."""
    return [(d.delivery_id, d.until) for d in clearance.waiting]


# -- admission ---------------------------------------------------------------------------------


async def test_deliveries_within_the_concurrency_cap_go_and_the_rest_wait(
    app: AsyncPostlane,
) -> None:
    g = gate(app, limits={"example.net": DestinationLimits(concurrency=2)})
    first = message("a@example.net", "b@example.net", "c@example.net")
    a, b, c = first.deliveries
    clearance = await admit(g, first)
    assert ids(clearance.to_send) == [a.id, b.id]
    [(waiting, at)] = waits(clearance)
    assert waiting == c.id and at > T0  # back later, no attempt used
    assert (await admit(g, message("d@example.net"))).to_send == []  # still full
    await g.release(clearance)
    assert len((await admit(g, message("e@example.net"))).to_send) == 1


async def test_a_refused_delivery_is_given_the_time_its_destinations_rate_allows(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    g = gate(app, limits={"example.net": DestinationLimits(rate=1)})
    m = message("a@example.net", "b@example.net", "c@example.net")
    a, b, c = m.deliveries
    clearance = await admit(g, m)
    assert ids(clearance.to_send) == [a.id]
    # one a second: each one sent back gets a slot of its own, not all the same moment
    assert waits(clearance) == [(b.id, T0 + 1.0), (c.id, T0 + 2.0)]
    await clock.advance(1.0)
    assert len((await admit(g, message("d@example.net"))).to_send) == 1


async def test_a_message_through_a_relay_takes_one_relay_slot_for_all_its_recipients(
    app: AsyncPostlane,
) -> None:
    g = gate(app, Relay("relay"), limits={"relay": DestinationLimits(concurrency=1)})
    first = await admit(g, message("a@example.net", "b@example.org"))
    assert len(first.to_send) == 2 and first.relays == ["relay"]  # one transaction
    second = message("c@example.net")
    refused = await admit(g, second)
    assert refused.to_send == [] and refused.relays == []
    assert ids(second.deliveries) == [w for w, _ in waits(refused)]
    await g.release(first)
    assert len((await admit(g, message("d@example.net"))).to_send) == 1


async def test_processes_sharing_a_cap_never_have_more_in_flight_together(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """Two processes' gates on one store, from their first send (before their shares of the
    cap have settled, each would let the whole cap through): every send also takes a slot in
    the store, so together they stay within the cap; a slot given back lets the other go; a
    relay refused by the fleet waits with its whole message."""
    limits = {"example.net": DestinationLimits(concurrency=2)}
    one, two = gate(app, limits=limits), gate(app, limits=limits)
    one.owner, two.owner = "one", "two"
    for g in (one, two, one):  # both have joined the fleet
        await g.sync()
    first = await admit(one, message("a@example.net", "b@example.net"))
    assert len(first.to_send) == 2 and first.fleet == ["example.net", "example.net"]
    refused = await admit(two, message("c@example.net"))
    assert refused.to_send == [] and refused.fleet == [] and waits(refused)[0][1] > T0
    await one.release(first)
    later = await admit(two, message("d@example.net"))
    assert len(later.to_send) == 1 and later.fleet == ["example.net"]
    relayed = gate(app, Relay("relay"), limits={"relay": DestinationLimits(concurrency=1)})
    relayed.owner = "three"
    await relayed.sync()
    await one.sync()
    held = await admit(relayed, message("e@example.org", "f@example.org"))
    assert held.relays == ["relay"] and held.fleet == ["relay"]
    other = gate(app, Relay("relay"), limits={"relay": DestinationLimits(concurrency=1)})
    other.owner = "four"
    await other.sync()
    waiting = await admit(other, message("g@example.org", "h@example.org"))
    assert waiting.to_send == [] and len(waiting.waiting) == 2 and waiting.relays == []


async def test_processes_sharing_a_rate_send_back_to_one_schedule_at_the_fleets_rate(
    app: AsyncPostlane,
) -> None:
    """Three processes share example.net's 40/s, a third each; one claims a backlog of 100 at
    once. What it cannot send now comes back due to any of them, so it waits for slots of the
    fleet's schedule, at the fleet's rate (and a quarter more: FLEET_SURPLUS), not at its own
    13/s: spaced at its share, a backlog one process claimed came back at a third of the rate
    for everyone. Another process's slots follow the first's, none given twice."""
    limits = {"example.net": DestinationLimits(rate=40)}
    one, two, three = gate(app, limits=limits), gate(app, limits=limits), gate(app, limits=limits)
    one.owner, two.owner, three.owner = "one", "two", "three"
    for g in (one, two, three, one, two):  # all three have joined the fleet
        await g.sync()
    backlog = [await admit(one, message(f"u{n}@example.net")) for n in range(100)]
    sent = sum(len(c.to_send) for c in backlog)
    assert sent == 1  # it joined processes already sending: nothing saved up, one send
    slots = [at for c in backlog for _, at in waits(c)]
    interval = 1 / (40 * (1 + FLEET_SURPLUS))
    assert slots == sorted(slots) and slots[0] <= T0 + 0.1
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert max(gaps) == pytest.approx(interval, abs=1e-4)  # times near 1.7e9 s: float's grain
    assert min(gaps) == pytest.approx(interval, abs=1e-4)
    more = [await admit(two, message(f"v{n}@example.net")) for n in range(20)]
    later = [at for c in more for _, at in waits(c)]
    assert later and min(later) > max(slots)  # after the first's: the fleet's next slots
    assert len(set(slots + later)) == len(slots) + len(later)


async def test_a_slowed_down_rate_without_a_configured_limit_holds_for_the_fleet(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """Three processes send through a relay with no configured limit, each from before its
    first sync (a worker claims at once when nothing has limits); then the relay asks to slow
    down and the rate it was given (10/s, as ``stats`` shows it) is adopted by all three.
    Together they send 10/s, not 10/s each: a slowed-down rate is shared by demand as a
    configured one is. (Each kept the share it started with, all of it, and the fleet sent
    three times what stats showed.)"""
    gates = [gate(app, Relay("relay")) for _ in range(3)]
    for g, owner in zip(gates, ("one", "two", "three"), strict=True):
        g.owner = owner
        await g.release(await admit(g, message("a@example.net")))  # before any sync
    for g in gates:  # the fleet has formed
        await g.sync()
    slowed = DestinationStatus("relay", 10.0, None, None, "throttled: 421 4.7.28", 0, 0, T0)
    await app.store.save_destination_states([slowed])
    sent = 0
    for _second in range(10):
        for g in gates:
            await g.sync()  # adopts the slowed rate; shares settle once a second
        for _tenth in range(10):  # each is offered far more than the rate, a tenth at a time
            for g in gates:
                for n in range(5):
                    clearance = await admit(g, message(f"{n}@example.net"))
                    sent += len(clearance.to_send)
                    await g.release(clearance)
            await clock.advance(0.1)
    # 10 s at 10/s, and the second's worth saved up before (324 when each sent 10/s)
    assert 85 <= sent <= 10 * 10 * 1.1 + 10, f"{sent} sent in 10 s at a rate of 10/s"


async def test_a_store_failing_mid_admission_leaves_no_fleet_slot_taken(
    app: AsyncPostlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's slot was taken in the store, then the store failed for a destination's:
    the admission fails, and the relay's slot goes back (no send holds it)."""
    limits = {
        "relay": DestinationLimits(concurrency=1),
        "example.org": DestinationLimits(concurrency=5),
    }
    one, two = gate(app, Relay("relay"), limits=limits), gate(app, Relay("relay"), limits=limits)
    one.owner, two.owner = "one", "two"
    for g in (one, two, one):
        await g.sync()
    take = app.store.take_fleet_slot

    async def failing(owner: str, name: str, *args: float) -> bool:
        if name == "example.org":
            raise RuntimeError("the store went away")
        return await take(owner, name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(app.store, "take_fleet_slot", failing)
    with pytest.raises(RuntimeError):
        await admit(one, message("a@example.org"))
    monkeypatch.setattr(app.store, "take_fleet_slot", take)
    assert (await admit(two, message("b@example.net"))).relays == ["relay"]  # it was given back


async def test_with_throttling_off_everything_goes(app: AsyncPostlane) -> None:
    g = gate(app, Relay("relay"), enabled=False)
    clearance = await admit(g, message(*(f"u{i}@example.net" for i in range(50))))
    assert len(clearance.to_send) == 50 and clearance.waiting == []


# -- pauses ------------------------------------------------------------------------------------


async def queue(app: AsyncPostlane, *addresses: str) -> None:
    for address in addresses:
        await app.send(sender="app@example.com", to=[address], text="x")


async def claim(app: AsyncPostlane, count: int) -> list[ClaimedMessage]:
    now = app.clock.now()
    return await app.store.claim_due(
        "gate-test/1/1/x", [(Lane.NORMAL, count)], limit=count, now=now, lease_until=now + 600
    )


async def test_a_paused_destination_defers_its_backlog_once_per_pause(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    store = app.store
    assert isinstance(store, CountingStore)
    await queue(app, *(f"u{i}@down.example" for i in range(5)))
    claimed = await claim(app, 3)  # three in hand, two more wait in the store
    assert await store.next_due_at() == T0
    g = gate(app, pause_after=1, pause=60)
    g.throttle.observe("down.example", DOWN, T0)  # paused until T0 + 60

    first = await admit(g, claimed[0])
    assert first.to_send == [] and waits(first) == [(claimed[0].deliveries[0].id, T0 + 60)]
    assert store.deferred == [("down.example", T0 + 60)]
    assert await store.next_due_at() == T0 + 60  # the two waiting in the store: not before

    second = await admit(g, claimed[1])  # the same pause: its backlog is already deferred
    assert waits(second) == [(claimed[1].deliveries[0].id, T0 + 60)]
    assert store.deferred == [("down.example", T0 + 60)]

    # the pause ends: one delivery probes, fails, and the destination pauses twice as long
    await clock.advance(60)
    probe = await admit(g, claimed[2])
    assert len(probe.to_send) == 1
    await g.release(probe)
    g.throttle.observe("down.example", DOWN, clock.now())
    again = await admit(g, message("v@down.example"))
    assert waits(again)[0][1] == T0 + 60 + 120
    assert store.deferred == [("down.example", T0 + 60), ("down.example", T0 + 180)]


async def test_one_process_of_the_fleet_probes_a_destination_when_its_pause_ends(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """Two processes share a paused destination. When the pause ends, the first to have a
    delivery for it probes; the other's waits (its backlog with it) for the probe's outcome,
    and goes once the probe went through. A probe that fails pauses the destination again for
    the fleet: the other waits, and adopts the new pause. (Each process sent a probe of its
    own.)"""
    store = app.store
    assert isinstance(store, CountingStore)
    one, two = gate(app, pause_after=1, pause=60), gate(app, pause_after=1, pause=60)
    one.owner, two.owner = "one", "two"
    for g in (one, two, one):  # both in the fleet
        await g.sync()
    one.throttle.observe("down.example", DOWN, T0)  # paused until T0 + 60
    await one.sync()  # recorded at once (news)
    await two.sync()  # adopted
    assert two.is_paused("down.example")

    await clock.advance(60)
    for g in (one, two):  # alive: each renews its shares about once a second
        await g.sync()
    probe = await admit(one, message("a@down.example"))
    assert len(probe.to_send) == 1  # one's delivery probes
    waiting = await admit(two, message("b@down.example"))
    assert waiting.to_send == [] and waits(waiting)[0][1] == T0 + 65  # asks again in 5 s
    assert store.deferred[-1] == ("down.example", T0 + 65)  # with its backlog
    assert (await admit(two, message("c@down.example"))).to_send == []  # not asked again
    await one.release(probe)
    one.throttle.observe("down.example", OK, clock.now())  # the probe went through
    await one.sync()
    await clock.advance(5)
    for g in (one, two):
        await g.sync()
    opened = await admit(two, message("d@down.example"))
    assert len(opened.to_send) == 1 and not two.is_paused("down.example")  # open
    await two.release(opened)

    # the next pause: the probe fails, and the fleet waits for the longer pause
    one.throttle.observe("down.example", DOWN, clock.now())
    await one.sync()
    await two.sync()
    await clock.advance(60)
    for g in (one, two):
        await g.sync()
    probe = await admit(two, message("e@down.example"))  # two asks first this time
    assert len(probe.to_send) == 1
    assert (await admit(one, message("f@down.example"))).to_send == []
    await two.release(probe)
    two.throttle.observe("down.example", DOWN, clock.now())  # paused again
    await two.sync()
    again = two.throttle.paused_until("down.example", clock.now())
    assert again is not None and again > clock.now()
    assert (await admit(one, message("g@down.example"))).to_send == []
    await one.sync()  # adopted
    assert one.throttle.paused_until("down.example", clock.now()) == again


async def test_a_process_that_stops_after_its_probe_failed_leaves_the_fleet_waiting(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """A fleet test stopped its workers just after a failed probe: the prober left the fleet
    before it recorded what its probe found, and another process, seeing a probe with no
    outcome and no live owner, probed the same pause's end again. Leaving records it first."""
    one, two = gate(app, pause_after=1, pause=60), gate(app, pause_after=1, pause=60)
    one.owner, two.owner = "one", "two"
    for g in (one, two, one):
        await g.sync()
    one.throttle.observe("down.example", DOWN, T0)
    await one.sync()
    await two.sync()
    await clock.advance(60)
    for g in (one, two):
        await g.sync()
    probe = await admit(one, message("a@down.example"))
    assert len(probe.to_send) == 1
    await one.release(probe)
    one.throttle.observe("down.example", DOWN, clock.now())  # the probe failed
    await one.leave_fleet()  # a graceful stop, before its next sync
    assert (await admit(two, message("b@down.example"))).to_send == []  # waits: no 2nd probe
    await two.sync()  # and adopts the longer pause
    assert two.throttle.paused_until("down.example", clock.now()) == T0 + 60 + 120


async def test_an_operators_lift_from_another_process_is_read_back_before_deferring(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    store = app.store
    assert isinstance(store, CountingStore)
    g = gate(app, pause_after=1, pause=600)
    g.throttle.observe("down.example", DOWN, T0)
    await g.sync()  # the pause is recorded, as every worker records it
    [recorded] = [s for s in await store.destination_states() if s.destination == "down.example"]
    assert recorded.paused_until == T0 + 600

    await clock.advance(5)
    await store.lift_destinations(["down.example"], clock.now())  # `queue flush`, elsewhere
    await queue(app, "ada@down.example")
    [claimed] = await claim(app, 1)

    clearance = await admit(g, claimed)
    assert len(clearance.to_send) == 1 and clearance.waiting == []  # it goes now
    assert store.deferred == []  # nothing was pushed back to the end of the lifted pause
    assert g.throttle.paused_until("down.example", clock.now()) is None


async def test_a_lift_between_the_gates_decision_and_the_hand_back_sends_back_nothing(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """The gate reads the recorded pause (still in force) and sends ada back to wait for its
    end; an operator's ``queue flush`` in another process lifts it before the worker hands
    ada back. The lift's call-back of waiting mail passed over ada (leased): the deferral
    carries the lifts the gate knew of, so the store makes ada due now, and the worker hears
    of the lift at once."""
    store = app.store
    g = gate(app, pause_after=1, pause=600)
    g.throttle.observe("down.example", DOWN, T0)
    await g.sync()
    await clock.advance(5)
    await queue(app, "ada@down.example")
    [claimed] = await claim(app, 1)
    clearance = await admit(g, claimed)
    assert waits(clearance) == [(claimed.deliveries[0].id, T0 + 600)]

    await store.lift_destinations(["down.example"], clock.now())  # `queue flush`, elsewhere
    await store.wait_for_destination_news(0)  # (this process's own lift: not what we test)
    await store.defer_unattempted(
        "gate-test/1/1/x", clearance.waiting, clock.now(), WAITING_FOR_DESTINATION
    )
    assert await store.next_due_at() == clock.now()  # not T0 + 600
    assert await store.wait_for_destination_news(0)  # news: adopt the lift now
    await g.sync()
    assert g.throttle.paused_until("down.example", clock.now()) is None
    [again] = await claim(app, 1)
    assert len((await admit(g, again)).to_send) == 1


async def test_a_pause_this_gate_began_and_records_again_after_a_lift_stays_lifted(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """The gate began down.example's pause and recorded it; an operator lifts it; a late reply
    then makes the gate record the destination again (its rate) before it reads the lift.
    That record does not undo the lift, and the gate adopts the lift at the same sync."""
    g = gate(app, pause_after=1, pause=600)
    g.throttle.observe("down.example", DOWN, T0)
    await g.sync()
    await clock.advance(5)
    await app.store.lift_destinations(["down.example"], clock.now())
    g.throttle.observe("down.example", SLOW, clock.now())  # a send started before the pause
    await g.sync()
    [status] = [s for s in await app.store.destination_states() if s.destination == "down.example"]
    assert status.paused_until is None and status.lifts == 1
    assert g.throttle.paused_until("down.example", clock.now()) is None


async def test_a_pause_is_recorded_and_another_processs_pause_adopted(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    g = gate(app, pause_after=1, pause=60)
    g.throttle.observe("down.example", DOWN, T0)
    await g.sync()
    statuses = {s.destination: s for s in await app.store.destination_states()}
    assert statuses["down.example"].paused_until == T0 + 60

    await clock.advance(1)
    other = DestinationStatus("google", None, None, T0 + 300, "3 connection failure(s)")
    other = dataclasses.replace(other, updated_at=T0 + 1)
    await app.store.save_destination_states([other])
    await g.sync()
    assert g.throttle.paused_until("google", clock.now()) == T0 + 300
    assert g.is_paused("google")


async def test_a_pause_one_gate_begins_is_news_that_stops_a_slowed_down_neighbour(
    app: AsyncPostlane, clock: FakeClock
) -> None:
    """Two workers on one store: one slowed down by the relay, the other pausing it. The
    pause is news at once (no waiting for the next periodic sync), survives the slowed-down
    one's record of its rate, and pauses the neighbour; a lift is news again."""
    one = gate(app, Relay("relay"), {"relay": DestinationLimits(rate=40)})
    two = gate(app, Relay("relay"), {"relay": DestinationLimits(rate=40)}, pause_after=1)
    m = message("a@example.net")
    one.observe(m, m.deliveries[0], SLOW, None, clock.now())
    assert await one.wait_for_news(0) is False  # a slow-down waits for the periodic sync
    two.observe(m, m.deliveries[0], DOWN, None, clock.now())
    assert await two.wait_for_news(0) is True  # its own pause: sync at once
    await two.sync()
    await clock.advance(0.5)
    await one.sync()  # records its slower rate a moment later, without the pause
    assert one.relay_paused_until() == T0 + 30
    [state] = [s for s in await app.store.destination_states() if s.destination == "relay"]
    assert state.paused_until == T0 + 30 and state.rate is not None and state.rate < 40
    await app.store.lift_destinations(None, clock.now())  # `queue flush` in this process
    assert await one.wait_for_news(0) is True
    await one.sync()
    assert one.relay_paused_until() is None


async def test_while_the_relay_is_paused_nothing_may_be_claimed(app: AsyncPostlane) -> None:
    g = gate(app, Relay("relay"), pause_after=1, pause=30)
    assert g.relay_paused_until() is None
    g.throttle.observe("relay", DOWN, T0)
    assert g.relay_paused_until() == T0 + 30


async def test_the_transport_is_handed_the_gates_pause_check(app: AsyncPostlane) -> None:
    relay = Relay("relay")
    g = gate(app, relay, pause_after=1, pause=30)
    assert relay.is_paused is not None and relay.is_paused("relay") is False
    g.throttle.observe("relay", DOWN, T0)
    assert relay.is_paused("relay") is True


async def test_a_router_takes_a_routes_fallback_while_the_gate_holds_its_relay_paused(
    app: AsyncPostlane,
) -> None:
    primary, fallback = Relay("relay:primary"), Relay("relay:fallback")
    rule = RouteRule(lanes=frozenset({"high"}), sender_domains=(), recipient_domains=())
    router = Router(Relay(), [(rule, primary, fallback)])
    g = gate(app, router, pause_after=1, pause=30)
    urgent = message("ada@example.net", lane=Lane.HIGH)
    [ada] = urgent.deliveries
    assert g.relay_for(urgent, ada) == "relay:primary"
    g.throttle.observe("relay:primary", DOWN, T0)
    assert g.relay_for(urgent, ada) == "relay:fallback"
    assert router.choose("high", "app@example.com", "example.net") is fallback
    [bob] = message("bob@example.net").deliveries  # normal lane: the default relay, none
    assert g.relay_for(message("bob@example.net"), bob) is None


# -- feedback ----------------------------------------------------------------------------------


async def test_a_reply_through_a_relay_speaks_about_the_relays_limits(
    app: AsyncPostlane,
) -> None:
    g = gate(app, Relay("relay"), cool_down=45)
    m = message("ada@example.net")
    [ada] = m.deliveries
    assert g.feedback_key(m, ada) == "relay"
    assert g.observe(m, ada, SLOW, None, T0) == 45  # the relay's cool-down
    slowed = {s.destination: s for s in g.throttle.statuses(T0)}
    assert (slowed["relay"].reason or "").startswith("throttled")
    assert "example.net" not in slowed  # the destination never answered


async def test_without_a_relay_a_reply_speaks_about_the_destinations_limits(
    app: AsyncPostlane,
) -> None:
    g = gate(app, Relay(None), cool_down=45)
    m = message("ada@example.net")
    [ada] = m.deliveries
    assert g.feedback_key(m, ada) == "example.net"
    g.observe(m, ada, SLOW, None, T0)
    assert [s.destination for s in g.throttle.statuses(T0)] == ["example.net"]


async def test_a_delivered_reply_through_a_relay_counts_for_the_destination_too(
    app: AsyncPostlane,
) -> None:
    g = gate(app, Relay("relay"))
    m = message("ada@example.net")
    [ada] = m.deliveries
    assert g.observe(m, ada, OK, None, T0) is None
    assert sorted(s.destination for s in g.throttle.statuses(T0)) == ["example.net", "relay"]


@pytest.mark.parametrize(
    ("verdict", "retry_after", "wait"),
    [
        (LATER, 600.0, 600.0),  # a counted reply's Retry-After is the wait
        (SLOW, 600.0, 600.0),  # the server's word wins over our cool-down
        (SLOW, None, 45.0),  # else a slow-down waits the cool-down
        (LATER, None, None),  # else the retry schedule alone decides
        (DOWN, None, None),
    ],
)
async def test_the_wait_a_reply_asks_for(
    app: AsyncPostlane, verdict: Verdict, retry_after: float | None, wait: float | None
) -> None:
    g = gate(app, Relay("relay"), cool_down=45)
    m = message("ada@example.net")
    assert g.observe(m, m.deliveries[0], verdict, retry_after, T0) == wait


async def test_a_slow_down_while_paused_waits_for_the_end_of_the_pause(
    app: AsyncPostlane,
) -> None:
    g = gate(app, Relay("relay"), cool_down=45, pause_after=1, pause=300)
    m = message("ada@example.net")
    g.throttle.observe("relay", DOWN, T0)
    assert g.observe(m, m.deliveries[0], SLOW, None, T0 + 10) == 290


async def test_a_process_without_throttling_still_says_it_runs(app: AsyncPostlane) -> None:
    """A review: presence was renewed only with throttling on, so an idle serve with
    `[throttle] enabled = false` was invisible to the migration's check for live processes."""
    g = gate(app, enabled=False)
    await g.sync()
    shares = await app.store.share_destinations("other", {}, app.clock.now(), app.clock.now())
    assert shares.owners == 1  # this gate's presence (the asking process holds none)
    await g.leave_fleet()
    shares = await app.store.share_destinations("other", {}, app.clock.now(), app.clock.now())
    assert shares.owners == 0
