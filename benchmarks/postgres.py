"""PostgreSQL: deliveries per second with 1 and 2 worker processes, and claim + record
throughput with 10,000 and 1,000,000 deliveries queued, side by side.

    python benchmarks/postgres.py [--dsn URL] [-n 10000] [--size 2048] [--workers 1 2]
                                  [--rounds 3] [--small 10000] [--big 1000000]
                                  [--measure 5000] [--batch 50]

--dsn defaults to $POSTLANE_TEST_POSTGRES, else postgresql://postgres@127.0.0.1:5432/test. Each
measurement runs in a schema of its own (``?schema=bench_...``), dropped afterwards.

Workers: N messages are enqueued in one transaction while K `postlane worker` processes wait on
LISTEN/NOTIFY (started beforehand, so their start-up is not timed); the time runs from that
commit to the last delivery recorded as sent into Postfix's smtp-sink (an in-process aiosmtpd
sink if smtp-sink is missing). Each worker count runs --rounds times, interleaved; the median
run is shown, with the CPU the workers, PostgreSQL and the whole machine used meanwhile.

Claims: the queue is bulk-loaded with INSERT ... SELECT from generate_series into the real
tables (so every index is the real one), vacuumed and analyzed; then one process claims and
records deliveries in batches with the store's own claim_due() and record(), as
benchmarks/claims.py does on SQLite. Each depth is loaded and measured --rounds times (the
median is shown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).parent))

import psycopg
from _common import done_progress, progress, table
from claims import claim_and_record
from deliver import SINK_USER, free_port, wait_port
from psycopg import sql

from postlane.destinations import destination_for
from postlane.message import Message, PreparedMessage, new_message_id, prepare
from postlane.store.postgres import PostgresStore, Q, masked, split_schema

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

    def cores_since(self, before: CPUTimes | None) -> dict[str, float] | None:
        """Cores kept busy on average since ``before``: by each group, by "PostgreSQL", and by
        "other": the rest of the machine, i.e. whatever else ran meanwhile (near 0 when quiet)."""
        if before is None:
            return None
        wall = self.at - before.at
        cores = {name: (t - before.groups[name]) / wall for name, t in self.groups.items()}
        postgres = sum(t - before.postgres.get(pid, 0.0) for pid, t in self.postgres.items())
        cores["PostgreSQL"] = postgres / wall
        cores["other"] = max(0.0, (self.machine - before.machine) / wall - sum(cores.values()))
        return cores


def cpu_cells(cores: Mapping[str, float] | None, names: Sequence[str]) -> list[str]:
    return [f"{cores[name]:.2f}" if cores else "-" for name in names]


# -- deliveries per second with K worker processes -------------------------------------------------

DRAIN_CPU = ["workers", "PostgreSQL", "sink + this script", "other"]


@dataclasses.dataclass(frozen=True)
class Drain:
    workers: int
    seconds: float
    attempts: int
    #: cores kept busy meanwhile, by DRAIN_CPU (None without /proc)
    cores: dict[str, float] | None

    def rate(self, count: int) -> float:
        return count / self.seconds


def write_config(folder: Path, url: str, relay_port: int) -> Path:
    config = folder / "postlane.toml"
    config.write_text(
        f"""
[store]
url = "{url}"
[delivery]
relay = "smtp://127.0.0.1:{relay_port}"
concurrency = 100
messages_per_connection = 1000
[http]
listen = "127.0.0.1:{free_port()}"
[smtp]
listen = "127.0.0.1:{free_port()}"
"""
    )
    return config


def log_file(folder: Path, name: str) -> IO[bytes]:
    # handed to a child process, closed by the caller once the child has its own copy
    return open(folder / f"{name}.log", "wb")


async def start_worker(config: Path, name: str) -> asyncio.subprocess.Process:
    log = log_file(config.parent, name)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postlane.cli",
            "--config",
            str(config),
            "worker",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,  # a file: a pipe nobody reads would fill up and block the worker
        )
    finally:
        log.close()  # the child has its own copy


def check_alive(processes: list[asyncio.subprocess.Process], folder: Path) -> None:
    for n, process in enumerate(processes, 1):
        if process.returncode is not None:
            tail = (folder / f"worker{n}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"worker {n} exited with {process.returncode}:\n{tail}")


async def wait_listening(
    dsn: str, processes: list[asyncio.subprocess.Process], folder: Path
) -> None:
    """Until every worker has its LISTEN connection (started, and woken by the enqueue's
    NOTIFY from now on): its last statement is the listen query or the one after it."""
    deadline = time.monotonic() + 60
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND query = ANY(%s)",
                [WORKER_APP, [Q["listen"], Q["tables_schema"]]],
            )
            row = await cursor.fetchone()
            if row is not None and row[0] >= len(processes):
                return
            check_alive(processes, folder)
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not start listening within 60 s")
            await asyncio.sleep(0.1)


async def drain(
    dsn: str, workers: int, template: PreparedMessage, count: int, sink: Sink, sink_port: int
) -> Drain:
    """K worker processes, waiting; ``count`` messages enqueued in one transaction; the time
    from its commit until the last of them is recorded as sent."""
    conninfo, _ = split_schema(dsn)
    schema = new_schema()
    store = PostgresStore(conninfo, schema=schema)
    await store.open()
    processes: list[asyncio.subprocess.Process] = []
    try:
        messages = [dataclasses.replace(template, id=new_message_id()) for _ in range(count)]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            url = with_params(conninfo, schema=schema, application_name=WORKER_APP)
            config = write_config(folder, url, sink_port)
            for n in range(1, workers + 1):
                processes.append(await start_worker(config, f"worker{n}"))
            progress(f"{workers} worker(s): starting")
            await wait_listening(conninfo, processes, folder)

            progress(f"{workers} worker(s): enqueueing {count:,} messages")
            await store.enqueue(messages, time.time())
            committed = time.time()  # the workers wake at this commit (NOTIFY)
            groups = {
                "workers": [p.pid for p in processes],
                "sink + this script": [sink.pid, os.getpid()],
            }
            cpu_before = CPUTimes.now(groups)
            deadline = time.monotonic() + max(120.0, count / 50)
            while True:
                stats = await store.stats(time.time())
                progress(f"{workers} worker(s): {stats.sent:,} / {count:,} sent")
                if stats.dead or stats.suppressed:
                    raise SystemExit(f"{stats.dead} dead, {stats.suppressed} suppressed: not clean")
                if stats.sent >= count:
                    cpu_after = CPUTimes.now(groups)
                    break
                check_alive(processes, folder)
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {stats.sent:,} of {count:,} sent in time")
                await asyncio.sleep(0.1)
            async with await psycopg.AsyncConnection.connect(conninfo) as conn:
                await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
                cursor = await conn.execute(
                    "SELECT (SELECT max(updated_at) FROM deliveries WHERE state = 'sent'),"
                    " (SELECT count(*) FROM attempts)"
                )
                row = await cursor.fetchone()
                assert row is not None
                last_sent, attempts = row
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                await asyncio.wait_for(process.wait(), timeout=60)
        used = cpu_after.cores_since(cpu_before) if cpu_after else None
        return Drain(workers, float(last_sent) - committed, int(attempts), used)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await store.drop_schema()
        await store.close()


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
    rate: float
    #: cores kept busy meanwhile, by CLAIM_CPU (None without /proc)
    cores: dict[str, float] | None


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
        progress(f"claiming {measured:,} at depth {depth:,}")
        groups = {"this script": [os.getpid()]}
        cpu_before = CPUTimes.now(groups)
        started = time.perf_counter()
        done = await claim_and_record(store, measured, batch, now)
        rate = done / (time.perf_counter() - started)
        cpu_after = CPUTimes.now(groups)
        return Claims(depth, rate, cpu_after.cores_since(cpu_before) if cpu_after else None)
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
    """Every worker count once per round (interleaved, so drift on a shared machine hits them
    alike); for each count, the run with the median rate."""
    template = template_message(args.size)
    runs: dict[int, list[Drain]] = {k: [] for k in args.workers}
    for _ in range(args.rounds):
        for k in args.workers:
            runs[k].append(await drain(args.dsn, k, template, args.n, sink, sink_port))
    return [sorted(runs[k], key=lambda d: d.seconds)[len(runs[k]) // 2] for k in args.workers]


async def run_claims(args: argparse.Namespace) -> tuple[Claims, Claims]:
    """Both depths once per round, each on a freshly loaded queue; for each, the run with the
    median rate."""
    template = template_message(1500)  # as benchmarks/claims.py
    runs: dict[int, list[Claims]] = {args.small: [], args.big: []}
    for _ in range(args.rounds):
        for depth in runs:
            runs[depth].append(
                await claims_per_second(args.dsn, template, depth, args.measure, args.batch)
            )
    small, big = (sorted(r, key=lambda c: c.rate)[len(r) // 2] for r in runs.values())
    return small, big


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default=os.environ.get("POSTLANE_TEST_POSTGRES") or DEFAULT_DSN)
    parser.add_argument("-n", type=int, default=10_000, help="messages the workers deliver")
    parser.add_argument("--size", type=int, default=2048, help="bytes per delivered message")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each measurement (median)")
    parser.add_argument("--small", type=int, default=10_000, help="the small queue depth")
    parser.add_argument("--big", type=int, default=1_000_000, help="the big queue depth")
    parser.add_argument("--measure", type=int, default=5_000, help="deliveries claimed+recorded")
    parser.add_argument("--batch", type=int, default=50, help="claim batch size")
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--skip-claims", action="store_true")
    args = parser.parse_args()
    version = server_version(args.dsn)

    drains: list[Drain] = []
    sink = None
    if not args.skip_workers:
        sink_port = free_port()
        with smtp_sink(sink_port) as sink:
            drains = asyncio.run(run_workers(args, sink, sink_port))
    claims = None if args.skip_claims else asyncio.run(run_claims(args))
    done_progress()

    print(f"PostgreSQL {version} at {masked(args.dsn)}; {os.cpu_count()} CPU cores")
    if drains:
        print()
        print(
            f"`postlane worker` processes delivering {args.n:,} queued messages of "
            f"{args.size:,} bytes into {sink.name if sink else '?'}; concurrency 100 per process; "
            f"median of {args.rounds} round(s)"
        )
        print(
            table(
                ["workers", "deliveries/s", "seconds", "attempts"]
                + [f"CPU: {name}" for name in DRAIN_CPU],
                [
                    [
                        d.workers,
                        f"{d.rate(args.n):,.0f}",
                        f"{d.seconds:.2f}",
                        f"{d.attempts:,}",
                        *cpu_cells(d.cores, DRAIN_CPU),
                    ]
                    for d in drains
                ],
            )
        )
        if len(drains) > 1:
            ratio = drains[-1].rate(args.n) / drains[0].rate(args.n)
            print(f"ratio ({drains[-1].workers} workers / {drains[0].workers}): {ratio:.2f}")
    if claims is not None:
        small, big = claims
        print()
        print(
            f"claim + record, batches of {args.batch}, {args.measure:,} deliveries, one process; "
            f"median of {args.rounds} round(s), each on a freshly loaded queue"
        )
        print(
            table(
                ["queued", "deliveries/s"] + [f"CPU: {name}" for name in CLAIM_CPU],
                [
                    [f"{c.depth:,}", f"{c.rate:,.0f}", *cpu_cells(c.cores, CLAIM_CPU)]
                    for c in (small, big)
                ],
            )
        )
        print(f"ratio (big / small): {big.rate / small.rate:.2f}")
    if drains or claims:
        print(
            "\nCPU: cores kept busy on average while timed; PostgreSQL counts the server's "
            "processes when it runs on this machine; other is the rest of the machine, i.e. "
            "anything else that ran meanwhile (about 0 on a quiet machine)"
        )


if __name__ == "__main__":
    main()
