"""What only the PostgreSQL store does: migrations under a lock, several hosts claiming from one
table, LISTEN/NOTIFY wake-ups, the transactional outbox, the claim index; and the operator
actions answering exactly as the SQLite store does. Every test gets its own schema."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.errors import NotFound, StoreUnavailable
from postlane.message import Lane, Message, PreparedMessage, RecipientState, prepare
from postlane.outbox import (
    cancel_in_transaction,
    cancel_in_transaction_sync,
    enqueue_in_transaction,
    enqueue_in_transaction_sync,
)
from postlane.records import AttemptRecord, Deferral, DestinationStatus, Outcome, Selector
from postlane.store import open_store_url
from postlane.store.base import Store
from postlane.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore, Q
from postlane.store.sqlite import SQLiteStore
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import IN_CI, _postgres_url, make_config
from tests.integration.test_migrations import old_unsubscribe_stops_every_lane
from tests.integration.test_store_contract import read_events

T0 = 1_800_000_000.0
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]

OpenStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
def pg_url() -> str:
    url = _postgres_url()
    if url is None:
        if IN_CI:
            pytest.fail("POSTLANE_TEST_POSTGRES is not set in CI")
        pytest.skip("PostgreSQL tests need POSTLANE_TEST_POSTGRES=postgresql://...")
    return url


@pytest.fixture
def schema() -> str:
    return f"t_{uuid4().hex[:12]}"


@pytest.fixture
async def open_store(pg_url: str, schema: str) -> AsyncIterator[OpenStore]:
    """Opens stores (each with its own pool, like separate hosts) on the test's schema, or on
    another one; drops every schema used and closes every store at the end."""
    opened: list[PostgresStore] = []

    async def open_one(schema_name: str = schema, **kwargs: Any) -> PostgresStore:
        store = PostgresStore(pg_url, schema=schema_name, **kwargs)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.drop_schema()
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> PostgresStore:
    return await open_store()


async def connect(
    url: str, schema: str | None = None, **kwargs: Any
) -> psycopg.AsyncConnection[Any]:
    """An application's own connection (search_path untouched unless ``schema``)."""
    conn = await psycopg.AsyncConnection.connect(url, **kwargs)
    if schema is not None:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        await conn.commit()
    return conn


def msg(*to: str, key: str | None = None, lane: str = "normal") -> PreparedMessage:
    return prepare(
        Message(
            sender="app@example.com",
            to=list(to or ["ada@example.net"]),
            subject="s",
            text="body",
            lane=lane,
            idempotency_key=key,
        ),
        max_size=1_000_000,
        now=T0,
    )


def attempt(cls: ReplyClass, code: int, text: str = "reply") -> AttemptRecord:
    return AttemptRecord(T0, cls, code, None, f"{code} {text}", "smtp://relay:25", "x", 7)


# -- configuration ---------------------------------------------------------------------------------


def test_description_never_shows_a_password() -> None:
    url = "postgresql://mailer:s3cret@db.internal:5432/mail?sslmode=require&password=other"
    description = PostgresStore(url, schema="outbox").description
    assert "s3cret" not in description and "other" not in description
    assert description.startswith("postgresql://mailer:***@db.internal:5432/mail?")
    assert "sslmode=require" in description and description.endswith("(schema outbox)")
    keywords = PostgresStore("host=db user=mailer password='s 3cret' dbname=mail").description
    assert "3cret" not in keywords and "password=***" in keywords
    store: Store = PostgresStore("postgresql://mailer@db/mail")  # the protocol, for mypy
    assert store.description == "postgresql://mailer@db/mail"


# -- migrations ------------------------------------------------------------------------------------


async def tables_and_versions(url: str, schema: str) -> tuple[set[str], list[tuple[int, Any]]]:
    async with await connect(url, schema, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema]
        )
        tables = {row[0] for row in await cursor.fetchall()}
        cursor = await conn.execute(
            "SELECT version, applied_at FROM postlane_schema_version ORDER BY version"
        )
        return tables, await cursor.fetchall()


async def test_open_creates_the_schema_and_opening_again_changes_nothing(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    # hosts starting together: the advisory lock lets one migrate, the others find it done
    await asyncio.gather(*(open_store() for _ in range(4)))
    tables, versions = await tables_and_versions(pg_url, schema)
    assert {"messages", "deliveries", "attempts", "suppressions"} <= tables
    assert [v for v, _ in versions] == list(range(1, SCHEMA_VERSION + 1))
    await open_store()
    assert await tables_and_versions(pg_url, schema) == (tables, versions)


async def test_a_command_that_must_not_create_finds_no_queue_and_makes_none(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    """`postlane queue list` pointed at the wrong database (or a mistyped ?schema=) said the
    queue was empty and made postlane's tables there (a fleet audit)."""
    separator = "&" if "?" in pg_url else "?"
    url = f"{pg_url}{separator}schema={schema}"
    lookout = open_store_url(url, create=False)
    with pytest.raises(StoreUnavailable, match="there is no postlane queue in"):
        await lookout.open()
    await lookout.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        found = await conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        )
        assert await found.fetchone() is None  # nothing made
    await open_store()  # serve makes it
    existing = open_store_url(url, create=False)
    await existing.open()  # now there is a queue: found
    await existing.close()


async def test_the_schema_can_come_from_the_url(pg_url: str, schema: str) -> None:
    separator = "&" if "?" in pg_url else "?"
    store = PostgresStore(f"{pg_url}{separator}schema={schema}")
    await store.open()
    try:
        assert store.schema == schema
        [result] = await store.enqueue([msg()], T0)
        tables, _ = await tables_and_versions(pg_url, schema)
        assert "messages" in tables
        assert (await store.get_message(result.id)).id == result.id
    finally:
        await store.drop_schema()
        await store.close()


async def test_an_idempotency_key_stored_before_keys_were_scoped_is_still_its_submitters(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    """An upgrade audit: a key an HTTP client stored before version 8 was given the local scope,
    so the client's retry after the upgrade was stored and sent again (twice at the sink)."""
    await build_schema_at(pg_url, schema, 7)  # a postlane of 2026-11-29
    async with await connect(pg_url, schema, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO messages (id, lane, sender, subject, message_id, idempotency_key, size, "
            "created_at, submitter, content) VALUES ('old1', 'normal', 'a@example.com', 's', "
            "'<x@example.com>', 'k1', 3, 1.0, 'token:abc', 'abc')"
        )
    store = await open_store()
    retry = dataclasses.replace(msg(key="k1"), submitter="token:abc")
    other = dataclasses.replace(msg(key="k1"), submitter="token:def")
    results = await store.enqueue([retry, other], T0)
    assert [(r.id, r.duplicate) for r in results] == [("old1", True), (other.id, False)]


async def build_schema_at(pg_url: str, schema: str, last: int) -> None:
    """A schema as postlane's migrations 1 to ``last`` left it (an older postlane's)."""
    async with await connect(pg_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        await conn.execute(Q["create_version_table"])
        for number, name, text in MIGRATIONS[:last]:
            await conn.execute(text)
            await conn.execute(Q["record_migration"], {"version": number, "name": name})


async def test_a_suppression_stored_before_lanes_stops_every_lane(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    """Entries made before version 21 (an unsubscribe among them) name no lanes: after the
    upgrade they go on stopping every lane until an operator narrows them."""
    await build_schema_at(pg_url, schema, 20)
    async with await connect(pg_url, schema, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO suppressions (address, scope, reason, created_at, source) "
            "VALUES ('ada@example.net', 'shop.example', 'unsubscribe', 1.0, 'unsubscribe')"
        )
    await old_unsubscribe_stops_every_lane(await open_store())


async def test_an_older_schema_is_migrated_only_by_what_may_create_and_it_says_so(
    pg_url: str, schema: str, open_store: OpenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade audit: operators' read-only commands migrated the schema under the fleet's
    running older postlanes, silently."""
    await build_schema_at(pg_url, schema, SCHEMA_VERSION - 1)
    reader = PostgresStore(pg_url, schema=schema, create=False)  # `postlane stats`, ...
    with pytest.raises(StoreUnavailable, match=r"schema version \d+ and this postlane needs"):
        await reader.open()
    await reader.close()
    _, versions = await tables_and_versions(pg_url, schema)
    assert versions[-1][0] == SCHEMA_VERSION - 1  # untouched
    with caplog.at_level(logging.WARNING, logger="postlane.store"):
        store = await open_store()  # serve, worker, migrate
    done = store.migration
    assert done is not None
    assert (done.from_version, done.to_version) == (SCHEMA_VERSION - 1, SCHEMA_VERSION)
    said = [r.getMessage() for r in caplog.records if r.name == "postlane.store"]
    assert any(f"from schema version {SCHEMA_VERSION - 1} to {SCHEMA_VERSION}" in m for m in said)
    assert any(m.startswith("migrated ") for m in said)
    assert (await open_store()).migration is None  # nothing left to do


@pytest.mark.parametrize("using", ["a lease", "a presence"])
async def test_a_migration_is_refused_while_another_postlane_uses_the_queue(
    pg_url: str, schema: str, open_store: OpenStore, using: str
) -> None:
    """An upgrade audit: `postlane migrate` went through beside a live older serve (an idle
    one holds no lock to wait for); its next results failed against the new schema, and five
    messages were sent twice. A live process shows in the queue itself: a delivery it leases,
    or the presence it renews about once a second."""
    await build_schema_at(pg_url, schema, SCHEMA_VERSION - 1)
    now = time.time()
    async with await connect(pg_url, schema, autocommit=True) as conn:
        if using == "a lease":
            await conn.execute(
                "INSERT INTO messages (id, lane, sender, subject, message_id, size, created_at,"
                " content, fingerprint) VALUES ('old1', 'normal', 'a@example.com', 's',"
                " '<old1@example.com>', 1, 1.0, 'x', 'f')"
            )
            await conn.execute(
                "INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at,"
                " state, next_attempt_at, updated_at, lease_owner, lease_expires_at) VALUES"
                " ('old1', 'r@example.net', 'example.net', 'example.net', 'normal', 1.0,"
                " 'sending', 1.0, 1.0, 'oldhost:4242:serve', %s)",
                [now + 60],
            )
        else:
            await conn.execute(
                "INSERT INTO destination_shares (destination, owner, demand, since, expires_at)"
                " VALUES ('*', 'oldhost:4242:worker', 1, %s, %s)",
                [now, now + 5],
            )
    with pytest.raises(StoreUnavailable, match="in use by 1 postlane process") as caught:
        await open_store()
    assert "oldhost:4242" in str(caught.value) and "nothing was changed" in str(caught.value)
    _, versions = await tables_and_versions(pg_url, schema)
    assert versions[-1][0] == SCHEMA_VERSION - 1  # untouched
    async with await connect(pg_url, schema, autocommit=True) as conn:  # it stopped
        await conn.execute("UPDATE deliveries SET lease_expires_at = 0")
        await conn.execute("UPDATE destination_shares SET expires_at = 0")
    assert (await open_store()).migration is not None


async def test_a_migration_gives_up_on_tables_another_session_holds_and_says_why(
    pg_url: str, schema: str, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade audit: a new worker migrating beside an older serve that held the tables
    deadlocked with it, and both ended with only 'deadlock detected' said. The migration waits
    a bounded time for the tables, tries again, then says what to do."""
    from postlane.store import postgres

    monkeypatch.setattr(postgres, "MIGRATION_LOCK_TIMEOUT", "200ms")
    monkeypatch.setattr(postgres, "MIGRATION_RETRY_PAUSE", 0.01)
    await build_schema_at(pg_url, schema, SCHEMA_VERSION - 1)
    async with await connect(pg_url, schema) as holder:  # an older postlane's transaction
        # every table (whichever the newest migration changes), but the versions' own
        cursor = await holder.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = %s AND table_name <> 'postlane_schema_version'",
            [schema],
        )
        held = sql.SQL(", ").join(sql.Identifier(row[0]) for row in await cursor.fetchall())
        await holder.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(held))
        with pytest.raises(StoreUnavailable, match="stop every older postlane using it") as caught:
            await open_store()
        assert "lock timeout" in str(caught.value)
        await holder.rollback()
    _, versions = await tables_and_versions(pg_url, schema)
    assert versions[-1][0] == SCHEMA_VERSION - 1  # nothing half-done
    store = await open_store()  # the tables free: it migrates
    assert store.migration is not None


async def test_a_schema_newer_than_this_postlane_is_refused(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    async with await connect(pg_url, schema, autocommit=True) as conn:
        await conn.execute("INSERT INTO postlane_schema_version (version, name) VALUES (999, 'x')")
    newer = PostgresStore(pg_url, schema=schema)
    with pytest.raises(StoreUnavailable, match="schema version 999"):
        await newer.open()


async def test_a_table_held_by_another_session_is_store_unavailable_within_the_timeout(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    """A durability audit: with a table locked by another session, enqueues hung for as long as
    the lock was held (35 s) with no answer and no log line; the clients gave up and retried
    what was then stored anyway. The promise is a 503 within the pool's timeout."""
    store = await open_store(timeout=1)
    async with await connect(pg_url, schema) as holder:
        await holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            await store.enqueue([msg()], T0)
        assert time.monotonic() - started < 5
        await holder.rollback()
    [result] = await store.enqueue([msg()], T0)  # the lock gone: it works
    assert not result.duplicate


async def test_an_unreachable_server_is_store_unavailable_without_the_password() -> None:
    store = PostgresStore("postgresql://u:s3cret@127.0.0.1:1/db", timeout=2)
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    assert "s3cret" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)


# -- many hosts ------------------------------------------------------------------------------------


async def test_two_hosts_claiming_at_once_never_lease_the_same_delivery(
    open_store: OpenStore,
) -> None:
    host_a, host_b = await open_store(), await open_store()
    messages = [msg(*(f"r{i}-{j}@example.net" for j in range(10))) for i in range(200)]
    await host_a.enqueue(messages, T0)

    async def claim_until_empty(store: PostgresStore, owner: str) -> list[int]:
        leased: list[int] = []
        while True:
            claimed = await store.claim_due(owner, ALL_LANES, limit=50, now=T0, lease_until=T0 + 60)
            if not claimed:
                return leased
            leased += [d.id for m in claimed for d in m.deliveries]

    runs = await asyncio.gather(
        claim_until_empty(host_a, "a/1"),
        claim_until_empty(host_a, "a/2"),
        claim_until_empty(host_b, "b/1"),
        claim_until_empty(host_b, "b/2"),
    )
    every = [delivery_id for run in runs for delivery_id in run]
    assert len(every) == 2000 and len(set(every)) == 2000  # all leased, none twice
    assert sum(1 for run in runs if run) >= 2  # they really raced
    assert sorted(await host_b.lease_owners()) == sorted(
        owner for owner, run in zip(["a/1", "a/2", "b/1", "b/2"], runs, strict=True) if run
    )


async def test_a_message_finished_by_two_hosts_at_once_is_done(open_store: OpenStore) -> None:
    host_a, host_b = await open_store(), await open_store()
    messages = [msg("one@example.net", "two@example.net") for _ in range(20)]
    await host_a.enqueue(messages, T0)
    # each host ends up leasing one recipient of every message (a claim takes a message's
    # whole due rest, so host A hands one of each back for host B to claim)
    claimed = await host_a.claim_due("a", ALL_LANES, limit=100, now=T0, lease_until=T0 + 60)
    ids_a = [m.deliveries[0].id for m in claimed]
    assert await host_a.hand_back("a", [m.deliveries[1].id for m in claimed], T0) == 20
    claimed = await host_b.claim_due("b", ALL_LANES, limit=100, now=T0, lease_until=T0 + 60)
    ids_b = [d.id for m in claimed for d in m.deliveries]
    assert len(ids_b) == 20 and not set(ids_a) & set(ids_b)

    def sent(ids: list[int]) -> list[Outcome]:
        return [
            Outcome(i, RecipientState.SENT, 1, 0, None, attempt(ReplyClass.DELIVERED, 250))
            for i in ids
        ]

    applied = await asyncio.gather(
        *(host_a.record("a", sent([a]), T0 + 1) for a in ids_a),
        *(host_b.record("b", sent([b]), T0 + 1) for b in ids_b),
    )
    assert sum(applied) == 40
    # every message saw its last recipient finish, whichever host recorded last
    assert await host_a.purge_finished(T0 + 100, retention=10, dead_retention=10) == 20


async def test_reaping_on_two_hosts_reaps_each_lease_once(open_store: OpenStore) -> None:
    host_a, host_b = await open_store(), await open_store()
    await host_a.enqueue([msg(*(f"r{j}@example.net" for j in range(30))) for _ in range(50)], T0)
    await host_a.claim_due("dead", ALL_LANES, limit=1500, now=T0, lease_until=T0 + 60)
    reaped = await asyncio.gather(
        host_a.reap_expired_leases(T0 + 60), host_b.reap_expired_leases(T0 + 60)
    )
    assert sum(reaped) == 1500
    stats = await host_b.stats(T0 + 60)
    assert stats.lanes[Lane.NORMAL].ready == 1500 and stats.lanes[Lane.NORMAL].sending == 0
    [listed] = await host_b.list_messages(Selector(), limit=1)
    view = await host_b.get_message(listed.id, history=True)
    assert all(r.attempts == 1 and len(r.history or ()) == 1 for r in view.recipients)


# -- LISTEN/NOTIFY ---------------------------------------------------------------------------------


async def test_an_enqueue_wakes_a_waiting_worker_at_commit(open_store: OpenStore) -> None:
    worker, api = await open_store(), await open_store()
    assert await worker.wait_for_work(0) is True  # starts listening: look once more
    assert await worker.wait_for_work(0.1) is False
    started = time.monotonic()
    waiting = asyncio.create_task(worker.wait_for_work(30))
    await api.enqueue([msg(), msg()], T0)
    assert await waiting is True
    assert time.monotonic() - started < 10  # woken by the commit, not by the 30 s timeout
    assert await worker.wait_for_work(0) is False  # the burst was one wake-up


async def test_a_notification_between_waits_is_not_lost(open_store: OpenStore) -> None:
    worker, api = await open_store(), await open_store()
    await worker.wait_for_work(0)
    await api.enqueue([msg()], T0)  # while nobody waits
    assert await worker.wait_for_work(30) is True


async def test_a_cancelled_wait_leaves_the_listener_working(open_store: OpenStore) -> None:
    worker, api = await open_store(), await open_store()
    await worker.wait_for_work(0)
    with pytest.raises(TimeoutError):  # cancelled mid-wait, as a worker's stop event would
        await asyncio.wait_for(worker.wait_for_work(30), timeout=0.2)
    await api.enqueue([msg()], T0)
    started = time.monotonic()
    assert await worker.wait_for_work(30) is True
    assert time.monotonic() - started < 10


async def test_enqueues_in_another_schema_do_not_wake(open_store: OpenStore, schema: str) -> None:
    worker = await open_store()
    elsewhere = await open_store(f"{schema}_other")
    await worker.wait_for_work(0)
    await elsewhere.enqueue([msg()], T0)
    assert await worker.wait_for_work(0.3) is False


async def test_a_lost_listening_connection_is_replaced(open_store: OpenStore, pg_url: str) -> None:
    worker, api = await open_store(), await open_store()
    await worker.wait_for_work(0)
    listener = worker._listener  # the store's own LISTEN connection, cut by the server
    assert listener is not None
    async with await connect(pg_url, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", [listener.info.backend_pid])
    assert await worker.wait_for_work(5) is True  # lost: may have missed one, look again
    assert await worker.wait_for_work(0) is True  # listening again (a fresh start)
    await api.enqueue([msg()], T0)
    assert await worker.wait_for_work(30) is True


async def test_a_pause_one_process_records_is_news_for_another_at_commit(
    open_store: OpenStore, schema: str
) -> None:
    worker, other = await open_store(), await open_store()
    elsewhere = await open_store(f"{schema}_other")
    await worker.wait_for_work(0)  # listening, as a worker is between claims
    await worker.wait_for_destination_news(0)  # (a fresh listener asks for a look once)
    listening = asyncio.create_task(worker.wait_for_work(30))
    await elsewhere.save_destination_states(
        [DestinationStatus("relay", None, None, T0 + 30, "paused", updated_at=T0)]
    )
    assert await worker.wait_for_destination_news(0.3) is False  # another schema's
    started = time.monotonic()
    await other.save_destination_states(
        [DestinationStatus("relay", None, None, T0 + 30, "paused", updated_at=T0)]
    )
    assert await worker.wait_for_destination_news(30) is True
    assert time.monotonic() - started < 10  # at the commit, not at a timeout
    await other.lift_destinations(["relay"], T0 + 1)
    assert await worker.wait_for_destination_news(30) is True
    assert not listening.done()  # news is not mail: the worker's wait for work goes on
    listening.cancel()


# -- the transactional outbox ---------------------------------------------------------------------


def signup(to: str = "new@example.net", key: str | None = None) -> Message:
    return Message(
        sender="app@example.com", to=[to], subject="Welcome", text="hi", idempotency_key=key
    )


async def make_users_table(url: str, schema: str) -> None:
    async with await connect(url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE {}.users (email text PRIMARY KEY)").format(sql.Identifier(schema))
        )


async def test_an_outbox_enqueue_rolled_back_with_its_transaction_leaves_nothing(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    await make_users_table(pg_url, schema)
    await store.wait_for_work(0)
    async with await connect(pg_url) as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {}.users VALUES ('new@example.net')").format(
                sql.Identifier(schema)
            )
        )
        result = await enqueue_in_transaction(conn, signup(), schema=schema, now=T0)
        await conn.rollback()
    with pytest.raises(NotFound):
        await store.get_message(result.id)
    assert await store.list_messages(Selector(), limit=10) == []
    assert await store.claim_due("w", ALL_LANES, limit=10, now=T0, lease_until=T0 + 60) == []
    assert await store.wait_for_work(0.2) is False  # a rolled-back NOTIFY is never sent


async def test_an_outbox_cancel_sees_its_transactions_mail_and_goes_with_its_rollback(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    async with await connect(pg_url) as conn:
        sent = await enqueue_in_transaction(conn, signup(), schema=schema, now=T0)
        cancelled = await cancel_in_transaction(conn, sent.id, schema=schema, now=T0)
        assert (cancelled.cancelled, cancelled.left) == (1, ())
        with pytest.raises(NotFound):
            await cancel_in_transaction(conn, sent.id, schema=schema, now=T0)
        await conn.commit()
        kept = await enqueue_in_transaction(conn, signup("kept@example.net"), schema=schema,
                                            now=T0)  # fmt: skip
        await conn.commit()
        assert (await cancel_in_transaction(conn, kept.id, schema=schema)).cancelled == 1
        await conn.rollback()  # the cancel goes with its transaction
    assert [m.id for m in await store.list_messages(Selector(), limit=10)] == [kept.id]
    with psycopg.connect(pg_url) as blocking:  # and on a blocking connection
        assert cancel_in_transaction_sync(blocking, kept.id, schema=schema).cancelled == 1
    assert await store.list_messages(Selector(), limit=10) == []


async def test_an_event_committed_later_is_never_behind_a_passed_cursor(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    """Event ids are handed out before commit: a transaction that took the smaller id and
    commits last must still be read after the cursor that passed the larger one."""
    async with await connect(pg_url) as conn:  # takes its event ids first, commits last
        slow = await enqueue_in_transaction(conn, signup("slow@example.net"), schema=schema,
                                            now=T0)  # fmt: skip
        fast = msg()
        await store.enqueue([fast], T0 + 1)
        assert await store.events_after(None, limit=10) == []  # not behind the open one
        await conn.commit()
    # shown once every write transaction of the database begun before them has ended (another
    # test worker's, in its own schema, may still be open a moment: docs/events.md)
    events = await read_events(store, lambda es: len(es) >= 2, limit=10)
    assert [e.queue_id for e in events] == [slow.id, fast.id]
    assert events[0].id < events[1].id  # ids in the order they were taken, read by commit
    later = msg()
    await store.enqueue([later], T0 + 2)
    # (read again, as above: another worker's transaction may hold it back a moment; seen in CI)
    after = await read_events(store, lambda es: len(es) >= 1, limit=10, after=events[-1].id)
    assert [e.queue_id for e in after] == [later.id]


async def test_a_transaction_in_another_database_does_not_hold_events_back(
    pg_url: str, store: PostgresStore
) -> None:
    """Transaction ids are the whole server's: a write transaction left open in another
    database (another application on the same server) writes no events here and must not stall
    the event log. (Read as the contract tests read: another test worker's transactions, in its
    own database, may hold an event back a moment, docs/events.md; this one stays open all the
    while, so a stall it caused would still fail.)"""
    other_database = psycopg.conninfo.make_conninfo(pg_url, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(other_database) as elsewhere:
        await elsewhere.execute("SELECT pg_current_xact_id()")  # holds an id, stays open
        prepared = msg()
        await store.enqueue([prepared], T0)
        events = await read_events(store, lambda es: len(es) >= 1)
        assert [e.queue_id for e in events] == [prepared.id]
        await elsewhere.rollback()


async def test_an_outbox_enqueue_committed_with_its_transaction_is_delivered(
    pg_url: str, schema: str, store: PostgresStore, tmp_path: Path
) -> None:
    await make_users_table(pg_url, schema)
    await store.wait_for_work(0)
    async with await connect(pg_url) as conn:
        before = await (await conn.execute("SHOW search_path")).fetchone()
        await conn.execute(
            sql.SQL("INSERT INTO {}.users VALUES ('new@example.net')").format(
                sql.Identifier(schema)
            )
        )
        result = await enqueue_in_transaction(conn, signup(), schema=schema, now=T0)
        # the caller's own statements still resolve as before, in the same transaction
        assert await (await conn.execute("SHOW search_path")).fetchone() == before
        assert await store.list_messages(Selector(), limit=10) == []  # not before the commit
        await conn.commit()
    assert not result.duplicate
    assert await store.wait_for_work(30) is True  # the commit woke the workers
    # a worker delivers it like any other message
    config = make_config(tmp_path)  # the capture transport: one .eml per delivery
    transport = transport_for(config)
    worker = Worker.from_config(config, store, transport, clock=FakeClock(T0))
    try:
        assert await worker.run_until_idle() == 1
    finally:
        await transport.close()
    view = await store.get_message(result.id, history=True)
    assert [(r.address, r.state) for r in view.recipients] == [
        ("new@example.net", RecipientState.SENT)
    ]
    [eml] = (tmp_path / "captured").glob("*.eml")
    assert b"Subject: Welcome" in eml.read_bytes()


async def test_the_blocking_outbox_shares_the_idempotency_key_with_the_store(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    # the same submission (a retry), first through the store
    [first] = await store.enqueue([prepare(signup(key="welcome-42"), max_size=10**6)], T0)

    def in_a_sync_app() -> tuple[Any, Any]:
        # client-side binding, as Django's psycopg connections do by default
        with psycopg.connect(pg_url, cursor_factory=psycopg.ClientCursor) as conn:
            again = enqueue_in_transaction_sync(conn, signup(key="welcome-42"), schema=schema)
            other = enqueue_in_transaction_sync(conn, signup(key="welcome-43"), schema=schema)
            conn.commit()
        return again, other

    again, other = await asyncio.to_thread(in_a_sync_app)
    assert (again.id, again.duplicate) == (first.id, True)
    assert not other.duplicate
    assert {m.id for m in await store.list_messages(Selector(), limit=10)} == {first.id, other.id}
    assert b"\r\nSubject: Welcome\r\n" in await store.get_content(other.id)


async def test_the_outbox_on_an_autocommit_connection_commits_by_itself(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    async with await connect(pg_url, schema, autocommit=True) as conn:
        result = await enqueue_in_transaction(conn, signup(), now=T0)  # search_path: schema
    assert (await store.get_message(result.id)).recipients[0].address == "new@example.net"


# -- the claim index -------------------------------------------------------------------------------


async def test_the_claim_reads_the_partial_due_index_in_order(
    pg_url: str, schema: str, store: PostgresStore
) -> None:
    [result] = await store.enqueue([msg()], T0)
    async with await connect(pg_url, schema, autocommit=True) as conn:
        # a deep history of finished rows and a backlog of many claims' worth of waiting ones
        await conn.execute(
            "INSERT INTO deliveries (queue_id, address, domain, destination, lane, created_at, "
            "state, next_attempt_at, updated_at) "
            "SELECT %(id)s, 'r' || i || '@example.net', 'example.net', 'example.net', "
            "(ARRAY['high', 'normal', 'low'])[1 + i %% 3], %(t)s, "
            "CASE WHEN i %% 4 = 0 THEN 'queued' ELSE 'sent' END, %(t)s + i, %(t)s "
            "FROM generate_series(1, 30000) AS i",
            {"id": result.id, "t": T0},
        )
        await conn.execute("ANALYZE deliveries")
        cursor = await conn.execute(
            "EXPLAIN (FORMAT JSON) " + Q["claim_lane"],
            {"owner": "w", "now": T0 + 1e6, "lease_until": T0, "lane": "normal", "limit": 50},
        )
        [(plan,)] = await cursor.fetchall()

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    found = nodes(plan[0]["Plan"])
    assert any(n.get("Index Name") == "deliveries_due" for n in found), plan
    assert not any(n["Node Type"] == "Sort" for n in found), plan  # the index gives the order
    assert not any(
        n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "deliveries" for n in found
    ), plan


# -- same answers as SQLite ------------------------------------------------------------------------


async def operator_scenario(store: Any, messages: list[PreparedMessage]) -> dict[str, Any]:
    """Every operator action on a small queue, and every answer."""
    await store.enqueue(messages, T0)
    claimed = await store.claim_due("w", ALL_LANES, limit=100, now=T0, lease_until=T0 + 60)
    by_id = {m.queue_id: m.deliveries for m in claimed}
    deferred = by_id[messages[2].id][0].id
    dead = [by_id[messages[3].id][0].id, by_id[messages[4].id][0].id]
    await store.record(
        "w",
        [
            Outcome(
                deferred,
                RecipientState.DEFERRED,
                1,
                0,
                T0 + 3600,
                attempt(ReplyClass.TEMPORARY, 451),
            ),
            *(
                Outcome(
                    d,
                    RecipientState.DEAD,
                    1,
                    0,
                    None,
                    attempt(ReplyClass.HARD_BOUNCE, 550, f"5.1.1 <x{d}@example.net> unknown"),
                )
                for d in dead
            ),
        ],
        T0,
    )
    await store.hand_back("w", None, T0)
    out: dict[str, Any] = {}
    pending = ["queued", "deferred", "held"]
    out["ids"] = await store.select_delivery_ids(Selector(), pending, after=0, limit=100)
    out["ids_after"] = await store.select_delivery_ids(Selector(), pending, after=2, limit=2)
    out["summary"] = await store.summarize(Selector(), pending)
    out["summary_dead"] = await store.summarize(Selector(domains=("example.net",)), ["dead"])
    out["groups"] = await store.dead_groups(Selector(), limit=10)
    out["shape"] = await store.shape(T0 + 600, [300.0, 3600.0], limit=10)
    exported = await store.export_deliveries([*dead, deferred])
    out["export"] = [m.as_json() for m in exported]
    out["flush"] = await store.flush([deferred], T0 + 1)
    out["hold"] = await store.hold(out["ids"], T0 + 2)
    out["release"] = await store.release(out["ids"][:2], T0 + 3)
    out["requeued"] = await store.requeue_dead(dead, T0 + 10)
    out["deleted"] = await store.delete_deliveries(dead, ["dead"])
    out["not_deleted"] = await store.delete_deliveries([deferred], ["dead", "held"])
    out["after_delete"] = [m.as_json() for m in await store.list_messages(Selector(), limit=10)]
    out["imported"] = await store.import_messages(exported, T0 + 20)
    out["imported_again"] = await store.import_messages(exported, T0 + 21)
    out["after_import"] = [
        m.as_json() for m in await store.list_messages(Selector(states=()), limit=10)
    ]
    out["stats"] = (await store.stats(T0 + 30)).as_json()
    return out


async def throttling_scenario(store: Any, messages: list[PreparedMessage]) -> dict[str, Any]:
    """A claim that reaches a message leases all its due recipients; throttle deferrals,
    destination pauses and their lifting."""
    await store.enqueue(messages, T0)
    out: dict[str, Any] = {}
    claimed = await store.claim_due("w", ALL_LANES, limit=1, now=T0, lease_until=T0 + 60)
    out["claimed"] = [(m.queue_id, [d.address for d in m.deliveries]) for m in claimed]
    ids = [d.id for m in claimed for d in m.deliveries]
    out["deferred"] = await store.defer_unattempted(
        "w",
        [Deferral(ids[0], T0 + 30), Deferral(ids[0], T0 + 99), Deferral(ids[1], T0)],
        T0,
        "rate",
    )
    out["paused"] = await store.defer_destination("google", T0 + 600, T0, "421 slow down")
    await store.save_destination_states(
        [
            DestinationStatus("google", 0.5, 2.0, T0 + 600, "421", updated_at=T0),
            DestinationStatus("yahoo", None, None, None, None, updated_at=T0),
            DestinationStatus("yahoo", 1.0, None, None, "429", updated_at=T0 + 1),
        ]
    )
    await store.claim_due("w2", ALL_LANES, limit=100, now=T0, lease_until=T0 + 60)
    out["states"] = await store.destination_states()
    out["lifted_one"] = await store.lift_destinations(["google"], T0 + 5)
    out["lifted_all"] = await store.lift_destinations(None, T0 + 6)
    out["states_after"] = await store.destination_states()
    out["messages"] = [
        m.as_json() for m in await store.list_messages(Selector(states=()), limit=10)
    ]
    return out


async def test_claims_and_throttling_answer_as_the_sqlite_store_does(
    store: PostgresStore, tmp_path: Path
) -> None:
    messages = [
        msg("a@gmail.com", "b@gmail.com", "c@example.net"),
        msg("d@gmail.com", lane="low"),
        msg("e@yahoo.com", "f@example.org", lane="high"),
    ]
    sqlite = SQLiteStore(tmp_path / "reference.db")
    await sqlite.open()
    try:
        expected = await throttling_scenario(sqlite, messages)
    finally:
        await sqlite.close()
    assert expected["claimed"][0][1] == ["e@yahoo.com", "f@example.org"]  # the whole message
    assert await throttling_scenario(store, messages) == expected


async def test_operator_actions_answer_as_the_sqlite_store_does(
    store: PostgresStore, tmp_path: Path
) -> None:
    messages = [
        msg("a@gmail.com", lane="high"),
        msg("b@example.net", "c@example.org", lane="low"),
        msg("d@yahoo.com"),
        msg("bounce1@example.net"),
        msg("bounce2@example.net"),
    ]
    sqlite = SQLiteStore(tmp_path / "reference.db")
    await sqlite.open()
    try:
        expected = await operator_scenario(sqlite, messages)
    finally:
        await sqlite.close()
    assert await operator_scenario(store, messages) == expected


async def test_a_dead_letters_last_attempt_is_read_by_index(
    pg_url: str, schema: str, open_store: OpenStore
) -> None:
    """A scale audit listed 40,000 dead letters on a PostgreSQL without statistics in 9 s:
    each one's last attempt was found by walking the attempts' primary key backwards. An index
    on (delivery_id, id) answers it whatever the planner knows."""
    await open_store()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        await conn.execute("SET enable_seqscan = off")
        cursor = await conn.execute(
            "EXPLAIN SELECT relay FROM attempts a WHERE a.delivery_id = 7 "
            "ORDER BY a.id DESC LIMIT 1"
        )
        plan = " ".join(str(row[0]) for row in await cursor.fetchall())
    assert "attempts_delivery_order" in plan and "Sort" not in plan, plan


async def test_pooled_connections_the_server_closed_cost_no_request(
    open_store: OpenStore, pg_url: str
) -> None:
    """A restart or a failover closes every connection waiting in the pool; the first request
    on each used to fail with a 503. Nothing was sent on them but a BEGIN: the pool drops
    them and the request goes on a fresh one."""
    store = await open_store()
    await store.enqueue([msg()], T0)
    pool = store.postgres._pool
    assert pool is not None
    held = [await pool.getconn() for _ in range(3)]  # three connections waiting in the pool
    pids = [conn.info.backend_pid for conn in held]
    for conn in held:
        await pool.putconn(conn)
    async with await connect(pg_url, autocommit=True) as admin:
        for pid in pids:
            await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    for _ in range(3):  # whichever connection each takes
        assert (await store.stats(T0)).lanes[Lane.NORMAL].ready == 1
    assert len(await store.enqueue([msg()], T0)) == 1
