"""LaneScheduler alone: the quotas it asks of each claim, and how it spends and drops the credit
behind them. What a claim then gets from a real store, with the real worker, is checked in
tests/integration/test_lane_fairness.py."""

from __future__ import annotations

import asyncio
from collections import Counter

from postlane.config import config_from_dict
from postlane.lanes import DEFAULT_SHARES, HighDemand, LaneScheduler, LaneSlots
from postlane.message import Lane


def claim_in_full(scheduler: LaneScheduler, slots: int) -> dict[Lane, int]:
    """One claim of ``slots`` in which every lane had more due than its quota, so each got it."""
    quotas = scheduler.quotas(slots)
    scheduler.claimed(quotas, dict(quotas))
    return dict(quotas)


def test_high_is_asked_first_for_every_slot_the_shares_do_not_reserve() -> None:
    scheduler = LaneScheduler()
    for _ in range(100):
        quotas = scheduler.quotas(10)
        assert [lane for lane, _ in quotas] == [Lane.HIGH, Lane.NORMAL, Lane.LOW]
        assert sum(quota for _, quota in quotas) == 10
        scheduler.claimed(quotas, dict(quotas))


def test_normal_and_low_keep_their_share_under_a_busy_high_lane() -> None:
    scheduler = LaneScheduler()
    got: Counter[Lane] = Counter()
    for _ in range(400):
        got.update(claim_in_full(scheduler, 10))
    total = sum(got.values())
    assert got[Lane.NORMAL] / total >= 0.24
    assert got[Lane.LOW] / total >= 0.09
    assert got[Lane.HIGH] > got[Lane.NORMAL] > got[Lane.LOW]


def test_one_slot_at_a_time_still_serves_every_lane() -> None:
    scheduler = LaneScheduler()
    got: Counter[Lane] = Counter()
    for _ in range(1000):
        got.update(claim_in_full(scheduler, 1))
    assert got[Lane.NORMAL] >= 240
    assert got[Lane.LOW] >= 90


def test_an_idle_lane_does_not_bank_credit() -> None:
    scheduler = LaneScheduler()
    for _ in range(100):  # only high had anything due: it took every slot
        quotas = scheduler.quotas(10)
        scheduler.claimed(quotas, {Lane.HIGH: 10})
    quotas = dict(scheduler.quotas(10))
    assert quotas[Lane.LOW] <= 1


def test_shares_come_from_the_lanes_tables_of_the_configuration() -> None:
    default = LaneScheduler.from_config(config_from_dict({}))
    assert default.shares == DEFAULT_SHARES == {Lane.NORMAL: 0.25, Lane.LOW: 0.1}
    configured = LaneScheduler.from_config(
        config_from_dict({"lanes": {"normal": {"share": 0.5}, "low": {"share": 0.2}}})
    )
    assert dict(configured.quotas(10)) == {Lane.HIGH: 3, Lane.NORMAL: 5, Lane.LOW: 2}


async def test_slots_go_to_waiters_high_lane_first_then_in_arrival_order() -> None:
    slots = LaneSlots(1)
    await slots.acquire("low")  # the one connection, busy
    served: list[str] = []

    async def wait(name: str, lane: str) -> None:
        async with slots.hold(lane):
            served.append(name)

    waiters = [
        asyncio.create_task(wait(name, lane))
        for name, lane in [
            ("news1", "low"),
            ("news2", "low"),
            ("receipt", "normal"),
            ("reset", "high"),
        ]
    ]
    await asyncio.sleep(0)  # (one loop turn: every waiter is queued)
    slots.release()
    await asyncio.gather(*waiters)
    assert served == ["reset", "receipt", "news1", "news2"]


async def test_a_cancelled_waiter_gives_its_slot_to_the_next() -> None:
    slots = LaneSlots(1)
    await slots.acquire("low")
    first = asyncio.create_task(slots.acquire("high"))
    second = asyncio.create_task(slots.acquire("low"))
    await asyncio.sleep(0)
    first.cancel()
    slots.release()
    await asyncio.wait_for(second, timeout=5)  # (the cancelled one's turn passed on)
    assert first.cancelled()
    slots.release()
    await asyncio.wait_for(slots.acquire("low"), timeout=5)  # every slot came back


def test_the_high_lane_keeps_a_spare_slot_and_the_slots_of_its_recent_peak() -> None:
    demand = HighDemand(20, window=60.0)
    assert demand.kept(0.0) == 1  # no high mail yet: one spare slot, so the first reset waits not
    demand.started(1, 1.0)
    demand.started(2, 1.3)
    demand.started(4, 1.9)
    demand.started(3, 2.5)  # fewer in flight than the peak: the peak holds
    assert demand.kept(3.0) == 5  # the peak, 4, and a spare for the next
    assert demand.kept(61.8) == 5  # the peak was at 1.9: it still counts within the window
    assert demand.kept(62.0) == 4  # then the highest since, 3 (at 2.5), and a spare
    assert demand.kept(62.6) == 1  # a quiet minute: back to the spare alone
    demand.started(30, 70.0)
    assert demand.kept(70.0) == 10  # never more than half the slots


def test_a_small_worker_keeps_no_spare_slot_for_the_high_lane() -> None:
    demand = HighDemand(8, window=60.0)
    assert demand.kept(0.0) == 0  # 8 slots: none idle for mail that may never come
    demand.started(2, 1.0)
    assert demand.kept(2.0) == 2  # but what high used lately stays its own
    assert demand.kept(61.5) == 0
