"""Bounces arriving while mail goes out: DSNs per second through the bounce listener, and what
they cost the worker's delivery rate, side by side in one run.

    python benchmarks/bounces.py [-n 10000] [-m 10000] [--sessions 10] [--store URL]

Two runs on fresh stores, each set up alike (N earlier messages delivered, so N deliveries are
``sent`` and have VERP return paths), then timed:

- alone: a worker (VerpTransport around the SMTP relay transport) delivers M new messages
  into a peer (Postfix's smtp-sink when installed, else an aiosmtpd server in a subprocess);
- with bounces: the same, while a separate process sends N DSNs (Postfix's own format, each to
  the VERP address of one sent delivery, from the null sender) over SESSIONS SMTP sessions to
  the bounce listener running in the worker's process, as ``serve`` will run it. Each DSN is
  answered 250 only once its bounce is recorded.

Printed: deliveries/s in both runs and their ratio, and DSNs/s. Absolute numbers drift on a
shared machine; the ratio measured in one run does not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.feedback.inbound import BounceProcessor
from postlane.feedback.verp import ReturnPaths, VerpTransport
from postlane.ingest.bounces import BounceListenerSettings, start_bounce_listener
from postlane.message import Message
from postlane.transports import transport_for
from postlane.worker import Worker

DOMAIN = "bounce.example"
TEMPLATE = (
    Path(__file__).resolve().parents[1] / "tests" / "data" / "feedback" / "postfix-failed.eml"
)
PLACEHOLDER = b"b-7-abcdefghijklmnop@bounce.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def start_peer(port: int) -> subprocess.Popen[bytes]:
    """A destination that takes everything: smtp-sink, else aiosmtpd, in its own process."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    sink = shutil.which("smtp-sink", path=path)
    if sink is not None:
        command = [sink]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command += [f"127.0.0.1:{port}", "1000"]
    else:
        command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
    peer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return peer


def config(folder: Path, peer_port: int, store: str | None) -> Any:
    return config_from_dict(
        {
            "store": {"url": store or f"sqlite:///{folder / 'bench.db'}"},
            "delivery": {
                "relay": f"smtp://127.0.0.1:{peer_port}",
                "concurrency": 100,
                "messages_per_connection": 1000,
                "tls_verify": False,
            },
            "retry": {"jitter": 0},
        },
        base_dir=folder,
    )


async def enqueue(app: AsyncPostlane, count: int, prefix: str) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 200):
        batch = [
            Message(
                sender="Shop <app@shop.example>",
                to=[f"{prefix}{i}@example.net"],
                subject="Your order",
                text="It shipped.\n" * 20,
            )
            for i in range(start, min(count, start + 200))
        ]
        ids += [r.id for r in await app.send_many(batch)]
    return ids


def write_dsns(path: Path, paths: ReturnPaths, deliveries: list[tuple[int, str]]) -> None:
    """One Postfix DSN per delivery, length-prefixed, for the feeder process."""
    template = TEMPLATE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    with path.open("wb") as out:
        for delivery_id, address in deliveries:
            verp = paths.address(delivery_id)
            dsn = template.replace(PLACEHOLDER, verp.encode()).replace(
                b"nobody@example.net", address.encode()
            )
            out.write(struct.pack(">I", len(verp)) + verp.encode())
            out.write(struct.pack(">I", len(dsn)) + dsn)


def read_dsns(path: Path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    out = []
    at = 0
    while at < len(data):
        (size,) = struct.unpack_from(">I", data, at)
        verp = data[at + 4 : at + 4 + size].decode()
        at += 4 + size
        (size,) = struct.unpack_from(">I", data, at)
        out.append((verp, data[at + 4 : at + 4 + size]))
        at += 4 + size
    return out


async def feed(path: Path, port: int, sessions: int) -> None:
    """The feeder process: send every DSN of ``path`` over ``sessions`` SMTP sessions."""
    import aiosmtplib

    dsns = read_dsns(path)
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in dsns:
        queue.put_nowait(item)

    clients = [
        aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120, start_tls=False)
        for _ in range(sessions)
    ]
    for client in clients:
        await client.connect()
    # connected: say so, and start when told (the worker starts at the same moment)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    async def session(client: aiosmtplib.SMTP) -> None:
        while not queue.empty():
            verp, dsn = queue.get_nowait()
            errors, _ = await client.sendmail("", [verp], dsn)  # raises unless 250
            if errors:
                raise SystemExit(f"the listener refused {verp}: {errors}")
        await client.quit()

    await asyncio.gather(*(session(client) for client in clients))


async def run(args: argparse.Namespace, with_bounces: bool) -> tuple[float, float | None]:
    """One run; returns (deliveries/s, DSNs/s or None)."""
    label = "with bounces" if with_bounces else "alone"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        peer_port, bounce_port = free_port(), free_port()
        peer = start_peer(peer_port)
        try:
            cfg = config(folder, peer_port, args.store)
            async with AsyncPostlane(cfg) as app:
                key = await app.store.secret("verp", app.clock.now())
                transport = VerpTransport(transport_for(cfg), DOMAIN, key)
                worker = Worker.from_config(cfg, app.store, transport, clock=app.clock)
                progress(f"{label}: setting up: {args.n} earlier messages delivered")
                earlier = await enqueue(app, args.n, "earlier")
                await worker.run_until_idle()
                deliveries = []
                for queue_id in earlier:
                    [ref] = await app.store.find_deliveries(
                        f"earlier{len(deliveries)}@example.net", queue_id=queue_id
                    )
                    deliveries.append((ref.delivery_id, ref.address))
                dsn_file = folder / "dsns.bin"
                write_dsns(dsn_file, ReturnPaths(DOMAIN, key), deliveries)
                await enqueue(app, args.m, "new")
                processor = BounceProcessor(app.store, ReturnPaths(DOMAIN, key), clock=app.clock)
                settings = BounceListenerSettings(listen=f"127.0.0.1:{bounce_port}")
                async with start_bounce_listener(  # as serve runs it: mail first
                    processor, settings, mail_activity=lambda: worker.attempts
                ) as _:
                    feeder = None
                    if with_bounces:
                        feeder = await asyncio.create_subprocess_exec(
                            sys.executable, __file__, "--feed", str(dsn_file),
                            "--port", str(bounce_port), "--sessions", str(args.sessions),
                            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        )  # fmt: skip
                        assert feeder.stdin is not None and feeder.stdout is not None
                        if await feeder.stdout.readline() != b"ready\n":
                            raise SystemExit("the DSN feeder could not connect")
                        feeder.stdin.write(b"go\n")
                    stop = asyncio.Event()
                    started = time.perf_counter()
                    delivering = asyncio.create_task(worker.run(stop))
                    fed_at: float | None = None
                    delivered_at: float | None = None
                    target = args.n + args.m
                    while delivered_at is None or (feeder is not None and fed_at is None):
                        await asyncio.sleep(0.2)
                        stats = await app.store.stats(app.clock.now())
                        elapsed = time.perf_counter() - started
                        if delivered_at is None and stats.sent + stats.bounced >= target:
                            delivered_at = elapsed
                        if feeder is not None and fed_at is None and feeder.returncode is not None:
                            if feeder.returncode != 0:
                                raise SystemExit("the DSN feeder failed")
                            fed_at = elapsed
                        delivered = stats.sent + stats.bounced - args.n
                        expected = args.n if with_bounces else 0
                        progress(
                            f"{label}: {elapsed:5.1f}s  delivered {delivered}/{args.m}  "
                            f"bounces recorded {stats.bounced}/{expected}"
                        )
                    stop.set()
                    await delivering
                    if feeder is not None:
                        await feeder.wait()
                        bounced = (await app.store.stats(app.clock.now())).bounced
                        if bounced != args.n:
                            raise SystemExit(f"{bounced} of {args.n} bounces recorded")
                await transport.close()
        finally:
            peer.kill()
            peer.wait()
    assert delivered_at is not None
    return args.m / delivered_at, (args.n / fed_at if fed_at else None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="DSNs (and earlier messages)")
    parser.add_argument("-m", type=int, default=10_000, help="messages delivered meanwhile")
    parser.add_argument("--sessions", type=int, default=10, help="SMTP sessions sending DSNs")
    parser.add_argument("--store", help="a store URL (default: SQLite in a temporary folder)")
    parser.add_argument("--feed", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feed is not None:
        asyncio.run(feed(args.feed, args.port, args.sessions))
        return
    alone, _ = asyncio.run(run(args, with_bounces=False))
    together, dsns = asyncio.run(run(args, with_bounces=True))
    done_progress()
    print(
        f"{args.m} messages delivered by a worker (VERP, 100 in flight) into a sink; "
        f"{args.n} DSNs over {args.sessions} sessions to the bounce listener in the same process"
    )
    rows = [
        ("deliveries alone", f"{alone:,.0f}", "-", "1.00x"),
        ("deliveries while DSNs arrive", f"{together:,.0f}", "-", f"{together / alone:.2f}x"),
        ("DSNs recorded (listener)", "-", f"{dsns:,.0f}" if dsns else "-", "-"),
    ]
    print(table(["", "deliveries/s", "DSNs/s", "vs alone"], rows))


if __name__ == "__main__":
    main()
