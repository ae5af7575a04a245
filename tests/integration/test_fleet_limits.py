"""A destination's limits hold for the whole fleet (issue 21): three `postlane worker`
processes on one PostgreSQL against a server that refuses above 40 messages/s send at most
40/s together (+10%), with few refusals once they have converged; one killed mid-run gives its
share back within a lease and nothing is lost; a pause one worker learns stops the others
within a second; two workers on one SQLite file or one PostgreSQL database never have more
sends in flight together than the destination's concurrency, from their first send on; three
workers send a backlog one of them claimed at close to the rate, on either store."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from psycopg import sql

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.store.postgres import PostgresStore, split_schema
from tests.conftest import ScriptedHandler, free_port, postgres_schema
from tests.integration.test_postgres_workers import enqueue
from tests.processes import start_postlane, stopping

pytestmark = pytest.mark.slow

LIMIT = 40.0


class RateLimitedHandler(ScriptedHandler):
    """Takes at most ``LIMIT`` messages per second (a token bucket of one second's worth);
    refuses the others with a rate-limit reply, as a provider does. Records when each was
    taken and refused."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = LIMIT
        self.refilled = time.monotonic()
        self.accepted_at: list[float] = []
        self.refused_at: list[float] = []
        self.replies: list[str] = []  # answer every DATA with these first (a 421 burst)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        if self.replies:
            self.refused_at.append(now)
            return self.replies.pop(0)
        self.tokens = min(LIMIT, self.tokens + (now - self.refilled) * LIMIT)
        self.refilled = now
        if self.tokens < 1:
            self.refused_at.append(now)
            return "421 4.7.28 Our system has detected an unusual rate of mail: rate limited"
        self.tokens -= 1
        self.accepted_at.append(now)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def limited_peer() -> AsyncIterator[tuple[str, RateLimitedHandler]]:
    handler = RateLimitedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="limited.test", loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    yield f"smtp://127.0.0.1:{port}", handler
    server.close()
    await server.wait_closed()


def write_config(
    folder: Path,
    url: str,
    relay: str,
    relay_limit: str = f"rate = {LIMIT}",
    delivery: Sequence[str] = (),
    concurrency: int = 20,
    **extra: str,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "postlane.toml"
    lines = [
        "[store]",
        f'url = "{url}"',
        "[delivery]",
        f'relay = "{relay}"',
        f"concurrency = {concurrency}",
        'lease = "3s"',
        'shutdown_grace = "2s"',
        *delivery,
        "[destinations.relay]",
        relay_limit,
        "[http]",
        f'listen = "127.0.0.1:{free_port()}"',
        "[smtp]",
        f'listen = "127.0.0.1:{free_port()}"',
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def busiest(times: list[float], window: float) -> int:
    """The most events in any ``window`` seconds."""
    most, start = 0, 0
    for end, at in enumerate(times):
        while times[start] < at - window:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.alone
async def test_three_workers_share_a_destinations_rate(
    pg_schema: str,
    limited_peer: tuple[str, RateLimitedHandler],
    tmp_path: Path,
) -> None:
    relay, handler = limited_peer
    count = 600
    config = write_config(tmp_path, pg_schema, relay)
    await enqueue(pg_schema, count, "fleet")
    workers = [
        start_postlane("worker", config=config, log=tmp_path / f"worker{n}.log") for n in (1, 2, 3)
    ]
    async with stopping(workers, timeout=60):
        await workers[0].wait_until(
            lambda: len(handler.accepted_at) >= count // 2, "half delivered", timeout=120
        )
        await workers[0].kill()  # it dies holding its share and its leases
        url, schema = split_schema(pg_schema)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

            async def shared_by_two() -> bool:
                cursor = await conn.execute(
                    sql.SQL(
                        "SELECT count(*) FROM {}.destination_shares "
                        "WHERE destination = 'relay' AND expires_at > %s"
                    ).format(sql.Identifier(schema or "public")),
                    [time.time()],
                )
                row = await cursor.fetchone()
                return row is not None and row[0] == 2

            # its share goes back to the two others within a lease (3 s) and a sync (1 s)
            await workers[1].wait_until(shared_by_two, "the relay shared by two", timeout=5)

        async with AsyncPostlane(config_from_dict({"store": {"url": pg_schema}})) as app:

            async def all_sent() -> bool:
                for worker in workers[1:]:
                    worker.check_running()
                return (await app.stats()).sent >= count

            await workers[1].wait_until(all_sent, f"all {count} sent", timeout=180, every=0.2)
    accepted = sorted(handler.accepted_at)
    start = accepted[0] + 3.0  # converged: every worker has its share
    steady = [t for t in accepted if t >= start]
    span = steady[-1] - steady[0]
    rate = (len(steady) - 1) / span
    assert rate <= LIMIT * 1.1, f"the fleet sent {rate:.1f}/s under a limit of {LIMIT}/s"
    assert busiest(steady, 2.0) <= 2 * LIMIT * 1.1 + 1
    refused_late = [t for t in handler.refused_at if t >= start]
    assert len(refused_late) < 0.05 * (len(steady) + len(refused_late)), (
        f"{len(refused_late)} refused after convergence, {len(steady)} accepted"
    )
    assert len(set(handler.message_ids())) == count  # nothing lost


class TimedHandler(ScriptedHandler):
    """Takes every message and records when."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted_at: list[float] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.accepted_at.append(time.monotonic())
        return await super().handle_DATA(server, session, envelope)


async def live_owners(url: str) -> int:
    """How many processes say they are alive in the fleet's shares (``destination_shares``)."""
    query = "SELECT count(*) FROM {}destination_shares WHERE destination = '*' AND expires_at > "
    if url.startswith("sqlite:"):
        with sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True) as conn:
            row = conn.execute(query.format("") + "?", [time.time()]).fetchone()
    else:
        base, schema = split_schema(url)
        async with await psycopg.AsyncConnection.connect(base, autocommit=True) as pg:
            cursor = await pg.execute(
                sql.SQL(query + "%s").format(sql.Identifier(schema or "public") + sql.SQL(".")),
                [time.time()],
            )
            row = await cursor.fetchone()
    return int(row[0]) if row else 0


@pytest.fixture(params=["sqlite", "postgres"])
async def fleet_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL for a fleet: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
        return
    async with postgres_schema() as url:
        yield url


@pytest.mark.alone
async def test_a_fleet_sends_a_backlog_one_worker_claimed_at_its_shared_rate(
    fleet_store: str, tmp_path: Path
) -> None:
    """Three workers share the relay's rate; one claims 50 deliveries at a time, the two
    others 4 (less concurrency). A backlog arrives, and the first claims most of it at once
    while its share is a third: what they cannot send now they send back to wait, and it
    comes back due to all three, whoever claims first. Together they must send at close to
    the rate, never above it. When each worker spaced what it sent back at its own share, the
    backlog came back at a third to a half of the rate, and the fleet sent 13.5/s (SQLite) and
    19/s (PostgreSQL) under a limit of 40/s until the backlog was gone."""
    handler = TimedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="sink.test", loop=loop), "127.0.0.1", 0
    )
    relay = f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    count = 600  # 15 s at the rate: a backlog through the whole window
    configs = [
        write_config(tmp_path / name, fleet_store, relay, concurrency=concurrency)
        for name, concurrency in (("big", 100), ("small", 4))
    ]
    workers = [
        start_postlane("worker", config=configs[n > 1], log=tmp_path / f"worker{n}.log")
        for n in (1, 2, 3)
    ]
    try:
        async with stopping(workers, timeout=60):

            async def formed() -> bool:
                return await live_owners(fleet_store) == 3

            await workers[0].wait_until(
                formed,
                "three workers in the fleet",
                timeout=30,
                ignoring=(sqlite3.Error, psycopg.Error),  # no tables yet
            )
            await enqueue(fleet_store, count, "backlog")
            await workers[0].wait_until(
                lambda: len(handler.accepted_at) >= 1, "the backlog's first message", timeout=30
            )
            first = handler.accepted_at[0]
            start, end = first + 3.0, first + 11.0  # once every worker has its share
            await workers[0].wait_until(
                lambda: time.monotonic() >= end, "the measured window", timeout=30, every=0.1
            )
            for worker in workers:
                worker.check_running()
    finally:
        server.close()
        await server.wait_closed()
    steady = [t for t in handler.accepted_at if start <= t < end]
    rate = len(steady) / (end - start)
    assert rate >= 0.85 * LIMIT, f"the fleet sent {rate:.1f}/s under a limit of {LIMIT}/s"
    assert rate <= 1.1 * LIMIT, f"the fleet sent {rate:.1f}/s under a limit of {LIMIT}/s"
    assert busiest(steady, 2.0) <= 2 * LIMIT * 1.1 + 1


async def test_a_pause_one_worker_learns_stops_the_others_within_a_second(
    pg_schema: str,
    limited_peer: tuple[str, RateLimitedHandler],
    tmp_path: Path,
) -> None:
    relay, handler = limited_peer
    # a 4xx burst the shaping rule turns into a pause of the relay
    config = write_config(tmp_path, pg_schema, relay)
    with config.open("a") as out:
        out.write(
            '[[shaping]]\nenhanced = "4.7.0"\nafter = 3\nwithin = "10s"\naction = "pause"\n'
            'duration = "30s"\n'
        )
    await enqueue(pg_schema, 400, "pause")
    workers = [
        start_postlane("worker", config=config, log=tmp_path / f"worker{n}.log") for n in (1, 2)
    ]
    store = PostgresStore(pg_schema)
    await store.open()
    try:
        async with stopping(workers, timeout=60):
            await workers[0].wait_until(
                lambda: len(handler.accepted_at) >= 40, "both sending", timeout=60
            )
            handler.replies = ["421 4.7.0 Try again later, closing connection"] * 6

            async def paused() -> bool:
                states = {s.destination: s for s in await store.destination_states()}
                relay_state = states.get("relay")
                return bool(relay_state and relay_state.paused_until)

            await workers[0].wait_until(paused, "the relay paused", timeout=30)
            paused_seen = time.monotonic()
            await asyncio.sleep(3.0)  # within the pause: nobody should be sending now
            late = [t for t in handler.accepted_at + handler.refused_at if t > paused_seen + 1.0]
            assert late == [], f"{len(late)} tries more than a second after the pause"
    finally:
        await store.close()


class DownRelay:
    """A relay that is down: it answers every connection ``421`` and closes it (a connection
    failure for the client). Records when each connection came."""

    def __init__(self) -> None:
        self.connected_at: list[float] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected_at.append(time.monotonic())
        writer.write(b"421 4.3.2 Service not available, closing transmission channel\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def rounds(times: Sequence[float], gap: float) -> list[int]:
    """How many of ``times`` came together, in each run separated by more than ``gap``."""
    counts: list[int] = []
    for n, at in enumerate(times):
        if n and at - times[n - 1] <= gap:
            counts[-1] += 1
        else:
            counts.append(1)
    return counts


async def test_when_a_pause_ends_one_worker_of_the_fleet_probes(
    fleet_store: str, tmp_path: Path
) -> None:
    """Three workers on one store send through a relay that is down: they pause it, and each
    time the pause ends one delivery probes for the whole fleet, not one per worker; its
    failure pauses the relay again for all of them. (Each worker sent a probe of its own: three
    connections at each pause's end.)"""
    relay = DownRelay()
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = write_config(tmp_path, fleet_store, f"smtp://127.0.0.1:{port}")
    with config.open("a") as out:  # pauses of 2 s, then 4 s: a few rounds in a few seconds
        out.write('[throttle]\npause = "2s"\nmax_pause = "4s"\n')
    await enqueue(fleet_store, 300, "down")
    workers = [
        start_postlane("worker", config=config, log=tmp_path / f"worker{n}.log") for n in (1, 2, 3)
    ]
    try:
        async with (
            stopping(workers, timeout=60),
            AsyncPostlane(config_from_dict({"store": {"url": fleet_store}})) as app,
        ):

            async def paused() -> bool:
                states = {s.destination: s for s in await app.store.destination_states()}
                return bool(states.get("relay") and states["relay"].paused_until)

            await workers[0].wait_until(paused, "the relay paused", timeout=30)
            # every worker has heard of the pause within a sync: from then on, only probes
            settled = time.monotonic() + 1.5
            await workers[0].wait_until(
                lambda: len(rounds([t for t in relay.connected_at if t > settled], 1.0)) >= 3,
                "three pauses' ends",
                timeout=30,
            )
            for worker in workers:
                worker.check_running()
    finally:
        server.close()
        await server.wait_closed()
    probes = rounds([t for t in relay.connected_at if t > settled], 1.0)
    assert probes[:3] == [1, 1, 1], f"connections at each pause's end: {probes}"


class CountingHandler(ScriptedHandler):
    """Holds each DATA a while and records how many are in its hands at once."""

    def __init__(self) -> None:
        super().__init__(data_delay=0.3)
        self.in_flight = 0
        self.peak = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.in_flight -= 1


async def two_workers_under_a_cap(url: str, folder: Path) -> CountingHandler:
    """16 messages through two `postlane worker` processes sharing ``url``, to a peer whose
    ``[destinations.relay] concurrency`` is 2; returns the peer once it has them all."""
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="capped.test", loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        config = write_config(folder, url, f"smtp://127.0.0.1:{port}", "concurrency = 2")
        count = 16
        await enqueue(url, count, "capped")
        workers = [
            start_postlane("worker", config=config, log=folder / f"worker{n}.log") for n in (1, 2)
        ]
        async with stopping(workers, timeout=60):
            await workers[0].wait_until(
                lambda: len(handler.received) >= count, f"all {count} received", timeout=60
            )
        assert len(set(handler.message_ids())) == count
        return handler
    finally:
        server.close()
        await server.wait_closed()


async def test_two_workers_on_one_sqlite_file_keep_a_shared_concurrency_cap(
    tmp_path: Path,
) -> None:
    handler = await two_workers_under_a_cap(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "w")
    assert handler.peak == 2, f"{handler.peak} sends in flight under a cap of 2"


async def test_two_workers_on_postgresql_keep_a_shared_concurrency_cap(
    pg_schema: str, tmp_path: Path
) -> None:
    handler = await two_workers_under_a_cap(pg_schema, tmp_path / "w")
    assert handler.peak == 2, f"{handler.peak} sends in flight under a cap of 2"
