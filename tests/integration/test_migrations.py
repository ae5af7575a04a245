"""Migrations run on start: an old database is brought to the current schema with its data, and
ends up identical to a database built fresh."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from postlane.errors import StoreUnavailable
from postlane.message import Lane, Message, PreparedMessage, prepare
from postlane.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore, _split_statements


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
    finally:
        conn.close()
    return [(kind, name, " ".join(sql.split())) for kind, name, sql in rows]


def build_version_1(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    version, _, sql = MIGRATIONS[0]
    assert version == 1
    for statement in _split_statements(sql):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO messages (id, lane, sender, subject, message_id, size, created_at, content) "
        "VALUES ('old1', 'normal', 'a@example.com', 'kept', '<old1@example.com>', 3, 1.0, "
        "x'616263')"
    )
    conn.execute(
        "INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, state, "
        "next_attempt_at, updated_at) VALUES ('old1', 'b@example.net', 'example.net', "
        "'example.net', 'normal', 1.0, 'deferred', 2.0, 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_there_is_more_than_one_migration() -> None:
    assert SCHEMA_VERSION >= 2 and [m[0] for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


async def test_an_old_database_is_migrated_with_its_data(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    build_version_1(old)
    store = SQLiteStore(old)
    await store.open()
    try:
        view = await store.get_message("old1")
        assert view.subject == "kept" and view.recipients[0].next_attempt_at == 2.0
        assert await store.get_content("old1") == b"abc"
    finally:
        await store.close()
    fresh = tmp_path / "fresh.db"
    store = SQLiteStore(fresh)
    await store.open()
    await store.close()
    assert schema_of(old) == schema_of(fresh)
    conn = sqlite3.connect(old)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def build_version(path: Path, last: int) -> sqlite3.Connection:
    """A database as postlane's migrations 1 to ``last`` left it (an older postlane's)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for _version, _name, sql in MIGRATIONS[:last]:
        for statement in _split_statements(sql):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {last}")
    return conn


async def test_an_idempotency_key_stored_before_keys_were_scoped_is_still_its_submitters(
    tmp_path: Path,
) -> None:
    """An upgrade audit: a key an HTTP client stored before version 10 was given the local
    scope, so the client's retry after the upgrade was stored and sent again."""
    path = tmp_path / "old.db"
    conn = build_version(path, 9)
    for queue_id, key, submitter in [("old1", "k1", "token:abc"), ("old2", "k2", None)]:
        conn.execute(
            "INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_key, size, "
            "created_at, submitter, content) VALUES (?, 'normal', 'a@example.com', 's', "
            "'<x@example.com>', ?, 3, 1.0, ?, x'616263')",
            (queue_id, key, submitter),
        )
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:

        def keyed(key: str, submitter: str | None) -> PreparedMessage:
            message = Message(
                sender="a@example.com", to=["b@example.net"], text="x", idempotency_key=key
            )
            return dataclasses.replace(prepare(message, max_size=10_000), submitter=submitter)

        retry, local = keyed("k1", "token:abc"), keyed("k2", None)
        other = dataclasses.replace(retry, id="other", submitter="token:def")
        results = await store.enqueue([retry, local, other], 2.0)
        assert [(r.id, r.duplicate) for r in results] == [
            ("old1", True),  # the token's own retry: the first message, nothing stored
            ("old2", True),  # a local key stays local
            ("other", False),  # another token's key is its own
        ]
    finally:
        await store.close()


async def test_a_suppression_stored_before_lanes_stops_every_lane(tmp_path: Path) -> None:
    """Entries made before version 22 (an unsubscribe among them) name no lanes: after the
    upgrade they go on stopping every lane until an operator narrows them."""
    path = tmp_path / "old.db"
    conn = build_version(path, 21)
    conn.execute(
        "INSERT INTO suppressions (address, scope, reason, created_at, source) "
        "VALUES ('ada@example.net', 'shop.example', 'unsubscribe', 1.0, 'unsubscribe')"
    )
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        await old_unsubscribe_stops_every_lane(store)
    finally:
        await store.close()


async def old_unsubscribe_stops_every_lane(store: Any) -> None:
    """The entry an older schema kept (ada@, an unsubscribe from shop.example) after the
    upgrade: no lanes, so it stops mail of every lane (PostgreSQL's test asks the same)."""
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.reason, entry.lanes) == ("unsubscribe", None)
    mails = [("ada@example.net", "a@shop.example", lane) for lane in Lane]
    assert await store.suppressed_mail(mails, now=2.0) == [True] * len(mails)


async def test_a_database_from_a_newer_postlane_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreUnavailable, match="newer than this postlane"):
        await store.open()


async def test_an_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = SQLiteStore(blocker / "queue.db")
    with pytest.raises(StoreUnavailable, match="cannot create"):
        await store.open()


def test_claim_and_stats_queries_use_their_indexes(tmp_path: Path) -> None:
    from postlane.store.sqlite import Q, connect, migrate

    conn = connect(tmp_path / "plan.db")
    migrate(conn)
    params = {"owner": "w", "now": 1.0, "lease_until": 2.0, "lane": "high", "limit": 10}
    plan = " ".join(
        str(tuple(row)) for row in conn.execute("EXPLAIN QUERY PLAN " + Q["claim_lane"], params)
    )
    assert "USING INDEX deliveries_due" in plan
    plan = " ".join(
        str(tuple(row))
        for row in conn.execute("EXPLAIN QUERY PLAN " + Q["counts_by_lane_state"], {"now": 0.0})
    )
    assert "COVERING INDEX deliveries_lane_state" in plan
    conn.close()


async def test_a_migration_is_refused_while_another_postlane_uses_the_queue(
    tmp_path: Path,
) -> None:
    """An upgrade audit (on PostgreSQL; SQLite alike): a migration went through beside a live
    older postlane, whose statements then failed against the new schema. A live process shows
    in the queue: a delivery it leases, or the presence it renews about once a second."""
    path = tmp_path / "old.db"
    conn = build_version(path, SCHEMA_VERSION - 1)
    conn.execute(
        "INSERT INTO destination_shares (destination, owner, demand, since, expires_at) "
        "VALUES ('*', 'oldhost:4242:serve', 1, ?, ?)",
        (time.time(), time.time() + 5),
    )
    conn.close()
    with pytest.raises(StoreUnavailable, match="in use by 1 postlane process") as caught:
        await SQLiteStore(path).open()
    assert "oldhost:4242:serve" in str(caught.value)
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1
    conn.execute("UPDATE destination_shares SET expires_at = 0")  # it stopped
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    assert store.migration is not None


async def test_after_the_upgrade_no_delivery_id_is_given_out_twice(tmp_path: Path) -> None:
    """A security audit: SQLite handed out the ids of deleted deliveries again, and tokens
    (VERP return paths, unsubscribe links) name a delivery by its id. Version 25 rebuilds
    deliveries with AUTOINCREMENT; ids given out before the upgrade whose rows were already
    gone (still named by their events) are not given out again either."""
    path = tmp_path / "old.db"
    conn = build_version(path, 24)
    conn.execute(
        "INSERT INTO messages (id, lane, sender, subject, message_id, size, created_at, content) "
        "VALUES ('old1', 'normal', 'a@example.com', 's', '<old1@example.com>', 3, 1.0, x'61')"
    )
    for delivery_id in (1, 2):
        conn.execute(
            "INSERT INTO deliveries (id, queue_id, address, domain, destination, lane, "
            "created_at, state, next_attempt_at, updated_at) VALUES (?, 'old1', ?, "
            "'example.net', 'example.net', 'normal', 1.0, 'deferred', 2.0, 1.0)",
            (delivery_id, f"r{delivery_id}@example.net"),
        )
    # deliveries 3 to 7 were sent (their tokens went out) and purged; their events remain
    conn.execute(
        "INSERT INTO events (type, at, queue_id, delivery_id, recipient, lane) "
        "VALUES ('deferred', 1.5, 'gone', 7, 'x@example.net', 'normal')"
    )
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        view = await store.get_message("old1")
        assert [r.address for r in view.recipients] == ["r1@example.net", "r2@example.net"]
        fresh = prepare(Message(sender="a@example.com", to=["n@example.net"], text="x"),
                        max_size=10_000)  # fmt: skip
        await store.enqueue([fresh], 3.0)
        [ref] = await store.find_deliveries("n@example.net", queue_id=fresh.id)
        assert ref.delivery_id == 8
        await store.delete_deliveries([ref.delivery_id], ["queued"])
        again = prepare(Message(sender="a@example.com", to=["m@example.net"], text="x"),
                        max_size=10_000)  # fmt: skip
        await store.enqueue([again], 4.0)
        [after] = await store.find_deliveries("m@example.net", queue_id=again.id)
        assert after.delivery_id == 9
    finally:
        await store.close()
