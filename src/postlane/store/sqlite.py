"""The SQLite store: the embedded default.

One writer thread owns the only writing connection. Every write is a job on its queue; the thread
runs all jobs waiting at that moment in one ``BEGIN IMMEDIATE ... COMMIT`` (each job under its own
savepoint, so one failing job does not undo the others) and only then resolves their futures.
That is group commit: under load, a hundred concurrent enqueues cost one fsync, not a hundred,
and each caller still hears back only after its data is durable (WAL, ``synchronous=FULL``).

Reads run on a small pool of reader threads with their own connections; WAL lets them read while
the writer writes. Other processes (the CLI next to ``postlane serve``) open the same file and
wait on SQLite's lock (``busy_timeout``) when they write.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from postlane.classify import ReplyClass
from postlane.errors import NotFound, StoreUnavailable
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
Q = load_queries("sqlite")
MIGRATIONS = load_migrations("sqlite")
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: how long a writer waits for another process's write lock before giving up
BUSY_TIMEOUT_MS = 10_000
#: most jobs in one group commit (bounds the transaction, not the queue)
MAX_JOBS_PER_COMMIT = 256
_PENDING = ("queued", "sending", "deferred", "held")


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with postlane's settings: WAL, full fsync on commit, foreign keys."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA cache_size = -65536")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a database to :data:`SCHEMA_VERSION`; each step is one transaction."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreUnavailable(f"cannot switch the SQLite database to WAL mode (got {mode})")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the database is at schema version {version}, newer than this postlane "
            f"({SCHEMA_VERSION}); upgrade postlane"
        )
    for number, _name, sql in MIGRATIONS:
        if number <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
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


@dataclass
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Writer:
    """The writer thread: runs queued jobs in group commits (see the module docstring)."""

    def __init__(self, path: Path, max_jobs: int = MAX_JOBS_PER_COMMIT) -> None:
        self._path = path
        self._max_jobs = max_jobs
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="postlane-sqlite-writer", daemon=True
        )
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.commits = 0

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def submit(self, run: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._thread.is_alive():
            future.set_exception(StoreUnavailable("the SQLite store is closed"))
            return future
        self._jobs.put(_Job(run, loop, future))
        return future

    def _run(self) -> None:
        try:
            conn = connect(self._path)
            migrate(conn)
        except BaseException as exc:  # reported to open()
            self._start_error = _unavailable(exc, self._path)
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < self._max_jobs:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            refusal = _unavailable(exc, self._path)
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, refusal)
            return
        try:
            for job in batch:
                if len(batch) == 1:
                    try:
                        outcomes.append((job, job.run(conn), None))
                    except Exception as exc:
                        conn.execute("ROLLBACK")
                        job.loop.call_soon_threadsafe(_settle, job.future, None, _translate(exc))
                        return
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    result = job.run(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    outcomes.append((job, None, _translate(exc)))
                else:
                    outcomes.append((job, result, None))
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = _unavailable(exc, self._path)
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, failure)
            return
        for job, result, error in outcomes:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _translate(exc: Exception) -> BaseException:
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailable(f"SQLite: {exc}")
    return exc


def _unavailable(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"cannot use the SQLite database {path}: {exc}")
    return exc


class SQLiteStore:
    """The :class:`postlane.store.base.Store` on one SQLite file."""

    def __init__(
        self, path: Path | str, *, readers: int = 2, max_jobs_per_commit: int = MAX_JOBS_PER_COMMIT
    ) -> None:
        """``max_jobs_per_commit=1`` turns group commit off (one fsync per write; for
        measuring what group commit buys)."""
        self.path = Path(path)
        self.description = f"sqlite:///{self.path}"
        self._writer = _Writer(self.path, max_jobs_per_commit)
        self._readers = readers
        self._reader_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: set when an enqueue of this process commits (wait_for_work)
        self._enqueued = asyncio.Event()

    # -- plumbing --------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {self.path.parent}: {exc.strerror}") from None
        await asyncio.to_thread(self._writer.start)
        self._reader_pool = ThreadPoolExecutor(
            self._readers, thread_name_prefix="postlane-sqlite-read"
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.stop)
        if self._reader_pool is not None:
            self._reader_pool.shutdown(wait=True)
            self._reader_pool = None
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    @property
    def commits(self) -> int:
        """How many write transactions committed (tests and benchmarks check group commit)."""
        return self._writer.commits

    async def _write(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(run)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader_pool is None:
            raise StoreUnavailable("the SQLite store is not open")

        def in_thread() -> T:
            conn = self._reader()
            conn.execute("BEGIN")  # one snapshot for multi-statement reads
            try:
                return run(conn)
            except sqlite3.Error as exc:
                raise _unavailable(exc, self.path) from exc
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, in_thread)

    # -- ingest ----------------------------------------------------------------------------------

    async def enqueue(self, messages: Sequence[PreparedMessage], now: float) -> list[EnqueueResult]:
        results = await self._write(lambda conn: _enqueue(conn, messages, now))
        self._enqueued.set()
        return results

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait for an enqueue of this process (other processes' are found by polling)."""
        try:
            await asyncio.wait_for(self._enqueued.wait(), timeout=max(0.0, timeout))
        except TimeoutError:
            return False
        self._enqueued.clear()
        return True

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
        return await self._write(
            lambda conn: _claim(conn, owner, quotas, limit=limit, now=now, lease_until=lease_until)
        )

    async def record(self, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
        return await self._write(lambda conn: _record(conn, owner, outcomes, now))

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        return await self._write(
            lambda conn: (
                conn.execute(
                    Q["renew_leases"], {"owner": owner, "lease_until": lease_until}
                ).rowcount
            )
        )

    async def hand_back(self, owner: str, delivery_ids: Sequence[int] | None, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            if delivery_ids is None:
                return int(conn.execute(Q["hand_back_all"], {"owner": owner, "now": now}).rowcount)
            return sum(
                conn.execute(Q["hand_back_one"], {"owner": owner, "now": now, "id": i}).rowcount
                for i in delivery_ids
            )

        return await self._write(run)

    async def reap_expired_leases(self, now: float) -> int:
        return await self._write(lambda conn: _reap(conn, now))

    async def expire_owner_leases(self, owners: Sequence[str], now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(Q["expire_owner_leases"], {"owner": o, "now": now}).rowcount
                for o in owners
            )

        return await self._write(run)

    async def lease_owners(self) -> list[str]:
        return await self._read(lambda conn: [r[0] for r in conn.execute(Q["lease_owners"])])

    async def next_due_at(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            value = conn.execute(Q["next_due_at"]).fetchone()[0]
            return None if value is None else float(value)

        return await self._read(run)

    async def purge_finished(self, now: float, retention: float, dead_retention: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            ids = conn.execute(
                Q["finished_messages"],
                {"cutoff": now - retention, "dead_cutoff": now - dead_retention},
            ).fetchall()
            for (queue_id,) in ids:
                conn.execute(Q["delete_message"], {"id": queue_id})
            return len(ids)

        total = 0
        while True:  # in slices, so the writer is never held for long
            removed = await self._write(run)
            total += removed
            if removed < 500:
                return total

    # -- read side -------------------------------------------------------------------------------

    async def get_message(self, queue_id: str, *, history: bool = False) -> MessageView:
        def run(conn: sqlite3.Connection) -> MessageView:
            views = _message_views(conn, [queue_id], history=history)
            if not views:
                raise NotFound(f"no message with id {queue_id}")
            return views[0]

        return await self._read(run)

    async def get_content(self, queue_id: str) -> bytes:
        def run(conn: sqlite3.Connection) -> bytes:
            row = conn.execute(Q["message_content"], {"id": queue_id}).fetchone()
            if row is None:
                raise NotFound(f"no message with id {queue_id}")
            return bytes(row[0])

        return await self._read(run)

    async def list_messages(self, selector: Selector, *, limit: int) -> list[MessageView]:
        def run(conn: sqlite3.Connection) -> list[MessageView]:
            where, params = _where(selector, default_states=_PENDING)
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT queue_id, min(created_at) AS c, min(id) AS first FROM deliveries d "
                    f"WHERE {where} GROUP BY queue_id ORDER BY c, first LIMIT :limit",
                    {**params, "limit": limit},
                )
            ]
            return _message_views(conn, ids, history=False)

        return await self._read(run)

    async def page_messages(
        self, selector: Selector, *, after: int, limit: int
    ) -> tuple[list[MessageView], int | None]:
        def run(conn: sqlite3.Connection) -> tuple[list[MessageView], int | None]:
            where, params = _where(selector, default_states=_PENDING)
            query = Q["page_rows"].replace("{selection}", where)
            pager = Pager(limit)
            pager.last_row = after
            while not pager.feed(
                conn.execute(
                    query, {**params, "after": pager.last_row, "limit": pager.chunk}
                ).fetchall()
            ):
                pass
            return _message_views(conn, pager.ids, history=False), pager.next_after

        return await self._read(run)

    async def stats(self, now: float) -> Stats:
        def run(conn: sqlite3.Connection) -> Stats:
            rows = conn.execute(Q["counts_by_lane_state"]).fetchall()
            suppression_list = int(conn.execute(Q["suppression_count"]).fetchone()[0])
            return _stats(rows, now, suppression_list)

        return await self._read(run)

    async def list_dead(self, selector: Selector, *, limit: int) -> list[DeadLetter]:
        def run(conn: sqlite3.Connection) -> list[DeadLetter]:
            where, params = _where(selector, default_states=("dead",), forced_states=("dead",))
            rows = conn.execute(
                f"{_DEAD_SELECT} WHERE {where} ORDER BY d.updated_at DESC, d.id LIMIT :limit",
                {**params, "limit": limit},
            ).fetchall()
            return [_dead_letter(conn, row, history=False) for row in rows]

        return await self._read(run)

    async def get_dead(self, queue_id: str) -> list[DeadLetter]:
        def run(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                f"{_DEAD_SELECT} WHERE d.queue_id = :id AND d.state = 'dead' ORDER BY d.id",
                {"id": queue_id},
            ).fetchall()
            if not rows:
                exists = conn.execute(Q["message"], {"id": queue_id}).fetchone()
                raise NotFound(
                    f"message {queue_id} has no dead recipient"
                    if exists
                    else f"no message with id {queue_id}"
                )
            return [_dead_letter(conn, row, history=True) for row in rows]

        return await self._read(run)

    # -- operator actions ------------------------------------------------------------------------

    async def select_delivery_ids(
        self, selector: Selector, states: Sequence[str], *, after: int, limit: int
    ) -> list[int]:
        def run(conn: sqlite3.Connection) -> list[int]:
            where, params = _where(selector, default_states=states, forced_states=states)
            return [
                row[0]
                for row in conn.execute(
                    f"SELECT d.id FROM deliveries d WHERE {where} AND d.id > :after "
                    "ORDER BY d.id LIMIT :limit",
                    {**params, "after": after, "limit": limit},
                )
            ]

        return await self._read(run)

    async def summarize(self, selector: Selector, states: Sequence[str]) -> list[SelectionCount]:
        def run(conn: sqlite3.Connection) -> list[SelectionCount]:
            where, params = _where(selector, default_states=states, forced_states=states)
            return [
                SelectionCount(Lane(lane), domain, RecipientState(state), _cls(cls), count)
                for lane, domain, state, cls, count in conn.execute(
                    "SELECT lane, domain, state, last_class, count(*) FROM deliveries d "
                    f"WHERE {where} GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2",
                    params,
                )
            ]

        return await self._read(run)

    async def selected_destinations(self, selector: Selector, states: Sequence[str]) -> list[str]:
        """The destinations the selected deliveries were given at enqueue (MX lookups
        included), so a flush lifts the pause its deliveries actually wait for."""

        def run(conn: sqlite3.Connection) -> list[str]:
            where, params = _where(selector, default_states=states, forced_states=states)
            return [
                row[0]
                for row in conn.execute(
                    f"SELECT DISTINCT destination FROM deliveries d WHERE {where} ORDER BY 1",
                    params,
                )
            ]

        return await self._read(run)

    async def export_deliveries(self, delivery_ids: Sequence[int]) -> list[ExportedMessage]:
        def run(conn: sqlite3.Connection) -> list[ExportedMessage]:
            ids = json.dumps(list(delivery_ids))
            return [
                _exported(conn, queue_id, ids)
                for (queue_id,) in conn.execute(Q["queue_ids_of"], {"ids": ids}).fetchall()
            ]

        return await self._read(run)

    async def flush(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": json.dumps(list(delivery_ids)), "now": now}
        return await self._write(lambda conn: int(conn.execute(Q["flush"], params).rowcount))

    async def hold(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": json.dumps(list(delivery_ids)), "now": now}

        def run(conn: sqlite3.Connection) -> int:
            held = conn.execute(Q["hold"], params).rowcount
            return int(held + conn.execute(Q["hold_after_send"], params).rowcount)

        return await self._write(run)

    async def release(self, delivery_ids: Sequence[int], now: float) -> int:
        params = {"ids": json.dumps(list(delivery_ids)), "now": now}

        def run(conn: sqlite3.Connection) -> int:
            released = conn.execute(Q["release"], params).rowcount
            return int(released + conn.execute(Q["release_after_send"], params).rowcount)

        return await self._write(run)

    async def delete_deliveries(self, delivery_ids: Sequence[int], states: Sequence[str]) -> int:
        return await self._write(lambda conn: _delete(conn, list(delivery_ids), list(states)))

    async def requeue_dead(self, delivery_ids: Sequence[int], now: float) -> list[float]:
        return await self._write(lambda conn: _requeue(conn, list(delivery_ids), now))

    async def import_messages(self, messages: Sequence[ExportedMessage], now: float) -> int:
        return await self._write(lambda conn: _import(conn, messages, now))

    async def dead_groups(self, selector: Selector, *, limit: int) -> list[DeadGroup]:
        def run(conn: sqlite3.Connection) -> list[DeadGroup]:
            where, params = _where(selector, default_states=("dead",), forced_states=("dead",))
            rows = conn.execute(
                "SELECT last_class, domain, last_code, last_enhanced, last_text, count(*), "
                "min(updated_at), max(updated_at), min(queue_id) "
                f"FROM deliveries d WHERE {where} GROUP BY 1, 2, 3, 4, 5",
                params,
            ).fetchall()
            return group_dead_letters(rows, limit)

        return await self._read(run)

    async def shape(self, now: float, edges: Sequence[float], *, limit: int) -> list[ShapeRow]:
        def run(conn: sqlite3.Connection) -> list[ShapeRow]:
            bounds = [0.0, *edges]
            columns = [
                f"sum(CASE WHEN :now - created_at >= {lo!r} AND :now - created_at < {hi!r} "
                "THEN 1 ELSE 0 END)"
                for lo, hi in itertools.pairwise(bounds)
            ]
            columns.append(f"sum(CASE WHEN :now - created_at >= {bounds[-1]!r} THEN 1 ELSE 0 END)")
            sql = (
                f"SELECT domain, count(*), {', '.join(columns)} FROM deliveries "
                "WHERE state IN ('queued', 'deferred', 'sending') "
                "GROUP BY domain ORDER BY 2 DESC, 1 LIMIT :limit"
            )
            return [
                ShapeRow(domain=row[0], total=row[1], buckets=tuple(int(v) for v in row[2:]))
                for row in conn.execute(sql, {"now": now, "limit": limit})
            ]

        return await self._read(run)

    # -- throttling ------------------------------------------------------------------------------

    async def defer_unattempted(
        self,
        owner: str,
        deferrals: Sequence[tuple[int, float]],
        now: float,
        reason: str,
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(
                    Q["defer_unattempted"],
                    {"id": i, "owner": owner, "next_attempt_at": t, "now": now, "reason": reason},
                ).rowcount
                for i, t in deferrals
            )

        return await self._write(run)

    async def defer_destination(
        self, destination: str, until: float, now: float, reason: str
    ) -> int:
        params = {"destination": destination, "until": until, "now": now, "reason": reason}
        return await self._write(
            lambda conn: int(conn.execute(Q["defer_destination"], params).rowcount)
        )

    async def hasten(self, destination: str | None, now: float, reason: str) -> int:
        params = {"destination": destination, "now": now, "reason": reason}
        query = Q["hasten_all"] if destination is None else Q["hasten_destination"]
        return await self._write(lambda conn: int(conn.execute(query, params).rowcount))

    async def save_destination_states(self, statuses: Sequence[DestinationStatus]) -> None:
        rows = [
            {
                "destination": s.destination,
                "rate": s.rate,
                "paused_until": s.paused_until,
                "reason": s.reason,
                "updated_at": s.updated_at,
            }
            for s in statuses
        ]
        await self._write(lambda conn: conn.executemany(Q["save_destination_state"], rows))

    async def destination_states(self) -> list[DestinationStatus]:
        def run(conn: sqlite3.Connection) -> list[DestinationStatus]:
            sending = dict(conn.execute(Q["sending_by_destination"]).fetchall())
            states = {
                name: DestinationStatus(
                    name, rate, None, paused, reason, sending.get(name, 0), None, at
                )
                for name, rate, paused, reason, at in conn.execute(Q["destination_states"])
            }
            for name, count in sending.items():
                if name not in states:
                    states[name] = DestinationStatus(name, None, None, None, None, count)
            return sorted(states.values(), key=lambda s: s.destination)

        return await self._read(run)

    async def lift_destinations(self, destinations: Sequence[str] | None, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            if destinations is None:
                conn.execute(Q["lift_all_destinations"], {"now": now})
                names = [r[0] for r in conn.execute("SELECT destination FROM destination_state")]
            else:
                names = list(destinations)
                for name in names:
                    conn.execute(Q["lift_destination"], {"destination": name, "now": now})
            return int(
                conn.execute(
                    Q["flush_destinations"], {"destinations": json.dumps(names), "now": now}
                ).rowcount
            )

        return await self._write(run)

    # -- recorded history ------------------------------------------------------------------------

    async def record_samples(self, samples: Sequence[Sample]) -> bool:
        rows = [sample.params() for sample in samples]

        def run(conn: sqlite3.Connection) -> bool:
            return sum(conn.execute(Q["insert_sample"], row).rowcount for row in rows) > 0

        return await self._write(run)

    async def samples(self, since: float) -> list[Sample]:
        def run(conn: sqlite3.Connection) -> list[Sample]:
            return [
                Sample.from_row(row) for row in conn.execute(Q["samples_since"], {"since": since})
            ]

        return await self._read(run)

    async def finished_between(self, start: float, end: float) -> tuple[int, int, int]:
        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            params = {"start": start, "end": end}
            sent = conn.execute(Q["sent_between"], params).fetchone()[0]
            dead, hard = conn.execute(Q["dead_between"], params).fetchone()
            return int(sent), int(dead), int(hard)

        return await self._read(run)

    async def attempt_classes_between(self, start: float, end: float) -> Mapping[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(Q["attempt_classes_between"], {"start": start, "end": end})
            return {str(cls): int(n) for cls, n in rows}

        return await self._read(run)

    async def destination_replies(self, since: float) -> list[tuple[str, str, int]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            rows = conn.execute(Q["destination_replies_since"], {"since": since})
            return [(str(d), str(c), int(n)) for d, c, n in rows]

        return await self._read(run)

    async def purge_samples(self, before: float) -> int:
        return await self._write(
            lambda conn: int(conn.execute(Q["purge_samples"], {"before": before}).rowcount)
        )

    async def recoveries_after(self, after_id: int) -> list[tuple[int, float]]:
        def run(conn: sqlite3.Connection) -> list[tuple[int, float]]:
            return [
                (int(i), float(s))
                for i, s in conn.execute(Q["recoveries_after"], {"after": after_id})
            ]

        return await self._read(run)

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        query = Q["alert_fire"] if firing else Q["alert_resolve"]
        params = {"name": name, "now": now}
        return await self._write(lambda conn: bool(conn.execute(query, params).rowcount))

    async def alerts_firing(self) -> list[tuple[str, float]]:
        return await self._read(
            lambda conn: [(n, float(t)) for n, t in conn.execute(Q["alerts_firing"])]
        )

    # -- suppression -----------------------------------------------------------------------------

    async def list_suppressions(self, *, limit: int) -> list[Suppression]:
        def run(conn: sqlite3.Connection) -> list[Suppression]:
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
                for r in conn.execute(Q["suppressions"], {"limit": limit})
            ]

        return await self._read(run)

    async def add_suppression(self, suppression: Suppression) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(Q["insert_suppression"], _suppression_params(suppression))
            return bool(cursor.rowcount)

        return await self._write(run)

    async def remove_suppression(self, address: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(Q["delete_suppression"], {"address": address.lower()}).rowcount
            )

        return await self._write(run)

    async def is_suppressed(self, addresses: Sequence[str]) -> Mapping[str, bool]:
        def run(conn: sqlite3.Connection) -> Mapping[str, bool]:
            found = _suppressed(conn, [a.lower() for a in addresses])
            return {a: a.lower() in found for a in addresses}

        return await self._read(run)


# -- the jobs (run in the writer thread) ---------------------------------------------------------


def _suppressed(conn: sqlite3.Connection, lowered: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(lowered), 500):
        chunk = lowered[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT address FROM suppressions WHERE address IN ({marks})", chunk
            )
        )
    return found


def _enqueue(
    conn: sqlite3.Connection, messages: Sequence[PreparedMessage], now: float
) -> list[EnqueueResult]:
    from postlane.destinations import destination_for

    has_suppressions = conn.execute("SELECT 1 FROM suppressions LIMIT 1").fetchone() is not None
    results: list[EnqueueResult] = []
    for message in messages:
        if message.idempotency_key is not None:
            row = conn.execute(
                Q["message_by_idempotency_key"], {"key": message.idempotency_key}
            ).fetchone()
            if row is not None:
                results.append(EnqueueResult(id=row[0], duplicate=True))
                continue
        suppressed = (
            _suppressed(conn, [r.address.lower() for r in message.recipients])
            if has_suppressions
            else set()
        )
        all_suppressed = len(suppressed) == len(message.recipients)
        conn.execute(
            Q["insert_message"],
            {
                "id": message.id,
                "lane": message.lane.value,
                "sender": message.sender,
                "subject": message.subject,
                "message_id": message.message_id,
                "idempotency_key": message.idempotency_key,
                "size": message.size,
                "metadata": json.dumps(message.metadata, separators=(",", ":")),
                "created_at": now,
                "done_at": now if all_suppressed else None,
                "submitter": message.submitter,
                "content": message.content,
            },
        )
        conn.executemany(
            Q["insert_delivery"],
            [
                {
                    "queue_id": message.id,
                    "address": r.address,
                    "domain": r.domain,
                    "destination": r.destination or destination_for(r.domain),
                    "lane": message.lane.value,
                    "created_at": now,
                    "state": "suppressed" if r.address.lower() in suppressed else "queued",
                    "reason": "on the suppression list"
                    if r.address.lower() in suppressed
                    else None,
                }
                for r in message.recipients
            ],
        )
        results.append(EnqueueResult(id=message.id, duplicate=False))
    return results


def _claim(
    conn: sqlite3.Connection,
    owner: str,
    quotas: Sequence[tuple[Lane, int]],
    *,
    limit: int,
    now: float,
    lease_until: float,
) -> list[ClaimedMessage]:
    rows: list[tuple[Lane, Any]] = []
    params = {"owner": owner, "now": now, "lease_until": lease_until}
    for lane, quota in quotas:
        if quota > 0:
            claimed = conn.execute(Q["claim_lane"], {**params, "lane": lane.value, "limit": quota})
            rows.extend((lane, row) for row in claimed.fetchall())
    for lane, _ in quotas:
        fill = limit - len(rows)
        if fill <= 0:
            break
        claimed = conn.execute(Q["claim_lane"], {**params, "lane": lane.value, "limit": fill})
        rows.extend((lane, row) for row in claimed.fetchall())
    if not rows:
        return []
    lanes = {row[1]: lane for lane, row in rows}
    rest = conn.execute(
        Q["claim_rest_of_messages"], {**params, "queue_ids": json.dumps(list(lanes))}
    ).fetchall()
    rows.extend((lanes[row[1]], row) for row in rest)
    by_message: dict[str, list[Delivery]] = defaultdict(list)
    for _lane, row in rows:
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
    claimed_messages: list[ClaimedMessage] = []
    ids = list(by_message)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for queue_id, lane_name, sender, message_id, key, created_at, content in conn.execute(
            "SELECT id, lane, sender, message_id, idempotency_key, created_at, content "
            f"FROM messages WHERE id IN ({marks})",
            chunk,
        ):
            deliveries = sorted(by_message[queue_id], key=lambda d: d.id)
            claimed_messages.append(
                ClaimedMessage(
                    queue_id=queue_id,
                    lane=Lane(lane_name),
                    sender=sender,
                    message_id=message_id,
                    idempotency_key=key,
                    created_at=created_at,
                    content=bytes(content),
                    deliveries=tuple(deliveries),
                )
            )
    claimed_messages.sort(key=lambda m: (m.created_at, m.queue_id))
    return claimed_messages


def _record(conn: sqlite3.Connection, owner: str, outcomes: Sequence[Outcome], now: float) -> int:
    attempts: list[dict[str, Any]] = []
    touched: set[str] = set()
    applied = 0
    for outcome in outcomes:
        attempt = outcome.attempt
        row = conn.execute(
            Q["record_outcome"],
            {
                "id": outcome.delivery_id,
                "owner": owner,
                "state": outcome.state.value,
                "attempts": outcome.attempts,
                "deferrals": outcome.deferrals,
                "next_attempt_at": outcome.next_attempt_at,
                "code": attempt.code if attempt else None,
                "enhanced": attempt.enhanced if attempt else None,
                "text": attempt.text if attempt else None,
                "class": attempt.cls.value if attempt else None,
                "reason": outcome.reason,
                "now": now,
            },
        ).fetchone()
        if row is None:
            continue  # no longer ours: deleted or reaped meanwhile
        applied += 1
        queue_id, address = row
        if outcome.state in FINAL_STATES:
            touched.add(queue_id)
        if outcome.state is RecipientState.SENT:  # a requeued dead letter recovered?
            params = {"id": outcome.delivery_id, "now": now}
            if conn.execute(Q["insert_recovery"], params).rowcount:
                conn.execute(Q["clear_dead_since"], params)
        if attempt is not None:
            attempts.append(
                {
                    "delivery_id": outcome.delivery_id,
                    "at": attempt.at,
                    "class": attempt.cls.value,
                    "code": attempt.code,
                    "enhanced": attempt.enhanced,
                    "text": attempt.text,
                    "relay": attempt.relay,
                    "destination": attempt.destination,
                    "duration_ms": attempt.duration_ms,
                    "counted": int(attempt.counted),
                }
            )
        if outcome.suppress:
            conn.execute(
                Q["insert_suppression"],
                {
                    "address": address.lower(),
                    "created_at": now,
                    "source": "bounce",
                    "reason": attempt.cls.value if attempt else "hard_bounce",
                    "code": attempt.code if attempt else None,
                    "enhanced": attempt.enhanced if attempt else None,
                    "text": attempt.text if attempt else None,
                    "queue_id": queue_id,
                },
            )
    if attempts:
        conn.executemany(Q["insert_attempt"], attempts)
    for queue_id in touched:
        conn.execute(Q["mark_done"], {"queue_id": queue_id, "now": now})
    return applied


def _reap(conn: sqlite3.Connection, now: float) -> int:
    total = 0
    while True:
        rows = conn.execute(Q["expired_leases"], {"now": now}).fetchall()
        for delivery_id, owner, destination in rows:
            text = f"worker {owner} stopped without recording a result (lease expired)"
            if conn.execute(
                Q["reap_lease"], {"id": delivery_id, "now": now, "text": text}
            ).rowcount:
                conn.execute(
                    Q["insert_attempt"],
                    {
                        "delivery_id": delivery_id,
                        "at": now,
                        "class": ReplyClass.TEMPORARY.value,
                        "code": None,
                        "enhanced": None,
                        "text": text,
                        "relay": "",
                        "destination": destination,
                        "duration_ms": 0,
                        "counted": 1,
                    },
                )
                total += 1
        if len(rows) < 1000:
            return total


def _delete(conn: sqlite3.Connection, delivery_ids: list[int], states: list[str]) -> int:
    params = {"ids": json.dumps(delivery_ids), "states": json.dumps(states)}
    rows = conn.execute(Q["delete_deliveries"], params).fetchall()
    now = time.time()
    for queue_id in {row[0] for row in rows}:
        conn.execute(Q["delete_empty_message"], {"queue_id": queue_id})
        conn.execute(Q["mark_done"], {"queue_id": queue_id, "now": now})
    return len(rows)


def _requeue(conn: sqlite3.Connection, delivery_ids: list[int], now: float) -> list[float]:
    ids = json.dumps(delivery_ids)
    dead = conn.execute(Q["dead_for_requeue"], {"ids": ids}).fetchall()
    conn.execute(Q["requeue_dead"], {"ids": ids, "now": now})
    for _id, queue_id, _address, _cls, _dead_at in dead:
        conn.execute(Q["reopen_message"], {"queue_id": queue_id})
    return [max(0.0, now - row[4]) for row in dead]


#: what an imported recipient comes back as: waiting or being sent -> due now
_IMPORTED_STATE = {
    RecipientState.SENDING: RecipientState.QUEUED,
    RecipientState.QUEUED: RecipientState.QUEUED,
    RecipientState.DEFERRED: RecipientState.QUEUED,
}


def _import(conn: sqlite3.Connection, messages: Sequence[ExportedMessage], now: float) -> int:
    restored = 0
    for message in messages:
        if conn.execute(Q["message"], {"id": message.id}).fetchone() is None:
            key = message.idempotency_key
            if (
                key is not None
                and conn.execute(Q["message_by_idempotency_key"], {"key": key}).fetchone()
            ):
                key = None  # another message holds the key now; keep this one all the same
            conn.execute(
                Q["insert_message"],
                {
                    "id": message.id,
                    "lane": message.lane.value,
                    "sender": message.sender,
                    "subject": message.subject,
                    "message_id": message.message_id,
                    "idempotency_key": key,
                    "size": len(message.content),
                    "metadata": json.dumps(dict(message.metadata), separators=(",", ":")),
                    "created_at": message.created_at,
                    "done_at": None,
                    "submitter": None,
                    "content": message.content,
                },
            )
        for r in message.recipients:
            exists = conn.execute(
                Q["delivery_exists"], {"queue_id": message.id, "address": r.address}
            ).fetchone()
            if exists:
                continue
            state = _IMPORTED_STATE.get(r.state, r.state)
            reply = r.last_response
            (delivery_id,) = conn.execute(
                Q["import_delivery"],
                {
                    "queue_id": message.id,
                    "address": r.address,
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
            ).fetchone()
            conn.executemany(
                Q["insert_attempt"],
                [
                    {
                        "delivery_id": delivery_id,
                        "at": a.at,
                        "class": a.cls.value,
                        "code": a.code,
                        "enhanced": a.enhanced,
                        "text": a.text,
                        "relay": a.relay,
                        "destination": a.destination,
                        "duration_ms": a.duration_ms,
                        "counted": int(a.counted),
                    }
                    for a in r.history
                ],
            )
            restored += 1
        conn.execute(Q["reopen_message"], {"queue_id": message.id})
        conn.execute(Q["mark_done"], {"queue_id": message.id, "now": now})
    return restored


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


# -- read helpers --------------------------------------------------------------------------------


def _cls(value: Any) -> ReplyClass | None:
    return ReplyClass(value) if value else None


def _exported(conn: sqlite3.Connection, queue_id: str, ids: str) -> ExportedMessage:
    row = conn.execute(Q["message_with_content"], {"id": queue_id}).fetchone()
    _id, lane, sender, subject, message_id, key, _size, metadata, created_at, content = row
    recipients = tuple(
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
            history=_history(conn, delivery_id),
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
        ) in conn.execute(Q["export_recipients"], {"queue_id": queue_id, "ids": ids}).fetchall()
    )
    return ExportedMessage(
        id=queue_id,
        lane=Lane(lane),
        sender=sender,
        subject=subject,
        message_id=message_id,
        idempotency_key=key,
        metadata=json.loads(metadata),
        created_at=created_at,
        content=bytes(content),
        recipients=recipients,
    )


def _reply(code: Any, enhanced: Any, text: Any, cls: Any) -> Reply | None:
    if cls is None:
        return None
    return Reply(code=code, enhanced=enhanced, text=text or "", cls=ReplyClass(cls))


def _history(conn: sqlite3.Connection, delivery_id: int) -> tuple[AttemptView, ...]:
    return tuple(
        AttemptView(
            at=at,
            cls=ReplyClass(cls),
            code=code,
            enhanced=enhanced,
            text=text,
            duration_ms=duration_ms,
            relay=relay,
            destination=destination,
            counted=bool(counted),
        )
        for at, cls, code, enhanced, text, duration_ms, relay, destination, counted in conn.execute(
            Q["delivery_history"], {"id": delivery_id}
        )
    )


def _message_views(
    conn: sqlite3.Connection, ids: Iterable[str], *, history: bool
) -> list[MessageView]:
    views = []
    for queue_id in ids:
        row = conn.execute(Q["message"], {"id": queue_id}).fetchone()
        if row is None:
            continue
        _id, lane, sender, subject, message_id, key, size, metadata, created_at, submitter = row
        recipients = tuple(
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
                history=_history(conn, delivery_id) if history else None,
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
            ) in conn.execute(Q["message_recipients"], {"id": queue_id}).fetchall()
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
                metadata=json.loads(metadata),
                recipients=recipients,
                submitter=submitter,
            )
        )
    return views


def _stats(rows: Sequence[Any], now: float, suppression_list: int) -> Stats:
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


_DEAD_SELECT = (
    "SELECT d.id, d.queue_id, d.address, d.domain, d.destination, d.lane, d.attempts, "
    "d.last_class, d.updated_at, d.last_code, d.last_enhanced, d.last_text, d.reason, "
    "m.sender, m.subject, "
    "(SELECT relay FROM attempts a WHERE a.delivery_id = d.id ORDER BY a.id DESC LIMIT 1) "
    "FROM deliveries d JOIN messages m ON m.id = d.queue_id"
)


def _dead_letter(conn: sqlite3.Connection, row: Sequence[Any], *, history: bool) -> DeadLetter:
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
    return DeadLetter(
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
        history=_history(conn, delivery_id) if history else None,
        delivery_id=delivery_id,
    )


def _where(
    selector: Selector,
    *,
    default_states: Sequence[str],
    forced_states: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause over ``deliveries d`` for a selector (every field narrows)."""
    clauses: list[str] = []
    params: dict[str, Any] = {}

    def among(column: str, values: Sequence[str | int], prefix: str) -> None:
        names = []
        for i, value in enumerate(values):
            params[f"{prefix}{i}"] = value
            names.append(f":{prefix}{i}")
        clauses.append(f"{column} IN ({','.join(names)})")

    states = [s.value for s in selector.states] or list(default_states)
    if forced_states is not None:
        states = [s for s in states if s in forced_states] or ["-none-"]
    among("d.state", states, "st")
    if selector.ids:
        among("d.queue_id", list(selector.ids), "id")
    if selector.delivery_ids:
        among("d.id", [int(i) for i in selector.delivery_ids], "di")
    if selector.lanes:
        among("d.lane", [lane.value for lane in selector.lanes], "ln")
    if selector.domains:
        among("d.domain", [d.lower() for d in selector.domains], "dm")
    if selector.classes:
        among("d.last_class", [c.value for c in selector.classes], "cl")
    if selector.older_than is not None:
        clauses.append("d.created_at <= :older_than")
        params["older_than"] = selector.older_than
    if selector.recipient:
        clauses.append("lower(d.address) = :recipient")
        params["recipient"] = selector.recipient.lower()
    if selector.sender:
        clauses.append("d.queue_id IN (SELECT id FROM messages WHERE lower(sender) = :sender)")
        params["sender"] = selector.sender.lower()
    for i, (key, value) in enumerate(selector.metadata.items()):
        clauses.append(
            f"d.queue_id IN (SELECT id FROM messages WHERE json_extract(metadata, :mk{i}) = :mv{i})"
        )
        params[f"mk{i}"] = "$." + json.dumps(key)
        params[f"mv{i}"] = value
    return " AND ".join(clauses) or "1", params
