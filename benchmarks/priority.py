"""Priority under a backlog: how long a high-lane message waits behind a low-lane backlog.

A low-lane backlog (``--low``, 1,500) is queued for an SMTP server that takes ``--peer-seconds``
(1 s) over every message, with ``--concurrency`` (20) sends in flight; once it flows, a
high-lane message (a password reset) is sent every ``--every`` seconds (0.3 s), ``--high`` of
them. For each one: the time from ``send()`` returning to the server's 250 ("delivered"), and
to the server having its DATA ("at the peer"). The aim (issue 20): delivered within the peer's
own time plus 0.5 s (1.5 s at most, 1.3 s median), while the low lane keeps its pace.

The baseline, in the same run: the same scenario against the code of another checkout
(``--before PATH``, e.g. ``git worktree add /tmp/postlane-before 53e7607``), alternating rounds.
Each measurement runs in a process of its own (``python benchmarks/priority.py --child``) with
that checkout's ``src`` first on its path.

    python benchmarks/priority.py --before /tmp/postlane-before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import done_progress, progress, table


class SlowPeer:
    """An SMTP server (aiosmtpd) that holds every message ``seconds`` before its 250, and
    notes when each recipient's DATA came and when it was answered."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.arrived: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.in_progress = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        for rcpt in envelope.rcpt_tos:
            self.arrived[rcpt] = now
        self.in_progress += 1
        try:
            await asyncio.sleep(self.seconds)  # the peer's own time: the scenario, not a wait
        finally:
            self.in_progress -= 1
        now = time.monotonic()
        for rcpt in envelope.rcpt_tos:
            self.answered[rcpt] = now
        return "250 2.0.0 OK"


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    from aiosmtpd.smtp import SMTP

    from postlane.app import AsyncPostlane
    from postlane.config import config_from_dict
    from postlane.message import Message
    from postlane.transports import transport_for
    from postlane.worker import Worker

    loop = asyncio.get_running_loop()
    peer = SlowPeer(args.peer_seconds)
    server = await loop.create_server(
        lambda: SMTP(peer, hostname="peer.test", loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="postlane-priority-") as folder:
        config = config_from_dict(
            {
                "store": {"url": f"sqlite:///{folder}/postlane.db"},
                "delivery": {
                    "relay": f"smtp://127.0.0.1:{port}",
                    "concurrency": args.concurrency,
                    "connections_per_host": args.concurrency,
                    "shutdown_grace": "1s",
                },
            },
            base_dir=Path(folder),
        )
        async with AsyncPostlane(config) as app:
            for start in range(0, args.low, 100):
                await asyncio.gather(
                    *(
                        app.send(
                            Message(
                                sender="news@example.com",
                                to=[f"news{i}@example.net"],
                                subject="news",
                                text="x",
                                lane="low",
                            )
                        )
                        for i in range(start, min(args.low, start + 100))
                    )
                )
            worker = Worker.from_config(
                config, app.store, transport_for(config), wake=app.wake, clock=app.clock
            )
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            # the backlog flows: every slot busy (but the one a worker of 10 slots or more keeps
            # for the high lane), for a couple of the peer's turns
            deadline = time.monotonic() + 60
            while peer.in_progress < args.concurrency - (args.concurrency >= 10):
                if time.monotonic() > deadline:
                    raise SystemExit("the backlog never filled the send slots")
                await asyncio.sleep(0.05)
            await asyncio.sleep(2 * args.peer_seconds)
            low_before = len(peer.answered)
            sent_at: dict[str, float] = {}
            window_start = time.monotonic()
            for n in range(args.high):
                rcpt = f"reset{n}@example.net"
                await app.send(
                    Message(
                        sender="auth@example.com", to=[rcpt], subject="reset", text="x", lane="high"
                    )
                )
                sent_at[rcpt] = time.monotonic()
                await asyncio.sleep(args.every)
            deadline = time.monotonic() + 60
            while not all(rcpt in peer.answered for rcpt in sent_at):
                if time.monotonic() > deadline:
                    raise SystemExit("high-lane messages were not delivered within a minute")
                await asyncio.sleep(0.05)
            window = time.monotonic() - window_start
            low_done = sum(1 for rcpt in peer.answered if rcpt.startswith("news")) - low_before
            peer.seconds = 0.0  # let the rest go at once so the worker stops quickly
            stop.set()
            await running
            await worker.transport.close()
    server.close()
    delivered = [peer.answered[rcpt] - sent_at[rcpt] for rcpt in sent_at]
    reached = [peer.arrived[rcpt] - sent_at[rcpt] for rcpt in sent_at]
    return {
        "delivered": delivered,
        "reached": reached,
        "low_rate": low_done / window,
        "low_rate_full": args.concurrency / args.peer_seconds,
    }


def child(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(scenario(args))))


def run_child(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(source / "src"))
    command = [
        sys.executable,
        __file__,
        "--child",
        f"--low={args.low}",
        f"--high={args.high}",
        f"--every={args.every}",
        f"--concurrency={args.concurrency}",
        f"--peer-seconds={args.peer_seconds}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{source}: the measurement failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=1500, help="low-lane backlog")
    parser.add_argument("--high", type=int, default=30, help="high-lane messages sent")
    parser.add_argument("--every", type=float, default=0.3, help="seconds between them")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--peer-seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    here = Path(__file__).resolve().parent.parent
    variants = [("this checkout", here)]
    if args.before is not None:
        variants.insert(0, (f"before ({args.before})", args.before.resolve()))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for round_ in range(1, args.rounds + 1):
        for name, source in variants:
            progress(f"round {round_}/{args.rounds}: {name}")
            results[name].append(run_child(source, args))
    done_progress()
    print(
        f"{args.low} low-lane messages queued for a server taking {args.peer_seconds:g} s a "
        f"message, {args.concurrency} in flight; a high-lane message every {args.every:g} s, "
        f"{args.high} per round, {args.rounds} round(s)"
    )
    rows = []
    worst: dict[str, float] = {}
    for name, _ in variants:
        delivered = [v for r in results[name] for v in r["delivered"]]
        reached = [v for r in results[name] for v in r["reached"]]
        low = statistics.mean(r["low_rate"] for r in results[name])
        full = results[name][0]["low_rate_full"]
        worst[name] = max(delivered)
        rows.append(
            [
                name,
                f"{statistics.median(reached):.2f} s",
                f"{statistics.median(delivered):.2f} s",
                f"{percentile(delivered, 0.9):.2f} s",
                f"{max(delivered):.2f} s",
                f"{low:.1f}/s of {full:.0f}/s",
            ]
        )
    print(
        table(
            [
                "code",
                "at the peer p50",
                "delivered p50",
                "p90",
                "max",
                "low lane meanwhile",
            ],
            rows,
        )
    )
    if len(variants) == 2:
        before, after = (name for name, _ in variants)
        print(f"worst wait: {worst[before] / worst[after]:.1f}x shorter than before")
    aim = args.peer_seconds + 0.5
    print(f"aim: delivered within {aim:g} s (the peer's {args.peer_seconds:g} s + 0.5 s)")


if __name__ == "__main__":
    main()
