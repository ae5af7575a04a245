from __future__ import annotations

from collections import Counter

from postlane.lanes import LaneScheduler
from postlane.message import Lane


def simulate(
    scheduler: LaneScheduler, rounds: int, slots: int, backlog: set[Lane]
) -> Counter[Lane]:
    """Claim ``rounds`` times with every lane in ``backlog`` always having more due."""
    total: Counter[Lane] = Counter()
    for _ in range(rounds):
        quotas = scheduler.quotas(slots)
        got: Counter[Lane] = Counter()
        left = slots
        for lane, quota in quotas:  # the quota pass
            take = min(quota, left) if lane in backlog else 0
            got[lane] += take
            left -= take
        for lane, _ in quotas:  # the fill pass, lane order
            if lane in backlog and left:
                got[lane] += left
                left = 0
        scheduler.claimed(quotas, got)
        total.update(got)
    return total


def test_high_goes_first_when_alone() -> None:
    got = simulate(LaneScheduler(), 100, 10, {Lane.HIGH})
    assert got == Counter({Lane.HIGH: 1000})


def test_normal_and_low_keep_their_share_under_a_busy_high_lane() -> None:
    got = simulate(LaneScheduler(), 400, 10, {Lane.HIGH, Lane.NORMAL, Lane.LOW})
    total = sum(got.values())
    assert got[Lane.NORMAL] / total >= 0.24
    assert got[Lane.LOW] / total >= 0.09
    assert got[Lane.HIGH] > got[Lane.NORMAL] > got[Lane.LOW]


def test_one_slot_at_a_time_still_serves_every_lane() -> None:
    got = simulate(LaneScheduler(), 1000, 1, {Lane.HIGH, Lane.NORMAL, Lane.LOW})
    assert got[Lane.NORMAL] >= 240
    assert got[Lane.LOW] >= 90


def test_an_idle_lane_does_not_bank_credit() -> None:
    scheduler = LaneScheduler()
    simulate(scheduler, 100, 10, {Lane.HIGH})  # low had nothing due all along
    quotas = dict(scheduler.quotas(10))
    assert quotas[Lane.LOW] <= 1
