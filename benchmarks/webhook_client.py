"""Webhook requests: httpx (the project's HTTP library) beside postlane's own small HTTP/1.1
client (``postlane.webhooks.http.EndpointClient``), in the same run, against one local receiver.

Each client posts ``-n`` signed events, one at a time over a kept-alive connection (what each
of a webhook sender's request lanes does), to a receiver in another process that answers 204.
What is measured is this process's CPU time per request: webhooks are sent from the process
that delivers mail, so their CPU is taken from the mail queue. Rounds alternate between the two
clients; the medians are printed with their ratio.

    python benchmarks/webhook_client.py -n 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import done_progress, progress, table

RECEIVER = """
import asyncio, sys

async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 204 No Content\\r\\nContent-Length: 0\\r\\n\\r\\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(n: int) -> list[tuple[dict[str, str], bytes]]:
    from postlane.webhooks.endpoints import new_secret, parse_secret
    from postlane.webhooks.signing import Signer

    signer = Signer((parse_secret(new_secret()),))
    out = []
    for i in range(n):
        event = {"type": "sent", "timestamp": "2026-12-02T09:00:00Z",
                 "data": {"id": str(i), "type": "sent", "message_id": f"m{i}",
                          "recipient": f"u{i}@example.net", "metadata": {"user": i}}}  # fmt: skip
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"content-type": "application/json",
                   **signer.headers(f"evt_{i}", time.time(), body)}  # fmt: skip
        out.append((headers, body))
    return out


async def with_httpx(url: str, requests: list[tuple[dict[str, str], bytes]]) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=15) as client:
        await client.post(url, content=b"{}", headers={"content-type": "application/json"})
        start = time.process_time()
        for headers, body in requests:
            reply = await client.post(url, content=body, headers=headers)
            assert reply.status_code == 204
        return (time.process_time() - start) / len(requests)


async def with_postlane(url: str, requests: list[tuple[dict[str, str], bytes]]) -> float:
    from postlane.webhooks.addresses import system_resolver
    from postlane.webhooks.endpoints import check_url
    from postlane.webhooks.http import EndpointClient

    client = EndpointClient(
        check_url(url, True), allow_private=True, timeout=15, resolver=system_resolver
    )
    try:
        await client.post({"content-type": "application/json"}, b"{}")
        start = time.process_time()
        for headers, body in requests:
            reply = await client.post(headers, body)
            assert reply.status == 204
        return (time.process_time() - start) / len(requests)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/hooks"
        requests = bodies(args.n)
        cpu: dict[str, list[float]] = {"httpx": [], "postlane": []}
        for round_ in range(1, args.rounds + 1):
            for name, run in (("httpx", with_httpx), ("postlane", with_postlane)):
                progress(f"round {round_}/{args.rounds}: {name}")
                cpu[name].append(asyncio.run(run(url, requests)))
        done_progress()
    finally:
        receiver.kill()
        receiver.wait()
    httpx_cpu, own_cpu = (statistics.median(cpu[name]) * 1e6 for name in ("httpx", "postlane"))
    print(f"{args.n} signed webhook POSTs per client per round, {args.rounds} rounds (median)")
    print(
        table(
            ["client", "CPU per request", "httpx's CPU / this"],
            [
                ["httpx.AsyncClient", f"{httpx_cpu:.0f} µs", "1.00x"],
                [
                    "postlane EndpointClient",
                    f"{own_cpu:.0f} µs",
                    f"{httpx_cpu / own_cpu:.1f}x",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
