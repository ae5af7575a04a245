"""An operator's ``queue flush`` from another process while a worker still holds the pause it
lifts (a scale audit: about 4% of a 10,000-recipient backlog to one paused domain went back to
the end of the old pause instead of out).

The worker claims what each slice of the flush makes due, still sees its stale pause, and
hands those deliveries back to wait until the pause's end; the flush lifts the pause at its
end and calls that mail back, but what the worker had claimed before the lift and handed back
after it stayed at the old pause's end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.message import Lane, Message, RecipientState
from postlane.records import DestinationStatus, Selector, paused_reason
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import SMTPPeer, postgres_schema
from tests.processes import run_postlane

DOMAIN = "paused.example"
#: a backlog big enough that the flush takes several slices and the worker claims in between
BACKLOG = 10000


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A SQLite file, or a PostgreSQL schema of its own: the worker and the CLI share it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
        return
    async with postgres_schema() as url:
        yield url


def write_config(tmp_path: Path, url: str, relay: str) -> Path:
    path = tmp_path / "postlane.toml"
    path.write_text(
        f'[store]\nurl = "{url}"\n'
        f'[delivery]\nrelay = "{relay}"\nconcurrency = 100\nlease = "1m"\n'
        "[retry]\njitter = 0\n"
    )
    return path


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """Await ``check`` until it is true; fail the test, naming ``what``, after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.alone  # 10,000 deliveries on two cores: the tests that time things run apart
async def test_a_flush_from_another_process_sends_a_paused_backlog_the_workers_still_hold(
    store_url: str, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    """Two workers (each with a store of its own, as two processes) adopted the destination's
    pause, its backlog deferred to the pause's end; ``postlane queue flush --domain`` runs in
    another process. Every delivery of the backlog is sent now: none is left waiting for the
    end of the pause the flush lifted. (Before the fix, 14 to 49 of 10,000 were, in most runs.)"""
    path = write_config(tmp_path, store_url, smtp_peer.url)
    config = config_from_dict(
        {
            "store": {"url": store_url},
            "delivery": {"relay": smtp_peer.url, "concurrency": 100, "lease": "1m"},
            "retry": {"jitter": 0},
        },
        base_dir=tmp_path,
    )
    now = time.time()
    pause_end = now + 3600
    async with AsyncPostlane(config) as app, AsyncPostlane(config) as other:
        for start in range(0, BACKLOG, 1000):
            await app.send_many(
                [
                    Message(sender="app@example.com", to=[f"r{i}@{DOMAIN}"], text="x")
                    for i in range(start, min(BACKLOG, start + 1000))
                ]
            )
        # what a worker records when throttling replies pause the destination: its pause, and
        # its backlog deferred to the pause's end
        await app.store.save_destination_states(
            [DestinationStatus(DOMAIN, None, None, pause_end, "paused by a rule", 0, None, now)]
        )
        await app.store.defer_destination(DOMAIN, pause_end, now, paused_reason(DOMAIN))
        assert await app.store.next_due_at() == pause_end

        transports = [transport_for(config) for _ in (app, other)]
        workers = [
            Worker.from_config(config, each.store, transport)
            for each, transport in zip((app, other), transports, strict=True)
        ]
        stop = asyncio.Event()
        running = [asyncio.create_task(worker.run(stop)) for worker in workers]

        async def every_worker_holds_the_pause() -> bool:
            assert not any(task.done() for task in running)
            return all(w.throttle.paused_until(DOMAIN, time.time()) for w in workers)

        async def settled() -> bool:
            """Everything sent, or nothing more will go before the old pause's end."""
            assert not any(task.done() for task in running)
            next_due = await app.store.next_due_at()
            sending = (await app.stats()).lanes[Lane.NORMAL].sending
            return sending == 0 and (next_due is None or next_due > time.time() + 60)

        try:
            await poll(every_worker_holds_the_pause, "the workers to adopt the pause", 30)
            await run_postlane(
                "queue", "flush", "--domain", DOMAIN, config=path, log=tmp_path / "flush.log"
            )
            await poll(settled, "the flushed backlog to be sent", 90)
        finally:
            stop.set()
            await asyncio.gather(*running)
            for transport in transports:
                await transport.close()
        waiting = await app.messages(
            Selector(domains=(DOMAIN,), states=(RecipientState.DEFERRED, RecipientState.QUEUED)),
            limit=BACKLOG,
        )
        late = [r for m in waiting for r in m.recipients if (r.next_attempt_at or 0) >= now + 60]
        assert late == [], f"{len(late)} of {BACKLOG} left at the end of the lifted pause"
        assert len(smtp_peer.handler.received) == BACKLOG
