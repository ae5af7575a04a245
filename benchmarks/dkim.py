"""DKIM signing: what it costs a delivering process, beside dkimpy (the previous signer), same run.

    python benchmarks/dkim.py [-n 1000] [--rounds 3] [--sign 2000] [--dkimpy 200] [--size 2048]

1. Signing alone: N messages through ``DkimSigner.sign_envelope`` (the signer's thread), 20 at
   a time, as the transports call it, while a ticker task on the same event loop measures how
   late its 1 ms sleeps wake (the loop's lag): postlane's signer with an RSA-2048 key, with RSA
   and Ed25519 (dual signing), and dkimpy's pure-Python RSA as postlane used it before (in
   ``asyncio.to_thread``). The CPU column is this process's CPU time per message, all threads:
   on a busy machine, the figure that moves least.
2. Delivery: N messages enqueued into SQLite, then delivered by an in-process Worker into a sink
   (Postfix's smtp-sink when installed, else aiosmtpd in another process), without a DKIM key,
   with an RSA key and with both keys, in interleaved rounds; the ticker runs here too.

Results go to stdout, progress to stderr. The ratios are the point: absolute numbers drift on a
shared machine, ratios measured in one run much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.app import AsyncPostlane
from postlane.classify import default_rules
from postlane.config import config_from_dict
from postlane.dkim import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DkimKey,
    DkimSigner,
    KeyType,
    dns_record_name,
    generate_key,
)
from postlane.message import Message
from postlane.transports import transport_for
from postlane.transports.base import Envelope
from postlane.worker import Worker

DOMAIN = "shop.example.com"
CONCURRENCY = 20


def import_dkimpy() -> ModuleType:
    """dkimpy's package, which this script's own name hides while its folder is on sys.path."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    try:
        return importlib.import_module("dkim")
    finally:
        sys.path[:] = saved


dkim = import_dkimpy()


class Measurement(NamedTuple):
    rate: float
    #: how late a 1 ms sleep on the loop woke, p99
    lag_ms: float
    #: CPU time per message: of the whole process (every thread), of the event loop's thread
    cpu_ms: float
    loop_cpu_ms: float


class Measuring:
    """Times what runs inside it for ``count`` messages: wall time, CPU time (the process's,
    and the calling thread's, the event loop's), and the loop's lag from a ticker task."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.lag = LoopLag()

    async def __aenter__(self) -> Measuring:
        await self.lag.__aenter__()
        self._start = (time.perf_counter(), time.process_time(), time.thread_time())
        return self

    async def __aexit__(self, *exc: object) -> None:
        end = (time.perf_counter(), time.process_time(), time.thread_time())
        await self.lag.__aexit__(*exc)
        wall, cpu, loop_cpu = (b - a for a, b in zip(self._start, end, strict=True))
        self.result = Measurement(
            self.count / wall,
            self.lag.p99_ms(),
            cpu * 1000 / self.count,
            loop_cpu * 1000 / self.count,
        )


class LoopLag:
    """A task that sleeps 1 ms at a time and records how much later than that it woke."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _tick(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - start - 0.001)

    def p99_ms(self) -> float:
        if len(self.lags) < 2:
            return float("nan")
        return statistics.quantiles(self.lags, n=100)[98] * 1000


def message_bytes(size: int, number: int) -> bytes:
    line = "The quick brown fox jumps over the lazy dog, again and again. "
    body = (line * (size // len(line) + 1))[:size]
    return (
        f"From: Shop <app@{DOMAIN}>\r\nTo: u{number}@example.net\r\nSubject: Order {number}\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{number}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def dkimpy_sign(content: bytes, selector: str, private_pem: bytes) -> bytes:
    """The signer postlane had before: dkimpy, the same fields and oversigning."""
    signer = dkim.DKIM(content, linesep=b"\r\n")
    occurs = Counter(name.lower() for name, _ in signer.headers)
    include = [name.encode() for name in SIGNED_HEADERS for _ in range(occurs[name.encode()])]
    include += [name.encode() for name in OVERSIGNED_HEADERS]
    signature: bytes = signer.sign(
        selector.encode(),
        DOMAIN.encode(),
        private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    return signature + content


async def idle_lag(seconds: float = 1.0) -> float:
    """The loop lag p99 (ms) with nothing else running: what the machine alone adds."""
    async with LoopLag() as lag:
        await asyncio.sleep(seconds)
    return lag.p99_ms()


async def sign_alone(
    label: str, sign: Callable[[Envelope], Awaitable[object]], envelopes: list[Envelope]
) -> Measurement:
    """Signing ``envelopes``, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def one(envelope: Envelope) -> None:
        nonlocal done
        async with gate:
            await sign(envelope)
        done += 1
        if done % 50 == 0:
            progress(f"signing alone, {label}: {done}/{len(envelopes)}")

    async with Measuring(len(envelopes)) as measuring:
        await asyncio.gather(*(one(envelope) for envelope in envelopes))
    return measuring.result


def start_sink() -> tuple[subprocess.Popen[bytes], int, str]:
    """A sink in another process, so that it does not share the worker's CPU time slices."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    smtp_sink = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin")
    if smtp_sink is not None:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [smtp_sink, *user, f"127.0.0.1:{port}", "1000"]
        name = "Postfix's smtp-sink"
    else:
        handler = "aiosmtpd.handlers.Sink"
        command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", handler]
        name = "aiosmtpd's Sink"
    sink = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return sink, port, name
        if time.monotonic() > deadline or sink.poll() is not None:
            sink.kill()
            sys.exit(f"{name} did not start on 127.0.0.1:{port}")
        time.sleep(0.05)


async def deliver(
    label: str, folder: Path, sink_port: int, count: int, size: int, dkim_table: dict[str, str]
) -> Measurement:
    """Delivering ``count`` messages, enqueued first."""
    config = config_from_dict(
        {
            "store": {"url": f"sqlite:///{folder / label}.db"},
            "delivery": {"relay": f"smtp://127.0.0.1:{sink_port}", "helo_name": "bench.test"},
            "throttle": {"enabled": False},
            **({"dkim": {DOMAIN: dkim_table}} if dkim_table else {}),
        },
        base_dir=folder,
    )
    text = message_bytes(size, 0).split(b"\r\n\r\n", 1)[1].decode()
    async with AsyncPostlane(config) as app:
        for start in range(0, count, 200):
            progress(f"delivery, {label}: enqueueing {start}/{count}")
            await app.send_many(
                [
                    Message(sender=f"app@{DOMAIN}", to=[f"u{n}@example.net"], text=text)
                    for n in range(start, min(count, start + 200))
                ]
            )
        worker = Worker.from_config(config, app.store, transport_for(config), wake=app.wake)
        progress(f"delivery, {label}: delivering {count}")
        try:
            async with Measuring(count) as measuring:
                delivered = await worker.run_until_idle()
        finally:
            await worker.transport.close()
        sent = (await app.stats()).sent
    if delivered != count or sent != count:
        sys.exit(f"delivery, {label}: {sent} of {count} sent ({delivered} attempts)")
    return measuring.result


async def run(count: int, rounds: int, sign_count: int, dkimpy_count: int, size: int) -> None:
    progress("generating keys")
    rsa = generate_key(DOMAIN, "bench-rsa")
    ed25519 = generate_key(DOMAIN, "bench-ed25519", kind=KeyType.ED25519)
    rsa_key = DkimKey(DOMAIN, "bench-rsa", rsa.private_pem)
    ed25519_key = DkimKey(DOMAIN, "bench-ed25519", ed25519.private_pem)
    signers = {
        "rsa-sha256": DkimSigner([rsa_key]),
        "rsa-sha256 + ed25519-sha256": DkimSigner([rsa_key, ed25519_key]),
    }
    # what is measured must be right: dkimpy verifies one message of each signer
    records = {
        f"{dns_record_name(DOMAIN, 'bench-rsa')}.".encode(): rsa.dns_record.encode(),
        f"{dns_record_name(DOMAIN, 'bench-ed25519')}.".encode(): ed25519.dns_record.encode(),
    }
    sample = message_bytes(size, 0)
    for name, signer in signers.items():
        signed = signer.sign(sample, DOMAIN)
        if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name)):
            sys.exit(f"{name}: the signature does not verify")

    def envelopes(number: int) -> list[Envelope]:
        return [
            Envelope(
                f"q{n}", f"app@{DOMAIN}", (f"u{n}@example.net",), message_bytes(size, n), f"<{n}@x>"
            )
            for n in range(number)
        ]

    async def dkimpy_in_thread(envelope: Envelope) -> bytes:
        return await asyncio.to_thread(dkimpy_sign, envelope.content, "bench-rsa", rsa.private_pem)

    progress("the loop's lag with nothing running")
    idle = await idle_lag()
    baseline = await sign_alone("dkimpy", dkimpy_in_thread, envelopes(dkimpy_count))
    rows: list[tuple[str, int, Measurement]] = [
        ("dkimpy, RSA in pure Python (before)", dkimpy_count, baseline)
    ]
    for name, signer in signers.items():
        measured = await sign_alone(name, signer.sign_envelope, envelopes(sign_count))
        rows.append((f"postlane, {name}", sign_count, measured))
    default_rules()  # the reply rules compile on first use: not in the first delivery's time

    sink, sink_port, sink_name = start_sink()
    runs: dict[str, list[Measurement]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "rsa.pem").write_bytes(rsa.private_pem)
            (folder / "ed25519.pem").write_bytes(ed25519.private_pem)
            rsa_table = {"selector": "bench-rsa", "private_key": "rsa.pem"}
            dual_table = rsa_table | {
                "ed25519_selector": "bench-ed25519",
                "ed25519_private_key": "ed25519.pem",
            }
            # interleaved rounds: a burst of load elsewhere hits every configuration alike
            for round_number in range(rounds):
                for label, dkim_table in (
                    ("unsigned", {}),
                    ("rsa-sha256", rsa_table),
                    ("rsa-sha256 + ed25519-sha256", dual_table),
                ):
                    name = f"{label.replace(' ', '').replace('+', '-')}-{round_number}"
                    measured = await deliver(name, folder, sink_port, count, size, dkim_table)
                    runs.setdefault(label, []).append(measured)
    finally:
        sink.terminate()
        sink.wait()
    done_progress()
    # each configuration's median round, by rate
    delivery = [(label, sorted(measured)[len(measured) // 2]) for label, measured in runs.items()]

    print(
        f"Loop lag: how late a 1 ms sleep on the event loop wakes, p99 ({idle:.1f} ms on this "
        "machine with nothing running). CPU: CPU time per message, of the whole process (every "
        "thread) and of the event loop's thread."
    )
    print()
    print(
        f"Signing alone: {CONCURRENCY} at a time through sign_envelope (dkimpy: to_thread), "
        f"{size}-byte bodies"
    )
    print(
        table(
            ["signer", "messages", "signed/s", "vs dkimpy", "CPU", "loop CPU", "loop lag p99"],
            [
                [
                    label,
                    n,
                    f"{measured.rate:,.0f}",
                    f"{measured.rate / baseline.rate:.1f}x",
                    f"{measured.cpu_ms:.2f} ms",
                    f"{measured.loop_cpu_ms:.2f} ms",
                    f"{measured.lag_ms:.1f} ms",
                ]
                for label, n, measured in rows
            ],
        )
    )
    print()
    unsigned = delivery[0][1]
    print(
        f"Delivery: {count} messages of {size} bytes enqueued into SQLite, then delivered by an "
        f"in-process Worker into {sink_name}; the median of {rounds} interleaved rounds"
    )
    print(
        table(
            ["DKIM keys", "delivered/s", "vs unsigned", "CPU", "loop CPU", "loop lag p99"],
            [
                [
                    label,
                    f"{measured.rate:,.0f}",
                    f"{measured.rate / unsigned.rate:.2f}",
                    f"{measured.cpu_ms:.2f} ms",
                    f"{measured.loop_cpu_ms:.2f} ms",
                    f"{measured.lag_ms:.1f} ms",
                ]
                for label, measured in delivery
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="messages delivered per run")
    parser.add_argument("--sign", type=int, default=2000, help="messages signed by postlane")
    parser.add_argument("--dkimpy", type=int, default=200, help="messages signed by dkimpy")
    parser.add_argument("--rounds", type=int, default=3, help="delivery runs of each kind")
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message")
    args = parser.parse_args()
    asyncio.run(run(args.n, args.rounds, args.sign, args.dkimpy, args.size))


if __name__ == "__main__":
    main()
