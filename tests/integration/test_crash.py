"""Failure tests with real processes: SIGKILL an enqueuing process, SIGKILL and SIGTERM a
delivering worker, restart, and count what the SMTP server received by Message-ID."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane
from postlane.message import Message, RecipientState
from tests.conftest import SMTPPeer, make_config
from tests.processes import PostlaneProcess, run_postlane, start_postlane

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, relay: str, **delivery: object) -> Path:
    lines = [
        "[store]",
        f'url = "sqlite:///{tmp_path / "queue.db"}"',
        "[delivery]",
        f'relay = "{relay}"',
    ]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in delivery.items()]
    path = tmp_path / "postlane.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_every_acknowledged_id_survives_sigkill(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, postlane
        from postlane.config import config_from_dict
        config = config_from_dict({{"store": {{"url": "sqlite:///{tmp_path / "queue.db"}"}}}})
        mail = postlane.Postlane(config)
        i = 0
        while True:
            result = mail.send(sender="a@example.com", to=[f"u{{i}}@example.net"], text="x")
            sys.stdout.write(result.id + "\\n")
            sys.stdout.flush()
            i += 1
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    printed: list[str] = []
    while len(printed) < 300:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        assert line, "the enqueuing process stopped"
        printed.append(line.decode().strip())
    process.kill()  # SIGKILL: no chance to flush anything
    rest, _ = await process.communicate()
    printed += [line for line in rest.decode().split("\n") if len(line) == 18]
    config = make_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'queue.db'}"})
    async with AsyncPostlane(config) as app:
        for queue_id in printed:
            view = await app.get(queue_id, history=False)
            assert view.state is RecipientState.QUEUED


async def enqueue(tmp_path: Path, count: int) -> None:
    config = make_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'queue.db'}"})
    async with AsyncPostlane(config) as app:
        await app.send_many(
            [
                Message(sender="a@example.com", to=[f"u{i}@example.net"], subject=str(i), text="x")
                for i in range(count)
            ]
        )


def start_worker(config: Path, *args: str) -> PostlaneProcess:
    return start_postlane("worker", *args, config=config, log=config.parent / "worker.log")


async def finish(config: Path) -> None:
    """``postlane worker --burst``: what a restarted worker does, until nothing is due."""
    await run_postlane("worker", "--burst", config=config, log=config.parent / "worker.log")


async def test_sigkill_mid_run_loses_nothing_and_duplicates_at_most_the_in_flight(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    total, concurrency = 300, 8
    smtp_peer.handler.data_delay = 0.01
    config = write_config(tmp_path, smtp_peer.url, concurrency=concurrency, batch_size=8)
    await enqueue(tmp_path, total)
    async with start_worker(config) as worker:
        await worker.wait_until(
            lambda: len(smtp_peer.handler.received) >= total // 3, "a third delivered", timeout=60
        )
        await worker.kill()  # SIGKILL: no chance to hand anything back
    killed_at = len(smtp_peer.handler.received)
    assert killed_at < total, "the worker finished before it could be killed"
    await finish(config)  # a restart on the same host reclaims the dead worker's leases at once
    counts = Counter(smtp_peer.handler.message_ids())
    assert len(counts) == total  # nothing lost
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= concurrency
    stats = await _stats(tmp_path)
    assert stats.sent == total


async def test_sigterm_hands_back_and_a_restart_sends_nothing_twice(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    total = 300
    smtp_peer.handler.data_delay = 0.01
    config = write_config(
        tmp_path, smtp_peer.url, concurrency=8, batch_size=8, shutdown_grace="10s"
    )
    await enqueue(tmp_path, total)
    async with start_worker(config) as worker:
        await worker.wait_until(
            lambda: len(smtp_peer.handler.received) >= total // 3, "a third delivered", timeout=60
        )
        assert await worker.stop() == 0, worker.describe()
    assert len(smtp_peer.handler.received) < total, "the worker finished before SIGTERM"
    stats = await _stats(tmp_path)
    assert sum(stats.lanes[lane].sending for lane in stats.lanes) == 0  # nothing left leased
    await finish(config)
    counts = Counter(smtp_peer.handler.message_ids())
    assert len(counts) == total
    assert max(counts.values()) == 1  # not one duplicate


async def _stats(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'queue.db'}"})
    async with AsyncPostlane(config) as app:
        return await app.stats()
