"""Claim + record throughput with 10,000 and with 1,000,000 deliveries queued, each in batches and
one delivery at a time, side by side.

    python benchmarks/claims.py [--small 10000] [--large 1000000] [--measure 5000] [--batch 50]

A worker's store cycle is: claim a batch of due deliveries under a lease, then record their
results (each with its attempt row) in one transaction. The claim index holds only waiting rows
and is walked in next-attempt order, so the depth of the queue should not change the cost of a
claim; this measures that claim, at both depths.

The baseline, in the same run and on the same queue: one claim transaction and one record
transaction per message (``--batch 1``), the approach docs/benchmarks.md's batches replaced.
The two ways alternate in chunks of 10 batches until each has done --measure deliveries, so both
see the same depth and the same machine; the queue must hold both: --small at least twice
--measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.classify import ReplyClass
from postlane.message import Lane, Message, RecipientState, new_message_id, prepare
from postlane.records import AttemptRecord, Outcome
from postlane.store.base import Store
from postlane.store.sqlite import SQLiteStore

QUOTAS = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


async def fill(store: SQLiteStore, count: int, now: float) -> None:
    template = prepare(
        Message(sender="app@example.com", to=["someone@example.net"], subject="s", text="x" * 1500),
        max_size=10**7,
    )
    for start in range(0, count, 1000):
        batch = [
            dataclasses.replace(template, id=new_message_id())
            for _ in range(min(1000, count - start))
        ]
        await store.enqueue(batch, now)
        if start % 50_000 == 0:
            progress(f"filling: {start:,} / {count:,}")


async def claim_and_record(store: Store, measured: int, batch: int, now: float) -> int:
    """A worker's store cycle without the sending: claim a batch of due deliveries under a
    lease, record each delivered with its attempt; until ``measured`` are done. Returns how
    many were."""
    done = 0
    while done < measured:
        claimed = await store.claim_due("bench", QUOTAS, limit=batch, now=now, lease_until=now + 60)
        if not claimed:
            raise SystemExit(f"the queue ran dry after {done:,}: raise the depth")
        outcomes = [
            Outcome(
                d.id,
                RecipientState.SENT,
                1,
                0,
                None,
                AttemptRecord(now, ReplyClass.DELIVERED, 250, "2.0.0", "ok", "bench", "x", 1),
            )
            for m in claimed
            for d in m.deliveries
        ]
        await store.record("bench", outcomes, now)
        done += len(outcomes)
    return done


@dataclasses.dataclass
class Way:
    """One way of claiming and recording, with what it did so far."""

    label: str
    batch: int
    done: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.seconds


def batched_and_one_at_a_time(batch: int) -> list[Way]:
    """The store's way (batches of ``batch``) and its baseline (one message per transaction)."""
    return [Way(f"batches of {batch}", batch), Way("one per message", 1)]


async def side_by_side(
    store: Store,
    ways: Sequence[Way],
    measured: int,
    now: float,
    *,
    label: str,
    around: Callable[[Way], AbstractContextManager[object]] | None = None,
) -> None:
    """Claim and record ``measured`` deliveries each way, in alternating chunks from the one
    queue, so the ways see the same depth and a drift of the machine hits them alike. ``around``
    wraps each timed chunk (e.g. to count the CPU used)."""
    chunk = 10 * max(way.batch for way in ways)
    while any(way.done < measured for way in ways):
        for way in ways:
            count = min(chunk, measured - way.done)
            if count <= 0:
                continue
            with around(way) if around is not None else contextlib.nullcontext():
                started = time.perf_counter()
                way.done += await claim_and_record(store, count, way.batch, now)
                way.seconds += time.perf_counter() - started
        progress(f"{label}: " + ", ".join(f"{w.label} {w.done:,}/{measured:,}" for w in ways))


async def measure(depth: int, measured: int, batch: int, folder: Path) -> list[Way]:
    store = SQLiteStore(folder / f"claims-{depth}.db")
    await store.open()
    try:
        now = time.time()
        await fill(store, depth, now)
        ways = batched_and_one_at_a_time(batch)
        await side_by_side(store, ways, measured, now, label=f"queued {depth:,}")
        return ways
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument(
        "--measure", type=int, default=5_000, help="deliveries claimed+recorded each way"
    )
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if min(args.small, args.large) < 2 * args.measure:
        parser.error("each depth must hold both ways' deliveries: at least twice --measure")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        small = await measure(args.small, args.measure, args.batch, Path(tmp))
        large = await measure(args.large, args.measure, args.batch, Path(tmp))
    done_progress()
    print(
        f"claim + record of {args.measure:,} deliveries each way, SQLite (WAL, "
        "synchronous=FULL), one process; the ways alternate in chunks on one queue"
    )
    rows = [
        (f"{depth:,}", *(f"{way.rate:,.0f}" for way in ways), f"{ways[0].rate / ways[1].rate:.1f}x")
        for depth, ways in ((args.small, small), (args.large, large))
    ]
    print(table(["queued", *(f"{w.label}/s" for w in small), "ratio"], rows))
    print(
        f"ratio ({args.large:,} / {args.small:,} queued): "
        + ", ".join(f"{a.label} {b.rate / a.rate:.2f}" for a, b in zip(small, large, strict=True))
    )


if __name__ == "__main__":
    asyncio.run(main())
