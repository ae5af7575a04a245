"""Throttle bookkeeping with explicit times: token bucket, concurrency, halving and recovery,
pauses and probes, shaping rules. Nothing sleeps."""

from __future__ import annotations

import itertools

import pytest

from postlane.classify import ReplyClass, Verdict
from postlane.config import DestinationLimits, ShapingRule, ThrottleConfig
from postlane.records import DestinationStatus
from postlane.throttle import LIFTED, Throttle

T0 = 1_000.0
OK = Verdict(ReplyClass.DELIVERED, 250, "2.0.0", "ok")
SLOW = Verdict(ReplyClass.THROTTLED, 421, "4.7.28", "rate limited")
DOWN = Verdict(ReplyClass.CONNECTION, None, None, "connection refused")


def throttle(rate: float = 0.0, concurrency: int = 0, **settings: float) -> Throttle:
    limits = {"d": DestinationLimits(rate=rate, concurrency=concurrency)}
    return Throttle(ThrottleConfig(**settings), limits)  # type: ignore[arg-type]


def send(t: Throttle, now: float, verdict: Verdict = OK, key: str = "d") -> bool:
    """Admit, then finish at once with ``verdict``; whether it was admitted."""
    if not t.admit([key], now).admitted:
        return False
    t.release([key])
    t.observe(key, verdict, now)
    return True


def test_the_token_bucket_admits_the_rate_and_spaces_the_rest() -> None:
    t = throttle(rate=10)
    admitted = [t.admit(["d"], T0).at is None for _ in range(15)]
    assert admitted.count(True) == 10  # a second's worth saved up, no more
    t2 = throttle(rate=10)
    for _ in range(10):
        t2.admit(["d"], T0)
    slots = [t2.admit(["d"], T0).at for _ in range(5)]
    assert slots == pytest.approx([T0 + 0.1, T0 + 0.2, T0 + 0.3, T0 + 0.4, T0 + 0.5])
    t3 = throttle(rate=10)
    count = sum(send(t3, T0 + i * 0.01) for i in range(300))  # 3 seconds of asking
    assert 38 <= count <= 41  # the saved-up second, then 10/s


def test_a_high_lane_delivery_gets_the_next_slot_ahead_of_the_backlog() -> None:
    t = throttle(rate=1)
    t.admit(["d"], T0)  # the second's token
    backlog = [t.admit(["d"], T0).at for _ in range(60)]  # newsletters: a minute of slots
    assert backlog[0] == pytest.approx(T0 + 1) and backlog[-1] == pytest.approx(T0 + 60)
    reset = t.admit(["d"], T0, urgent=True).at
    assert reset == pytest.approx(T0 + 1)  # the next token, not the 61st
    second = t.admit(["d"], T0, urgent=True).at
    assert second == pytest.approx(T0 + 2)  # urgent ones are spaced among themselves too
    # the backlog moved back by one slot each: the rate still holds overall
    assert t.admit(["d"], T0).at == pytest.approx(T0 + 63)


def test_concurrency_caps_sends_in_flight() -> None:
    t = throttle(concurrency=2)
    assert t.admit(["d"], T0).admitted and t.admit(["d"], T0).admitted
    third = t.admit(["d"], T0)
    assert not third.admitted and third.paused_destination is None
    t.release(["d"])
    assert t.admit(["d"], T0).admitted


def test_a_delivery_needs_a_slot_from_every_key() -> None:
    t = Throttle(ThrottleConfig(), {"relay": DestinationLimits(concurrency=1)})
    assert t.admit(["google", "relay"], T0).admitted
    assert not t.admit(["yahoo", "relay"], T0).admitted  # the relay is full
    t.release(["google", "relay"])
    assert t.admit(["yahoo", "relay"], T0).admitted


def test_throttled_halves_what_was_being_sent_once_a_second_down_to_the_floor() -> None:
    t = throttle(min_rate=1.0)
    for i in range(40):  # 20/s for two seconds
        send(t, T0 + i * 0.05)
    now = T0 + 2.0
    t.observe("d", SLOW, now)
    [status] = t.statuses(now)
    assert status.rate == pytest.approx(10, rel=0.15)
    t.observe("d", SLOW, now + 0.5)  # within the second: no second cut
    assert t.statuses(now)[0].rate == pytest.approx(status.rate)
    for k in range(1, 10):
        t.observe("d", SLOW, now + k * 1.1)
    assert t.statuses(now)[0].rate == 1.0  # never below min_rate
    assert "throttled" in (t.statuses(now)[0].reason or "")


def test_a_slow_down_from_no_limit_takes_effect_at_once() -> None:
    t = throttle(min_rate=0.5)
    assert send(t, T0)
    t.observe("d", SLOW, T0 + 0.1)  # 0.5/s from now: the next send in 2 seconds, not now
    assert t.statuses(T0 + 0.1)[0].rate == 0.5
    waiting = t.admit(["d"], T0 + 0.1)
    assert waiting.at == pytest.approx(T0 + 2.1)


def test_successes_let_the_rate_creep_back_to_the_configured_limit() -> None:
    t = throttle(rate=20, increase=2.0)
    t.observe("d", SLOW, T0)
    slowed = t.statuses(T0)[0].rate
    assert slowed is not None and slowed <= 10
    now = T0
    for _ in range(200):
        now += 1 / 10
        send(t, now)
    final = t.statuses(now)[0].rate
    assert final == 20  # capped at the configured rate
    assert t.statuses(now)[0].reason is None


def test_recovery_is_additive_per_second() -> None:
    t = throttle(rate=100, increase=1.0, min_rate=0.1)
    t.observe("d", SLOW, T0)
    start = t.statuses(T0)[0].rate
    assert start is not None
    now = T0
    sent = 0
    while now < T0 + 5:
        now += 1 / start
        sent += send(t, now)
    grown = t.statuses(now)[0].rate
    assert grown is not None and 3.5 <= grown - start <= 6.5  # about +1/s per second


def test_repeated_connection_failures_pause_then_a_probe_decides() -> None:
    t = throttle(pause_after=3, pause=30, max_pause=100)
    for _ in range(3):
        send(t, T0, DOWN)
    admission = t.admit(["d"], T0 + 1)
    assert admission.at == T0 + 30 and admission.paused_destination == "d"
    send(t, T0 + 2, DOWN)  # a result of a send started before the pause: not counted again
    assert t.paused_until("d", T0 + 2) == T0 + 30
    # the pause is over: one probe at a time
    assert t.admit(["d"], T0 + 30).admitted
    second = t.admit(["d"], T0 + 30)
    assert not second.admitted and second.paused_destination == "d"
    t.release(["d"])
    t.observe("d", DOWN, T0 + 31)  # the probe failed: paused twice as long
    assert t.paused_until("d", T0 + 31) == T0 + 31 + 60
    # said as such (it read "1 connection failure(s)", a new and milder trouble at 3 a.m.)
    [status] = t.statuses(T0 + 31)
    assert (status.reason or "").startswith("connection failure of the probe after pause 1: ")
    assert t.admit(["d"], T0 + 91).admitted  # probe again
    t.release(["d"])
    t.observe("d", OK, T0 + 92)  # it worked: open
    assert t.admit(["d"], T0 + 92).admitted and t.admit(["d"], T0 + 92).admitted
    assert t.paused_until("d", T0 + 92) is None


def test_pauses_grow_no_longer_than_max_pause() -> None:
    t = throttle(pause_after=1, pause=30, max_pause=50)
    now = T0
    for _ in range(5):
        send(t, now, DOWN)
        until = t.paused_until("d", now)
        assert until is not None and until - now <= 50
        now = until
        assert t.admit(["d"], now).admitted
        t.release(["d"])


def test_a_shaping_rule_pauses_after_n_matches_in_a_window() -> None:
    rule = ShapingRule(enhanced="5.7.", action="pause", duration=600, after=2, within=60)
    t = Throttle(ThrottleConfig(), {}, [rule])
    blocked = Verdict(ReplyClass.POLICY_BLOCK, 554, "5.7.1", "blocked by reputation")
    t.observe("d", blocked, T0)
    assert t.paused_until("d", T0) is None
    t.observe("d", blocked, T0 + 100)  # the first fell out of the window
    assert t.paused_until("d", T0 + 100) is None
    t.observe("d", blocked, T0 + 110)
    assert t.paused_until("d", T0 + 110) == T0 + 710
    assert "shaping rule 1" in (t.statuses(T0 + 110)[0].reason or "")


def test_a_shaping_rule_sets_a_rate_for_matching_destinations_only() -> None:
    rule = ShapingRule(match="unusual rate", destinations=("goog*",), action="rate", rate=2.0)
    t = Throttle(ThrottleConfig(), {}, [rule])
    text = Verdict(ReplyClass.THROTTLED, 421, "4.7.28", "an unusual rate of unsolicited mail")
    t.observe("google", text, T0)
    t.observe("yahoo", text, T0)
    rates = {s.destination: s.rate for s in t.statuses(T0)}
    assert rates["google"] == 2.0
    assert rates["yahoo"] != 2.0


GMAIL_RATE = Verdict(ReplyClass.THROTTLED, 421, "4.7.28", "an unusual rate of unsolicited mail")
#: a "slow down" the rule below does not match
BUSY = Verdict(ReplyClass.THROTTLED, 450, "4.2.1", "too many messages, slow down")


def shaped(rate: float = 20.0, **settings: float) -> Throttle:
    """``d`` configured at ``rate``/s, with a rule: 4.7.28 holds it at 2/s for 10 minutes."""
    rule = ShapingRule(enhanced="4.7.28", action="rate", rate=2.0, duration=600)
    limits = {"d": DestinationLimits(rate=rate)}
    return Throttle(ThrottleConfig(**settings), limits, [rule])  # type: ignore[arg-type]


def test_a_recovering_rate_is_recorded_and_a_slow_down_with_no_limit_ends() -> None:
    """An outside audit: after a provider slowed the relay down (no rate configured), stats
    showed the slowed rate and "throttled" six minutes after the queue was empty, while the
    worker sent 24/s: the recovering rate was never recorded, and with no ceiling the
    slow-down never ended. It is recorded each time it has grown by a quarter, and ends once
    the destination has not asked to slow down for five minutes, mail or none. The reason is
    one line, with the reply's codes."""
    from postlane.throttle import SLOW_DOWN_MEMORY

    t = throttle(increase=4.0, min_rate=1.0)
    multi_line = Verdict(
        ReplyClass.THROTTLED, 421, "4.7.28", "Our system has detected\nan unusual rate of\n  mail"
    )
    for n in range(20):  # sending 20/s, until the provider says so
        send(t, T0 + n / 20)
    t.observe("d", multi_line, T0 + 1)
    [cut] = t.changes(T0 + 1)
    assert cut.rate is not None and cut.rate <= 10
    assert cut.reason == "throttled: 421 4.7.28 Our system has detected an unusual rate of mail"
    recorded, now = [cut.rate], T0 + 1
    while now < T0 + 30:  # asking as fast as admitted: the rate binds, and grows
        now += 0.01
        send(t, now)
        recorded += [c.rate for c in t.changes(now) if c.rate is not None]
    assert len(recorded) >= 3 and recorded == sorted(recorded)  # stats follow it back up
    assert all(b <= a * 1.25 + 1 for a, b in itertools.pairwise(recorded))  # in steps
    assert t.changes(T0 + 1 + SLOW_DOWN_MEMORY - 1) == []  # not yet: it asked 5 min ago
    [over] = t.changes(T0 + 1 + SLOW_DOWN_MEMORY + 1)  # no mail for a while: over all the same
    assert over.rate is None and over.reason is None
    assert t.admit(["d"], T0 + 1 + SLOW_DOWN_MEMORY + 1).admitted


def send_for(t: Throttle, start: float, seconds: float, step: float = 0.05) -> tuple[int, float]:
    """Send successfully as fast as ``t`` admits, asking every ``step`` seconds; returns the
    number sent and the time the last ask was made."""
    now, sent = start, 0
    while now < start + seconds:
        sent += send(t, now)
        now += step
    return sent, now


def test_a_shaping_rate_rule_holds_its_rate_for_its_duration_then_recovers() -> None:
    t = shaped(rate=20, increase=2.0)
    t.observe("d", GMAIL_RATE, T0)
    [status] = t.statuses(T0)
    assert status.rate == 2.0
    assert "shaping rule 1" in (status.reason or "") and "2.0/s for 10m" in (status.reason or "")
    # ten minutes of successes: the rate stays at 2/s (no creeping back), and so does the pace
    sent, now = send_for(t, T0, 599)
    [status] = t.statuses(now)
    assert status.rate == 2.0 and "2.0/s" in (status.reason or "")
    assert sent == pytest.approx(2 * 599, abs=5)
    # the hold is over: reported once, then successes let the rate creep back to the limit
    [change] = t.changes(T0 + 600)
    assert change.rate == 2.0 and "recovering after shaping rule 1" in (change.reason or "")
    sent, now = send_for(t, T0 + 600, 120)
    [status] = t.statuses(now)
    assert status.rate == 20 and status.reason is None
    assert sent > 2 * 120 * 2  # well above the held pace


def test_a_held_rate_caps_recovery_after_a_slow_down_until_it_ends() -> None:
    t = shaped(rate=20, increase=2.0, min_rate=0.5)
    t.observe("d", GMAIL_RATE, T0)
    t.observe("d", BUSY, T0 + 10)  # "slow down" on top: halved below the held rate
    slowed = t.statuses(T0 + 10)[0].rate
    assert slowed is not None and slowed < 2.0
    _, now = send_for(t, T0 + 10, 200)
    [status] = t.statuses(now)
    assert status.rate == 2.0  # back up to the held rate, not beyond it
    assert "shaping rule 1" in (status.reason or "")
    _, now = send_for(t, T0 + 600, 120)
    assert t.statuses(now)[0].rate == 20


def test_a_shaping_rate_rule_never_raises_the_configured_rate() -> None:
    t = shaped(rate=1.0)
    t.observe("d", GMAIL_RATE, T0)
    assert t.statuses(T0)[0].rate == 1.0
    sent, _ = send_for(t, T0, 100)
    assert sent <= 101


def test_flush_ends_a_held_rate() -> None:
    t = shaped(rate=20, increase=2.0)
    t.observe("d", GMAIL_RATE, T0)
    t.lift(["d"])
    [status] = t.statuses(T0)
    assert status.rate == 20 and status.reason is None
    t.observe("d", BUSY, T0 + 1)
    send_for(t, T0 + 1, 120)
    assert t.statuses(T0 + 121)[0].rate == 20  # recovers to the limit: no hold left


def test_flush_lifts_pauses_and_slow_downs() -> None:
    t = throttle(rate=50, pause_after=1)
    send(t, T0, DOWN)
    t.observe("d", SLOW, T0)
    t.lift(["d"])
    [status] = t.statuses(T0)
    assert status.paused_until is None and status.rate == 50 and status.reason is None
    assert t.admit(["d"], T0).admitted


def test_a_lift_calls_back_what_waits_for_slots_at_the_old_rate() -> None:
    """Deliveries sent back to wait were given slots at the slowed rate (some minutes away):
    once an operator's lift is adopted they are made due at the next sync, not left to
    their slots while nothing limits the destination any more."""
    t = throttle(min_rate=0.5)
    assert send(t, T0)
    t.observe("d", SLOW, T0 + 0.1)
    slots = [t.admit(["d"], T0 + 0.1).at for _ in range(100)]
    assert max(s or 0 for s in slots) > T0 + 60  # spaced far ahead at 0.5/s
    assert t.to_hasten(T0 + 1) == []
    t.adopt(DestinationStatus("d", None, None, None, LIFTED, updated_at=T0 + 2, lifts=1), T0 + 2)
    assert t.to_hasten(T0 + 2) == ["d"]
    assert t.to_hasten(T0 + 3) == []  # once
    assert t.admit(["d"], T0 + 3).admitted  # and new mail is not slotted behind the old


def test_changes_are_persisted_once_and_other_processes_are_adopted() -> None:
    t = throttle(pause_after=1)
    send(t, T0, DOWN)
    [change] = t.changes(T0)
    assert change.destination == "d" and change.paused_until == T0 + 30
    assert t.changes(T0) == []
    other = throttle()
    other.adopt(change, T0 + 1)
    assert other.paused_until("d", T0 + 1) == T0 + 30
    other.adopt(
        DestinationStatus("d", None, None, None, LIFTED, updated_at=T0 + 2, lifts=1), T0 + 2
    )
    assert other.paused_until("d", T0 + 2) is None
    other.adopt(change, T0 + 3)  # older than what it knows: ignored
    assert other.paused_until("d", T0 + 3) is None


def test_lifts_are_counted_so_one_is_adopted_whatever_was_recorded_after_it() -> None:
    """Another process recorded its rate after the operator's lift (the reason is no longer
    "lifted by an operator"): the lift is adopted all the same, as the store counts it, and
    the slow-down recorded after it too. A record read before the lift changes nothing then."""
    t = throttle()
    paused = DestinationStatus("d", None, None, T0 + 600, "paused by another", updated_at=T0)
    t.adopt(paused, T0)
    assert t.paused_until("d", T0 + 1) == T0 + 600 and t.lifts("d") == 0
    after = DestinationStatus("d", 2.0, None, None, "throttled: 421", updated_at=T0 + 2, lifts=1)
    t.adopt(after, T0 + 2)
    assert t.pause_and_rate("d", T0 + 2) == (None, 2.0) and t.lifts("d") == 1
    t.adopt(paused, T0 + 3)  # read before the lift
    assert t.paused_until("d", T0 + 3) is None
    status = t.status_of("d", T0 + 4)
    assert status is not None and status.lifts == 1  # what it records says it knows the lift


def test_a_pause_recorded_beside_this_processs_own_record_is_adopted() -> None:
    """The store keeps another process's pause through this one's later record of its rate:
    read back with this process's time, it is still taken."""
    t = throttle(rate=50)
    t.observe("d", SLOW, T0)
    [mine] = t.changes(T0 + 1)  # this process records its slow-down at T0 + 1
    merged = DestinationStatus("d", mine.rate, 50, T0 + 30, "paused by another", updated_at=T0 + 1)
    t.adopt(merged, T0 + 1)
    assert t.paused_until("d", T0 + 1) == T0 + 30


def test_only_the_process_that_began_a_pause_records_it() -> None:
    """An adopted pause is not recorded again: an operator's lift the process has not heard
    of yet is not undone by its next record of a rate."""
    t = throttle(rate=50)
    t.adopt(DestinationStatus("d", None, 50, T0 + 30, "paused by another", updated_at=T0), T0)
    assert t.news is False
    t.observe("d", SLOW, T0 + 1)
    [change] = t.changes(T0 + 1)
    assert change.paused_until is None and change.rate is not None and change.rate < 50
    mine = throttle(pause_after=1)
    send(mine, T0, DOWN)
    assert mine.news is True  # the fleet should hear at once
    [change] = mine.changes(T0)
    assert change.paused_until == T0 + 30 and mine.news is False


def test_a_disabled_throttle_admits_everything() -> None:
    t = Throttle(ThrottleConfig(enabled=False), {"d": DestinationLimits(rate=1, concurrency=1)})
    assert all(t.admit(["d"], T0).admitted for _ in range(100))


def test_a_success_from_a_send_started_before_a_pause_does_not_lift_it() -> None:
    rule = ShapingRule(enhanced="4.7.0", action="pause", duration=30.0, after=1, within=10.0)
    t = Throttle(ThrottleConfig(), {"d": DestinationLimits()}, [rule])
    t.observe("d", Verdict(ReplyClass.TEMPORARY, 421, "4.7.0", "try again later"), T0)
    assert t.paused_until("d", T0) == T0 + 30
    t.observe("d", OK, T0 + 0.1)  # a send that was in flight when the pause began
    assert t.paused_until("d", T0 + 0.1) == T0 + 30
    # after the pause, one delivery probes; its success opens the destination again
    assert t.admit(["d"], T0 + 30).admitted
    t.observe("d", OK, T0 + 30.5)
    t.release(["d"])
    assert t.paused_until("d", T0 + 31) is None and t.admit(["d"], T0 + 31).admitted


def test_the_fleets_shares_split_rate_and_concurrency_by_demand() -> None:
    from postlane.fleet import PRESENCE
    from postlane.records import FleetShares

    shares = FleetShares(
        {"d": {"a": 30.0, "b": 10.0}, PRESENCE: {"a": 1.0, "b": 1.0}},
        2,
        {("d", "a"): T0, ("d", "b"): T0, (PRESENCE, "a"): T0 - 60, (PRESENCE, "b"): T0 - 60},
    )
    a, b = throttle(rate=40, concurrency=10), throttle(rate=40, concurrency=10)
    a.set_shares(shares, "a", T0)
    b.set_shares(shares, "b", T0)
    # a new destination starts at an even share: b falls to its part at once, a rises to its
    # part (3/4: 30 messages/s, 8 of the 10 slots) a sync later, when b has surely fallen
    assert (a._get("d").share, a._get("d").slots) == (pytest.approx(0.5), 5)
    assert (b._get("d").share, b._get("d").slots) == (pytest.approx(0.25), 2)
    a.set_shares(shares, "a", T0 + 1)
    assert a.admit(["d"], T0 + 1).admitted
    assert (a._get("d").share, a._get("d").slots) == (pytest.approx(0.75), 8)
    # a process that has just joined and not asked yet counts as wanting as much
    joining = FleetShares(
        {"d": {"a": 30.0}, PRESENCE: {"a": 1.0, "c": 1.0}},
        2,
        {("d", "a"): T0, (PRESENCE, "a"): T0 - 60, (PRESENCE, "c"): T0 + 1},
    )
    a.set_shares(joining, "a", T0 + 2)
    assert (a._get("d").share, a._get("d").slots) == (pytest.approx(0.5), 5)
    assert "d" in a.demands(T0 + 2) and a.demands(T0 + 2)[PRESENCE] == 1.0


def test_a_share_falls_at_once_and_rises_only_when_two_syncs_in_a_row_say_so() -> None:
    """Each process reads the others' demands as they were at their last sync: when demands
    move, one whose view is fresher would take more while another, not yet seeing that, keeps
    its part, and together they sent above the rate (48/s under 40/s after a process died).
    So a share (and a part of the cap) falls at once and rises only a sync later."""
    from postlane.fleet import PRESENCE
    from postlane.records import FleetShares

    def sync(t: Throttle, mine: float, theirs: float, at: float) -> tuple[float, int | None]:
        owners = {"a": 1.0, "b": 1.0}
        since = {(name, o): T0 - 60 for name in ("d", PRESENCE) for o in owners}
        demands = {"d": {"a": mine, "b": theirs}, PRESENCE: owners}
        t.set_shares(FleetShares(demands, 2, since), "a", at)
        state = t._get("d")
        return state.share, state.slots

    t = throttle(rate=40, concurrency=10)
    assert sync(t, 10, 10, T0) == (pytest.approx(0.5), 5)
    assert sync(t, 30, 10, T0 + 1) == (pytest.approx(0.5), 5)  # more, but not yet
    assert sync(t, 30, 10, T0 + 2) == (pytest.approx(0.75), 8)  # said twice: taken
    assert sync(t, 10, 30, T0 + 3) == (pytest.approx(0.25), 3)  # less: at once
    assert sync(t, 30, 10, T0 + 4) == (pytest.approx(0.25), 3)
    assert sync(t, 20, 20, T0 + 5) == (pytest.approx(0.5), 5)  # the lesser of the two


def test_a_process_sharing_a_rate_has_room_for_what_its_bucket_lets_go() -> None:
    """What a worker may claim for a relay whose rate the fleet shares: the tokens its bucket
    holds beyond the messages it claimed and has yet to admit; none, and when one comes."""
    alone = throttle(rate=40)
    assert alone.fleet_room("d", T0) is None  # alone: claims as usual
    t = throttle(rate=40)
    fleet_of(t, 2)
    assert t.fleet_room("d", T0) == (1, 0.0)  # half the rate, nothing saved up yet
    room, wait = t.fleet_room("d", T0, pending=1) or (None, None)
    assert room == 0 and wait == pytest.approx(1 / 20)  # the one claimed takes it
    assert t.fleet_room("d", T0 + 0.5) == (11, 0.0)
    assert t.fleet_room("d", T0 + 0.5, pending=5) == (6, 0.0)
    for _ in range(11):
        assert t.admit(["d"], T0 + 0.5).admitted
    room, wait = t.fleet_room("d", T0 + 0.5) or (None, None)
    assert room == 0 and wait == pytest.approx(1 / 20)
    assert t.fleet_room("d", T0 + 5) == (20, 0.0)  # a second's worth of its share at most


def test_a_process_joining_others_has_nothing_saved_up() -> None:
    """A process alone starts with a second's worth of the rate (as the provider's own bucket
    is full after a quiet while). One that joins processes already sending starts with one
    send, then its share's rate: with a whole second of its share at once on top of theirs,
    before they had made room for it, a third worker started 4 s late sent 21-22 messages in a
    quarter second under 40/s, and the server refused one."""
    alone = throttle(rate=40)
    assert sum(alone.admit(["d"], T0).admitted for _ in range(60)) == 40
    joining = throttle(rate=40)
    fleet_of(joining, 3)
    assert sum(joining.admit(["d"], T0).admitted for _ in range(60)) == 1
    assert sum(joining.admit(["d"], T0 + 0.31).admitted for _ in range(60)) == 4  # 40/3 a second
    assert throttle(concurrency=2).fleet_room("d", T0) is None  # no rate


def fleet_of(t: Throttle, owners: int, owner: str = "a") -> None:
    """``t`` learns that ``owners`` processes (``owner`` among them) are in the fleet."""
    from postlane.fleet import PRESENCE
    from postlane.records import FleetShares

    names = [owner, *(f"other{n}" for n in range(owners - 1))]
    present = {name: 1.0 for name in names}
    since = {(PRESENCE, name): T0 - 60 for name in names}
    t.set_shares(FleetShares({PRESENCE: present}, owners, since), owner, T0)


def test_a_delivery_waiting_for_a_rate_the_fleet_shares_takes_the_fleets_next_slot() -> None:
    """Alone, a process spaces what it sends back at its rate; sharing the rate, what it sends
    back comes back due to every process, so it takes the next slot of the fleet's schedule
    (spaced at the fleet's rate, with a surplus), only no sooner than its own next token. A
    high-lane delivery still gets this process's next slot, ahead of the backlog."""
    from postlane.fleet import FLEET_SURPLUS, FleetSchedule

    alone = throttle(rate=40)
    for _ in range(40):
        assert alone.admit(["d"], T0).admitted
    waiting = alone.admit(["d"], T0)
    assert waiting.fleet_schedule is None and waiting.at == pytest.approx(T0 + 1 / 40)
    shared = throttle(rate=40)
    fleet_of(shared, 3)
    assert shared.admit(["d"], T0).admitted  # joining the others: one send, nothing saved up
    waiting = shared.admit(["d"], T0)
    assert waiting.fleet_schedule == FleetSchedule("d", 1 / (40 * (1 + FLEET_SURPLUS)))
    assert waiting.at is not None and T0 < waiting.at <= T0 + 3 / 40  # its next token
    urgent = shared.admit(["d"], T0, urgent=True)
    assert urgent.fleet_schedule is None and urgent.at is not None and urgent.at < T0 + 0.1
    # a cap, not the rate: its own slots, as before
    capped = throttle(concurrency=1)
    fleet_of(capped, 3)
    assert capped.admit(["d"], T0).admitted
    assert capped.admit(["d"], T0).fleet_schedule is None


def test_a_backlog_claimed_at_once_asks_for_no_more_than_its_part_of_the_rate() -> None:
    """Thousands of sends asked for in a second (a backlog claimed at once) say no more than
    the process's part of the rate among those asking: the others claim what comes back due
    as much as it does. Below that part, the demand is what was asked for."""
    from postlane.fleet import PRESENCE
    from postlane.records import FleetShares

    t = throttle(rate=40)
    for _ in range(600):
        if t.admit(["d"], T0).admitted:
            t.release(["d"])  # sent at once: none in flight
    assert t.demands(T0)["d"] == pytest.approx(40)  # alone so far: the whole rate at most
    owners = {"a": 1.0, "b": 1.0, "c": 1.0}
    since = {(PRESENCE, o): T0 - 60 for o in owners} | {("d", o): T0 - 60 for o in owners}
    t.set_shares(
        FleetShares({"d": {"a": 40.0, "b": 5.0, "c": 5.0}, PRESENCE: owners}, 3, since), "a", T0
    )
    assert t.demands(T0)["d"] == pytest.approx(40 / 3)
    quiet = throttle(rate=40)
    for n in range(10):
        send(quiet, T0 + n * 0.1)
    assert quiet.demands(T0 + 1)["d"] == pytest.approx(10 / 2)  # ten over the last two seconds


def test_deliveries_given_the_fleets_slots_are_called_back_when_the_rate_is_lifted() -> None:
    """Slots of the fleet's schedule given at a slowed rate count as waiting deliveries: an
    operator's lift (or a rate grown well past theirs) calls them back, as for its own."""
    t = throttle(rate=40)
    fleet_of(t, 2)
    t.observe("d", SLOW, T0)  # halved
    t.fleet_slotted("d", T0 + 60, T0)
    assert t.to_hasten(T0 + 1) == []
    t.lift(["d"])
    assert t.to_hasten(T0 + 1) == ["d"]
