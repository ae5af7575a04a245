"""PostgreSQL: deliveries per second with 1 and 2 worker processes beside one worker on SQLite,
and claim + record throughput with 10,000 and 1,000,000 deliveries queued, in batches beside one
delivery at a time; all side by side in one run.

    python benchmarks/postgres.py [--dsn URL] [-n 10000] [--size 2048] [--workers 1 2]
                                  [--rounds 3] [--small 10000] [--big 1000000]
                                  [--measure 5000] [--batch 50] [--fleet-limit 100000]

--dsn defaults to $POSTLANE_TEST_POSTGRES, else postgresql://postgres@127.0.0.1:5432/test. Each
measurement runs in a schema of its own (``?schema=bench_...``), dropped afterwards.

Workers: N messages are enqueued in one transaction while K `postlane worker` processes wait on
LISTEN/NOTIFY (started beforehand, so their start-up is not timed); the time runs from that
commit to the last delivery recorded as sent into Postfix's smtp-sink (an in-process aiosmtpd
sink if smtp-sink is missing). The baselines, measured in the same rounds: one worker (always
run, whatever --workers says), and one worker on a SQLite store (postlane's default, polling
every 10 ms since SQLite cannot wake another process). Each runs --rounds times, interleaved;
the median run is shown, with the CPU the workers, PostgreSQL and the whole machine used
meanwhile.

Claims: the queue is bulk-loaded with INSERT ... SELECT from generate_series into the real
tables (so every index is the real one), vacuumed and analyzed; then one process claims and
records deliveries with the store's own claim_due() and record(), in batches and, as the
baseline, one claim and one record transaction per delivery, alternating in chunks on the same
queue (as benchmarks/claims.py does on SQLite). Each depth is loaded and measured --rounds times
(the round with the median batched rate is shown, both ways of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

import psycopg
from _common import done_progress, progress, table
from claims import Way, batched_and_one_at_a_time, side_by_side
from deliver import SINK_USER, free_port, wait_port
from psycopg import sql

from postlane.destinations import destination_for
from postlane.message import Message, PreparedMessage, new_message_id, prepare
from postlane.store.base import Store
from postlane.store.postgres import PostgresStore, Q, masked, split_schema
from postlane.store.sqlite import SQLiteStore
from tests.processes import PostlaneProcess, ProcessFailed, start_postlane, stop_all

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: what the worker processes call themselves in pg_stat_activity (to see them listening)
WORKER_APP = "postlane-bench-worker"
LOAD_CHUNK = 50_000


def with_params(dsn: str, **params: str) -> str:
    """``dsn`` (a URL) with some query parameters added."""
    return f"{dsn}{'&' if '?' in dsn else '?'}{urlencode(params)}"


def new_schema() -> str:
    return f"bench_{uuid.uuid4().hex[:12]}"


def template_message(size: int) -> PreparedMessage:
    """One prepared message of about ``size`` bytes; copies get new queue ids."""
    line = "x" * 70 + "\n"
    text = line * max(1, size // len(line))
    return prepare(
        Message(sender="app@example.com", to=["someone@example.net"], subject="s", text=text),
        max_size=10**7,
    )


# -- the SMTP sink ---------------------------------------------------------------------------------


def smtp_sink_path() -> str | None:
    found = shutil.which("smtp-sink")
    if found is None and Path("/usr/sbin/smtp-sink").exists():
        found = "/usr/sbin/smtp-sink"
    return found


@dataclasses.dataclass(frozen=True)
class Sink:
    name: str
    pid: int  # its process (this one when it runs in here)


@contextlib.contextmanager
def smtp_sink(port: int) -> Iterator[Sink]:
    """An SMTP server on 127.0.0.1:``port`` that accepts everything."""
    path = smtp_sink_path()
    if path is not None:
        user = ["-u", SINK_USER] if os.geteuid() == 0 else []  # root must drop privileges
        sink = subprocess.Popen(
            [path, *user, f"127.0.0.1:{port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            yield Sink("Postfix's smtp-sink", sink.pid)
        finally:
            sink.terminate()
            sink.wait(timeout=10)
        return

    from aiosmtpd.controller import Controller

    class Accept:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 Ok"

    controller = Controller(Accept(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Sink("aiosmtpd in this process, smtp-sink not being installed", os.getpid())
    finally:
        controller.stop()


# -- CPU accounting (Linux /proc) ----------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds a process used so far: utime + stime (fields 14 and 15 of its stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "postgres":
                pids.append(int(comm.parent.name))
    return pids


@dataclasses.dataclass(frozen=True)
class CPUTimes:
    """CPU seconds used so far: by named groups of processes, by each process of the PostgreSQL
    server (when it runs on this machine) and by the whole machine."""

    at: float
    groups: dict[str, float]
    postgres: dict[int, float]
    machine: float

    @classmethod
    def now(cls, groups: Mapping[str, Sequence[int]]) -> CPUTimes | None:
        """None where there is no Linux /proc to read."""
        try:
            used = {
                name: sum(process_cpu(pid) for pid in set(pids)) for name, pids in groups.items()
            }
            postgres: dict[int, float] = {}
            for pid in postgres_pids():
                with contextlib.suppress(OSError):  # a backend that just exited
                    postgres[pid] = process_cpu(pid)
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, IndexError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        busy = sum(cpu) - cpu[3] - cpu[4]
        return cls(time.monotonic(), used, postgres, busy / os.sysconf("SC_CLK_TCK"))

    def used_since(self, before: CPUTimes) -> tuple[float, dict[str, float]]:
        """Wall seconds since ``before``, and the CPU seconds used meanwhile: by each group, by
        "PostgreSQL", and by "other": the rest of the machine, i.e. whatever else ran meanwhile
        (near 0 when quiet)."""
        used = {name: t - before.groups[name] for name, t in self.groups.items()}
        used["PostgreSQL"] = sum(
            t - before.postgres.get(pid, 0.0) for pid, t in self.postgres.items()
        )
        used["other"] = max(0.0, (self.machine - before.machine) - sum(used.values()))
        return self.at - before.at, used

    def cores_since(self, before: CPUTimes | None) -> dict[str, float] | None:
        """Cores kept busy on average since ``before``, by the names of :meth:`used_since`."""
        if before is None:
            return None
        wall, used = self.used_since(before)
        return {name: seconds / wall for name, seconds in used.items()}


@dataclasses.dataclass
class CPUTotal:
    """CPU used over several timed stretches (the chunks of one way of claiming)."""

    wall: float = 0.0
    used: Counter[str] = dataclasses.field(default_factory=Counter)
    measured: bool = True

    @contextlib.contextmanager
    def meter(self, groups: Mapping[str, Sequence[int]]) -> Iterator[None]:
        before = CPUTimes.now(groups)
        yield
        after = CPUTimes.now(groups)
        if before is None or after is None:
            self.measured = False
            return
        wall, used = after.used_since(before)
        self.wall += wall
        self.used.update(used)

    def cores(self) -> dict[str, float] | None:
        if not self.measured or not self.wall:
            return None
        return {name: seconds / self.wall for name, seconds in self.used.items()}


def cpu_cells(cores: Mapping[str, float] | None, names: Sequence[str]) -> list[str]:
    return [f"{cores[name]:.2f}" if cores else "-" for name in names]


# -- deliveries per second with K worker processes -------------------------------------------------

DRAIN_CPU = ["workers", "PostgreSQL", "sink + this script", "other"]
POSTGRES, SQLITE = "PostgreSQL", "SQLite"


@dataclasses.dataclass(frozen=True)
class Drain:
    store: str
    workers: int
    #: the fleet-wide rate limit on the relay (None: no limit)
    limit: float | None
    seconds: float
    attempts: int
    #: cores kept busy meanwhile, by DRAIN_CPU (None without /proc)
    cores: dict[str, float] | None

    def rate(self, count: int) -> float:
        return count / self.seconds


def write_config(
    folder: Path,
    url: str,
    relay_port: int,
    *,
    poll_interval: str = "1s",
    limit: float | None = None,
) -> Path:
    config = folder / "postlane.toml"
    # a limit the workers share through the store (issue 21), far above what they reach: what
    # it costs is the sharing, not the waiting
    limited = "" if limit is None else f"[destinations.relay]\nrate = {limit:g}\n"
    config.write_text(
        limited
        + f"""
[store]
url = "{url}"
[delivery]
relay = "smtp://127.0.0.1:{relay_port}"
concurrency = 100
messages_per_connection = 1000
poll_interval = "{poll_interval}"
[http]
listen = "127.0.0.1:{free_port()}"
[smtp]
listen = "127.0.0.1:{free_port()}"
"""
    )
    return config


def check_running(processes: Sequence[PostlaneProcess]) -> None:
    for process in processes:
        process.check_running()


async def wait_listening(dsn: str, processes: Sequence[PostlaneProcess]) -> None:
    """Until every worker has its LISTEN connection (started, and woken by the enqueue's
    NOTIFY from now on): its last statement is the listen query or the one after it."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

        async def listening() -> bool:
            check_running(processes)
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND query = ANY(%s)",
                [WORKER_APP, [Q["listen"], Q["tables_schema"]]],
            )
            row = await cursor.fetchone()
            return row is not None and row[0] >= len(processes)

        await processes[0].wait_until(listening, "every worker to LISTEN", timeout=60, every=0.1)


def sqlite_results(path: Path) -> tuple[float, int]:
    """When the last delivery was recorded as sent, and how many attempts were made."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute(
            "SELECT (SELECT max(updated_at) FROM deliveries WHERE state = 'sent'),"
            " (SELECT count(*) FROM attempts)"
        ).fetchone()
    return float(row[0]), int(row[1])


async def postgres_results(conninfo: str, schema: str) -> tuple[float, int]:
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        cursor = await conn.execute(
            "SELECT (SELECT max(updated_at) FROM deliveries WHERE state = 'sent'),"
            " (SELECT count(*) FROM attempts)"
        )
        row = await cursor.fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


async def drain(
    dsn: str,
    backend: str,
    workers: int,
    template: PreparedMessage,
    count: int,
    sink: Sink,
    sink_port: int,
    limit: float | None = None,
) -> Drain:
    """K worker processes on ``backend`` (PostgreSQL or SQLite), waiting; ``count`` messages
    enqueued in one transaction; the time from its commit until the last of them is recorded
    as sent. With ``limit``, the relay has that fleet-wide rate."""
    conninfo, _ = split_schema(dsn)
    schema = new_schema()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store: Store
        if backend == POSTGRES:
            store = PostgresStore(conninfo, schema=schema)
            url = with_params(conninfo, schema=schema, application_name=WORKER_APP)
            config = write_config(folder, url, sink_port, limit=limit)
        else:
            store = SQLiteStore(folder / "queue.db")
            # no NOTIFY across processes: the worker polls, often enough not to add to the time
            url = f"sqlite:///{folder / 'queue.db'}"
            config = write_config(folder, url, sink_port, poll_interval="10ms")
        name = f"{workers} {backend} worker(s)" + ("" if limit is None else ", fleet limit")
        await store.open()
        processes: list[PostlaneProcess] = []
        try:
            messages = [dataclasses.replace(template, id=new_message_id()) for _ in range(count)]
            for n in range(1, workers + 1):
                processes.append(
                    start_postlane("worker", config=config, log=folder / f"worker{n}.log")
                )
            progress(f"{name}: starting")
            if backend == POSTGRES:
                await wait_listening(conninfo, processes)
            else:
                for process in processes:
                    await process.wait_running(timeout=60)

            progress(f"{name}: enqueueing {count:,} messages")
            await store.enqueue(messages, time.time())
            committed = time.time()  # the workers wake at this commit (NOTIFY, or their poll)
            groups = {
                "workers": [p.pid for p in processes],
                "sink + this script": [sink.pid, os.getpid()],
            }
            cpu_before = CPUTimes.now(groups)
            cpu_after: list[CPUTimes | None] = []

            async def all_sent() -> bool:
                check_running(processes)
                stats = await store.stats(time.time())
                progress(f"{name}: {stats.sent:,} / {count:,} sent")
                if stats.dead or stats.suppressed:
                    raise SystemExit(f"{stats.dead} dead, {stats.suppressed} suppressed: not clean")
                if stats.sent < count:
                    return False
                cpu_after.append(CPUTimes.now(groups))
                return True

            await processes[0].wait_until(
                all_sent, f"{count:,} sent", timeout=max(120.0, count / 50), every=0.1
            )
            if backend == POSTGRES:
                last_sent, attempts = await postgres_results(conninfo, schema)
            else:
                last_sent, attempts = await asyncio.to_thread(sqlite_results, folder / "queue.db")
            await stop_all(processes, timeout=60)
        finally:
            for process in processes:
                if process.running:
                    await process.kill()
            if isinstance(store, PostgresStore):
                await store.drop_schema()
            await store.close()
    used = cpu_after[0].cores_since(cpu_before) if cpu_after[0] else None
    return Drain(backend, workers, limit, last_sent - committed, attempts, used)


# -- claim + record at depth -----------------------------------------------------------------------


async def load(conn: psycopg.AsyncConnection[Any], template: PreparedMessage, depth: int) -> float:
    """``depth`` messages of one due recipient each, straight into the tables; returns the
    ``now`` they are due at. Arrival times are spread over the last ``depth`` milliseconds."""
    now = time.time()
    recipient = template.recipients[0]
    params: dict[str, object] = {
        "now": now,
        "depth": depth,
        "lane": template.lane.value,
        "sender": template.sender,
        "subject": template.subject,
        "size": template.size,
        "content": template.content,
        "address": recipient.address,
        "domain": recipient.domain,
        "destination": recipient.destination or destination_for(recipient.domain),
    }
    series = (
        "SELECT 'bench' || lpad(i::text, 10, '0') AS id, i,"
        " %(now)s::float8 - (%(depth)s::int8 - i) * 0.001::float8 AS t"
        " FROM generate_series(%(first)s::int8, %(last)s::int8) AS i"
    )
    started = time.perf_counter()
    for first in range(1, depth + 1, LOAD_CHUNK):
        last = min(depth, first + LOAD_CHUNK - 1)
        chunk = {**params, "first": first, "last": last}
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO messages (id, lane, sender, subject, message_id, size, created_at,"
                " content) SELECT id, %(lane)s, %(sender)s, %(subject)s,"
                " '<' || i || '@bench.postlane>', %(size)s, t, %(content)s"
                f" FROM ({series}) AS s",
                chunk,
            )
            await conn.execute(
                "INSERT INTO deliveries (queue_id, address, domain, destination, lane,"
                " created_at, state, next_attempt_at, updated_at)"
                " SELECT id, %(address)s, %(domain)s, %(destination)s, %(lane)s, t, 'queued', t, t"
                f" FROM ({series}) AS s",
                chunk,
            )
        rate = last / (time.perf_counter() - started)
        progress(f"loading {depth:,}: {last:,} rows ({rate:,.0f}/s)")
    progress(f"loading {depth:,}: VACUUM ANALYZE, CHECKPOINT")
    await conn.execute("VACUUM (ANALYZE) messages")
    await conn.execute("VACUUM (ANALYZE) deliveries")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        await conn.execute("CHECKPOINT")  # not during the measurement
    return now


CLAIM_CPU = ["this script", "PostgreSQL", "other"]


@dataclasses.dataclass(frozen=True)
class Claims:
    depth: int
    #: the store's way (batches) first, then the baseline (one per message)
    ways: list[Way]
    #: cores kept busy meanwhile by each way, by CLAIM_CPU (None without /proc)
    cores: list[dict[str, float] | None]


async def claims_per_second(
    dsn: str, template: PreparedMessage, depth: int, measured: int, batch: int
) -> Claims:
    conninfo, _ = split_schema(dsn)
    store = PostgresStore(conninfo, schema=new_schema())
    await store.open()
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("SET search_path TO {}").format(sql.Identifier(store.schema or ""))
            )
            now = await load(conn, template, depth)
        groups = {"this script": [os.getpid()]}
        ways = batched_and_one_at_a_time(batch)
        cpu = {way.label: CPUTotal() for way in ways}
        await side_by_side(
            store,
            ways,
            measured,
            now,
            label=f"queued {depth:,}",
            around=lambda way: cpu[way.label].meter(groups),
        )
        return Claims(depth, ways, [cpu[way.label].cores() for way in ways])
    finally:
        await store.drop_schema()
        await store.close()


# -- main ------------------------------------------------------------------------------------------


def server_version(dsn: str) -> str:
    """PostgreSQL's version, or exit with one line when it cannot be reached."""
    conninfo, _ = split_schema(dsn)
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()  # "15.2 (Debian ...)"
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.exit(f"PostgreSQL is unreachable at {masked(dsn)}: {first}")
    return str(row[0]).split()[0] if row else "?"


async def run_workers(args: argparse.Namespace, sink: Sink, sink_port: int) -> list[Drain]:
    """One SQLite worker and every PostgreSQL worker count (1 always among them) once per round,
    interleaved so that drift on a shared machine hits them alike; for each, the median run."""
    template = template_message(args.size)
    limits: list[float | None] = [None] if args.fleet_limit is None else [None, args.fleet_limit]
    setups = [(SQLITE, 1, None)] + [
        (POSTGRES, k, limit) for k in worker_counts(args) for limit in limits
    ]
    runs: dict[tuple[str, int, float | None], list[Drain]] = {setup: [] for setup in setups}
    for _ in range(args.rounds):
        for backend, k, limit in setups:
            runs[backend, k, limit].append(
                await drain(args.dsn, backend, k, template, args.n, sink, sink_port, limit)
            )
    return [sorted(r, key=lambda d: d.seconds)[len(r) // 2] for r in runs.values()]


def worker_counts(args: argparse.Namespace) -> list[int]:
    """--workers, with 1 added: one worker is what more workers are compared with."""
    return sorted({1, *args.workers})


async def run_claims(args: argparse.Namespace) -> tuple[Claims, Claims]:
    """Both depths once per round, each on a freshly loaded queue; for each, the round with the
    median batched rate (both ways of it, so their ratio is of one queue and one moment)."""
    template = template_message(1500)  # as benchmarks/claims.py
    runs: dict[int, list[Claims]] = {args.small: [], args.big: []}
    for _ in range(args.rounds):
        for depth in runs:
            runs[depth].append(
                await claims_per_second(args.dsn, template, depth, args.measure, args.batch)
            )
    small, big = (sorted(r, key=lambda c: c.ways[0].rate)[len(r) // 2] for r in runs.values())
    return small, big


def print_drains(args: argparse.Namespace, drains: list[Drain], sink: Sink | None) -> None:
    print(
        f"`postlane worker` processes delivering {args.n:,} queued messages of "
        f"{args.size:,} bytes into {sink.name if sink else '?'}; concurrency 100 per process; "
        f"median of {args.rounds} round(s)"
    )
    sqlite = next(d for d in drains if d.store == SQLITE)
    one = next(d for d in drains if d.store == POSTGRES and d.workers == 1 and d.limit is None)
    print(
        table(
            [
                "store",
                "workers",
                "fleet limit",
                "deliveries/s",
                "seconds",
                "attempts",
                "vs SQLite",
                "vs 1 worker",
            ]
            + [f"CPU: {name}" for name in DRAIN_CPU],
            [
                [
                    d.store,
                    d.workers,
                    "-" if d.limit is None else f"{d.limit:,.0f}/s",
                    f"{d.rate(args.n):,.0f}",
                    f"{d.seconds:.2f}",
                    f"{d.attempts:,}",
                    f"{sqlite.seconds / d.seconds:.2f}x",
                    f"{one.seconds / d.seconds:.2f}x" if d.store == POSTGRES else "-",
                    *cpu_cells(d.cores, DRAIN_CPU),
                ]
                for d in drains
            ],
        )
    )
    for d in drains:
        if d.store == POSTGRES and d.workers > 1 and d.limit is None:
            print(f"ratio ({d.workers} workers / 1): {one.seconds / d.seconds:.2f}")
    for d in drains:
        if d.limit is not None:
            free = next(
                e
                for e in drains
                if e.store == POSTGRES and e.workers == d.workers and e.limit is None
            )
            print(
                f"ratio ({d.workers} worker(s), fleet limit / no limit): "
                f"{free.seconds / d.seconds:.2f}"
            )
    print(f"ratio (1 PostgreSQL worker / 1 SQLite worker): {sqlite.seconds / one.seconds:.2f}")


def print_claims(args: argparse.Namespace, small: Claims, big: Claims) -> None:
    print(
        f"claim + record of {args.measure:,} deliveries each way, one process; the ways "
        f"alternate in chunks on one queue; median of {args.rounds} round(s), each on a freshly "
        "loaded queue"
    )
    rows = []
    for claims in (small, big):
        baseline = claims.ways[-1]
        for way, cores in zip(claims.ways, claims.cores, strict=True):
            rows.append(
                [
                    f"{claims.depth:,}",
                    way.label,
                    f"{way.rate:,.0f}",
                    f"{way.rate / baseline.rate:.1f}x",
                    *cpu_cells(cores, CLAIM_CPU),
                ]
            )
    print(
        table(
            ["queued", "claims", "deliveries/s", f"vs {small.ways[-1].label}"]
            + [f"CPU: {name}" for name in CLAIM_CPU],
            rows,
        )
    )
    print(
        f"ratio ({big.depth:,} / {small.depth:,} queued): "
        + ", ".join(
            f"{a.label} {b.rate / a.rate:.2f}" for a, b in zip(small.ways, big.ways, strict=True)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default=os.environ.get("POSTLANE_TEST_POSTGRES") or DEFAULT_DSN)
    parser.add_argument("-n", type=int, default=10_000, help="messages the workers deliver")
    parser.add_argument("--size", type=int, default=2048, help="bytes per delivered message")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="process counts (1 is always run)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each measurement (median)")
    parser.add_argument("--small", type=int, default=10_000, help="the small queue depth")
    parser.add_argument("--big", type=int, default=1_000_000, help="the big queue depth")
    parser.add_argument(
        "--measure", type=int, default=5_000, help="deliveries claimed+recorded each way"
    )
    parser.add_argument("--batch", type=int, default=50, help="claim batch size")
    parser.add_argument(
        "--fleet-limit",
        type=float,
        default=None,
        metavar="RATE",
        help="also run each PostgreSQL worker count with [destinations.relay] rate = RATE, a "
        "fleet-wide limit far above the rate reached (its overhead, as a ratio)",
    )
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--skip-claims", action="store_true")
    args = parser.parse_args()
    if not args.skip_claims and min(args.small, args.big) < 2 * args.measure:
        parser.error("each depth must hold both ways' deliveries: at least twice --measure")
    version = server_version(args.dsn)

    drains: list[Drain] = []
    sink = None
    try:
        if not args.skip_workers:
            sink_port = free_port()
            with smtp_sink(sink_port) as sink:
                drains = asyncio.run(run_workers(args, sink, sink_port))
        claims = None if args.skip_claims else asyncio.run(run_claims(args))
    except ProcessFailed as failed:  # a worker died or hung: its log says why
        done_progress()
        sys.exit(f"postgres.py: a worker process {failed}")
    done_progress()

    print(f"PostgreSQL {version} at {masked(args.dsn)}; {os.cpu_count()} CPU cores")
    if drains:
        print()
        print_drains(args, drains, sink)
    if claims is not None:
        print()
        print_claims(args, *claims)
    if drains or claims:
        print(
            "\nCPU: cores kept busy on average while timed; PostgreSQL counts the server's "
            "processes when it runs on this machine; other is the rest of the machine, i.e. "
            "anything else that ran meanwhile (about 0 on a quiet machine)"
        )


if __name__ == "__main__":
    main()
