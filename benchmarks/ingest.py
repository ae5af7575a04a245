"""Messages accepted per second: postlane's SMTP submission beside Postfix's smtpd (same run),
and postlane's HTTP batch endpoint.

    sudo python benchmarks/ingest.py [-n 10000] [--size 2048] [--sessions 20] [--aiosmtpd-ref REF]
                                    [--processes N]

SMTP: smtp-source sends N messages of SIZE bytes over 20 sessions to each server; every 250 is
given only after the message is durably stored (Postfix: its queue file fsynced; postlane: the
commit). Postfix must be set up first (../shared/anchors/postfix-relay.sh); its relay target is
smtp-sink, started here, so Postfix's queue drains while it accepts (as in production).
HTTP: POST /v1/messages/batch with 100 messages per request, 4 concurrent clients.
--aiosmtpd-ref: also measure the SMTP receive path as it was at a git commit (its src/ exported
to a temporary folder and run instead of this tree's), e.g. 8c77439, the last on aiosmtpd: the
before and after in one run. For each postlane server, the CPU seconds the serve process spent
per message are shown too (steadier than the rate on a machine that does other work).
--processes N: postlane is measured again as ``serve --processes N`` (same run, same store kind),
to compare one process with N on the same ports (the CPU column: the supervisor's children).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table
from deliver import free_port, inject, port_open, start_sink

from tests.processes import RUNNING, start_postlane


def measure_postfix(count: int, size: int, sessions: int) -> float | None:
    if not port_open(25):
        return None
    subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
    sink = start_sink(2525, count)
    try:
        return inject(25, count, size, sessions)
    finally:
        sink.wait(timeout=600)


def serve_config(folder: Path, smtp_port: int, http_port: int) -> Path:
    config = folder / "postlane.toml"
    # relay to a closed port: delivery defers (connection) and stays out of the measurement's way
    config.write_text(
        f"""
[store]
url = "sqlite:///{folder / "ingest.db"}"
[delivery]
relay = "smtp://127.0.0.1:{free_port()}"
[http]
listen = "127.0.0.1:{http_port}"
[smtp]
listen = "127.0.0.1:{smtp_port}"
"""
    )
    return config


@dataclass
class Measured:
    smtp_seconds: float
    #: CPU seconds (user + system, all threads) serve spent while smtp-source ran
    smtp_cpu: float
    http_seconds: float | None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s children (serve --processes N: the serve processes)."""
    total = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += cpu_seconds(int(child))
    return total


def measure_postlane(
    count: int,
    size: int,
    sessions: int,
    *,
    source: Path | None = None,
    http: bool = True,
    processes: int = 1,
) -> Measured:
    """``source``: a ``src/`` folder to run instead of this tree's."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        smtp_port, http_port = free_port(), free_port()
        config = serve_config(folder, smtp_port, http_port)
        env: dict[str, str] = {"PYTHONPATH": str(source)} if source is not None else {}
        several = ("--processes", str(processes)) if processes > 1 else ()
        serve = start_postlane(
            "serve", *several, config=config, log=folder / "serve.log", stop_timeout=60, env=env
        )
        used = cpu_seconds if processes == 1 else children_cpu
        with serve:
            serve.wait_until_blocking(  # SMTP and HTTP listening in every process
                lambda: serve.output().count(RUNNING) >= processes, "every process running"
            )
            inject(smtp_port, min(count, 1000), size, sessions)  # warm-up: imports, caches
            before = used(serve.pid)
            smtp_seconds = inject(smtp_port, count, size, sessions)
            smtp_cpu = used(serve.pid) - before
            http_seconds = asyncio.run(post_batches(http_port, count, size)) if http else None
            return Measured(smtp_seconds, smtp_cpu, http_seconds)


@contextlib.contextmanager
def source_at(ref: str) -> Iterator[Path]:
    """This repository's ``src/`` at commit ``ref``, in a temporary folder."""
    repository = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repository), "archive", ref, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp) / "src"


async def post_batches(port: int, count: int, size: int) -> float:
    import httpx

    line = "x" * 70 + "\n"
    message = {
        "from": "sender@example.com",
        "to": ["rcpt@example.net"],
        "subject": "batch",
        "text": line * max(1, size // len(line)),
    }
    batches = [{"messages": [message] * min(100, count - start)} for start in range(0, count, 100)]
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            while not queue.empty():
                r = await c.post("/v1/messages/batch", json=queue.get_nowait())
                r.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(4)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--aiosmtpd-ref", metavar="REF", help="also measure this commit's SMTP")
    parser.add_argument("--processes", type=int, default=1, help="also measure serve --processes N")
    args = parser.parse_args()
    n = args.n
    progress(f"Postfix: {n} messages over {args.sessions} SMTP sessions")
    postfix = measure_postfix(n, args.size, args.sessions)
    before = None
    if args.aiosmtpd_ref:
        progress(f"postlane at {args.aiosmtpd_ref} (aiosmtpd): {n} messages over SMTP")
        with source_at(args.aiosmtpd_ref) as source:
            before = measure_postlane(n, args.size, args.sessions, source=source, http=False)
    progress(f"postlane: {n} messages over SMTP, then {n} through the batch endpoint")
    now = measure_postlane(n, args.size, args.sessions)
    several = None
    if args.processes > 1:
        progress(f"postlane serve --processes {args.processes}: the same")
        several = measure_postlane(n, args.size, args.sessions, processes=args.processes)
    done_progress()

    def vs_postfix(seconds: float) -> str:
        return f"{postfix / seconds:.2f}x" if postfix else "-"

    def cpu(measured: Measured) -> str:
        return f"{measured.smtp_cpu / n * 1e6:,.0f}"

    rows = []
    if postfix is not None:
        rows.append(("Postfix smtpd (SMTP)", f"{n / postfix:,.0f}", "1.00x", "-"))
    if before is not None:
        seconds = before.smtp_seconds
        name = f"postlane serve (SMTP, aiosmtpd, {args.aiosmtpd_ref})"
        rows.append((name, f"{n / seconds:,.0f}", vs_postfix(seconds), cpu(before)))
    seconds = now.smtp_seconds
    rows.append(("postlane serve (SMTP)", f"{n / seconds:,.0f}", vs_postfix(seconds), cpu(now)))
    assert now.http_seconds is not None
    seconds = now.http_seconds
    http = ("postlane serve (HTTP batch of 100)", f"{n / seconds:,.0f}", vs_postfix(seconds), "-")
    rows.append(http)
    if several is not None:
        label = f"postlane serve --processes {args.processes}"
        seconds = several.smtp_seconds
        rows.append((f"{label} (SMTP)", f"{n / seconds:,.0f}", vs_postfix(seconds), cpu(several)))
        assert several.http_seconds is not None
        seconds = several.http_seconds
        batch = (f"{label} (HTTP batch of 100)", f"{n / seconds:,.0f}", vs_postfix(seconds), "-")
        rows.append(batch)
    print(f"{n} messages of {args.size} bytes accepted, each durably stored before its answer")
    print(table(["", "accepted/s", "vs Postfix", "serve CPU us/message"], rows))
    if postfix is None:
        print("(Postfix is not listening on 127.0.0.1:25: run ../shared/anchors/postfix-relay.sh)")


if __name__ == "__main__":
    main()
