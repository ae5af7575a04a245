"""What outbound webhooks cost the mail queue: deliveries per second with the webhook sender
running beside the worker (in the same process, to a local verifying receiver) and without it,
in the same run, and how far behind the webhooks were when the mail was done.

    python benchmarks/webhooks.py [-n 5000] [--rounds 2] [--concurrency 8]

Each round enqueues N one-recipient messages (each gives a ``queued`` event, then a ``sent``
one), then times a :class:`~postlane.worker.Worker` delivering them to Postfix's smtp-sink (or,
without it, postlane's provider simulator), both peers in processes of their own. "on" runs a
:class:`~postlane.webhooks.sender.WebhookSender` in the worker's process and event loop, posting
every event to ``tests/webhook_receiver.py`` (its own process, verifying every signature with the
``standardwebhooks`` library). Rounds alternate off/on so drift on a shared machine hits both.
Aim: on/off >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.message import Message
from postlane.transports import transport_for
from postlane.webhooks.endpoints import WebhookEndpoint, new_secret
from postlane.webhooks.sender import SenderSettings, WebhookSender
from postlane.worker import Worker

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def start_peer(port: int) -> tuple[subprocess.Popen[bytes], str]:
    """smtp-sink when Postfix is installed (as root), else postlane's simulator."""
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if Path(sink).exists():
        command = [sink, "-u", "nobody", f"127.0.0.1:{port}", "1000"]
        name = "smtp-sink"
    else:
        command = [sys.executable, "-m", "postlane.cli", "simulate", "--listen"]
        command.append(f"127.0.0.1:{port}")
        name = "postlane simulate"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, name


def received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as answer:
        return int(json.loads(answer.read())["verified"])


def start_sender_process(store_url: str, table: dict[str, object]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/webhook_sender_process.py"),
            "--store",
            store_url,
            "--endpoint",
            json.dumps(table),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def one_round(
    count: int,
    smtp_port: int,
    hooks: tuple[int, str] | None,
    concurrency: int,
    in_process: bool = True,
    busy_share: float = SenderSettings().busy_share,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = config_from_dict(
            {
                "store": {"url": f"sqlite:///{tmp}/queue.db"},
                "delivery": {"relay": f"smtp://127.0.0.1:{smtp_port}"},
                "throttle": {"enabled": False},
            }
        )
        async with AsyncPostlane(config) as app:
            for start in range(0, count, 500):
                await app.send_many(
                    [
                        Message(sender="app@example.com", to=[f"u{i}@example.net"], text="x" * 800)
                        for i in range(start, min(count, start + 500))
                    ]
                )
            worker = Worker.from_config(config, app.store, transport_for(config), wake=app.wake)
            stop, hooks_stop = asyncio.Event(), asyncio.Event()
            sender_task = None
            sender_process = None
            before = 0
            if hooks is not None:
                port, secret = hooks
                before = received(port)
                table: dict[str, object] = {
                    "url": f"http://127.0.0.1:{port}/hooks",
                    "secret": secret,
                    "allow_private": True,
                    "concurrency": concurrency,
                }
                if in_process:
                    sender = WebhookSender(
                        app.store,  # type: ignore[arg-type]
                        [WebhookEndpoint.from_table(table)],
                        mail_activity=lambda: worker.attempts,
                        settings=SenderSettings(busy_share=busy_share),
                    )
                    sender_task = asyncio.create_task(sender.run(hooks_stop))
                else:
                    sender_process = start_sender_process(config.store.url, table)
            started = time.perf_counter()
            worker_task = asyncio.create_task(worker.run(stop))
            while worker.sent < count:  # noqa: ASYNC110 (a benchmark polls)
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - started
            stop.set()
            await worker_task
            result = {"seconds": seconds, "rate": count / seconds}
            if hooks is not None:
                port, _ = hooks
                events = 2 * count
                behind = events - (received(port) - before)
                caught_up = time.perf_counter()
                while received(port) - before < events:  # noqa: ASYNC110 (polls another process)
                    await asyncio.sleep(0.05)
                result["behind"] = behind
                result["catch_up"] = time.perf_counter() - caught_up
                hooks_stop.set()
                if sender_task is not None:
                    await sender_task
                if sender_process is not None:
                    sender_process.terminate()
                    sender_process.wait()
            await worker.transport.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="webhook requests in flight")
    parser.add_argument(
        "--sender",
        choices=("in-process", "process"),
        default="in-process",
        help="run the webhook sender in the worker's process, or in a process of its own",
    )
    parser.add_argument(
        "--busy-share",
        type=float,
        default=SenderSettings().busy_share,
        help="share of the time webhooks may start requests while mail is delivered",
    )
    args = parser.parse_args()
    smtp_port, hooks_port = free_port(), free_port()
    secret = new_secret()
    peer, peer_name = start_peer(smtp_port)
    receiver = subprocess.Popen(  # noqa: ASYNC220 (set-up, before anything is timed)
        [
            sys.executable,
            str(ROOT / "tests/webhook_receiver.py"),
            "--port",
            str(hooks_port),
            "--secret",
            secret,
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_port(hooks_port)
    off: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    try:
        for number in range(args.rounds):
            progress(f"round {number + 1}/{args.rounds}: webhooks off")
            off.append(await one_round(args.n, smtp_port, None, args.concurrency))
            progress(f"round {number + 1}/{args.rounds}: webhooks on")
            on.append(
                await one_round(
                    args.n,
                    smtp_port,
                    (hooks_port, secret),
                    args.concurrency,
                    in_process=args.sender == "in-process",
                    busy_share=args.busy_share,
                )
            )
    finally:
        done_progress()
        receiver.terminate()
        peer.terminate()
    rate_off = statistics.median(r["rate"] for r in off)
    rate_on = statistics.median(r["rate"] for r in on)
    # each "on" round is compared with the "off" round just before it: drift cancels
    ratio = statistics.median(b["rate"] / a["rate"] for a, b in zip(off, on, strict=True))
    print(
        f"{args.n} one-recipient messages into {peer_name}, {args.rounds} round(s) each, "
        f"webhooks: {2 * args.n} events per round, {args.concurrency} requests in flight, "
        f"sender {args.sender}, busy share {args.busy_share:g}"
    )
    rows = [
        ("webhooks off", f"{rate_off:,.0f}/s", "", ""),
        (
            "webhooks on",
            f"{rate_on:,.0f}/s",
            f"{statistics.median(r['behind'] for r in on):,.0f}",
            f"{statistics.median(r['catch_up'] for r in on):.1f}s",
        ),
    ]
    print(table(["", "deliveries", "events behind at the end", "then caught up in"], rows))
    print(
        "each round, off/on:",
        ", ".join(f"{a['rate']:,.0f}/{b['rate']:,.0f}" for a, b in zip(off, on, strict=True)),
    )
    print(f"on/off: {ratio:.2f}, the median of the rounds' ratios (aim >= 0.9)")


if __name__ == "__main__":
    try:
        import uvloop  # as `postlane serve` runs
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
