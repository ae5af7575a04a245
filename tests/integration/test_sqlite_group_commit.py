"""SQLite's group commit: concurrent enqueues share commits (one fsync for many), and each
returns only once its own commit is done."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postlane.message import Message, PreparedMessage, prepare
from postlane.store.sqlite import SQLiteStore


def one(i: int) -> PreparedMessage:
    return prepare(
        Message(sender="a@example.com", to=[f"r{i}@example.net"], subject="s", text="t"),
        max_size=10**6,
    )


async def enqueue_concurrently(store: SQLiteStore, count: int) -> int:
    before = store.commits
    results = await asyncio.gather(*(store.enqueue([one(i)], 1.0) for i in range(count)))
    assert len({r.id for [r] in results}) == count
    return store.commits - before


async def test_concurrent_enqueues_share_commits_and_all_are_stored(tmp_path: Path) -> None:
    grouped = SQLiteStore(tmp_path / "grouped.db")
    await grouped.open()
    single = SQLiteStore(tmp_path / "single.db", max_jobs_per_commit=1)
    await single.open()
    try:
        grouped_commits = await enqueue_concurrently(grouped, 200)
        single_commits = await enqueue_concurrently(single, 200)
        assert single_commits == 200  # the counter counts commits: one per enqueue without grouping
        assert grouped_commits <= 50  # with it, the 200 writes share a handful of commits
        # and the enqueues waiting together ran as one plan (a few statements, not 200 x 5)
        assert grouped.combined >= 100 and single.combined == 0
        reopened = SQLiteStore(tmp_path / "grouped.db")
        await reopened.open()
        try:
            stats = await reopened.stats(2.0)
            assert sum(s.ready for s in stats.lanes.values()) == 200  # every one is on disk
        finally:
            await reopened.close()
    finally:
        await grouped.close()
        await single.close()
