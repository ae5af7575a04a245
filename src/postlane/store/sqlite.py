"""The SQLite store: the embedded default.

One writer thread owns the only writing connection. Every write is a job on its queue; the thread
runs all jobs waiting at that moment in one ``BEGIN IMMEDIATE ... COMMIT`` (each job under its own
savepoint, so one failing job does not undo the others) and only then resolves their futures.
That is group commit: under load, a hundred concurrent enqueues cost one fsync, not a hundred,
and each caller still hears back only after its data is durable (WAL, ``synchronous=FULL``).

Reads run on a small pool of reader threads with their own connections; WAL lets them read while
the writer writes. Other processes (the CLI next to ``postlane serve``, the processes of
``serve --processes N``) open the same file; their writer threads take turns on a lock file
beside it (``_Turns``), SQLite's own lock (``busy_timeout``) staying the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from postlane.errors import NoQueue, StoreFull, StoreUnavailable
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
from postlane.waits import in_own_thread, report, take_queued, took

T = TypeVar("T")
Item = TypeVar("Item")
MIGRATIONS = load_migrations("sqlite")
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: the version that added the fleet's shares (each live process's presence)
SHARES_FROM = 13

#: how long a writer waits for another process's write lock before giving up
BUSY_TIMEOUT_MS = 10_000
#: the line that marks a migration rebuilding a table (run with foreign keys off)
FOREIGN_KEYS_OFF = "-- postlane: foreign keys off"
#: most jobs in one group commit (bounds the transaction, not the queue)
MAX_JOBS_PER_COMMIT = 256


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with postlane's settings: WAL, full fsync on commit, foreign keys."""
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
        cached_statements=512,  # the named queries, and their short-array forms
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA cache_size = -65536")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode = WAL``, tried again while another process holds the file: the
    switch takes an exclusive lock without waiting for the busy timeout, so processes opening a
    new database together (a Django project and its ``postlane_events``) would otherwise fail
    with "database is locked" (tests/integration/test_sqlite_files.py)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # in the opening thread, never on an event loop
        pause = min(pause * 2, 0.1)


def migrate(
    conn: sqlite3.Connection, *, allowed: bool = True, description: str = "the SQLite database"
) -> int:
    """Bring a database to :data:`SCHEMA_VERSION`; each step is one transaction. ``allowed``
    False: an older schema is refused, not migrated (see :func:`migration_starts`)."""
    mode = _switch_to_wal(conn)
    if mode.lower() != "wal":
        raise StoreUnavailable(f"cannot switch the SQLite database to WAL mode (got {mode})")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{description} is at schema version {version}, newer than this postlane "
            f"({SCHEMA_VERSION}); upgrade postlane (docs/upgrading.md)"
        )
    if version < SCHEMA_VERSION:
        migration_starts(description, version, SCHEMA_VERSION, allowed=allowed)
        if version > 0:
            owners = conn.execute(
                live_owners_sql(version, SHARES_FROM, ":now"), {"now": time.time()}
            )
            refuse_while_in_use(description, [row[0] for row in owners.fetchall()])
    for number, _name, sql in MIGRATIONS:
        if number <= version:
            continue
        # a migration that rebuilds a table runs with foreign keys off (a dropped parent must
        # not cascade), and checks them before it commits; the pragma is a no-op in a transaction
        rebuilds = FOREIGN_KEYS_OFF in sql
        if rebuilds:
            conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another process opening the same new file may have got here first (a Django
            # project and its postlane_events started together): read the version again
            # under the write lock
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= number:
                conn.execute("COMMIT")
                version = number
                continue
            for statement in _split_statements(sql):
                conn.execute(statement)
            if rebuilds and conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise StoreUnavailable(f"migration {number} would break a foreign key")
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            if rebuilds:
                conn.execute("PRAGMA foreign_keys = ON")
        version = number
    return version


def _split_statements(sql: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows where each ends)."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current.append(line)
        candidate = "".join(current)
        if sqlite3.complete_statement(candidate):
            statements.append(candidate.strip())
            current = []
    if "".join(current).strip():
        statements.append("".join(current).strip())
    return statements


#: runs the items of several jobs as one: their results, in order
Combine = Callable[[sqlite3.Connection, list[Any]], list[Any]]


@dataclass
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    #: jobs with the same ``combine`` in one group commit run as one call over their items
    combine: Combine | None = None
    item: Any = None


#: what became of one job: its result, or its error
_Outcome = tuple[_Job, Any, BaseException | None]


def _report(outcomes: list[_Outcome]) -> None:
    """Resolve the futures, one wake-up per event loop (not one per job)."""
    report([(job.loop, job.future, result, error) for job, result, error in outcomes])


def _groups(batch: list[_Job]) -> list[list[_Job]]:
    """The jobs of a group commit in order, those sharing a ``combine`` together at the place
    of their first (concurrent writes: any order of them is one they could have run in)."""
    groups: list[list[_Job]] = []
    by_combine: dict[Combine, list[_Job]] = {}
    for job in batch:
        if job.combine is None:
            groups.append([job])
        elif (group := by_combine.get(job.combine)) is not None:
            group.append(job)
        else:
            by_combine[job.combine] = group = [job]
            groups.append(group)
    return groups


class _Writer:
    """The writer thread: runs queued jobs in group commits (see the module docstring)."""

    def __init__(
        self, path: Path, max_jobs: int = MAX_JOBS_PER_COMMIT, *, may_migrate: bool = True
    ) -> None:
        self._path = path
        self._max_jobs = max_jobs
        self._may_migrate = may_migrate
        #: what opening did to the schema (None: nothing)
        self.migration: Migration | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="postlane-sqlite-writer", daemon=True
        )
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        #: the turns every process's writer takes (None: the lock file could not be made)
        self._turns: _Turns | None = None
        self.commits = 0
        #: jobs that ran combined with others of their kind (see write_combined)
        self.combined = 0

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def submit(
        self,
        run: Callable[[sqlite3.Connection], T],
        combine: Combine | None = None,
        item: Any = None,
    ) -> asyncio.Future[T]:
        """Queue a job; ``combine`` and ``item``: it may run with others of its kind, as
        ``combine(conn, items)`` (see :meth:`SQLiteDatabase.write_combined`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._thread.is_alive():
            future.set_exception(StoreUnavailable("the SQLite store is closed"))
            return future
        self._jobs.put(_Job(run, loop, future, combine, item))
        return future

    def _run(self) -> None:
        try:
            conn = connect(self._path)
            before = int(conn.execute("PRAGMA user_version").fetchone()[0])
            started = time.monotonic()
            description = f"sqlite:///{self._path}"
            after = migrate(conn, allowed=self._may_migrate, description=description)
            if after != before:
                self.migration = Migration(description, before, after, time.monotonic() - started)
                migration_done(self.migration)
        except BaseException as exc:  # reported to open()
            self._start_error = _unavailable(exc, self._path)
            self._started.set()
            return
        self._turns = _open_turns(self._path, BUSY_TIMEOUT_MS / 1000)
        self._started.set()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                turns = self._turns if self._turns is not None and self._turns.take() else None
                # gathered once the turn is ours: what arrived while another process wrote
                # goes in this commit, not in one more after it
                batch, stop = take_queued(self._jobs, job, self._max_jobs)
                self._commit(conn, batch, turns)
                if stop:
                    return
        finally:
            conn.close()
            if self._turns is not None:
                self._turns.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job], turns: _Turns | None) -> None:
        """The batch's transaction, holding ``turns`` (taken by the caller) until it ends."""
        try:
            outcomes = self._transaction(conn, batch)
        finally:
            if turns is not None:
                turns.give_back()  # before waking the callers: the next process goes first
        _report(outcomes)

    def _transaction(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[_Outcome]:
        """The batch's transaction; what became of each job (reported by the caller)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            refusal = _unavailable(exc, self._path)
            return [(job, None, refusal) for job in batch]
        outcomes: list[_Outcome] = []
        try:
            if len(batch) == 1:
                job = batch[0]
                try:
                    outcomes.append((job, job.run(conn), None))
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    return [(job, None, _translate(exc))]
            else:
                for group in _groups(batch):
                    if len(group) == 1 or not self._run_combined(conn, group, outcomes):
                        for job in group:
                            self._run_alone(conn, job, outcomes)
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = _unavailable(exc, self._path)
            return [(job, None, failure) for job in batch]
        return outcomes

    @staticmethod
    def _run_alone(conn: sqlite3.Connection, job: _Job, outcomes: list[_Outcome]) -> None:
        """One job of a group commit, under its own savepoint: its failure undoes only it."""
        conn.execute("SAVEPOINT job")
        try:
            result = job.run(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            outcomes.append((job, None, _translate(exc)))
        else:
            outcomes.append((job, result, None))
        conn.execute("RELEASE job")

    def _run_combined(
        self, conn: sqlite3.Connection, group: list[_Job], outcomes: list[_Outcome]
    ) -> bool:
        """Jobs of one kind as one call; False (nothing done) when it failed."""
        combine = group[0].combine
        assert combine is not None
        conn.execute("SAVEPOINT combined")
        try:
            results = combine(conn, [job.item for job in group])
        except Exception:
            conn.execute("ROLLBACK TO combined")
            conn.execute("RELEASE combined")
            return False
        conn.execute("RELEASE combined")
        self.combined += len(group)
        outcomes.extend((job, result, None) for job, result in zip(group, results, strict=True))
        return True


def _translate(exc: Exception) -> BaseException:
    """Any database error is the store's failure (a locked, full or corrupted file): callers
    answer it as such (SMTP 421, HTTP 503), never as a refusal of what they were given."""
    if isinstance(exc, sqlite3.Error):
        return _failure(exc)(f"SQLite: {exc}")
    return exc


def _failure(exc: sqlite3.Error) -> type[StoreUnavailable]:
    """A full disk (``SQLITE_FULL``, extended codes included) is told apart: SMTP clients are
    told so."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        StoreFull if code is not None and code & 0xFF == sqlite3.SQLITE_FULL else StoreUnavailable
    )


def _unavailable(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        return _failure(exc)(f"cannot use the SQLite database {path}: {exc}")
    return exc


class SQLiteDialect(Dialect):
    """SQLite's SQL: ``:named`` parameters, arrays as JSON read with ``json_each``."""

    def param(self, name: str) -> str:
        return f":{name}"

    def any_of(self, column: str, param: str, sql_type: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(:{param}))"

    def rows_of(self, columns: Sequence[tuple[str, str]]) -> str:
        """One row a run: a batch runs once per row."""
        return "VALUES (" + ", ".join(f":{name}" for name, _ in columns) + ")"

    def metadata_matches(
        self, metadata: Mapping[str, str], params: dict[str, Any], alias: str
    ) -> str:
        clauses = []
        for i, (key, value) in enumerate(metadata.items()):
            params[f"mk{i}"] = "$." + json.dumps(key)
            params[f"mv{i}"] = value
            clauses.append(f"json_extract({alias}.metadata, :mk{i}) = :mv{i}")
        return " AND ".join(clauses)


DIALECT = SQLiteDialect("sqlite")
#: every named query, as this database runs it
Q = DIALECT.queries


def _bound(params: Mapping[str, Any], arrays: frozenset[str]) -> Mapping[str, Any]:
    """Parameters as sqlite3 binds them: an array as its JSON text (for json_each). Most
    statements have no array: they keep their mapping as it is (this runs for every row)."""
    if not arrays:
        return params
    bound = dict(params)
    for name in arrays:
        if type(params.get(name)) in _ARRAYS:
            bound[name] = json.dumps(list(params[name]))
    return bound


@functools.cache
def _arrays_of(sql: str) -> frozenset[str]:
    """The parameters a statement reads as arrays (``json_each(:name)``): only these are
    looked at, not every parameter of every row."""
    return frozenset(re.findall(r"json_each\(:(\w+)\)", sql))


_ARRAYS = (list, tuple)
#: arrays up to this long are bound as a list of parameters instead of a JSON text: json_each
#: costs about 20 µs a statement, a few times what the statement itself does for one message
#: (docs/benchmarks.md, "Durable enqueues")
SHORT_ARRAY = 8


def _with_short_arrays(sql: str, params: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``col IN (SELECT value FROM json_each(:ids))`` as ``col IN (:ids_0, :ids_1)`` for each
    short array parameter: the statement texts per length stay few (sqlite3 caches them)."""
    bound: dict[str, Any] | None = None
    for name, value in params.items():
        if type(value) not in _ARRAYS or len(value) > SHORT_ARRAY:
            continue
        form = f"IN (SELECT value FROM json_each(:{name}))"
        if form not in sql:
            continue
        if bound is None:
            bound = dict(params)
        del bound[name]
        names = [f"{name}__{i}" for i in range(len(value))]
        sql = sql.replace(form, "IN (" + ", ".join(":" + n for n in names) + ")")
        bound.update(zip(names, value, strict=True))
    return sql, params if bound is None else bound


def _execute(conn: sqlite3.Connection, statement: Statement) -> Result:
    sql = DIALECT.sql(statement)
    if statement.rows is None:
        sql, params = _with_short_arrays(sql, statement.params)
        cursor = conn.execute(sql, _bound(params, _arrays_of(sql)))
        found = cursor.fetchall()
        return Result(found, cursor.rowcount if cursor.rowcount >= 0 else len(found))
    if not statement.rows:
        return EMPTY
    arrays = _arrays_of(sql)
    shared = _bound(statement.params, arrays)
    rows = (
        [{**shared, **_bound(row, arrays)} for row in statement.rows]
        if shared
        else [_bound(row, arrays) for row in statement.rows]
    )
    if not _returns_rows(sql):  # one call, sqlite3 loops over the rows in C
        cursor = conn.executemany(sql, rows)
        return Result([], max(cursor.rowcount, 0))
    found, changed = [], 0
    for params in rows:  # in-process: a statement per row costs no round trip
        cursor = conn.execute(sql, params)
        found += cursor.fetchall()
        changed += max(cursor.rowcount, 0)
    return Result(found, changed)


@functools.cache
def _returns_rows(sql: str) -> bool:
    """Whether a batch statement answers each row (``executemany`` cannot fetch them)."""
    return "RETURNING" in sql.upper() or sql.lstrip().upper().startswith("SELECT")


def run_plan(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Execute a plan on a connection, in its current transaction."""
    try:
        statement = next(plan)
        while True:
            statement = plan.send(_execute(conn, statement))
    except StopIteration as done:
        result: T = done.value
        return result


def _open_turns(path: Path, timeout: float) -> _Turns | None:
    """The lock file beside the database that writers of all processes queue on (None where
    it cannot be made: a read-only folder, SQLite's lock alone then)."""
    try:
        fd = os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    return _Turns(fd, timeout)


@dataclass
class _TurnRequest:
    granted: threading.Event = field(default_factory=threading.Event)
    #: set once a turn taken after its writer stopped waiting has been given back
    released: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Turns:
    """Whose turn it is to write, among every process's writer (a lock file's ``flock``).

    SQLite's own lock makes a second writer sleep and retry (1, 2, 5, 10 ms ... as its busy
    handler backs off), so with two ``serve`` processes every collision cost milliseconds and
    two processes delivered less than one. Waiting for this file's lock in the kernel hands the
    turn over the moment the other commit ends. Never for longer than SQLite would wait: a
    holder that hangs (a stopped ``postlane`` command in the middle of a commit) is waited for
    ``timeout``, then writes go ahead without turns until it lets go, and SQLite's lock, which
    stays the guard either way, refuses them as before (``StoreUnavailable``)."""

    def __init__(self, fd: int, timeout: float) -> None:
        self._fd = fd
        self._timeout = timeout
        self._requests: queue.SimpleQueue[_TurnRequest | None] = queue.SimpleQueue()
        self._waiter: threading.Thread | None = None
        #: a turn given up on, still awaited: no turns until it has come and gone
        self._stuck: _TurnRequest | None = None

    def take(self) -> bool:
        """Whether this writer holds the turn now (then :meth:`give_back` after the commit)."""
        if self._stuck is not None:
            if not self._stuck.released.is_set():
                return False
            self._stuck = None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False  # a file system without flock: SQLite's lock alone
        # blocking, but in a thread of its own, so that the wait has an end
        if self._waiter is None:
            self._waiter = threading.Thread(
                target=self._wait, name="postlane-sqlite-turns", daemon=True
            )
            self._waiter.start()
        request = _TurnRequest()
        self._requests.put(request)
        request.granted.wait(self._timeout)
        with request.lock:
            if request.granted.is_set():
                return True
            request.abandoned = True
        self._stuck = request
        return False

    def give_back(self) -> None:
        with contextlib.suppress(OSError):  # a lock it cannot drop ends with the descriptor
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _wait(self) -> None:
        while (request := self._requests.get()) is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with request.lock:
                if not request.abandoned:
                    request.granted.set()
                    continue
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            request.released.set()

    def close(self) -> None:
        if self._waiter is not None:
            self._requests.put(None)
        if self._stuck is None or self._stuck.released.is_set():
            os.close(self._fd)
        # else the waiting thread still has the descriptor (a daemon: it ends with the process)


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only: it holds whole messages. SQLite
    gives its WAL and shared-memory files the database file's permissions."""
    # its directory must exist: a mistyped path made a new directory and an empty queue, and
    # serve ran on it as if the mail were gone
    if not path.parent.is_dir():
        raise StoreUnavailable(
            f"cannot create {path}: {path.parent} is not a directory (create it, or correct "
            "[store] url)"
        )
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {path}: {exc.strerror}") from None


class SQLiteDatabase:
    """One SQLite file: the writer thread for writes, a pool of reader threads for reads."""

    dialect: Dialect = DIALECT

    def __init__(
        self, path: Path, *, readers: int, max_jobs_per_commit: int, create: bool = True
    ) -> None:
        self.path = path
        #: whether opening may create the file (operator commands only read an existing queue)
        self.create = create
        self.description = f"sqlite:///{path}"
        #: the writer thread (its counters: commits, combined); it migrates only a store it
        #: may create (serve, worker, migrate, the library), never for an operator's command
        self.writer = _Writer(path, max_jobs_per_commit, may_migrate=create)
        self._readers = readers
        self._reader_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: set when an enqueue of this process commits (wait_for_work)
        self._enqueued = asyncio.Event()
        #: set when a pause or lift of this process commits (wait_for_destination_news)
        self._destination_news = asyncio.Event()
        #: each combine function's job runner (the key that groups its jobs)
        self._combiners: dict[Callable[[list[Any]], Plan[list[Any]]], Combine] = {}

    @property
    def migration(self) -> Migration | None:
        """What opening did to the schema (None: nothing)."""
        return self.writer.migration

    async def open(self) -> None:
        if not self.path.exists():
            if not self.create:
                raise NoQueue(
                    f"there is no queue at {self.path} (postlane serve, postlane worker or "
                    "postlane migrate creates it)"
                )
            _create_private(self.path)
        await asyncio.to_thread(self.writer.start)
        self._reader_pool = ThreadPoolExecutor(
            self._readers, thread_name_prefix="postlane-sqlite-read"
        )

    async def close(self) -> None:
        # in a thread of its own: a store closed by an atexit handler (the Django backend's, a
        # script's) finds the default executor already shut down
        await in_own_thread(self.writer.stop)
        if self._reader_pool is not None:
            self._reader_pool.shutdown(wait=True)
            self._reader_pool = None
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def write(self, plan: Callable[[], Plan[T]]) -> T:
        return await self.writer.submit(lambda conn: run_plan(conn, plan()))

    async def write_combined(self, combine: Callable[[list[Item]], Plan[list[T]]], item: Item) -> T:
        """The jobs of one group commit that share ``combine`` run as one plan: under load, a
        hundred enqueues cost a few statements, not a few hundred."""
        key = self._combiners.get(combine)
        if key is None:
            key = self._combiners[combine] = lambda conn, items: run_plan(conn, combine(items))
        return await self.writer.submit(lambda conn: key(conn, [item])[0], key, item)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def read(self, plan: Callable[[], Plan[T]]) -> T:
        if self._reader_pool is None:
            raise StoreUnavailable("the SQLite store is not open")

        def in_thread() -> T:
            try:
                conn = self._reader()
                conn.execute("BEGIN")  # one snapshot for multi-statement reads
            except sqlite3.Error as exc:
                raise _unavailable(exc, self.path) from exc
            try:
                result = run_plan(conn, plan())
            except BaseException as exc:
                # end the snapshot; a failure to do so must not hide what went wrong first
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")
                if isinstance(exc, sqlite3.Error):
                    raise _unavailable(exc, self.path) from exc
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:  # a damaged file can fail even here
                raise _unavailable(exc, self.path) from exc
            return result

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, in_thread)

    def enqueued(self) -> None:
        self._enqueued.set()

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait for an enqueue of this process (other processes' are found by polling)."""
        return await took(self._enqueued, timeout)

    def destinations_changed(self) -> None:
        self._destination_news.set()

    async def wait_for_destination_news(self, timeout: float) -> bool:
        """This process's pauses and lifts (other processes' are read at the next sync)."""
        return await took(self._destination_news, timeout)


class SQLiteStore(SQLStore):
    """The :class:`postlane.store.base.Store` on one SQLite file."""

    def __init__(
        self,
        path: Path | str,
        *,
        readers: int = 2,
        max_jobs_per_commit: int = MAX_JOBS_PER_COMMIT,
        create: bool = True,
    ) -> None:
        """``max_jobs_per_commit=1`` turns group commit off (one fsync per write; for
        measuring what group commit buys). ``create=False``: opening a file that does not
        exist is an error, not a new empty queue."""
        self.path = Path(path)
        self.sqlite = SQLiteDatabase(
            self.path, readers=readers, max_jobs_per_commit=max_jobs_per_commit, create=create
        )
        super().__init__(self.sqlite)

    @property
    def commits(self) -> int:
        """How many write transactions committed (tests and benchmarks check group commit)."""
        return self.sqlite.writer.commits

    @property
    def combined(self) -> int:
        """How many writes ran combined with others of their kind (enqueues, as one plan)."""
        return self.sqlite.writer.combined
