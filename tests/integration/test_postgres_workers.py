"""Many worker processes on one PostgreSQL: three `postlane worker` processes and one
`postlane serve` deliver 5,000 messages to a local SMTP server, each exactly once; then again
with one worker SIGKILLed mid-run: nothing lost, duplicates no more than its in-flight
deliveries."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.message import Message
from tests.conftest import SMTPPeer, free_port
from tests.processes import start_postlane, stopping

pytestmark = pytest.mark.slow

COUNT = 5000
CONCURRENCY = 20


def write_config(folder: Path, url: str, relay: str) -> Path:
    path = folder / "postlane.toml"
    path.write_text(
        f"""
[store]
url = "{url}"
[delivery]
relay = "{relay}"
concurrency = {CONCURRENCY}
batch_size = {CONCURRENCY}
lease = "3s"
[http]
listen = "127.0.0.1:{free_port()}"
[smtp]
listen = "127.0.0.1:{free_port()}"
"""
    )
    return path


async def enqueue(url: str, count: int, tag: str) -> None:
    config = config_from_dict({"store": {"url": url}})
    async with AsyncPostlane(config) as app:
        for start in range(0, count, 1000):
            await app.send_many(
                [
                    Message(sender="a@example.com", to=[f"{tag}{i}@example.net"], text="x")
                    for i in range(start, min(count, start + 1000))
                ]
            )


async def run_fleet(url: str, peer: SMTPPeer, folder: Path, *, kill_one: bool) -> Counter[str]:
    folder.mkdir()  # noqa: ASYNC240
    config = write_config(folder, url, peer.url)
    await enqueue(url, COUNT, folder.name)
    serve = start_postlane("serve", config=config, log=folder / "serve.log")
    workers = [
        start_postlane("worker", config=config, log=folder / f"worker{n}.log") for n in (1, 2, 3)
    ]
    async with (
        stopping([serve, *workers], timeout=60),
        AsyncPostlane(config_from_dict({"store": {"url": url}})) as app,
    ):
        if kill_one:
            await workers[0].wait_until(
                lambda: len(peer.handler.received) >= COUNT // 3, "a third delivered", timeout=120
            )
            await workers[0].kill()

        async def all_sent() -> bool:
            for worker in workers[(1 if kill_one else 0) :]:
                worker.check_running()
            return (await app.stats()).sent >= COUNT

        await serve.wait_until(all_sent, f"all {COUNT} sent", timeout=180, every=0.2)
    return Counter(peer.handler.message_ids())


async def test_three_workers_and_serve_deliver_each_message_exactly_once(
    pg_schema: str, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    counts = await run_fleet(pg_schema, smtp_peer, tmp_path / "fleet", kill_one=False)
    assert len(counts) == COUNT
    assert max(counts.values()) == 1


async def test_a_worker_killed_mid_run_loses_nothing(
    pg_schema: str, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    smtp_peer.handler.data_delay = 0.002  # keep the run long enough to kill a worker in it
    counts = await run_fleet(pg_schema, smtp_peer, tmp_path / "killed", kill_one=True)
    assert len(counts) == COUNT  # nothing lost: its leases ran out and others took them
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= CONCURRENCY  # at most what the killed worker had in flight
