"""The PostgreSQL store: many worker hosts on one database.

Same behaviour as :mod:`postlane.store.sqlite` (one contract suite runs against both), built on
what PostgreSQL does well with many writers:

- Each method is one transaction on a connection from a psycopg pool, so concurrent callers
  (and other processes and hosts) commit in parallel; PostgreSQL's own group commit shares the
  WAL flushes of concurrent commits.
- Claims lease rows with ``FOR UPDATE SKIP LOCKED``: workers on any number of hosts take
  disjoint batches without waiting on each other (see ``claim_lane`` in ``queries.sql``).
- Enqueues ``NOTIFY postlane_enqueued`` at commit, and :meth:`PostgresStore.wait_for_work` lets
  an idle worker wake on it instead of polling.
- Enqueue can also run on the application's own connection, inside its transaction
  (:mod:`postlane.outbox`): the statements live here once, as a sans-IO *plan* (a generator of
  statements) that an async or a sync driver executes on any psycopg connection.

Times are float epoch seconds in ``double precision`` columns, as in SQLite. With ``schema``,
everything lives in that PostgreSQL schema (created if missing), so several postlane
installations (or test runs) can share one database.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from postlane.classify import ReplyClass
from postlane.destinations import destination_for
from postlane.errors import ConfigError, NotFound, StoreUnavailable
from postlane.message import FINAL_STATES, Lane, PreparedMessage, RecipientState
from postlane.records import (
    AttemptView,
    ClaimedMessage,
    DeadGroup,
    DeadLetter,
    Delivery,
    DestinationStatus,
    EnqueueResult,
    ExportedMessage,
    ExportedRecipient,
    LaneStats,
    MessageView,
    Outcome,
    RecipientView,
    Reply,
    Sample,
    SelectionCount,
    Selector,
    ShapeRow,
    Stats,
    Suppression,
)
from postlane.store.base import Pager
from postlane.store.sql import load_migrations, load_queries
from postlane.triage import group_dead_letters

T = TypeVar("T")
Conn = psycopg.AsyncConnection[TupleRow]
Row = tuple[Any, ...]

Q = load_queries("postgres")
MIGRATIONS = load_migrations("postgres")
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: the LISTEN/NOTIFY channel enqueues notify on (the payload names the tables' schema)
CHANNEL = "postlane_enqueued"
#: a transaction PostgreSQL rolled back to break a deadlock is run again this many times in all
TRANSACTION_TRIES = 3
_PENDING = ("queued", "sending", "deferred", "held")


# -- enqueue: one plan, run by the store and by the transactional outbox --------------------------


@dataclass(frozen=True)
class Statement:
    """One statement of a plan; the driver sends back the rows it returned (if any)."""

    query: str
    params: Mapping[str, Any]


#: a sans-IO sequence of statements: yields each, receives its rows, returns the result
Plan = Generator[Statement, list[Row], T]


def enqueue_plan(messages: Sequence[PreparedMessage], now: float) -> Plan[list[EnqueueResult]]:
    """The statements that store ``messages`` (see :meth:`PostgresStore.enqueue`), in whatever
    transaction the driver's connection is in. A constant number of statements per batch: the
    suppression check, the message rows, the recipient rows, the notification (and a look-up
    of existing ids when an idempotency key was already stored)."""
    addresses = sorted({r.address.lower() for m in messages for r in m.recipients})
    suppressed: set[str] = set()
    if addresses:
        rows = yield Statement(Q["suppressed_among"], {"addresses": addresses})
        suppressed = {row[0] for row in rows}

    # The first message per idempotency key in the batch is the candidate; later ones repeat it.
    # Candidates with a key go in key order, so two batches with the same keys take their
    # locks in the same order and never deadlock.
    candidates: dict[str, PreparedMessage] = {}
    for message in messages:
        if message.idempotency_key is not None:
            candidates.setdefault(message.idempotency_key, message)
    keyless = [m for m in messages if m.idempotency_key is None]
    pending = sorted(candidates.values(), key=lambda m: m.idempotency_key or "") + keyless
    stored: set[str] = set()
    id_of_key: dict[str, str] = {}
    for _ in range(TRANSACTION_TRIES):
        if not pending:
            break
        rows = yield Statement(Q["insert_messages"], _message_columns(pending, suppressed, now))
        stored.update(row[0] for row in rows)
        lost = [m.idempotency_key for m in pending if m.id not in stored and m.idempotency_key]
        if lost:
            rows = yield Statement(Q["messages_by_idempotency_key"], {"keys": lost})
            id_of_key.update((key, queue_id) for key, queue_id in rows)
        # A key whose row was purged between the two statements: try that message again.
        pending = [m for m in pending if m.id not in stored and m.idempotency_key not in id_of_key]
    if pending:
        raise StoreUnavailable("an idempotency key kept changing hands; enqueue again")

    new = [m for m in messages if m.id in stored]
    if new:
        yield Statement(Q["insert_deliveries"], _delivery_columns(new, suppressed, now))
        yield Statement(Q["notify_enqueued"], {})
    results: list[EnqueueResult] = []
    seen: set[str] = set()
    for message in messages:
        key = message.idempotency_key
        if message.id in stored and message.id not in seen:
            seen.add(message.id)
            results.append(EnqueueResult(id=message.id, duplicate=False))
        elif key is not None and candidates[key].id in stored:
            results.append(EnqueueResult(id=candidates[key].id, duplicate=True))
        elif key is not None:
            results.append(EnqueueResult(id=id_of_key[key], duplicate=True))
    return results


def in_schema(plan: Plan[T], schema: str | None) -> Plan[T]:
    """Run ``plan`` with the search_path set to ``schema`` for its statements only: the
    caller's transaction gets its own search_path back afterwards (the transactional outbox)."""
    if schema is None:
        return (yield from plan)
    [(saved,)] = yield Statement(Q["search_path"], {})
    yield Statement(Q["set_search_path"], {"schema": schema, "local": True})
    result = yield from plan
    yield Statement(Q["restore_search_path"], {"search_path": saved})
    return result


async def run_plan(conn: psycopg.AsyncConnection[Any], plan: Plan[T]) -> T:
    """Execute a plan on an async connection, in its current transaction (no commit)."""
    rows: list[Row] | None = None
    try:
        while True:
            statement = plan.send(rows) if rows is not None else next(plan)
            async with conn.cursor(row_factory=tuple_row) as cursor:
                await cursor.execute(statement.query, statement.params)
                rows = await cursor.fetchall() if cursor.description is not None else []
    except StopIteration as done:
        result: T = done.value
        return result


def run_plan_sync(conn: psycopg.Connection[Any], plan: Plan[T]) -> T:
    """Execute a plan on a blocking connection, in its current transaction (no commit)."""
    rows: list[Row] | None = None
    try:
        while True:
            statement = plan.send(rows) if rows is not None else next(plan)
            with conn.cursor(row_factory=tuple_row) as cursor:
                cursor.execute(statement.query, statement.params)
                rows = cursor.fetchall() if cursor.description is not None else []
    except StopIteration as done:
        result: T = done.value
        return result


def _message_columns(
    messages: Sequence[PreparedMessage], suppressed: set[str], now: float
) -> dict[str, list[Any]]:
    """insert_messages's parameters: one array per column."""
    columns: dict[str, list[Any]] = defaultdict(list)
    for m in messages:
        all_suppressed = all(r.address.lower() in suppressed for r in m.recipients)
        columns["id"].append(m.id)
        columns["lane"].append(m.lane.value)
        columns["sender"].append(m.sender)
        columns["subject"].append(m.subject)
        columns["message_id"].append(m.message_id)
        columns["idempotency_key"].append(m.idempotency_key)
        columns["size"].append(m.size)
        columns["metadata"].append(json.dumps(m.metadata, separators=(",", ":")))
        columns["created_at"].append(now)
        columns["done_at"].append(now if all_suppressed else None)
        columns["submitter"].append(m.submitter)
        columns["content"].append(m.content)
    return columns


def _delivery_columns(
    messages: Sequence[PreparedMessage], suppressed: set[str], now: float
) -> dict[str, list[Any]]:
    """insert_deliveries's parameters: one array per column, a row per recipient."""
    columns: dict[str, list[Any]] = defaultdict(list)
    for m in messages:
        for r in m.recipients:
            is_suppressed = r.address.lower() in suppressed
            columns["queue_id"].append(m.id)
            columns["address"].append(r.address)
            columns["domain"].append(r.domain)
            columns["destination"].append(r.destination or destination_for(r.domain))
            columns["lane"].append(m.lane.value)
            columns["created_at"].append(now)
            columns["state"].append("suppressed" if is_suppressed else "queued")
            columns["reason"].append("on the suppression list" if is_suppressed else None)
    return columns


# -- connection strings ----------------------------------------------------------------------------


def split_schema(url: str) -> tuple[str, str | None]:
    """Take postlane's own ``schema`` query parameter off a URL (libpq would refuse it):
    ``postgresql://host/db?schema=mail`` keeps everything in the schema ``mail``."""
    if "://" not in url:
        return url, None
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    if not schemas:
        return url, None
    rest = urlencode([(name, value) for name, value in query if name != "schema"])
    return urlunsplit(parts._replace(query=rest)), schemas[-1] or None


_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def masked(url: str) -> str:
    """A connection string fit for logs and messages: any password replaced by ``***``."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = [
        (name, "***" if name.lower() == "password" else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


# -- the store -------------------------------------------------------------------------------------


class PostgresStore:
    """The :class:`postlane.store.base.Store` on a PostgreSQL database, for many worker hosts.

    ``url`` is a libpq URL or keyword string (``postgresql://user@host:5432/db``); ``schema``
    (or ``?schema=`` in the URL) puts every table in that schema. ``min_size``/``max_size``
    bound the connection pool; ``timeout`` is how long to wait for a connection."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
    ) -> None:
        conninfo, url_schema = split_schema(url)
        self.schema = schema if schema is not None else url_schema
        self.description = masked(url)
        if schema is not None:
            self.description += f" (schema {schema})"
        self._conninfo = conninfo
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._listener: Conn | None = None
        self._listen_lock = asyncio.Lock()
        #: the notification payload meant for this store (the schema of its tables)
        self._payload: str | None = None

    # -- plumbing --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Bring the schema to the current version, then open the connection pool."""
        await self._migrate()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self._conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            # autocommit: a connection is never left inside a transaction it did not ask for;
            # every method opens its own with conn.transaction()
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=self._timeout,
            name="postlane",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
        except psycopg.OperationalError as exc:
            await pool.close()
            raise self._unavailable(exc) from exc
        self._pool = pool

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def drop_schema(self) -> None:
        """Drop the store's schema and everything in it (tests; a deliberate uninstall)."""
        if not self.schema:
            raise ConfigError("drop_schema() needs a store opened with schema=...")
        statement = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
        async with await self._connect() as conn:
            await conn.execute(statement)

    async def _connect(self) -> Conn:
        """A connection outside the pool (migrations, LISTEN), set up like the pool's."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=max(2, round(self._timeout))
            )
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc
        try:
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _configure(self, conn: Conn) -> None:
        if self.schema:
            await conn.execute(Q["set_search_path"], {"schema": self.schema, "local": False})

    async def _migrate(self) -> None:
        """Apply pending migrations in one transaction, under an advisory lock: several
        processes starting together wait for the first, then find nothing left to do."""
        async with await self._connect() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(Q["lock_migrations"], {"schema": self.schema or ""})
                    if self.schema and not await _scalar(
                        conn, Q["schema_exists"], {"schema": self.schema}
                    ):
                        await conn.execute(
                            sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema))
                        )
                    if not await _scalar(conn, Q["version_table_exists"]):
                        await conn.execute(Q["create_version_table"])
                    version = await _scalar(conn, Q["schema_version"])
                    if version > SCHEMA_VERSION:
                        raise StoreUnavailable(
                            f"the database {self.description} is at schema version {version}, "
                            f"newer than this postlane ({SCHEMA_VERSION}); upgrade postlane"
                        )
                    for number, name, text in MIGRATIONS:
                        if number > version:
                            await conn.execute(text)
                            await conn.execute(
                                Q["record_migration"], {"version": number, "name": name}
                            )
            except psycopg.Error as exc:
                raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(f"cannot use the PostgreSQL database {self.description}: {detail}")

    async def _run(self, run: Callable[[Conn], Awaitable[T]], *, snapshot: bool = False) -> T:
        """``run`` in one transaction on a pooled connection. A transaction PostgreSQL rolled
        back to break a deadlock or a serialisation conflict is run again; connection trouble
        becomes :class:`StoreUnavailable`. ``snapshot``: one consistent view for all reads."""
        if self._pool is None:
            raise StoreUnavailable(f"the PostgreSQL store {self.description} is not open")
        tries = 0
        while True:
            tries += 1
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    if snapshot:
                        await conn.execute(Q["read_snapshot"])
                    return await run(conn)
            except psycopg.errors.TransactionRollback as exc:
                if tries >= TRANSACTION_TRIES:
                    raise self._unavailable(exc) from exc
            except psycopg.OperationalError as exc:
                raise self._unavailable(exc) from exc

    # -- wake-ups --------------------------------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an enqueue to commit (LISTEN/NOTIFY); True when
        one did, False on timeout. Meant for an idle worker, in place of a blind sleep.

        A dedicated connection (not from the pool) listens from the first call on. True means
        "claim again", never "there is work for you": another host may take it first, and the
        first call (which starts listening) and a call after the listening connection was lost
        return True at once, as notifications may have been missed meanwhile. Notifications
        that arrive between calls are not lost: the next call returns True at once. Raises
        :class:`StoreUnavailable` when the database cannot be reached."""
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._listen_lock.locked():
            await self._listen_lock.acquire()  # at once (wait_for(..., 0) would time out)
        else:  # another task is waiting on the listener: queue up, within our own timeout
            try:
                await asyncio.wait_for(self._listen_lock.acquire(), timeout=max(0.0, timeout))
            except TimeoutError:
                return False
        try:
            if self._listener is None or self._listener.closed:
                self._listener = await self._listen()
                return True
            listener = self._listener
            try:
                woken = await self._next_notification(listener, deadline - time.monotonic())
                if woken:  # a burst of enqueues is one wake-up: drop what else is queued
                    await self._next_notification(listener, 0.0)
                return woken
            except psycopg.OperationalError:
                await listener.close()
                self._listener = None
                return True
        finally:
            self._listen_lock.release()

    async def _listen(self) -> Conn:
        conn = await self._connect()
        try:
            await conn.execute(Q["listen"])
            self._payload = await _scalar(conn, Q["tables_schema"])
        except psycopg.Error as exc:
            await conn.close()
            raise self._unavailable(exc) from exc
        return conn

    async def _next_notification(self, conn: Conn, timeout: float) -> bool:
        """Whether a notification for this store arrives within ``timeout`` (0: already here)."""
        async with aclosing(conn.notifies(timeout=max(0.0, timeout))) as notifications:
            async for notification in notifications:
                if notification.channel == CHANNEL and notification.payload == self._payload:
                    return True
        return False

    # -- ingest ----------------------------------------------------------------------------------

    async def enqueue(self, messages: Sequence[PreparedMessage], now: float) -> list[EnqueueResult]:
        """Store messages in one transaction and notify listening workers at its commit."""
        return await self._run(lambda conn: run_plan(conn, enqueue_plan(messages, now)))

    # -- delivery --------------------------------------------------------------------------------

    async def claim_due(
        self,
        owner: str,
        quotas: Sequence[tuple[Lane, int]],
        *,
        limit: int,
        now: float,
        lease_until: float,
    ) -> list[ClaimedMessage]:
        return await self._run(
            lambda conn: _claim(conn, owner, quotas, limit=limit, now=now, lease_until=lease_until)
        )

    async def record(self, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
        return await self._run(lambda conn: _record(conn, owner, outcomes, now))

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        return await self._run(
            lambda conn: _rowcount(
                conn, Q["renew_leases"], {"owner": owner, "lease_until": lease_until}
            )
        )

    async def hand_back(self, owner: str, delivery_ids: Sequence[int] | None, now: float) -> int:
        if delivery_ids is None:
            query, params = Q["hand_back_all"], {"owner": owner, "now": now}
        elif not delivery_ids:
            return 0
        else:
            query = Q["hand_back_some"]
            params = {"owner": owner, "now": now, "ids": list(delivery_ids)}
        return await self._run(lambda conn: _rowcount(conn, query, params))

    async def reap_expired_leases(self, now: float) -> int:
        async def run(conn: Conn) -> int:
            total = 0
            while True:
                reaped = await _rowcount(conn, Q["reap_expired_leases"], {"now": now})
                total += reaped
                if reaped < 1000:
                    return total

        return await self._run(run)

    async def expire_owner_leases(self, owners: Sequence[str], now: float) -> int:
        if not owners:
            return 0
        params = {"owners": list(owners), "now": now}
        return await self._run(lambda conn: _rowcount(conn, Q["expire_owner_leases"], params))

    async def lease_owners(self) -> list[str]:
        async def run(conn: Conn) -> list[str]:
            return [row[0] for row in await _fetch(conn, Q["lease_owners"])]

        return await self._run(run)

    async def next_due_at(self) -> float | None:
        async def run(conn: Conn) -> float | None:
            value = await _scalar(conn, Q["next_due_at"])
            return None if value is None else float(value)

        return await self._run(run)

    async def purge_finished(self, now: float, retention: float, dead_retention: float) -> int:
        params = {"cutoff": now - retention, "dead_cutoff": now - dead_retention}
        total = 0
        while True:  # in slices of 500 messages, each its own short transaction
            removed = await self._run(lambda conn: _rowcount(conn, Q["purge_finished"], params))
            total += removed
            if removed < 500:
                return total

    # -- read side -------------------------------------------------------------------------------

    async def get_message(self, queue_id: str, *, history: bool = False) -> MessageView:
        async def run(conn: Conn) -> MessageView:
            views = await _message_views(conn, [queue_id], history=history)
            if not views:
                raise NotFound(f"no message with id {queue_id}")
            return views[0]

        return await self._run(run, snapshot=True)

    async def get_content(self, queue_id: str) -> bytes:
        async def run(conn: Conn) -> bytes:
            rows = await _fetch(conn, Q["message_content"], {"id": queue_id})
            if not rows:
                raise NotFound(f"no message with id {queue_id}")
            return bytes(rows[0][0])

        return await self._run(run)

    async def list_messages(self, selector: Selector, *, limit: int) -> list[MessageView]:
        async def run(conn: Conn) -> list[MessageView]:
            where, params = _selection(selector, default_states=_PENDING)
            query = Q["list_message_ids"].replace("{selection}", where)
            rows = await _fetch(conn, query, {**params, "limit": limit})
            return await _message_views(conn, [row[0] for row in rows], history=False)

        return await self._run(run, snapshot=True)

    async def page_messages(
        self, selector: Selector, *, after: int, limit: int
    ) -> tuple[list[MessageView], int | None]:
        async def run(conn: Conn) -> tuple[list[MessageView], int | None]:
            where, params = _selection(selector, default_states=_PENDING)
            query = Q["page_rows"].replace("{selection}", where)
            pager = Pager(limit)
            pager.last_row = after
            while not pager.feed(
                [
                    (int(row[0]), str(row[1]))
                    for row in await _fetch(
                        conn, query, {**params, "after": pager.last_row, "limit": pager.chunk}
                    )
                ]
            ):
                pass
            return await _message_views(conn, pager.ids, history=False), pager.next_after

        return await self._run(run, snapshot=True)

    async def stats(self, now: float) -> Stats:
        async def run(conn: Conn) -> Stats:
            rows = await _fetch(conn, Q["counts_by_lane_state"])
            suppression_list = await _scalar(conn, Q["suppression_count"])
            return _stats(rows, now, int(suppression_list))

        return await self._run(run, snapshot=True)

    async def list_dead(self, selector: Selector, *, limit: int) -> list[DeadLetter]:
        async def run(conn: Conn) -> list[DeadLetter]:
            where, params = _selection(selector, default_states=("dead",), forced_states=("dead",))
            query = Q["dead_letters"].replace("{selection}", where)
            rows = await _fetch(
                conn,
                f"{query} ORDER BY d.updated_at DESC, d.id LIMIT %(limit)s",
                {**params, "limit": limit},
            )
            return await _dead_letters(conn, rows, history=False)

        return await self._run(run, snapshot=True)

    async def get_dead(self, queue_id: str) -> list[DeadLetter]:
        async def run(conn: Conn) -> list[DeadLetter]:
            query = Q["dead_letters"].replace(
                "{selection}", "d.queue_id = %(id)s AND d.state = 'dead'"
            )
            rows = await _fetch(conn, f"{query} ORDER BY d.id", {"id": queue_id})
            if not rows:
                exists = await _fetch(conn, Q["message_exists"], {"id": queue_id})
                raise NotFound(
                    f"message {queue_id} has no dead recipient"
                    if exists
                    else f"no message with id {queue_id}"
                )
            return await _dead_letters(conn, rows, history=True)

        return await self._run(run, snapshot=True)

    # -- operator actions ------------------------------------------------------------------------

    async def select_delivery_ids(
        self, selector: Selector, states: Sequence[str], *, after: int, limit: int
    ) -> list[int]:
        where, params = _selection(selector, default_states=states, forced_states=states)
        query = Q["select_delivery_ids"].replace("{selection}", where)

        async def run(conn: Conn) -> list[int]:
            rows = await _fetch(conn, query, {**params, "after": after, "limit": limit})
            return [row[0] for row in rows]

        return await self._run(run)

    async def summarize(self, selector: Selector, states: Sequence[str]) -> list[SelectionCount]:
        where, params = _selection(selector, default_states=states, forced_states=states)
        query = Q["summarize"].replace("{selection}", where)

        async def run(conn: Conn) -> list[SelectionCount]:
            return [
                SelectionCount(Lane(lane), domain, RecipientState(state), _cls(cls), count)
                for lane, domain, state, cls, count in await _fetch(conn, query, params)
            ]

        return await self._run(run)

    async def selected_destinations(self, selector: Selector, states: Sequence[str]) -> list[str]:
        """The destinations the selected deliveries were given at enqueue (MX lookups
        included), so a flush lifts the pause its deliveries actually wait for."""
        where, params = _selection(selector, default_states=states, forced_states=states)
        query = Q["selected_destinations"].replace("{selection}", where)

        async def run(conn: Conn) -> list[str]:
            return [row[0] for row in await _fetch(conn, query, params)]

        return await self._run(run)

    async def export_deliveries(self, delivery_ids: Sequence[int]) -> list[ExportedMessage]:
        return await self._run(lambda conn: _export(conn, list(delivery_ids)), snapshot=True)

    async def flush(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": list(delivery_ids), "now": now}
        return await self._run(lambda conn: _rowcount(conn, Q["flush"], params))

    async def hold(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": list(delivery_ids), "now": now}

        async def run(conn: Conn) -> int:
            held = await _rowcount(conn, Q["hold"], params)
            return held + await _rowcount(conn, Q["hold_after_send"], params)

        return await self._run(run)

    async def release(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": list(delivery_ids), "now": now}

        async def run(conn: Conn) -> int:
            released = await _rowcount(conn, Q["release"], params)
            return released + await _rowcount(conn, Q["release_after_send"], params)

        return await self._run(run)

    async def delete_deliveries(self, delivery_ids: Sequence[int], states: Sequence[str]) -> int:
        params = {"ids": list(delivery_ids), "states": list(states)}

        async def run(conn: Conn) -> int:
            rows = await _fetch(conn, Q["delete_deliveries"], params)
            touched = sorted({row[0] for row in rows})
            if touched:
                await conn.execute(Q["delete_empty_messages"], {"ids": touched})
                # what is left of a message may now all be final
                await conn.execute(Q["mark_done"], {"ids": touched, "now": time.time()})
            return len(rows)

        return await self._run(run)

    async def requeue_dead(self, delivery_ids: Sequence[int], now: float) -> list[float]:
        async def run(conn: Conn) -> list[float]:
            rows = await _fetch(conn, Q["requeue_dead"], {"ids": list(delivery_ids), "now": now})
            if rows:
                await conn.execute(Q["reopen_messages"], {"ids": sorted({r[0] for r in rows})})
            return [max(0.0, now - dead_at) for _q, _a, _c, dead_at in rows]

        return await self._run(run)

    async def import_messages(self, messages: Sequence[ExportedMessage], now: float) -> int:
        return await self._run(lambda conn: _import(conn, messages, now))

    async def dead_groups(self, selector: Selector, *, limit: int) -> list[DeadGroup]:
        where, params = _selection(selector, default_states=("dead",), forced_states=("dead",))
        query = Q["dead_groups"].replace("{selection}", where)

        async def run(conn: Conn) -> list[DeadGroup]:
            return group_dead_letters(await _fetch(conn, query, params), limit)

        return await self._run(run)

    async def shape(self, now: float, edges: Sequence[float], *, limit: int) -> list[ShapeRow]:
        bounds = [0.0, *(float(edge) for edge in edges)]

        async def run(conn: Conn) -> list[ShapeRow]:
            shaped = []
            params = {"now": now, "bounds": bounds, "limit": limit}
            for domain, total, buckets, counts in await _fetch(conn, Q["shape"], params):
                by_bucket = dict(zip(buckets, counts, strict=True))
                shaped.append(
                    ShapeRow(
                        domain=domain,
                        total=total,
                        buckets=tuple(int(by_bucket.get(i, 0)) for i in range(1, len(bounds) + 1)),
                    )
                )
            return shaped

        return await self._run(run)

    # -- throttling ------------------------------------------------------------------------------

    async def defer_unattempted(
        self, owner: str, deferrals: Sequence[tuple[int, float]], now: float, reason: str
    ) -> int:
        first = dict(reversed(deferrals))  # a delivery listed twice: its first time wins
        if not first:
            return 0
        params = {
            "id": list(first),
            "next_attempt_at": list(first.values()),
            "owner": owner,
            "now": now,
            "reason": reason,
        }
        return await self._run(lambda conn: _rowcount(conn, Q["defer_unattempted"], params))

    async def defer_destination(
        self, destination: str, until: float, now: float, reason: str
    ) -> int:
        params = {"destination": destination, "until": until, "now": now, "reason": reason}
        return await self._run(lambda conn: _rowcount(conn, Q["defer_destination"], params))

    async def hasten(self, destination: str | None, now: float, reason: str) -> int:
        params = {"destination": destination, "now": now, "reason": reason}
        query = Q["hasten_all"] if destination is None else Q["hasten_destination"]
        return await self._run(lambda conn: _rowcount(conn, query, params))

    async def save_destination_states(self, statuses: Sequence[DestinationStatus]) -> None:
        # one row per destination (an upsert may not touch a row twice): the last one wins
        latest = {s.destination: s for s in statuses}
        if not latest:
            return
        params = {
            "destination": list(latest),
            "rate": [s.rate for s in latest.values()],
            "paused_until": [s.paused_until for s in latest.values()],
            "reason": [s.reason for s in latest.values()],
            "updated_at": [s.updated_at for s in latest.values()],
        }
        await self._run(lambda conn: _rowcount(conn, Q["save_destination_states"], params))

    async def destination_states(self) -> list[DestinationStatus]:
        async def run(conn: Conn) -> list[DestinationStatus]:
            sending = {name: int(n) for name, n in await _fetch(conn, Q["sending_by_destination"])}
            states = {
                name: DestinationStatus(
                    name, rate, None, paused, reason, sending.get(name, 0), None, at
                )
                for name, rate, paused, reason, at in await _fetch(conn, Q["destination_states"])
            }
            for name, count in sending.items():
                if name not in states:
                    states[name] = DestinationStatus(name, None, None, None, None, count)
            return sorted(states.values(), key=lambda s: s.destination)

        return await self._run(run, snapshot=True)

    async def lift_destinations(self, destinations: Sequence[str] | None, now: float) -> int:
        async def run(conn: Conn) -> int:
            if destinations is None:
                rows = await _fetch(conn, Q["lift_all_destinations"], {"now": now})
                names = [row[0] for row in rows]
            else:
                names = list(destinations)
                await conn.execute(Q["lift_destinations"], {"destinations": names, "now": now})
            return await _rowcount(
                conn, Q["flush_destinations"], {"destinations": names, "now": now}
            )

        return await self._run(run)

    # -- recorded history ------------------------------------------------------------------------

    async def record_samples(self, samples: Sequence[Sample]) -> bool:
        rows = [sample.params() for sample in samples]

        async def run(conn: Conn) -> bool:
            inserted = 0
            for row in rows:
                inserted += await _rowcount(conn, Q["insert_sample"], row)
            return inserted > 0

        return await self._run(run)

    async def samples(self, since: float) -> list[Sample]:
        async def run(conn: Conn) -> list[Sample]:
            rows = await _fetch(conn, Q["samples_since"], {"since": since})
            return [Sample.from_row(row) for row in rows]

        return await self._run(run, snapshot=True)

    async def finished_between(self, start: float, end: float) -> tuple[int, int, int]:
        async def run(conn: Conn) -> tuple[int, int, int]:
            [row] = await _fetch(conn, Q["finished_between"], {"start": start, "end": end})
            return int(row[0]), int(row[1]), int(row[2])

        return await self._run(run, snapshot=True)

    async def attempt_classes_between(self, start: float, end: float) -> Mapping[str, int]:
        async def run(conn: Conn) -> dict[str, int]:
            rows = await _fetch(conn, Q["attempt_classes_between"], {"start": start, "end": end})
            return {str(cls): int(n) for cls, n in rows}

        return await self._run(run, snapshot=True)

    async def destination_replies(self, since: float) -> list[tuple[str, str, int]]:
        async def run(conn: Conn) -> list[tuple[str, str, int]]:
            rows = await _fetch(conn, Q["destination_replies_since"], {"since": since})
            return [(str(d), str(c), int(n)) for d, c, n in rows]

        return await self._run(run, snapshot=True)

    async def purge_samples(self, before: float) -> int:
        return await self._run(lambda conn: _rowcount(conn, Q["purge_samples"], {"before": before}))

    async def recoveries_after(self, after_id: int) -> list[tuple[int, float]]:
        async def run(conn: Conn) -> list[tuple[int, float]]:
            rows = await _fetch(conn, Q["recoveries_after"], {"after": after_id})
            return [(int(i), float(seconds)) for i, seconds in rows]

        return await self._run(run, snapshot=True)

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        query = Q["alert_fire"] if firing else Q["alert_resolve"]
        params = {"name": name, "now": now}
        return bool(await self._run(lambda conn: _rowcount(conn, query, params)))

    async def alerts_firing(self) -> list[tuple[str, float]]:
        async def run(conn: Conn) -> list[tuple[str, float]]:
            return [(str(n), float(t)) for n, t in await _fetch(conn, Q["alerts_firing"])]

        return await self._run(run, snapshot=True)

    # -- suppression -----------------------------------------------------------------------------

    async def list_suppressions(self, *, limit: int) -> list[Suppression]:
        async def run(conn: Conn) -> list[Suppression]:
            return [
                Suppression(
                    address=r[0],
                    created_at=r[1],
                    source=r[2],
                    reason=r[3],
                    code=r[4],
                    enhanced=r[5],
                    text=r[6],
                    queue_id=r[7],
                )
                for r in await _fetch(conn, Q["suppressions"], {"limit": limit})
            ]

        return await self._run(run)

    async def add_suppression(self, suppression: Suppression) -> bool:
        params = _suppression_params(suppression)
        return bool(await self._run(lambda conn: _rowcount(conn, Q["insert_suppression"], params)))

    async def remove_suppression(self, address: str) -> bool:
        params = {"address": address.lower()}
        return bool(await self._run(lambda conn: _rowcount(conn, Q["delete_suppression"], params)))

    async def is_suppressed(self, addresses: Sequence[str]) -> Mapping[str, bool]:
        async def run(conn: Conn) -> Mapping[str, bool]:
            lowered = sorted({a.lower() for a in addresses})
            rows = await _fetch(conn, Q["suppressed_among"], {"addresses": lowered})
            found = {row[0] for row in rows}
            return {a: a.lower() in found for a in addresses}

        return await self._run(run)


# -- statements ------------------------------------------------------------------------------------


async def _fetch(conn: Conn, query: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    cursor = await conn.execute(query, params)
    return await cursor.fetchall()


async def _scalar(conn: Conn, query: str, params: Mapping[str, Any] | None = None) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _rowcount(conn: Conn, query: str, params: Mapping[str, Any]) -> int:
    cursor = await conn.execute(query, params)
    return max(cursor.rowcount, 0)


async def _claim(
    conn: Conn,
    owner: str,
    quotas: Sequence[tuple[Lane, int]],
    *,
    limit: int,
    now: float,
    lease_until: float,
) -> list[ClaimedMessage]:
    """Each lane's quota in the order given, then fill up to ``limit`` from the lanes in that
    order, then the other due recipients of the messages reached (as the SQLite store's
    claim)."""
    rows: list[Row] = []
    params = {"owner": owner, "now": now, "lease_until": lease_until}
    for lane, quota in quotas:
        if quota > 0:
            rows += await _fetch(
                conn, Q["claim_lane"], {**params, "lane": lane.value, "limit": quota}
            )
    for lane, _ in quotas:
        fill = limit - len(rows)
        if fill <= 0:
            break
        rows += await _fetch(conn, Q["claim_lane"], {**params, "lane": lane.value, "limit": fill})
    if not rows:
        return []
    queue_ids = list(dict.fromkeys(row[1] for row in rows))
    rows += await _fetch(conn, Q["claim_rest_of_messages"], {**params, "queue_ids": queue_ids})
    by_message: dict[str, list[Delivery]] = defaultdict(list)
    for row in rows:
        delivery_id, queue_id, address, domain, destination, attempts, deferrals, created, last = (
            row
        )
        by_message[queue_id].append(
            Delivery(
                id=delivery_id,
                address=address,
                domain=domain,
                destination=destination,
                attempts=attempts,
                deferrals=deferrals,
                created_at=created,
                last_class=ReplyClass(last) if last else None,
            )
        )
    claimed = [
        ClaimedMessage(
            queue_id=queue_id,
            lane=Lane(lane_name),
            sender=sender,
            message_id=message_id,
            idempotency_key=key,
            created_at=created_at,
            content=bytes(content),
            deliveries=tuple(sorted(by_message[queue_id], key=lambda d: d.id)),
        )
        for queue_id, lane_name, sender, message_id, key, created_at, content in await _fetch(
            conn, Q["claimed_messages"], {"ids": list(by_message)}
        )
    ]
    claimed.sort(key=lambda m: (m.created_at, m.queue_id))
    return claimed


async def _record(conn: Conn, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
    """One UPDATE for the whole batch, then the attempts, suppressions and finished messages.
    A delivery listed twice gets its first outcome (as in SQLite, the second finds it no longer
    leased)."""
    first: dict[int, Outcome] = {}
    for outcome in outcomes:
        first.setdefault(outcome.delivery_id, outcome)
    if not first:
        return 0
    batch = list(first.values())
    finals = [o.delivery_id for o in batch if o.state in FINAL_STATES]
    if finals:
        await conn.execute(Q["lock_messages_of"], {"ids": finals})
    columns: dict[str, list[Any]] = defaultdict(list)
    for o in batch:
        a = o.attempt
        columns["id"].append(o.delivery_id)
        columns["state"].append(o.state.value)
        columns["attempts"].append(o.attempts)
        columns["deferrals"].append(o.deferrals)
        columns["next_attempt_at"].append(o.next_attempt_at)
        columns["code"].append(a.code if a else None)
        columns["enhanced"].append(a.enhanced if a else None)
        columns["text"].append(a.text if a else None)
        columns["class"].append(a.cls.value if a else None)
        columns["reason"].append(o.reason)
    rows = await _fetch(conn, Q["record_outcomes"], {**columns, "owner": owner, "now": now})
    applied = {delivery_id: (queue_id, address) for delivery_id, queue_id, address in rows}

    attempts: dict[str, list[Any]] = defaultdict(list)
    suppressions: list[dict[str, Any]] = []
    done: set[str] = set()
    for o in batch:
        if o.delivery_id not in applied:
            continue  # no longer ours: deleted or reaped meanwhile
        queue_id, address = applied[o.delivery_id]
        a = o.attempt
        if o.state in FINAL_STATES:
            done.add(queue_id)
        if a is not None:
            attempts["delivery_id"].append(o.delivery_id)
            attempts["at"].append(a.at)
            attempts["class"].append(a.cls.value)
            attempts["code"].append(a.code)
            attempts["enhanced"].append(a.enhanced)
            attempts["text"].append(a.text)
            attempts["relay"].append(a.relay)
            attempts["destination"].append(a.destination)
            attempts["duration_ms"].append(a.duration_ms)
            attempts["counted"].append(a.counted)
        if o.suppress:
            suppressions.append(
                {
                    "address": address.lower(),
                    "created_at": now,
                    "source": "bounce",
                    "reason": a.cls.value if a else "hard_bounce",
                    "code": a.code if a else None,
                    "enhanced": a.enhanced if a else None,
                    "text": a.text if a else None,
                    "queue_id": queue_id,
                }
            )
    if attempts:
        await conn.execute(Q["insert_attempts"], attempts)
    if suppressions:
        async with conn.cursor() as cursor:
            await cursor.executemany(Q["insert_suppression"], suppressions)
    if done:
        await conn.execute(Q["mark_done"], {"ids": sorted(done), "now": now})
    sent = [
        o.delivery_id for o in batch if o.delivery_id in applied and o.state is RecipientState.SENT
    ]
    if sent:  # requeued dead letters that got through: their recovery time
        await conn.execute(Q["record_recoveries"], {"ids": sent, "now": now})
    return len(applied)


#: what an imported recipient comes back as: waiting or being sent -> due now
_IMPORTED_STATE = {
    RecipientState.SENDING: RecipientState.QUEUED,
    RecipientState.QUEUED: RecipientState.QUEUED,
    RecipientState.DEFERRED: RecipientState.QUEUED,
}


async def _import(conn: Conn, messages: Sequence[ExportedMessage], now: float) -> int:
    """Bring back exported messages (as the SQLite store's import): a message already stored
    keeps its row, a recipient already present is skipped, an idempotency key held by another
    message is dropped from the imported one."""
    restored = 0
    for message in messages:
        [(exists, key_held)] = await _fetch(
            conn, Q["message_or_key"], {"id": message.id, "key": message.idempotency_key}
        )
        if not exists:
            await conn.execute(
                Q["import_message"],
                {
                    "id": message.id,
                    "lane": message.lane.value,
                    "sender": message.sender,
                    "subject": message.subject,
                    "message_id": message.message_id,
                    "idempotency_key": None if key_held else message.idempotency_key,
                    "size": len(message.content),
                    "metadata": Jsonb(dict(message.metadata)),
                    "created_at": message.created_at,
                    "content": message.content,
                },
            )
        for r in message.recipients:
            params = {"queue_id": message.id, "address": r.address}
            if await _fetch(conn, Q["delivery_exists"], params):
                continue
            state = _IMPORTED_STATE.get(r.state, r.state)
            reply = r.last_response
            [(delivery_id,)] = await _fetch(
                conn,
                Q["import_delivery"],
                {
                    **params,
                    "domain": r.domain,
                    "destination": r.destination,
                    "lane": message.lane.value,
                    "created_at": r.created_at,
                    "state": state.value,
                    "attempts": r.attempts,
                    "deferrals": r.deferrals,
                    "next_attempt_at": now if state is RecipientState.QUEUED else r.next_attempt_at,
                    "code": reply.code if reply else None,
                    "enhanced": reply.enhanced if reply else None,
                    "text": reply.text if reply else None,
                    "class": reply.cls.value if reply else None,
                    "reason": "imported" if state is not r.state else r.reason,
                    "now": now,
                },
            )
            if r.history:
                await conn.execute(Q["insert_attempts"], _attempt_columns(delivery_id, r.history))
            restored += 1
        await conn.execute(Q["reopen_messages"], {"ids": [message.id]})
        await conn.execute(Q["mark_done"], {"ids": [message.id], "now": now})
    return restored


def _attempt_columns(delivery_id: int, history: Sequence[AttemptView]) -> dict[str, list[Any]]:
    """insert_attempts's parameters for an imported history."""
    return {
        "delivery_id": [delivery_id] * len(history),
        "at": [a.at for a in history],
        "class": [a.cls.value for a in history],
        "code": [a.code for a in history],
        "enhanced": [a.enhanced for a in history],
        "text": [a.text for a in history],
        "relay": [a.relay for a in history],
        "destination": [a.destination for a in history],
        "duration_ms": [a.duration_ms for a in history],
        "counted": [a.counted for a in history],
    }


async def _export(conn: Conn, delivery_ids: list[int]) -> list[ExportedMessage]:
    """Full records of some deliveries, by message (content, recipients, histories)."""
    if not delivery_ids:
        return []
    recipients: dict[str, list[Row]] = defaultdict(list)
    for row in await _fetch(conn, Q["export_recipients"], {"ids": delivery_ids}):
        recipients[row[0]].append(row[1:])
    histories = await _histories(conn, [r[0] for rows in recipients.values() for r in rows])
    messages = {
        row[0]: row
        for row in await _fetch(conn, Q["messages_with_content"], {"ids": list(recipients)})
    }
    exported = []
    for queue_id in recipients:
        _id, lane, sender, subject, message_id, key, metadata, created_at, content = messages[
            queue_id
        ]
        exported.append(
            ExportedMessage(
                id=queue_id,
                lane=Lane(lane),
                sender=sender,
                subject=subject,
                message_id=message_id,
                idempotency_key=key,
                metadata=metadata,
                created_at=created_at,
                content=bytes(content),
                recipients=tuple(
                    ExportedRecipient(
                        address=address,
                        domain=domain,
                        destination=destination,
                        state=RecipientState(state),
                        attempts=attempts,
                        deferrals=deferrals,
                        next_attempt_at=next_at,
                        created_at=created,
                        last_response=_reply(code, enhanced, text, cls),
                        reason=reason,
                        history=histories[delivery_id],
                    )
                    for (
                        delivery_id,
                        address,
                        domain,
                        destination,
                        state,
                        attempts,
                        deferrals,
                        next_at,
                        created,
                        code,
                        enhanced,
                        text,
                        cls,
                        reason,
                    ) in recipients[queue_id]
                ),
            )
        )
    return exported


def _cls(value: Any) -> ReplyClass | None:
    return ReplyClass(value) if value else None


def _suppression_params(s: Suppression) -> dict[str, Any]:
    return {
        "address": s.address.lower(),
        "created_at": s.created_at,
        "source": s.source,
        "reason": s.reason,
        "code": s.code,
        "enhanced": s.enhanced,
        "text": s.text,
        "queue_id": s.queue_id,
    }


# -- read helpers ----------------------------------------------------------------------------------


def _reply(code: Any, enhanced: Any, text: Any, cls: Any) -> Reply | None:
    if cls is None:
        return None
    return Reply(code=code, enhanced=enhanced, text=text or "", cls=ReplyClass(cls))


async def _histories(conn: Conn, delivery_ids: Sequence[int]) -> dict[int, tuple[AttemptView, ...]]:
    """Every attempt of some deliveries, oldest first, in one query."""
    found: dict[int, list[AttemptView]] = defaultdict(list)
    if delivery_ids:
        rows = await _fetch(conn, Q["histories_of"], {"ids": list(delivery_ids)})
        for delivery_id, at, cls, code, enhanced, text, duration_ms, relay, dest, counted in rows:
            found[delivery_id].append(
                AttemptView(
                    at=at,
                    cls=ReplyClass(cls),
                    code=code,
                    enhanced=enhanced,
                    text=text,
                    duration_ms=duration_ms,
                    relay=relay,
                    destination=dest,
                    counted=bool(counted),
                )
            )
    return {delivery_id: tuple(found[delivery_id]) for delivery_id in delivery_ids}


async def _message_views(conn: Conn, ids: Iterable[str], *, history: bool) -> list[MessageView]:
    """Messages with their recipients (and histories), in the order of ``ids``, in three
    queries whatever their number."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return []
    messages = {row[0]: row for row in await _fetch(conn, Q["messages"], {"ids": wanted})}
    recipients: dict[str, list[Row]] = defaultdict(list)
    for row in await _fetch(conn, Q["recipients_of"], {"ids": list(messages)}):
        recipients[row[0]].append(row[1:])
    histories = (
        await _histories(conn, [r[0] for rows in recipients.values() for r in rows])
        if history
        else {}
    )
    views = []
    for queue_id in wanted:
        if queue_id not in messages:
            continue
        _id, lane, sender, subject, message_id, key, size, metadata, created_at, submitter = (
            messages[queue_id]
        )
        views.append(
            MessageView(
                id=queue_id,
                lane=Lane(lane),
                created_at=created_at,
                sender=sender,
                subject=subject,
                size=size,
                message_id=message_id,
                idempotency_key=key,
                metadata=metadata,
                submitter=submitter,
                recipients=tuple(
                    RecipientView(
                        address=address,
                        domain=domain,
                        destination=destination,
                        state=RecipientState(state),
                        attempts=attempts,
                        next_attempt_at=next_at,
                        last_response=_reply(code, enhanced, text, cls),
                        updated_at=updated_at,
                        reason=reason,
                        history=histories[delivery_id] if history else None,
                    )
                    for (
                        delivery_id,
                        address,
                        domain,
                        destination,
                        state,
                        attempts,
                        next_at,
                        code,
                        enhanced,
                        text,
                        cls,
                        updated_at,
                        reason,
                    ) in recipients[queue_id]
                ),
            )
        )
    return views


def _stats(rows: Sequence[Row], now: float, suppression_list: int) -> Stats:
    counts: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    finals: dict[str, int] = defaultdict(int)
    for lane, state, count, min_created in rows:
        counts[(lane, state)] = count
        if state in ("queued", "deferred", "sending") and min_created is not None:
            oldest[lane] = min(oldest.get(lane, min_created), min_created)
        if state in ("sent", "dead", "suppressed"):
            finals[state] += count
    lanes = {
        lane: LaneStats(
            ready=counts.get((lane.value, "queued"), 0),
            deferred=counts.get((lane.value, "deferred"), 0),
            held=counts.get((lane.value, "held"), 0),
            sending=counts.get((lane.value, "sending"), 0),
            oldest_age_seconds=max(0.0, now - oldest[lane.value]) if lane.value in oldest else 0.0,
        )
        for lane in Lane
    }
    return Stats(
        lanes=lanes,
        sent=finals["sent"],
        dead=finals["dead"],
        suppressed=finals["suppressed"],
        suppression_list=suppression_list,
    )


async def _dead_letters(conn: Conn, rows: Sequence[Row], *, history: bool) -> list[DeadLetter]:
    histories = await _histories(conn, [row[0] for row in rows]) if history else {}
    letters = []
    for row in rows:
        (
            delivery_id,
            queue_id,
            address,
            domain,
            destination,
            lane,
            attempts,
            cls,
            dead_at,
            code,
            enhanced,
            text,
            reason,
            sender,
            subject,
            relay,
        ) = row
        reply_class = ReplyClass(cls) if cls else ReplyClass.TEMPORARY
        letters.append(
            DeadLetter(
                id=queue_id,
                address=address,
                domain=domain,
                destination=destination,
                lane=Lane(lane),
                attempts=attempts,
                cls=reply_class,
                dead_at=dead_at,
                last_response=_reply(code, enhanced, text, reply_class.value),
                relay=relay or "",
                reason=reason,
                sender=sender,
                subject=subject,
                history=histories[delivery_id] if history else None,
                delivery_id=delivery_id,
            )
        )
    return letters


def _selection(
    selector: Selector,
    *,
    default_states: Sequence[str],
    forced_states: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause over ``deliveries d`` for a selector (every field narrows). The clause is
    built from fixed fragments only; every value travels as a parameter."""
    states = [s.value for s in selector.states] or list(default_states)
    if forced_states is not None:
        states = [s for s in states if s in forced_states]
    clauses = ["d.state = ANY(%(states)s::text[])"]
    params: dict[str, Any] = {"states": states}
    if selector.ids:
        clauses.append("d.queue_id = ANY(%(ids)s::text[])")
        params["ids"] = list(selector.ids)
    if selector.delivery_ids:
        clauses.append("d.id = ANY(%(delivery_ids)s::bigint[])")
        params["delivery_ids"] = list(selector.delivery_ids)
    if selector.lanes:
        clauses.append("d.lane = ANY(%(lanes)s::text[])")
        params["lanes"] = [lane.value for lane in selector.lanes]
    if selector.domains:
        clauses.append("d.domain = ANY(%(domains)s::text[])")
        params["domains"] = [d.lower() for d in selector.domains]
    if selector.classes:
        clauses.append("d.last_class = ANY(%(classes)s::text[])")
        params["classes"] = [c.value for c in selector.classes]
    if selector.older_than is not None:
        clauses.append("d.created_at <= %(older_than)s")
        params["older_than"] = selector.older_than
    if selector.recipient:
        clauses.append("lower(d.address) = %(recipient)s")
        params["recipient"] = selector.recipient.lower()
    if selector.sender:
        clauses.append("d.queue_id IN (SELECT id FROM messages WHERE lower(sender) = %(sender)s)")
        params["sender"] = selector.sender.lower()
    if selector.metadata:
        # containment of {"key": "value", ...}: each key must hold that JSON string, as
        # SQLite's json_extract(metadata, '$."key"') = 'value' requires
        clauses.append("d.queue_id IN (SELECT id FROM messages WHERE metadata @> %(metadata)s)")
        params["metadata"] = Jsonb(dict(selector.metadata))
    return " AND ".join(clauses), params
