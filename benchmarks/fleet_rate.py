"""A destination's rate held by a fleet: N `postlane worker` processes on one store deliver a
backlog for one destination limited to R messages/s into a local SMTP sink, which measures the
rate they send at together once they have converged.

    python benchmarks/fleet_rate.py [--store URL] [--processes 1,2,3,5] [--rate 50] [-n 3000]
                                    [--warmup 3] [--window 10] [--limit example.net|relay]
                                    [--concurrency 100] [--others-concurrency N] [--late]
                                    [--latency 0] [--serve] [--port 0] [--trace]

Each row: the rate at the sink over ``--window`` seconds starting ``--warmup`` seconds after
the first message arrived (every worker has its share by then), as a ratio of the configured
rate; the busiest 1 s and 2 s of that window (a token bucket lets a second's worth saved up go
at once); and how many each worker delivered in the whole run.

- ``--store``: a PostgreSQL URL puts every row on it, in a fresh schema (default: a SQLite file).
- ``--limit``: whose ``rate``: the recipients' destination (default) or the relay's.
- ``--concurrency``: each worker's ``[delivery] concurrency``; ``--others-concurrency``: every
  worker's but the first's (a fleet of unequal workers, the first claiming more at a time).
- ``--late``: the backlog arrives once every worker has joined the fleet (default: it is there
  when they start).
- ``--latency``: the sink holds each message this long before answering.
- ``--serve``: ``postlane serve --processes N`` instead of N ``postlane worker``.
- ``--port``: the sink's TCP port and, with ``--serve``, the next two for HTTP and SMTP in
  (0: free ports).
- ``--trace``: each second, the sink's rate, the backlog's schedule (due now, coming due in the
  next 5 s and 5-30 s, later) and each worker's demand recorded in the store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.message import Message
from tests.processes import PostlaneProcess, start_postlane, stop_all

DESTINATION = "example.net"


class Sink:
    """Takes every message and records when (monotonic seconds)."""

    def __init__(self, latency: float = 0.0) -> None:
        self.accepted_at: list[float] = []
        self.latency = latency

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.latency:
            await asyncio.sleep(self.latency)
        self.accepted_at.append(time.monotonic())
        return "250 2.0.0 OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_store(store: str | None, folder: Path, name: str) -> str:
    """A PostgreSQL URL with a schema of its own (``?schema=``), or a new SQLite file."""
    if store is None:
        return f"sqlite:///{folder / 'q.db'}"
    separator = "&" if "?" in store else "?"
    return f"{store}{separator}schema=bench_{name}_{os.getpid()}_{time.monotonic_ns()}"


async def drop_schema(url: str) -> None:
    if not url.startswith("postgres"):
        return
    from postlane.store.postgres import PostgresStore, split_schema

    base, schema = split_schema(url)
    store = PostgresStore(base, schema=schema)
    await store.open()
    await store.drop_schema()
    await store.close()


async def enqueue(url: str, count: int) -> None:
    async with AsyncPostlane(config_from_dict({"store": {"url": url}})) as app:
        for start in range(0, count, 1000):
            await app.send_many(
                [
                    Message(sender="a@example.com", to=[f"u{i}@{DESTINATION}"], text="x")
                    for i in range(start, min(count, start + 1000))
                ]
            )


def write_config(
    folder: Path,
    url: str,
    sink_port: int,
    rate: float,
    port: int,
    limited: str,
    concurrency: int,
) -> Path:
    http, smtp = (port + 1, port + 2) if port else (free_port(), free_port())
    path = folder / "postlane.toml"
    path.write_text(
        "\n".join(
            [
                "[store]",
                f'url = "{url}"',
                "[delivery]",
                f'relay = "smtp://127.0.0.1:{sink_port}"',
                f"concurrency = {concurrency}",
                f'[destinations."{limited}"]',
                f"rate = {rate}",
                "[http]",
                f'listen = "127.0.0.1:{http}"',
                "[smtp]",
                f'listen = "127.0.0.1:{smtp}"',
                "[log]",
                'level = "info"',
            ]
        )
        + "\n"
    )
    return path


async def read_store(url: str, destination: str) -> tuple[dict[str, float], list[int]]:
    """The live demands recorded on ``destination`` by owner, and how many of the backlog's
    deliveries are due now, in the next 5 s, 5-30 s and 30 s or more ahead (its schedule)."""
    now = time.time()
    demands_query = (
        "SELECT owner, demand FROM {s}destination_shares "
        "WHERE destination = {p} AND expires_at > {p}"
    )
    schedule_query = (
        "SELECT sum(CASE WHEN next_attempt_at <= {p} THEN 1 ELSE 0 END),"
        " sum(CASE WHEN next_attempt_at > {p} AND next_attempt_at <= {p} THEN 1 ELSE 0 END),"
        " sum(CASE WHEN next_attempt_at > {p} AND next_attempt_at <= {p} THEN 1 ELSE 0 END),"
        " sum(CASE WHEN next_attempt_at > {p} THEN 1 ELSE 0 END)"
        " FROM {s}deliveries WHERE state IN ('queued', 'deferred')"
    )
    at = [now, now, now + 5, now + 5, now + 30, now + 30]
    if url.startswith("postgres"):
        import psycopg

        from postlane.store.postgres import split_schema

        base, schema = split_schema(url)
        prefix = f'"{schema}".' if schema else ""
        async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
            cursor = await conn.execute(demands_query.format(s=prefix, p="%s"), [destination, now])
            rows = await cursor.fetchall()
            cursor = await conn.execute(schedule_query.format(s=prefix, p="%s"), at)
            schedule = await cursor.fetchone()
    else:
        import sqlite3

        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(demands_query.format(s="", p="?"), [destination, now]).fetchall()
            schedule = conn.execute(schedule_query.format(s="", p="?"), at).fetchone()
    counts = [int(n or 0) for n in (schedule or ())]
    return {str(owner): float(demand) for owner, demand in rows}, counts


async def trace(url: str, destination: str, sink: Sink, lines: list[str], every: float) -> None:
    """Every ``every`` seconds: what the sink took since, and each process's recorded demand."""
    taken = 0
    names: dict[str, str] = {}
    started = last = time.monotonic()
    while True:
        await asyncio.sleep(every)
        now = len(sink.accepted_at)
        elapsed, last = time.monotonic() - last, time.monotonic()
        try:
            demands, schedule = await read_store(url, destination)
        except Exception as exc:  # no tables yet, a locked file now and then: say so, go on
            lines.append(f"{time.monotonic() - started:5.1f}s  ({str(exc).splitlines()[0]})")
            taken = now
            continue
        for owner in demands:
            names.setdefault(owner, f"p{len(names) + 1}")
        total = sum(demands.values()) or 1.0
        shown = "  ".join(
            f"{names[o]}={d:6.1f} ({d / total:4.0%})" for o, d in sorted(demands.items())
        )
        due, soon, later, far = schedule
        lines.append(
            f"{time.monotonic() - started:5.1f}s  sink {(now - taken) / elapsed:5.1f}/s  "
            f"waiting: due {due:4d}, next 5 s {soon / 5:5.1f}/s, 5-30 s {later / 25:5.1f}/s, "
            f"later {far:4d}  demands: {shown}"
        )
        taken = now


async def live_workers(url: str) -> int:
    """How many processes say they are alive in the fleet's shares."""
    demands, _ = await read_store(url, "*")
    return len(demands)


def delivered_by_each(processes: list[PostlaneProcess], serve: bool) -> str:
    """How many deliveries each worker logged (serve --processes N: one log for all)."""
    if serve:
        return str(processes[0].output().count("class=delivered"))
    return "/".join(str(p.output().count("class=delivered")) for p in processes)


async def measure(
    processes: int,
    *,
    store: str | None,
    rate: float,
    count: int,
    warmup: float,
    window: float,
    serve: bool,
    port: int,
    limited: str,
    latency: float,
    traced: list[str] | None = None,
    late: bool = False,
    concurrency: int = 100,
    others_concurrency: int | None = None,
) -> list[object]:
    sink = Sink(latency)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(sink, hostname="sink.test", loop=loop), "127.0.0.1", port
    )
    sink_port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        url = fresh_store(store, folder, f"fleet{processes}")
        config = write_config(folder, url, sink_port, rate, port, limited, concurrency)
        others = config
        if others_concurrency is not None:
            (folder / "others").mkdir()
            others = write_config(
                folder / "others", url, sink_port, rate, port, limited, others_concurrency
            )
        try:
            if not late:
                await enqueue(url, count)
            if serve:
                several = ("--processes", str(processes)) if processes > 1 else ()
                workers = [
                    start_postlane("serve", *several, config=config, log=folder / "serve.log")
                ]
            else:
                workers = [
                    start_postlane(
                        "worker", config=others if n else config, log=folder / f"worker{n}.log"
                    )
                    for n in range(processes)
                ]
            tracing = None
            if traced is not None:
                traced.append(f"-- {processes} process(es)")
                tracing = asyncio.create_task(trace(url, limited, sink, traced, 1.0))
            try:
                if late:

                    async def joined() -> bool:
                        return await live_workers(url) >= processes

                    await workers[0].wait_until(
                        joined, "every worker in the fleet", timeout=60, ignoring=(Exception,)
                    )
                    await enqueue(url, count)
                await workers[0].wait_until(
                    lambda: bool(sink.accepted_at), "the first message", timeout=60
                )
                begin = sink.accepted_at[0] + warmup
                end = begin + window
                await workers[0].wait_until(
                    lambda: time.monotonic() >= end or len(sink.accepted_at) >= count,
                    "the window",
                    timeout=warmup + window + 30,
                    every=0.1,
                )
                for worker in workers:
                    worker.check_running()
            finally:
                if tracing is not None:
                    tracing.cancel()
                await stop_all(workers, timeout=60)
            steady = [t for t in sink.accepted_at if begin <= t < end]
            span = min(end, sink.accepted_at[-1]) - begin
            measured = len(steady) / span if span > 0 else 0.0
            busiest = max((sum(1 for u in steady if t <= u < t + 1.0) for t in steady), default=0)
            busiest2 = max((sum(1 for u in steady if t <= u < t + 2.0) for t in steady), default=0)
            each = delivered_by_each(workers, serve)
        finally:
            await drop_schema(url)
    server.close()
    await server.wait_closed()
    return [processes, f"{measured:.1f}", f"{measured / rate:.2f}", busiest, busiest2, each]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a PostgreSQL URL (default: a SQLite file)")
    parser.add_argument("--processes", default="1,2,3,5", help="comma-separated fleet sizes")
    parser.add_argument("--rate", type=float, default=50.0, help="the destination's rate")
    parser.add_argument("-n", type=int, default=3000, help="messages in the backlog")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--serve", action="store_true", help="serve --processes N")
    parser.add_argument("--port", type=int, default=0, help="the sink's port (0: free)")
    parser.add_argument(
        "--limit", default=DESTINATION, help=f"whose rate: {DESTINATION} (default) or relay"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="the sink's DATA delay (s)")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="[delivery] concurrency of each process"
    )
    parser.add_argument(
        "--others-concurrency", type=int, help="[delivery] concurrency of all but the first"
    )
    parser.add_argument(
        "--late", action="store_true", help="enqueue the backlog once the fleet has formed"
    )
    parser.add_argument(
        "--trace", action="store_true", help="print each second's rate and recorded demands"
    )
    args = parser.parse_args()
    rows = []
    traced: list[str] | None = [] if args.trace else None
    for n in (int(p) for p in args.processes.split(",")):
        progress(f"{n} process(es)")
        rows.append(
            await measure(
                n,
                store=args.store,
                rate=args.rate,
                count=args.n,
                warmup=args.warmup,
                window=args.window,
                serve=args.serve,
                port=args.port,
                limited=args.limit,
                latency=args.latency,
                traced=traced,
                late=args.late,
                concurrency=args.concurrency,
                others_concurrency=args.others_concurrency,
            )
        )
    done_progress()
    if traced:
        print("\n".join(traced))
    kind = "PostgreSQL" if args.store else "SQLite"
    command = "serve --processes N" if args.serve else "N x postlane worker"
    others = (
        "" if args.others_concurrency is None else f" ({args.others_concurrency} after the first)"
    )
    print(
        f"{command} on {kind}, [destinations.{args.limit}] rate = {args.rate:g}, "
        f"concurrency {args.concurrency}{others}, backlog of {args.n}"
        f"{' arriving once the fleet has formed' if args.late else ''}, "
        f"sink latency {args.latency:g} s"
    )
    print(
        table(
            ["processes", "msg/s", "of rate", "busiest 1 s", "busiest 2 s", "delivered by each"],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
