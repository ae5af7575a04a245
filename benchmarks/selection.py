"""A bulk action's walk and a listing, selected by a message's sender or metadata, on a big queue.

    python benchmarks/selection.py -n 200000
    python benchmarks/ab.py --before ../old/src --rounds 3 -- benchmarks/selection.py -n 200000

An operator's ``queue hold --all --sender junk@...`` reads the deliveries a slice of 500 at a
time, in id order (``store.select_delivery_ids``), and acts on each slice; ``queue list
--sender ...`` and the API's listing read one page. This builds an SQLite queue of ``-n``
messages (one recipient each; five senders, seven campaigns in their metadata), then times
the whole walk for one sender (a fifth of the queue), for one campaign (a seventh), for a
sender nobody used, and one listing page of each. Compare two checkouts with ``ab.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.records import Selector
from postlane.store.sqlite import SQLiteStore

CASES = [
    ("one sender (1/5)", Selector(sender="app3@example.com")),
    ("one campaign (1/7)", Selector(metadata={"campaign": "c3"})),
    ("a sender with no mail", Selector(sender="nobody@example.com")),
]


def build(path: Path, count: int) -> None:
    """A queue of ``count`` waiting messages, written in one transaction (the schema by the
    store itself)."""

    async def create() -> None:
        store = SQLiteStore(path, create=True)
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO messages (id, lane, sender, subject, message_id, size, created_at, "
        "content, metadata) VALUES (?, 'normal', ?, 's', '<x@example.com>', 3, 1.0, x'61', ?)",
        (
            (f"m{i:08d}", f"app{i % 5}@example.com", json.dumps({"campaign": f"c{i % 7}"}))
            for i in range(count)
        ),
    )
    conn.executemany(
        "INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, "
        "state, next_attempt_at, updated_at) VALUES (?, ?, 'example.net', 'example.net', "
        "'normal', 1.0, 'queued', 2.0, 1.0)",
        ((f"m{i:08d}", f"r{i}@example.net") for i in range(count)),
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


async def measure(path: Path, slice_size: int) -> list[list[object]]:
    store = SQLiteStore(path)
    await store.open()
    rows: list[list[object]] = []
    try:
        for name, selector in CASES:
            progress(f"walking: {name}")
            started = time.perf_counter()
            after, found = 0, 0
            while ids := await store.select_delivery_ids(
                selector, ["queued", "deferred"], after=after, limit=slice_size
            ):
                found += len(ids)
                after = ids[-1]
            walk = time.perf_counter() - started
            started = time.perf_counter()
            await store.list_messages(selector, limit=100)
            page = time.perf_counter() - started
            rows.append([name, found, f"{walk:.2f} s", f"{page * 1000:.1f} ms"])
    finally:
        await store.close()
        done_progress()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="messages in the queue")
    parser.add_argument("--slice", type=int, default=500, help="a bulk action's slice")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "queue.db"
        progress(f"building a queue of {args.n:,} messages")
        build(path, args.n)
        rows = asyncio.run(measure(path, args.slice))
    print(f"SQLite, {args.n:,} waiting messages, slices of {args.slice}:")
    print(table(["selector", "selected", "whole walk", "a listing's page"], rows))


if __name__ == "__main__":
    main()
