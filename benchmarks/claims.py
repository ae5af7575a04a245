"""Claim + record throughput with 10,000 and with 1,000,000 deliveries queued, side by side.

    python benchmarks/claims.py [--small 10000] [--large 1000000] [--measure 5000] [--batch 50]

A worker's store cycle is: claim a batch of due deliveries under a lease, then record their
results (each with its attempt row) in one transaction. The claim index holds only waiting rows
and is walked in next-attempt order, so the depth of the queue should not change the cost of a
claim; this measures that claim.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
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


async def measure(depth: int, measured: int, batch: int, folder: Path) -> float:
    store = SQLiteStore(folder / f"claims-{depth}.db")
    await store.open()
    try:
        now = time.time()
        await fill(store, depth, now)
        progress(f"claiming {measured:,} at depth {depth:,}")
        started = time.perf_counter()
        done = await claim_and_record(store, measured, batch, now)
        return done / (time.perf_counter() - started)
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--measure", type=int, default=5_000, help="deliveries claimed+recorded")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        small = await measure(args.small, args.measure, args.batch, Path(tmp))
        large = await measure(args.large, args.measure, args.batch, Path(tmp))
    done_progress()
    print(f"claim + record, batches of {args.batch}, SQLite (WAL, synchronous=FULL), one process")
    print(
        table(
            ["queued", "deliveries/s"],
            [(f"{args.small:,}", f"{small:,.0f}"), (f"{args.large:,}", f"{large:,.0f}")],
        )
    )
    print(f"ratio (large / small): {large / small:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
