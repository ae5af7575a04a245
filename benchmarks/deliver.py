"""End-to-end deliveries per second into Postfix's smtp-sink: postlane beside Postfix, same run.

    python benchmarks/deliver.py [-n 10000] [--size 2048] [--sessions 20] [--skip-postfix]
                                 [--processes N] [--store URL] [--relay-concurrency N]

Both receive N messages of SIZE bytes from smtp-source over 20 SMTP sessions, store each durably
before answering 250, and relay everything to an smtp-sink that exits after N messages:

- Postfix: smtp-source -> Postfix on 127.0.0.1:25 -> smtp-sink :2525 (set up by
  ../shared/anchors/postfix-relay.sh: run it once, as root);
- postlane: smtp-source -> `postlane serve` (SQLite, SMTP submission) -> smtp-sink.

A first row measures smtp-source straight into smtp-sink, nothing between: what the load
generator and the sink do alone on this machine, in this run (every relay's ceiling: it does
their work and its own). A later postlane row enqueues the same N messages through the Python
API first and then times delivery alone (the worker's side). ``--processes N`` adds a row for
``postlane serve --processes N`` (the same SMTP-in test, N processes on the same ports), on the
store ``--store`` names (default: SQLite; a PostgreSQL URL puts every postlane row on it, in a
fresh schema); ``--relay-concurrency N`` caps postlane's sends in flight to the relay
(``[destinations.relay] concurrency``: what the cap costs, with the fleet's slots in the store
when several processes share it). Ratios are printed; absolute numbers drift on a shared
machine, ratios measured in one run do not. Each row also gives the CPU time the queue's own
processes used per message (read from /proc: Postfix's master with its daemons, postlane's
processes), which says how much of the machine a rate takes: a relay's rate can only rise while
its CPU, the load generator's and the sink's together fit in the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from tests.processes import RUNNING, PostlaneProcess, ProcessFailed, start_postlane

SINK_USER = "nobody"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        sys.exit(
            f"{tool} is missing: install Postfix (../shared/anchors/postfix-relay.sh as root, or "
            "apt-get install postfix)"
        )
    return path


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of these processes and all their descendants alive now, plus
    what the children they already waited for used (a daemon's finished workers count)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen or (fields := _stat(pid)) is None:
            continue
        seen.add(pid)
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        todo += parents.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def postfix_master() -> list[int]:
    """Postfix's master process (its daemons are its children), if it runs."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry.name}/comm").read_text().strip() == "master":
                    return [int(entry.name)]
    return []


def start_sink(port: int, count: int) -> subprocess.Popen[bytes]:
    sink = subprocess.Popen(
        [need("smtp-sink"), "-u", SINK_USER, "-M", str(count), f"127.0.0.1:{port}", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return sink


def inject(port: int, count: int, size: int, sessions: int) -> float:
    """smtp-source into ``port``; returns the seconds until every message was accepted."""
    start = time.perf_counter()
    subprocess.run(
        [
            need("smtp-source"),
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-l",
            str(size),
            "-f",
            "sender@example.com",
            "-t",
            "rcpt@example.net",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def wait_sink(
    sink: subprocess.Popen[bytes], timeout: float, feeder: PostlaneProcess | None = None
) -> None:
    """Until the sink has had its N messages (it exits then). With ``feeder``, the postlane
    process delivering into it: its death ends the wait at once, with its log."""
    try:
        if feeder is None:
            sink.wait(timeout=timeout)
        else:
            feeder.wait_until_blocking(
                lambda: sink.poll() is not None,
                "the sink to receive every message",
                timeout=timeout,
                every=0.01,
            )
    except (subprocess.TimeoutExpired, ProcessFailed) as failed:
        sink.kill()
        sink.wait()
        raise SystemExit(f"the sink did not receive every message in time: {failed}") from None


#: seconds to accept every message, seconds until the sink had them all, CPU seconds the queue's
#: own processes used meanwhile
Run = tuple[float, float, float]


def measure_postfix(count: int, size: int, sessions: int) -> Run | None:
    if not port_open(25):
        return None
    subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
    master = postfix_master()
    start = time.perf_counter()
    sink = start_sink(2525, count)
    cpu = cpu_seconds(master)
    accepted = inject(25, count, size, sessions)
    wait_sink(sink, timeout=600)
    return accepted, time.perf_counter() - start, cpu_seconds(master) - cpu


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children it has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_nothing_between(count: int, size: int, sessions: int) -> tuple[float, float]:
    """smtp-source straight into smtp-sink, no queue between: what the two tools do alone on
    this machine in this run, the ceiling of every other row (a relay receives *and* sends);
    returns the seconds and the two tools' CPU seconds (what they take in every other row too)."""
    port = free_port()
    cpu = children_cpu()
    sink = start_sink(port, count)
    start = time.perf_counter()
    # smtp-sink -M exits at its N-th message, perhaps before smtp-source's last QUIT
    with contextlib.suppress(subprocess.CalledProcessError):
        inject(port, count, size, sessions)
    wait_sink(sink, timeout=600)
    return time.perf_counter() - start, children_cpu() - cpu


def write_config(
    folder: Path,
    sink_port: int,
    smtp_port: int,
    http_port: int,
    store: str | None = None,
    relay_concurrency: int = 0,
) -> Path:
    """postlane's configuration for a run; ``relay_concurrency``: a cap on the relay's sends
    in flight (``[destinations.relay] concurrency``; 0: none)."""
    config = folder / "postlane.toml"
    limits = (
        f"[destinations.relay]\nconcurrency = {relay_concurrency}\n" if relay_concurrency else ""
    )
    url = store or f"sqlite:///{folder / 'bench.db'}"
    config.write_text(
        f"""
[store]
url = "{url}"
[delivery]
relay = "smtp://127.0.0.1:{sink_port}"
concurrency = 100
messages_per_connection = 1000
[http]
listen = "127.0.0.1:{http_port}"
[smtp]
listen = "127.0.0.1:{smtp_port}"
{limits}"""
    )
    return config


def fresh_store(store: str | None, name: str) -> str | None:
    """A PostgreSQL URL with a schema of its own (``?schema=``), or None (SQLite)."""
    if store is None or not store.startswith("postgres"):
        return store
    separator = "&" if "?" in store else "?"
    return f"{store}{separator}schema=bench_{name}_{os.getpid()}_{time.monotonic_ns()}"


def measure_postlane_smtp(
    count: int,
    size: int,
    sessions: int,
    processes: int = 1,
    store: str | None = None,
    relay_concurrency: int = 0,
) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sink_port, smtp_port, http_port = free_port(), free_port(), free_port()
        config = write_config(
            folder,
            sink_port,
            smtp_port,
            http_port,
            fresh_store(store, f"smtp{processes}"),
            relay_concurrency,
        )
        sink = start_sink(sink_port, count)
        several = ("--processes", str(processes)) if processes > 1 else ()
        serve = start_postlane(
            "serve", *several, config=config, log=folder / "serve.log", stop_timeout=60
        )
        with serve:
            serve.wait_until_blocking(  # SMTP and HTTP listening, a worker started, in each
                lambda: serve.output().count(RUNNING) >= processes, "every process running"
            )
            cpu = cpu_seconds([serve.pid])
            start = time.perf_counter()
            accepted = inject(smtp_port, count, size, sessions)
            wait_sink(sink, timeout=600, feeder=serve)
            return accepted, time.perf_counter() - start, cpu_seconds([serve.pid]) - cpu


def measure_postlane_api(
    count: int, size: int, store: str | None = None, relay_concurrency: int = 0
) -> tuple[float, float, float]:
    """Enqueue through the Python API (batches of 100, each acknowledged after its durable
    commit), then deliver with `postlane worker`; returns the enqueue's and the delivery's
    seconds, and the CPU seconds of both (this process's while enqueueing, the worker's)."""
    from postlane import Postlane
    from postlane.config import load_config
    from postlane.message import Message

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sink_port = free_port()
        config_path = write_config(
            folder,
            sink_port,
            free_port(),
            free_port(),
            fresh_store(store, "api"),
            relay_concurrency,
        )
        line = "x" * 70 + "\n"
        text = line * max(1, size // len(line))
        mail = Postlane(load_config(config_path))
        began, cpu = time.perf_counter(), time.process_time()
        for start in range(0, count, 100):
            mail.send_many(
                [
                    Message(sender="sender@example.com", to=["rcpt@example.net"], text=text)
                    for _ in range(start, min(count, start + 100))
                ]
            )
        enqueued, cpu = time.perf_counter() - began, time.process_time() - cpu
        mail.close()
        sink = start_sink(sink_port, count)
        began = time.perf_counter()
        log = folder / "worker.log"
        with start_postlane("worker", config=config_path, log=log, stop_timeout=60) as worker:
            worker_cpu = cpu_seconds([worker.pid])
            wait_sink(sink, timeout=600, feeder=worker)
            delivered = time.perf_counter() - began
            worker_cpu = cpu_seconds([worker.pid]) - worker_cpu
        return enqueued, delivered, cpu + worker_cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="messages")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="also serve --processes N")
    parser.add_argument("--store", help="a PostgreSQL URL for postlane (default: SQLite)")
    parser.add_argument(
        "--relay-concurrency",
        type=int,
        default=0,
        help="cap postlane's sends in flight to the relay ([destinations.relay] concurrency)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: smtp-sink drops privileges to 'nobody' and postsuper needs root")
    n = args.n

    progress(f"no queue: {n} messages from smtp-source straight into smtp-sink")
    nothing, tools_cpu = measure_nothing_between(n, args.size, args.sessions)
    postfix = None
    if not args.skip_postfix:
        progress(f"Postfix: {n} messages through smtp-source -> postfix -> smtp-sink")
        postfix = measure_postfix(n, args.size, args.sessions)
    progress(f"postlane: {n} messages through smtp-source -> postlane serve -> smtp-sink")
    cap = args.relay_concurrency
    serve = measure_postlane_smtp(
        n, args.size, args.sessions, store=args.store, relay_concurrency=cap
    )
    several = None
    if args.processes > 1:
        progress(f"postlane: the same through serve --processes {args.processes}")
        several = measure_postlane_smtp(
            n, args.size, args.sessions, args.processes, store=args.store, relay_concurrency=cap
        )
    progress(f"postlane: {n} messages enqueued by the API, then delivered by a worker")
    enqueued, delivered, api_cpu = measure_postlane_api(
        n, args.size, store=args.store, relay_concurrency=cap
    )
    done_progress()

    def versus(seconds: float) -> str:
        return f"{postfix[1] / seconds:.2f}x" if postfix else "-"

    def per_message(cpu: float) -> str:
        return f"{cpu / n * 1e6:,.0f} µs"

    def row(name: str, run: Run) -> tuple[str, str, str, str, str, str]:
        accepted, end_to_end, cpu = run
        return (
            name,
            f"{n / accepted:,.0f}",
            "-",
            f"{n / end_to_end:,.0f}",
            versus(end_to_end),
            per_message(cpu),
        )

    rows = [
        (
            "no queue (smtp-source -> smtp-sink)",
            "-",
            "-",
            f"{n / nothing:,.0f}",
            versus(nothing),
            per_message(tools_cpu),
        )
    ]
    if postfix is not None:
        rows.append(row("Postfix (SMTP in)", postfix))
    rows.append(row("postlane serve (SMTP in)", serve))
    if several is not None:
        rows.append(row(f"postlane serve --processes {args.processes} (SMTP in)", several))
    total = enqueued + delivered
    rows.append(
        (
            "postlane (API in, then worker)",
            f"{n / enqueued:,.0f}",
            f"{n / delivered:,.0f}",
            f"{n / total:,.0f}",
            versus(total),
            per_message(api_cpu),
        )
    )
    print(
        f"{n} messages of {args.size} bytes into smtp-sink; "
        "every one stored durably before it was acknowledged"
    )
    headers = ["", "accepted/s", "delivery alone/s", "end to end/s", "vs Postfix", "CPU/msg"]
    print(table(headers, rows))
    print(
        f"CPU/msg: the queue's own processes (Postfix's master and its daemons; postlane's "
        f"processes), user + system, per message; this machine has {os.cpu_count()} cores for "
        "them, smtp-source and smtp-sink together (the no-queue row: those two tools' own CPU, "
        "which they take beside every queue)"
    )
    if postfix is None:
        print("(Postfix is not listening on 127.0.0.1:25: run ../shared/anchors/postfix-relay.sh)")


if __name__ == "__main__":
    main()
