"""Messages accepted per second: postlane's SMTP submission beside Postfix's smtpd (same run),
and postlane's HTTP batch endpoint.

    sudo python benchmarks/ingest.py [-n 10000] [--size 2048] [--sessions 20] [--processes N]

SMTP: smtp-source sends N messages of SIZE bytes over 20 sessions to each server; every 250 is
given only after the message is durably stored (Postfix: its queue file fsynced; postlane: the
commit). Postfix must be set up first (../shared/anchors/postfix-relay.sh); its relay target is
smtp-sink, started here, so Postfix's queue drains while it accepts (as in production).
HTTP: POST /v1/messages/batch with 100 messages per request, 4 concurrent clients.
``--processes N``: postlane is measured again as ``serve --processes N`` (same run, same store
kind), to compare one process with N on the same ports.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
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


def measure_postlane(
    count: int, size: int, sessions: int, processes: int = 1
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        smtp_port, http_port = free_port(), free_port()
        config = serve_config(folder, smtp_port, http_port)
        serve = start_postlane(
            "serve",
            "--processes",
            str(processes),
            config=config,
            log=folder / "serve.log",
            stop_timeout=60,
        )
        with serve:
            serve.wait_until_blocking(  # SMTP and HTTP listening in every process
                lambda: serve.output().count(RUNNING) >= processes, "every process running"
            )
            smtp_seconds = inject(smtp_port, count, size, sessions)
            http_seconds = asyncio.run(post_batches(http_port, count, size))
            return smtp_seconds, http_seconds


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
    parser.add_argument("--processes", type=int, default=1, help="also measure serve --processes N")
    args = parser.parse_args()
    n = args.n
    progress(f"Postfix: {n} messages over {args.sessions} SMTP sessions")
    postfix = measure_postfix(n, args.size, args.sessions)
    progress(f"postlane: {n} messages over SMTP, then {n} through the batch endpoint")
    smtp, http = measure_postlane(n, args.size, args.sessions)
    several = None
    if args.processes > 1:
        progress(f"postlane serve --processes {args.processes}: the same")
        several = measure_postlane(n, args.size, args.sessions, args.processes)
    done_progress()
    rows = []
    if postfix is not None:
        rows.append(("Postfix smtpd (SMTP)", f"{n / postfix:,.0f}", "1.00x"))
    ratio = f"{postfix / smtp:.2f}x" if postfix else "-"
    rows.append(("postlane serve (SMTP)", f"{n / smtp:,.0f}", ratio))
    ratio = f"{postfix / http:.2f}x" if postfix else "-"
    rows.append(("postlane serve (HTTP batch of 100)", f"{n / http:,.0f}", ratio))
    if several is not None:
        label = f"postlane serve --processes {args.processes}"
        ratio = f"{postfix / several[0]:.2f}x" if postfix else "-"
        rows.append((f"{label} (SMTP)", f"{n / several[0]:,.0f}", ratio))
        ratio = f"{postfix / several[1]:.2f}x" if postfix else "-"
        rows.append((f"{label} (HTTP batch of 100)", f"{n / several[1]:,.0f}", ratio))
    print(f"{n} messages of {args.size} bytes accepted, each durably stored before its answer")
    print(table(["", "accepted/s", "vs Postfix"], rows))
    if postfix is None:
        print("(Postfix is not listening on 127.0.0.1:25: run ../shared/anchors/postfix-relay.sh)")


if __name__ == "__main__":
    main()
