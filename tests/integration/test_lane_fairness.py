"""Lane fairness as it happens: the real worker (its LaneScheduler, Worker.from_config) claiming
from the real store (a SQLite file, PostgreSQL) and delivering to an SMTP server (aiosmtpd), with
all three lanes holding a backlog. High is served first; normal and low get their configured
share of every claim all along, never less (starved), never more (while high waits).

Each claim the worker makes is recorded on its way back from the store (the store itself does
the work); the deliveries are counted at the SMTP server.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postlane.clock import FakeClock
from postlane.message import Lane, Message, prepare
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import SMTPPeer, make_config

#: the shares docs/configuration.md gives for [lanes.normal] and [lanes.low] share
DOCUMENTED_SHARES = {Lane.NORMAL: 0.25, Lane.LOW: 0.1}
#: queued per lane; high has the least, so that it runs dry first if it is served first
BACKLOG = {Lane.HIGH: 100, Lane.NORMAL: 120, Lane.LOW: 120}
#: arrival times: low queued first, high last, so a claim that ignored lanes (oldest first)
#: would starve high instead of serving it first
QUEUED_AGO = {Lane.LOW: 30.0, Lane.NORMAL: 20.0, Lane.HIGH: 10.0}


@dataclass(frozen=True)
class Claim:
    """One claim_due call of the worker: the slots it asked for and what each lane got."""

    slots: int
    got: Counter[Lane]


def record_claims(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[Claim]:
    """Every claim the worker makes from now on, as the store answered it."""
    claims: list[Claim] = []
    claim_due = store.claim_due

    async def recorded(owner: str, quotas: Any, *, limit: int, **kwargs: Any) -> Any:
        claimed = await claim_due(owner, quotas, limit=limit, **kwargs)
        got: Counter[Lane] = Counter()
        for message in claimed:
            got[message.lane] += len(message.deliveries)
        claims.append(Claim(limit, got))
        return claimed

    monkeypatch.setattr(store, "claim_due", recorded)
    return claims


async def fill(store: Any, clock: FakeClock) -> None:
    for lane, count in BACKLOG.items():
        batch = [
            prepare(
                Message(
                    sender="app@example.com",
                    to=[f"{lane.value}{i}@example.net"],
                    subject=f"{lane.value} {i}",
                    text="x",
                    lane=lane,
                ),
                max_size=10**6,
            )
            for i in range(count)
        ]
        await store.enqueue(batch, clock.now() - QUEUED_AGO[lane])


def lane_of(address: str) -> Lane:
    return next(lane for lane in Lane if address.startswith(lane.value))


@pytest.mark.parametrize(
    ("concurrency", "batch_size"), [(1, 1), (8, 8)], ids=["one slot at a time", "batches of 8"]
)
@pytest.mark.parametrize(
    "shares",
    [None, {Lane.NORMAL: 0.4, Lane.LOW: 0.2}],
    ids=["documented shares", "configured shares"],
)
async def test_high_goes_first_and_normal_and_low_keep_their_share_of_every_claim(
    store: Any,
    smtp_peer: SMTPPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
    batch_size: int,
    shares: dict[Lane, float] | None,
) -> None:
    clock = FakeClock()
    lanes = {lane.value: {"share": share} for lane, share in (shares or {}).items()}
    config = make_config(
        tmp_path,
        delivery={"relay": smtp_peer.url, "concurrency": concurrency, "batch_size": batch_size},
        lanes=lanes,
    )
    expected = shares or DOCUMENTED_SHARES
    await fill(store, clock)
    claims = record_claims(store, monkeypatch)
    worker = Worker.from_config(config, store, transport_for(config), clock=clock)
    try:
        await worker.run_until_idle()
    finally:
        await worker.transport.close()

    # everything went out, once each
    received = [rcpt for r in smtp_peer.handler.received for rcpt in r.rcpt_tos]
    assert len(received) == len(set(received)) == sum(BACKLOG.values())

    # while every lane has more due than a claim can take, each claim is shared: normal and low
    # get their share of the slots so far, give or take the fraction of a slot carried as credit
    # from claim to claim (and low's turn deferred by normal's when one slot is all there is);
    # high gets all the rest. Bounds on every prefix bound every window too: no lane starves.
    high_share = 1 - sum(expected.values())
    left = dict(BACKLOG)
    slots, got = 0, Counter[Lane]()
    for contended, claim in enumerate(claims, 1):
        if min(left.values()) < claim.slots:
            break
        slots += claim.slots
        got += claim.got
        assert claim.got.total() == claim.slots  # no slot left empty while mail is due
        so_far = f"after {contended} claims of {slots} slots: {dict(got)}"
        for lane, share in expected.items():
            fair = share * slots
            assert math.floor(fair) - 2 <= got[lane] <= math.ceil(fair) + 1, so_far
        assert got[Lane.HIGH] >= math.floor(high_share * slots) - 2, so_far
        for lane in Lane:
            left[lane] -= claim.got[lane]
    assert slots >= 120, "the lanes were contended too briefly to tell their shares"

    # high is served first: at the SMTP server its backlog ran dry first, then normal's, low's last
    last_arrival = {lane_of(address): n for n, address in enumerate(received)}
    assert sorted(last_arrival, key=last_arrival.__getitem__) == [Lane.HIGH, Lane.NORMAL, Lane.LOW]
