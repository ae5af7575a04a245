"""What the store's plans cost a one-message enqueue: the plan against the same SQL hand-written.

    python benchmarks/plan_cost.py [--rounds 10] [--chunk 500]

One producer enqueues one message at a time into a SQLite store (WAL, synchronous=FULL), each
acknowledged after its own commit, in alternating chunks: through ``SQLiteStore.enqueue`` (the
plan of ``store/delivery.py``: a generator of named statements that ``run_plan`` executes) and
through a job that runs the very statements that plan runs for such a message (the suppression
check, the message row with its ``RETURNING``, the delivery row, the ``queued`` event), written
out as the stores were before the refactor, on the same writer thread, in the same group
commit, with the same lock file between processes. The difference is the price of writing the
store once for two databases (plans, ``Statement`` and ``Result``, the per-statement dispatch,
the combined-enqueue bookkeeping), apart from what the features since write. Printed: the
median time per enqueue of each way, the writer thread's CPU in its commits per enqueue, and
the ratio of the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

import postlane.store.sqlite as sqlite_store
from postlane.message import Message, PreparedMessage, new_message_id, prepare
from postlane.store import rows
from postlane.store.sqlite import Q, SQLiteDatabase, SQLiteStore, _with_short_arrays

#: the writer thread's CPU (ns) spent in commits, by the way being measured
_CPU = {"plan": 0, "hand-written": 0}
_WAY = ["plan"]


def _time_commits() -> None:
    """Count the writer thread's CPU inside each group commit under the current way."""
    commit = sqlite_store._Writer._commit

    def timed(self: Any, conn: Any, batch: Any, turns: Any) -> None:
        start = time.thread_time_ns()
        try:
            commit(self, conn, batch, turns)
        finally:
            _CPU[_WAY[0]] += time.thread_time_ns() - start

    sqlite_store._Writer._commit = timed  # type: ignore[method-assign]


def hand_written(message: PreparedMessage, now: float) -> Callable[[Any], Any]:
    """The statements the enqueue plan runs for one message without a key or suppressions."""

    def job(conn: Any) -> Any:
        conn.execute(Q["any_suppression"]).fetchall()
        cursor = conn.execute(
            Q["insert_messages"], rows.message_params(message, now=now, done=False)
        )
        stored = cursor.fetchall()
        conn.executemany(
            Q["insert_deliveries"],
            [
                rows.delivery_params(message, r, now=now, suppressed=False)
                for r in message.recipients
            ],
        )
        sql, params = _with_short_arrays(Q["insert_enqueue_events"], {"ids": [message.id]})
        conn.execute(sql, params)
        return stored

    return job


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=500, help="enqueues per chunk")
    args = parser.parse_args()
    _time_commits()
    times: dict[str, list[float]] = {"plan": [], "hand-written": []}
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteStore(Path(folder) / "plan-cost.db")
        await store.open()
        writer = cast(SQLiteDatabase, store.db).writer
        template = prepare(
            Message(
                sender="app@example.com", to=["ada@example.net"], subject="Hi", text="x" * 2000
            ),
            max_size=10**7,
        )
        try:
            for round_ in range(1, args.rounds + 1):
                for way in times:
                    progress(f"round {round_} / {args.rounds}: {way}")
                    _WAY[0] = way
                    start = time.perf_counter()
                    for _ in range(args.chunk):
                        message = dataclasses.replace(template, id=new_message_id())
                        if way == "plan":
                            await store.enqueue([message], time.time())
                        else:
                            await writer.submit(hand_written(message, time.time()))
                    times[way].append((time.perf_counter() - start) / args.chunk)
        finally:
            await store.close()
    done_progress()
    enqueues = args.rounds * args.chunk
    medians = {way: statistics.median(runs) for way, runs in times.items()}
    print(
        f"one producer, one-message enqueues, {args.rounds} alternating chunks of {args.chunk} "
        "(SQLite, WAL, synchronous=FULL)"
    )
    print(
        table(
            ["way", "µs/enqueue (median)", "spread", "writer CPU in commits", "rate vs plan"],
            [
                (
                    way,
                    f"{medians[way] * 1e6:,.0f}",
                    f"{min(runs) * 1e6:,.0f}-{max(runs) * 1e6:,.0f}",
                    f"{_CPU[way] / enqueues / 1000:,.0f} µs",
                    f"{medians['plan'] / medians[way]:.2f}x",
                )
                for way, runs in times.items()
            ],
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
