"""Where the time of ``postlane serve``'s SMTP receive path goes: py-spy samples the serve
process while smtp-source sends it mail, and the samples of the event loop's thread are put in
buckets (the SMTP server's own Python, socket writes, the handler, the store, ...).

    pip install py-spy
    sudo python benchmarks/smtp_profile.py [-n 10000] [--ref REF]

``--ref``: profile the code of an earlier commit instead (e.g. 8c77439, the last on aiosmtpd).
Needs root (py-spy reads another process's memory) and Postfix's smtp-source.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import table
from deliver import free_port, inject
from ingest import cpu_seconds, serve_config, source_at

from tests.processes import start_postlane

#: (bucket, pattern searched in a sample's stack), the first that matches wins
BUCKETS = [
    ("delivery worker (polling an empty queue)", r"postlane/worker\.py"),
    ("handler: store enqueue, loop side", r"send_prepared"),
    (
        "handler: sender, recipients, message checks, Received",
        r"handle_(MAIL|RCPT|DATA)|SubmissionHandler\.(mail|rcpt|data|_may_submit)",
    ),
    (
        "socket writes (one send() per reply or batch)",
        r"StreamWriter\.write \(|_flush \(|\.push \(",
    ),
    ("per-connection setup", r"connection_made|SMTP\.__init__|factory"),
    (
        "SMTP server: parsing and dispatch (Python)",
        r"aiosmtpd|smtpd\.py|smtp_(protocol|syntax|body)\.py",
    ),
]


EVENT_LOOP = "event loop, C (accept, recv, close, callbacks, tasks)"


def buckets(profile: Path) -> tuple[dict[str, int], int, dict[str, int]]:
    """Samples per bucket on the event loop's thread, their total, and samples per thread."""
    counts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(number)
        thread = re.sub(r"thread \(\d+\): ", "", frames[0])
        threads[thread.split("_")[0] if "postlane-sqlite-read" in thread else thread] += samples
        if "MainThread" not in frames[0]:
            continue
        total += samples
        rest = ";".join(frames[1:])
        for name, pattern in BUCKETS:
            if re.search(pattern, rest):
                counts[name] += samples
                break
        else:
            python = [f for f in frames[1:] if ".py" in f]
            # a stack that ends in the loop's runner: uvloop's C code (accept, recv, close,
            # callbacks and the task and future machinery)
            runner = not python or re.search(r"runners\.py|uvloop", python[-1]) is not None
            counts[EVENT_LOOP if runner else "other (asyncio, the app's glue)"] += samples
    return dict(counts), total, dict(threads)


def profile(count: int, size: int, sessions: int, source: Path | None, out: Path) -> float:
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is missing: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        smtp_port, http_port = free_port(), free_port()
        config = serve_config(folder, smtp_port, http_port)
        env: dict[str, str] = {"PYTHONPATH": str(source)} if source is not None else {}
        with start_postlane(
            "serve", config=config, log=folder / "serve.log", stop_timeout=60, env=env
        ) as serve:
            serve.wait_running_blocking()
            inject(smtp_port, min(count, 1000), size, sessions)  # warm-up
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(serve.pid), "--rate", "500", "--format", "raw",
                 "--threads", "--nonblocking", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)  # py-spy attached
            before = cpu_seconds(serve.pid)
            inject(smtp_port, count, size, sessions)
            used = cpu_seconds(serve.pid) - before
            recorder.send_signal(2)  # SIGINT: py-spy writes its samples and exits
            recorder.wait(timeout=60)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--ref", help="profile this commit's code instead of this tree's")
    args = parser.parse_args()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        source = stack.enter_context(source_at(args.ref)) if args.ref else None
        out = Path(tmp) / "profile.txt"
        used = profile(args.n, args.size, args.sessions, source, out)
        counts, total, threads = buckets(out)
    print(f"{args.ref or 'this tree'}: {args.n} messages of {args.size} bytes over "
          f"{args.sessions} sessions; serve CPU {used / args.n * 1e6:,.0f} us/message")  # fmt: skip
    rows = [
        (name, f"{100 * n / total:.1f}%") for name, n in sorted(counts.items(), key=lambda x: -x[1])
    ]
    print(table(["event loop thread", "share"], rows))
    main_samples = threads.get("MainThread", 1)
    rows = [
        (name, f"{n / main_samples:.2f}")
        for name, n in sorted(threads.items(), key=lambda x: -x[1])
    ]
    print(table(["thread", "samples / event loop's"], rows))


if __name__ == "__main__":
    main()
