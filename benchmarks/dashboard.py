"""The dashboard's queue pages with 10,000 and with 1,000,000 messages queued, side by side with
the previous approach (the CLI's ``queue list`` query: group every selected delivery by message,
sort, then cut).

    python benchmarks/dashboard.py [--small 10000] [--large 1000000] [--pages 20]

A page is 50 messages. "cursor" is ``Store.page_messages``: it walks the primary key from the
page's cursor and stops at the page's end; "group by" is ``Store.list_messages``'s query paged with
``OFFSET`` (group every waiting delivery by message, sort by arrival, skip, cut). Measured for the
first page and for the page in the middle of the queue, each the median of ``--pages`` reads.
Then a search by recipient and by sender that finds one message among all the others, with
the search indexes (schema version 9) and with them dropped (the schema before).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table
from claims import fill

from postlane.message import Message, prepare
from postlane.records import MessageView, Selector
from postlane.store.sqlite import SQLiteStore, connect, run_plan

PAGE = 50
T = TypeVar("T")


async def median_ms(read: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await read()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def cursor_at(store: SQLiteStore, pages: int) -> int:
    """The cursor of page ``pages``: just before its first message's first delivery (found once,
    not part of the timing)."""

    def run(conn: sqlite3.Connection) -> int:
        row = conn.execute(
            "SELECT min(id) AS first FROM deliveries GROUP BY queue_id ORDER BY first "
            "LIMIT 1 OFFSET ?",
            (pages * PAGE,),
        ).fetchone()
        return int(row[0]) - 1

    return await on_own_connection(store, run)


_CONNECTIONS: dict[Path, sqlite3.Connection] = {}


async def on_own_connection(store: SQLiteStore, run: Callable[[sqlite3.Connection], T]) -> T:
    """Raw SQL on one connection of the benchmark's own per database, kept open (a warm page
    cache, as the store's reader connections have), in a thread like the store's reads."""
    conn = _CONNECTIONS.get(store.path)
    if conn is None:
        conn = _CONNECTIONS[store.path] = connect(store.path)
    return await asyncio.to_thread(run, conn)


async def offset_page(store: SQLiteStore, offset: int) -> list[MessageView]:
    """The previous approach, paged by offset: ``list_messages``'s query (group the selected
    deliveries by message, sort by arrival) with ``OFFSET``, then the page's views."""

    def run(conn: sqlite3.Connection) -> list[MessageView]:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT queue_id, min(created_at) AS c, min(id) AS first FROM deliveries d "
                "WHERE d.state IN ('queued', 'deferred', 'held', 'sending') "
                "GROUP BY queue_id ORDER BY c, first LIMIT ? OFFSET ?",
                (PAGE, offset),
            )
        ]
        conn.execute("BEGIN")
        try:
            return run_plan(conn, store._message_views(ids, history=False))
        finally:
            conn.execute("COMMIT")

    return await on_own_connection(store, run)


async def measure(depth: int, repeats: int, folder: Path) -> list[tuple[str, float, float]]:
    store = SQLiteStore(folder / f"dashboard-{depth}.db")
    await store.open()
    try:
        await fill(store, depth, time.time())
        rows = []
        total_pages = depth // PAGE
        for where, page_number in (("first", 0), ("middle", total_pages // 2)):
            progress(f"depth {depth:,}: {where} page")
            selector = Selector()
            after = await cursor_at(store, page_number) if page_number else 0

            async def by_cursor(after: int = after, selector: Selector = selector) -> None:
                views, _ = await store.page_messages(selector, after=after, limit=PAGE)
                assert len(views) == PAGE

            async def by_group(offset: int = page_number * PAGE) -> None:
                assert len(await offset_page(store, offset)) == PAGE

            cursor_ms = await median_ms(by_cursor, repeats)
            group_ms = await median_ms(by_group, max(3, repeats // 5))
            rows.append((where, cursor_ms, group_ms))
        rows += await measure_search(store, repeats)
        return rows
    finally:
        own = _CONNECTIONS.pop(store.path, None)
        if own is not None:
            own.close()
        await store.close()


async def measure_search(store: SQLiteStore, repeats: int) -> list[tuple[str, float, float]]:
    """One page of a search by recipient and by sender (one matching message among all the
    others), with the search indexes, then with them dropped (the previous schema)."""
    needle = prepare(
        Message(sender="Billing@Shop.example", to=["Ada@Example.net"], subject="s", text="x"),
        max_size=10**7,
    )
    await store.enqueue([needle], time.time())
    searches = {
        "by recipient": Selector(recipient="ada@example.net"),
        "by sender": Selector(sender="billing@shop.example"),
    }

    async def timed() -> dict[str, float]:
        out = {}
        for name, selector in searches.items():

            async def search(selector: Selector = selector) -> None:
                views, _ = await store.page_messages(selector, after=0, limit=PAGE)
                assert [v.id for v in views] == [needle.id]

            out[name] = await median_ms(search, repeats)
        return out

    progress("searching, with the indexes")
    indexed = await timed()

    def drop(conn: sqlite3.Connection) -> None:
        conn.execute("DROP INDEX deliveries_address")
        conn.execute("DROP INDEX messages_sender")

    await on_own_connection(store, drop)
    progress("searching, without them")
    scanned = await timed()
    return [(name, indexed[name], scanned[name]) for name in searches]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--pages", type=int, default=20, help="reads per measurement")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {
            depth: await measure(depth, args.pages, Path(tmp)) for depth in (args.small, args.large)
        }
    done_progress()
    print(f"one page of {PAGE} messages (median ms), SQLite, messages waiting in the queue")
    body = []
    for depth, rows in results.items():
        for where, cursor_ms, group_ms in rows:
            if where.startswith("by "):
                continue
            body.append(
                (
                    f"{depth:,}",
                    where,
                    f"{cursor_ms:.1f}",
                    f"{group_ms:.1f}",
                    f"{group_ms / cursor_ms:.0f}x",
                )
            )
    print(table(["queued", "page", "cursor", "group by (previous)", "ratio"], body))
    print("a search finding one message: with the search indexes vs without them (previous)")
    print(
        table(
            ["queued", "search", "indexed", "full scan (previous)", "ratio"],
            [
                (f"{depth:,}", where, f"{fast:.1f}", f"{slow:.1f}", f"{slow / fast:.0f}x")
                for depth, rows in results.items()
                for where, fast, slow in rows
                if where.startswith("by ")
            ],
        )
    )
    small_first = results[args.small][0][1]
    large_middle = results[args.large][1][1]
    print(f"cursor: middle page at {args.large:,} / first page at {args.small:,}: "
          f"{large_middle / small_first:.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
