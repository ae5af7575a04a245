"""What only the SQLite store does with its files: they are private, an operator command never
creates one, processes opening a new one together all get it, and a damaged file is the
store's failure (StoreUnavailable), never a refusal."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from postlane.errors import NoQueue, StoreUnavailable
from postlane.message import Message, prepare
from postlane.records import Selector
from postlane.store import open_store_url
from postlane.store.sqlite import SQLiteStore
from tests.polling import until

T0 = 1_800_000_000.0


def mail(n: int = 0) -> object:
    return prepare(
        Message(sender="app@example.com", to=[f"u{n}@example.net"], subject="s", text="x" * 500),
        max_size=10**6,
        now=T0,
    )


def lock_file_of_another_process(folder: Path) -> int:
    """The writers' lock file beside ``folder``'s database, opened as another process opens it
    (a descriptor of its own: ``flock`` on it competes with the store's)."""
    return os.open(folder / "postlane.db-writer.lock", os.O_RDWR)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_finding_8_the_database_and_its_wal_are_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "postlane.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.enqueue([mail()], T0)  # type: ignore[list-item]
        for name in (
            "postlane.db",
            "postlane.db-wal",
            "postlane.db-shm",
            "postlane.db-writer.lock",
        ):
            assert mode(tmp_path / name) == 0o600, name
    finally:
        await store.close()


async def test_writers_of_all_processes_take_turns_on_the_lock_file(tmp_path: Path) -> None:
    """Another process's writer holds the turn (its own open file of the lock, as another
    process has): a write here waits for it in the kernel, not in SQLite's sleeping busy
    handler, and goes through the moment the turn is handed over."""
    path = tmp_path / "postlane.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        other = lock_file_of_another_process(tmp_path)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            write = asyncio.ensure_future(store.enqueue([mail(1)], T0))  # type: ignore[list-item]
            done, _ = await asyncio.wait([write], timeout=0.5)
            assert not done, "a write went ahead while another process held the turn"
            fcntl.flock(other, fcntl.LOCK_UN)
            (result,) = await asyncio.wait_for(write, timeout=10)
            assert not result.duplicate
        finally:
            os.close(other)
        # and the turn is given back after each commit: another process gets it at once
        await store.enqueue([mail(2)], T0)  # type: ignore[list-item]
        other = lock_file_of_another_process(tmp_path)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    finally:
        await store.close()


async def test_writes_that_queue_while_another_process_writes_share_the_next_commit(
    tmp_path: Path,
) -> None:
    """The writer gathers its batch once the turn is its own: what arrived while another
    process was writing goes into one commit with the write that waited first, not into one
    more commit after it (with two serve processes, a fifth fewer commits, measured in
    docs/benchmarks.md)."""
    path = tmp_path / "postlane.db"
    store = SQLiteStore(path)
    await store.open()
    jobs = store.sqlite.writer._jobs
    other = lock_file_of_another_process(tmp_path)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        before = store.commits
        first = asyncio.ensure_future(store.enqueue([mail(1)], T0))  # type: ignore[list-item]
        turns = store.sqlite.writer._turns
        assert turns is not None
        await until(
            lambda: turns._waiter is not None and jobs.qsize() == 0,
            "the writer took the first write and waits for the turn",
        )
        more = [
            asyncio.ensure_future(store.enqueue([mail(n)], T0))  # type: ignore[list-item]
            for n in (2, 3)
        ]
        await until(lambda: jobs.qsize() == 2, "the next two writes queued behind it")
        fcntl.flock(other, fcntl.LOCK_UN)
        results = await asyncio.wait_for(asyncio.gather(first, *more), timeout=10)
        assert [result.duplicate for (result,) in results] == [False, False, False]
        assert store.commits - before == 1
    finally:
        os.close(other)
        await store.close()


async def test_a_holder_of_the_turn_that_hangs_is_waited_for_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped in the middle of a commit (Ctrl-Z on a command) keeps its turn: the
    others wait as long as SQLite would wait for its lock, then write without turns (SQLite's
    lock still guards) until it lets go, and take turns again from then on."""
    monkeypatch.setattr("postlane.store.sqlite.BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "postlane.db"
    store = SQLiteStore(path)
    await store.open()
    stuck = lock_file_of_another_process(tmp_path)
    try:
        fcntl.flock(stuck, fcntl.LOCK_EX)
        (first,) = await asyncio.wait_for(store.enqueue([mail(1)], T0), timeout=10)  # type: ignore[list-item]
        (second,) = await asyncio.wait_for(store.enqueue([mail(2)], T0), timeout=10)  # type: ignore[list-item]
        assert not first.duplicate and not second.duplicate
        fcntl.flock(stuck, fcntl.LOCK_UN)  # it lets go: the abandoned wait ends and gives back
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # turns again: the next write waits for a holder
            fcntl.flock(stuck, fcntl.LOCK_EX)
            write = asyncio.ensure_future(store.enqueue([mail(3)], T0))  # type: ignore[list-item]
            done, _ = await asyncio.wait([write], timeout=0.15)
            fcntl.flock(stuck, fcntl.LOCK_UN)
            await asyncio.wait_for(write, timeout=10)
            if not done:
                break
            assert asyncio.get_running_loop().time() < deadline, "turns never came back"
    finally:
        os.close(stuck)
        await store.close()


async def test_an_operator_command_never_creates_a_queue(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "postlane.db"
    store = open_store_url(f"sqlite:///{path}", create=False)
    with pytest.raises(NoQueue) as caught:  # a StoreUnavailable, which callers may catch
        await store.open()
    assert str(path) in caught.value.message
    assert "postlane serve, postlane worker or postlane migrate creates it" in caught.value.message
    assert isinstance(caught.value, StoreUnavailable)
    assert not path.exists() and not path.parent.exists()


async def test_a_damaged_database_is_the_stores_failure_not_the_callers(tmp_path: Path) -> None:
    path = tmp_path / "postlane.db"
    store = SQLiteStore(path)
    await store.open()
    await store.enqueue([mail(n) for n in range(200)], T0)  # type: ignore[misc]
    await store.close()
    store = SQLiteStore(path)
    await store.open()  # the schema read while the file was whole; now it breaks under it
    try:
        data = bytearray(path.read_bytes())
        page = 4096
        for start in range(8 * page, len(data) - page, page):
            data[start + 8 : start + page] = b"\xa5" * (page - 8)
        path.write_bytes(bytes(data))
        with pytest.raises(StoreUnavailable):
            await store.enqueue([mail(999)], T0)  # type: ignore[list-item]
        with pytest.raises(StoreUnavailable):
            await store.list_messages(Selector(), limit=500)
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable) as caught:  # and opening it again says so
        await SQLiteStore(path).open()
    assert "malformed" in caught.value.message


def _open_and_close(path: str, together: object, results: object) -> None:
    """In a process of its own: open the store's file as its writer does (WAL, migrations)."""
    from postlane.store.sqlite import connect, migrate

    together.wait()  # type: ignore[attr-defined]
    try:
        conn = connect(Path(path))
        version = migrate(conn)
        conn.close()
        results.put(str(version))  # type: ignore[attr-defined]
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_opening_a_new_database_together_all_get_it(tmp_path: Path) -> None:
    """A Django project and its ``postlane_events`` started together open the same new file at
    once: the switch to WAL takes an exclusive lock without waiting for the busy timeout, so
    without trying it again one of them failed with "database is locked" (a third of the time
    with three processes)."""
    from postlane.store.sqlite import SCHEMA_VERSION

    context = multiprocessing.get_context("fork")  # started together at once, as in the field
    for round_ in range(25):
        path = tmp_path / f"new-{round_}.db"
        together, results = context.Barrier(3), context.Queue()
        processes = [
            context.Process(target=_open_and_close, args=(str(path), together, results))
            for _ in range(3)
        ]
        for process in processes:
            process.start()
        answers = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert answers == [str(SCHEMA_VERSION)] * 3
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
