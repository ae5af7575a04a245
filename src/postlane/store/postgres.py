"""The PostgreSQL store: many worker hosts on one database.

The store's operations are written once (:mod:`postlane.store.sqlstore`); this module runs them
on PostgreSQL and adds what PostgreSQL does well with many writers:

- Each method is one transaction on a connection from a psycopg pool, so concurrent callers
  (and other processes and hosts) commit in parallel; PostgreSQL's own group commit shares the
  WAL flushes of concurrent commits.
- Claims lease rows with ``FOR UPDATE SKIP LOCKED``: workers on any number of hosts take
  disjoint batches without waiting on each other (see ``claim_lane`` in ``queries.sql``).
- Enqueues ``NOTIFY postlane_enqueued`` at commit, and :meth:`PostgresStore.wait_for_work` lets
  an idle worker wake on it instead of polling.
- Enqueue can also run on the application's own connection, inside its transaction
  (:mod:`postlane.outbox`): the store's enqueue plan, executed by an async or a sync driver
  on any psycopg connection.

Times are float epoch seconds in ``double precision`` columns, as in SQLite. With ``schema``,
everything lives in that PostgreSQL schema (created if missing), so several postlane
installations (or test runs) can share one database.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from postlane.errors import ConfigError, NoQueue, StoreFull, StoreUnavailable
from postlane.message import PreparedMessage
from postlane.records import EnqueueResult
from postlane.store import delivery
from postlane.store.plans import EMPTY, Dialect, Plan, Result, Statement
from postlane.store.sql import (
    Migration,
    live_owners_sql,
    load_migrations,
    migration_done,
    migration_starts,
    refuse_while_in_use,
)
from postlane.store.sqlstore import SQLStore
from postlane.waits import settle, took

T = TypeVar("T")
Item = TypeVar("Item")
Conn = psycopg.AsyncConnection[Any]

MIGRATIONS = load_migrations("postgres")
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: the version that added the fleet's shares (each live process's presence)
SHARES_FROM = 11
#: how long a migration waits for a table another session holds before it gives up (waiting
#: longer would queue every later statement of every session behind it), how many times it is
#: tried, and the pause before the next try (times the tries so far)
MIGRATION_LOCK_TIMEOUT = "5s"
MIGRATION_TRIES = 3
MIGRATION_RETRY_PAUSE = 1.0

log = logging.getLogger("postlane.store")

#: the LISTEN/NOTIFY channel enqueues notify on (the payload names the tables' schema)
CHANNEL = "postlane_enqueued"
#: the channel a pause or a lift of a destination notifies on (same payload)
DESTINATIONS_CHANNEL = "postlane_destinations"
#: a transaction PostgreSQL rolled back to break a deadlock is run again this many times in all
TRANSACTION_TRIES = 3


class PostgresDialect(Dialect):
    """PostgreSQL's SQL: psycopg's ``%(named)s`` parameters, arrays as arrays, row locks."""

    row_locks = True
    notify_query = "notify_enqueued"
    notify_destinations_query = "notify_destinations"

    def param(self, name: str) -> str:
        return f"%({name})s"

    def render(self, text: str) -> str:
        """A shared query with psycopg's placeholders (``:name`` is ``%(name)s`` here)."""
        return super().render(re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", text))

    def any_of(self, column: str, param: str, sql_type: str) -> str:
        return f"{column} = ANY(%({param})s::{sql_type}[])"

    def rows_of(self, columns: Sequence[tuple[str, str]]) -> str:
        """The batch's columns travel as arrays; ``unnest`` turns them back into rows."""
        arrays = ", ".join(f"%({name})s::{sql_type}[]" for name, sql_type in columns)
        return f"SELECT * FROM unnest({arrays})"

    def metadata_matches(
        self, metadata: Mapping[str, str], params: dict[str, Any], alias: str
    ) -> str:
        # containment of {"key": "value", ...}: each key must hold that JSON string
        params["metadata"] = Jsonb(dict(metadata))
        return f"{alias}.metadata @> %(metadata)s"


DIALECT = PostgresDialect("postgres")
#: every named query, as this database runs it
Q = DIALECT.queries


def _columns(statement: Statement) -> dict[str, Any]:
    """A batch's rows as parallel arrays (``unnest`` turns them back into rows)."""
    assert statement.rows is not None
    columns: dict[str, Any] = {name: [] for name in statement.rows[0]}
    for row in statement.rows:
        for name, value in row.items():
            columns[name].append(value)
    return {**statement.params, **columns}


def _prepared(statement: Statement) -> tuple[str, Mapping[str, Any]] | None:
    if statement.rows is None:
        return DIALECT.sql(statement), statement.params
    if not statement.rows:
        return None
    return DIALECT.sql(statement), _columns(statement)


class _Steps(Generic[T]):
    """A plan's statements as PostgreSQL runs them (an empty batch is answered at once), for
    an async or a blocking driver; ``value`` is the plan's result once ``next`` gives None."""

    def __init__(self, plan: Plan[T]) -> None:
        self.plan = plan
        self.result: Result | None = None
        self.value: T

    def answer(self, found: Sequence[Any], rowcount: int) -> None:
        self.result = Result(list(found), max(rowcount, 0))

    def next(self) -> tuple[str, Mapping[str, Any]] | None:
        try:
            statement = self.plan.send(self.result) if self.result else next(self.plan)
            while (prepared := _prepared(statement)) is None:
                statement = self.plan.send(EMPTY)
        except StopIteration as done:
            self.value = done.value
            return None
        return prepared


async def run_plan(conn: psycopg.AsyncConnection[Any], plan: Plan[T]) -> T:
    """Execute a plan on an async connection, in its current transaction (no commit)."""
    steps = _Steps(plan)
    while (prepared := steps.next()) is not None:
        async with conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(*prepared)
            steps.answer(await cursor.fetchall() if cursor.description else [], cursor.rowcount)
    return steps.value


def run_plan_sync(conn: psycopg.Connection[Any], plan: Plan[T]) -> T:
    """Execute a plan on a blocking connection, in its current transaction (no commit)."""
    steps = _Steps(plan)
    while (prepared := steps.next()) is not None:
        with conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(*prepared)
            steps.answer(cursor.fetchall() if cursor.description else [], cursor.rowcount)
    return steps.value


def enqueue_plan(messages: list[PreparedMessage], now: float) -> Plan[list[EnqueueResult]]:
    """The store's enqueue, notifying listening workers at the commit (the outbox's too)."""
    return delivery.enqueue_plan(messages, now, DIALECT.notify_query)


def in_schema(plan: Plan[T], schema: str | None) -> Plan[T]:
    """Run ``plan`` with the search_path set to ``schema`` for its statements only: the
    caller's transaction gets its own search_path back afterwards (the transactional outbox)."""
    if schema is None:
        return (yield from plan)
    saved = yield Statement("search_path")
    yield Statement("set_search_path", {"schema": schema, "local": True})
    result = yield from plan
    yield Statement("restore_search_path", {"search_path": saved.rows[0]["search_path"]})
    return result


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


# -- the database ----------------------------------------------------------------------------------


#: transactions of one kind of combined write running at once: one commits while the next
#: gathers the calls that arrive meanwhile
COMBINED_IN_FLIGHT = 2
#: calls in one combined transaction at most
COMBINED_MAX_ITEMS = 256


class _Combiner:
    """PostgreSQL's group commit for one kind of write (enqueues). While
    :data:`COMBINED_IN_FLIGHT` transactions of the kind run, new calls wait, and then go
    together in the next one. Each enqueue's transaction sends a NOTIFY, and PostgreSQL commits
    notifying transactions one at a time (a database-wide lock), so a hundred concurrent
    enqueues would otherwise queue for their commits. Should a shared transaction fail, each of
    its calls runs alone, so that a failure (an idempotency conflict) is only its caller's."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._run = run
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls that ran in a transaction shared with others
        self.combined = 0

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._in_flight < COMBINED_IN_FLIGHT:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Any, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch = self._waiting[:COMBINED_MAX_ITEMS]
                del self._waiting[:COMBINED_MAX_ITEMS]
                await self._run_batch(batch)
                batch = []
        except BaseException as exc:  # cancelled (the store closing): no caller waits forever
            for _item, future in batch + self._waiting:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"the write was interrupted ({exc!r})"))
            self._waiting.clear()
            raise
        finally:
            self._in_flight -= 1

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                settle(batch[0][1], None, exc)
                return
            alone = await asyncio.gather(
                *(self._run([item]) for item, _ in batch), return_exceptions=True
            )
            for (_item, future), outcome in zip(batch, alone, strict=True):
                if isinstance(outcome, BaseException):
                    settle(future, None, outcome)
                else:
                    settle(future, outcome[0], None)
            return
        if len(batch) > 1:
            self.combined += len(batch)
        for (_item, future), result in zip(batch, results, strict=True):
            settle(future, result, None)


class PostgresDatabase:
    """One PostgreSQL database (optionally one schema of it): a connection pool for plans, a
    dedicated connection for LISTEN, migrations under an advisory lock."""

    dialect: Dialect = DIALECT

    def __init__(
        self,
        url: str,
        *,
        schema: str | None,
        min_size: int,
        max_size: int,
        timeout: float,
        create: bool = True,
    ) -> None:
        conninfo, url_schema = split_schema(url)
        #: False: a database (or schema) without postlane's tables is an error, not a new
        #: empty queue made in it (an operator's command pointed at the wrong one)
        self._create = create
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
        #: set when any process pauses or lifts a destination (heard on the LISTEN connection)
        self._destination_news = asyncio.Event()
        #: the notification payload meant for this store (the schema of its tables)
        self._payload: str | None = None
        #: each combine function's gatherer of concurrent calls (write_combined)
        self._combiners: dict[Callable[[list[Any]], Plan[list[Any]]], _Combiner] = {}
        #: what opening did to the schema (None: nothing)
        self.migration: Migration | None = None

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
            configure=self._configure_pooled,
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

    async def _configure_pooled(self, conn: Conn) -> None:
        """A pooled connection waits for a lock at most the pool's timeout: a table another
        session holds (a long transaction, an older postlane's migration) makes an enqueue a
        ``503 store_unavailable`` within it, not a request that hangs until the client gives
        up and retries what was then stored anyway (a durability audit)."""
        await self._configure(conn)
        timeout = f"{max(1, round(self._timeout * 1000))}ms"
        await conn.execute(Q["session_lock_timeout"], {"timeout": timeout})

    async def _migrate(self) -> None:
        """Apply pending migrations in one transaction, under an advisory lock: several
        processes starting together wait for the first, then find nothing left to do. A table
        other sessions hold (an older postlane still running, or a long transaction) makes
        the migration give up after :data:`MIGRATION_LOCK_TIMEOUT` rather than queue every
        session of the database behind it; it is tried again, then refused in one line."""
        for attempt in range(1, MIGRATION_TRIES + 1):
            try:
                await self._migrate_once()
                return
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "lock timeout"
                if attempt == MIGRATION_TRIES:
                    raise StoreUnavailable(
                        f"cannot migrate {self.description}: its tables stay in use by other "
                        f"sessions ({reason}); stop every older postlane using it, then run "
                        "`postlane migrate` (docs/upgrading.md)"
                    ) from None
                log.warning(
                    "migrating %s: its tables are in use (%s); trying again",
                    self.description,
                    reason,
                )
                await asyncio.sleep(MIGRATION_RETRY_PAUSE * attempt)

    async def _migrate_once(self) -> None:
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
                    # (a schema made just above goes with the transaction this undoes)
                    if not self._create and not await _scalar(conn, Q["version_table_exists"]):
                        raise NoQueue(
                            f"there is no postlane queue in {self.description} (postlane "
                            "serve, postlane worker or postlane migrate creates it; check "
                            "store.url and its ?schema=)"
                        )
                    if not await _scalar(conn, Q["version_table_exists"]):
                        await conn.execute(Q["create_version_table"])
                    version = await _scalar(conn, Q["schema_version"])
                    if version > SCHEMA_VERSION:
                        raise StoreUnavailable(
                            f"the database {self.description} is at schema version {version}, "
                            f"newer than this postlane ({SCHEMA_VERSION}); upgrade postlane "
                            "(docs/upgrading.md)"
                        )
                    if version == SCHEMA_VERSION:
                        return
                    migration_starts(
                        self.description, version, SCHEMA_VERSION, allowed=self._create
                    )
                    if version > 0:
                        owners = live_owners_sql(version, SHARES_FROM, "%(now)s")
                        found = await conn.execute(owners, {"now": time.time()})
                        refuse_while_in_use(
                            self.description, [r[0] for r in await found.fetchall()]
                        )
                    started = time.monotonic()
                    await conn.execute(
                        Q["migration_lock_timeout"], {"timeout": MIGRATION_LOCK_TIMEOUT}
                    )
                    for number, name, text in MIGRATIONS:
                        if number > version:
                            await conn.execute(text)
                            await conn.execute(
                                Q["record_migration"], {"version": number, "name": name}
                            )
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
                raise
            except psycopg.Error as exc:
                raise self._unavailable(exc) from exc
        self.migration = Migration(
            self.description, version, SCHEMA_VERSION, time.monotonic() - started
        )
        migration_done(self.migration)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        failure = StoreFull if isinstance(exc, psycopg.errors.DiskFull) else StoreUnavailable
        return failure(f"cannot use the PostgreSQL database {self.description}: {_first_line(exc)}")

    async def write(self, plan: Callable[[], Plan[T]]) -> T:
        return await self._run(plan, snapshot=False)

    @property
    def combined(self) -> int:
        return sum(combiner.combined for combiner in self._combiners.values())

    async def write_combined(self, combine: Callable[[list[Item]], Plan[list[T]]], item: Item) -> T:
        """Calls with the same ``combine`` share transactions (see :class:`_Combiner`)."""
        combiner = self._combiners.get(combine)
        if combiner is None:

            async def run(items: list[Any]) -> list[Any]:
                return await self._run(lambda: combine(items), snapshot=False)

            combiner = self._combiners[combine] = _Combiner(run)
        result: T = await combiner.submit(item)
        return result

    async def read(self, plan: Callable[[], Plan[T]]) -> T:
        return await self._run(plan, snapshot=True)

    def enqueued(self) -> None:
        """Other processes hear of it through NOTIFY, sent in the enqueue's transaction."""

    def destinations_changed(self) -> None:
        """Other processes hear of it through NOTIFY, sent in the same transaction."""
        self._destination_news.set()

    async def wait_for_destination_news(self, timeout: float) -> bool:
        """Heard while some task of this process waits for work (:meth:`wait_for_work` reads
        the LISTEN connection): a worker always does between claims."""
        return await took(self._destination_news, timeout)

    async def _run(self, plan: Callable[[], Plan[T]], *, snapshot: bool) -> T:
        """A plan in one transaction on a pooled connection. A transaction PostgreSQL rolled
        back to break a deadlock or a serialisation conflict is run again; connection trouble
        becomes :class:`StoreUnavailable`. ``snapshot``: one consistent view for all reads."""
        if self._pool is None:
            raise StoreUnavailable(f"the PostgreSQL store {self.description} is not open")
        tries = stale = 0
        while True:
            tries += 1
            conn: Conn | None = None
            begun = False
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    begun = True
                    if snapshot:
                        await conn.execute(Q["read_snapshot"])
                    return await run_plan(conn, plan())
            except psycopg.errors.TransactionRollback as exc:
                if tries >= TRANSACTION_TRIES:
                    raise self._unavailable(exc) from exc
            except psycopg.OperationalError as exc:
                # A pooled connection the server ended while it waited in the pool (a restart,
                # an administrator) fails at its BEGIN: nothing was sent, the pool drops it,
                # and the next is tried; each used to cost a client a 503. Only for the
                # server's own word: a connection lost to the network (the server may be gone)
                # fails at once, as before, rather than wait for the pool while it reconnects
                # (the wait pushed its reconnection back past the server's return)
                ended = isinstance(exc, psycopg.errors.AdminShutdown)
                if (
                    ended
                    and conn is not None
                    and conn.broken
                    and not begun
                    and stale <= self._max_size
                ):
                    stale += 1
                    tries -= 1
                    log.info("a pooled PostgreSQL connection had been closed: %s", _first_line(exc))
                    continue
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
                self._destination_news.set()  # what was missed meanwhile: read it again
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
        except BaseException:  # cancelled: a worker woken by something else stops waiting
            await conn.close()
            raise
        return conn

    async def _next_notification(self, conn: Conn, timeout: float) -> bool:
        """Whether a notification for this store arrives within ``timeout`` (0: already here)."""
        async with aclosing(conn.notifies(timeout=max(0.0, timeout))) as notifications:
            async for notification in notifications:
                if notification.payload != self._payload:
                    continue  # a store in another schema of the same database
                if notification.channel == CHANNEL:
                    return True
                if notification.channel == DESTINATIONS_CHANNEL:
                    self._destination_news.set()
        return False


# -- the store -------------------------------------------------------------------------------------


class PostgresStore(SQLStore):
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
        create: bool = True,
    ) -> None:
        self.postgres = PostgresDatabase(
            url,
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            create=create,
        )
        super().__init__(self.postgres)

    @property
    def combined(self) -> int:
        """How many writes ran in a transaction shared with others (enqueues, as one plan)."""
        return self.postgres.combined

    @property
    def schema(self) -> str | None:
        return self.postgres.schema

    @property
    def _listener(self) -> Conn | None:
        """The dedicated LISTEN connection (tests cut it to check it is replaced)."""
        return self.postgres._listener

    async def drop_schema(self) -> None:
        """Drop the store's schema and everything in it (tests; a deliberate uninstall)."""
        await self.postgres.drop_schema()


async def _scalar(conn: Conn, query: str, params: Mapping[str, Any] | None = None) -> Any:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    return None if row is None else row[0]


def _first_line(exc: BaseException) -> str:
    """What an error says, in one line (psycopg's add the server's detail on more)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
