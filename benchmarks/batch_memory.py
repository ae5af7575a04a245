"""Peak memory of ``postlane serve`` while large batches arrive at once (audit finding 10).

    python benchmarks/batch_memory.py [--clients 6] [--messages 1000] [--size 130000]
                                      [--source DIR]

Starts ``postlane serve`` (defaults but for its ports, and a relay nobody listens on, so the
worker stays quiet), posts CLIENTS batches of MESSAGES messages of SIZE bytes of text each to
``POST /v1/messages/batch`` at the same moment (about 130 MB each by default), and reports the
server's resident memory before and at its peak (``VmHWM``: the kernel's high-water mark, so no
peak between two samples is missed) and how each batch was answered. ``--source DIR`` runs the
postlane found in DIR/src instead (an older checkout, for a before/after figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
sys.path.insert(0, str(Path(__file__).parent))

from _common import table

from tests.processes import start_postlane


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, resident peak) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def batch_body(messages: int, size: int) -> bytes:
    text = ("postlane batch memory " * (size // 22 + 1))[:size]
    items = [
        {"from": "app@example.com", "to": [f"u{n}@example.net"], "subject": f"m{n}", "text": text}
        for n in range(messages)
    ]
    return json.dumps({"messages": items}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=130_000)
    parser.add_argument("--source", type=Path, help="run the postlane in DIR/src")
    args = parser.parse_args()

    body = batch_body(args.messages, args.size)
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        port = free_port()
        config = directory / "postlane.toml"
        config.write_text(
            f'[store]\nurl = "sqlite:///{directory / "postlane.db"}"\n'
            f'[delivery]\nrelay = "smtp://127.0.0.1:{free_port()}"\n'
            f'[retry]\ndelays = ["1h"]\n'
            f'[http]\nlisten = "127.0.0.1:{port}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        env = {"POSTLANE_CONFIG": str(config)}
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source.resolve() / "src")
        base = f"http://127.0.0.1:{port}"
        log = directory / "serve.log"
        with start_postlane("serve", env=env, cwd=directory, log=log) as server:
            server.wait_until_blocking(
                lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200,
                "serve to answer /healthz",
                ignoring=(httpx.HTTPError,),
            )
            time.sleep(1.0)
            pid = server.popen.pid
            before, _ = memory_mb(pid)
            answers: list[str] = []
            start = threading.Barrier(args.clients)

            def post() -> None:
                with httpx.Client(timeout=600) as client:
                    start.wait()
                    try:
                        r = client.post(
                            base + "/v1/messages/batch",
                            content=body,
                            headers={"Content-Type": "application/json"},
                        )
                        answers.append(f"{r.status_code} {r.headers.get('retry-after', '')}")
                    except httpx.HTTPError as exc:
                        answers.append(type(exc).__name__)

            started = time.perf_counter()
            threads = [threading.Thread(target=post) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            _, peak = memory_mb(pid)
            stored = httpx.get(base + "/v1/stats", timeout=60).json()
            waiting = sum(lane["ready"] + lane["deferred"] for lane in stored["lanes"].values())
        source = str(args.source) if args.source else "this checkout"
        print(
            f"postlane from {source}; {args.clients} concurrent batches of {len(body) / 1e6:.0f} MB"
        )
        print(
            table(
                ["resident before", "peak resident", "growth", "answers", "stored", "seconds"],
                [
                    [
                        f"{before:.0f} MB",
                        f"{peak:.0f} MB",
                        f"{peak - before:.0f} MB",
                        ", ".join(sorted(answers)),
                        waiting,
                        f"{seconds:.1f}",
                    ]
                ],
            )
        )
        if os.environ.get("SHOW_LOG"):
            print(log.read_text()[-3000:])


if __name__ == "__main__":
    main()
