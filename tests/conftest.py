"""Fixtures that build real things: a store on a temporary file, an SMTP server on a free port
with scripted replies, a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

from postlane.clock import FakeClock
from postlane.config import Config, config_from_dict
from postlane.store.sqlite import SQLiteStore

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _database_per_worker() -> None:
    """Under pytest-xdist (the suite runs on two processes), each worker gets a PostgreSQL
    database of its own, ``<database>_gw0`` and so on, created at the first run: the event
    log's read horizon waits for every write transaction running in its database, so workers
    sharing one would hold back each other's events. The worker's tests (and the processes
    they start) see it as ``$POSTLANE_TEST_POSTGRES``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    url = os.environ.get("POSTLANE_TEST_POSTGRES")
    if not worker or not url:
        return
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    base = parts.path.lstrip("/") or "postgres"
    if base.endswith(f"_{worker}"):
        return  # done already (this module is imported twice: as conftest and as tests.conftest)
    name = f"{base}_{worker}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            # one CREATE DATABASE at a time: two at once fail on their shared template
            conn.execute("SELECT pg_advisory_lock(hashtext('postlane-test-databases'))")
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError:
        return  # no server: the PostgreSQL tests say so (and fail under CI)
    os.environ["POSTLANE_TEST_POSTGRES"] = urlunsplit(parts._replace(path=f"/{name}"))


_database_per_worker()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: the lock the test processes of one run (pytest-xdist's workers) share: a test marked
#: ``alone`` holds it alone, every other test shares it (see :func:`_machine_to_itself`)
_RUN_LOCKS = Path(tempfile.gettempdir()) / (
    "postlane-tests-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", f"solo-{os.getpid()}")
)


@pytest.fixture(autouse=True)
def _machine_to_itself(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``alone`` runs while no other test of the run does: the fleet tests time a
    destination's rate at a sink in this process, and on a 2-core machine another worker's
    tests beside three postlane processes stall the sink's event loop, so it stamps what
    arrived on time as a burst. The others share the machine as usual. A waiting ``alone``
    test holds the gate, so the others cannot keep it from the machine for ever."""
    alone = request.node.get_closest_marker("alone") is not None
    with open(f"{_RUN_LOCKS}.gate", "a") as gate, open(f"{_RUN_LOCKS}.run", "a") as run:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_UN)


def make_config(tmp_path: Path, **sections: Any) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)  # the store's directory: made by its owner
    data: dict[str, Any] = {
        "store": {"url": f"sqlite:///{tmp_path / 'postlane.db'}"},
        "delivery": {"relay": f"capture://{tmp_path / 'captured'}"},
        "retry": {"jitter": 0},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # arrays of tables: [[routes]], [[shaping]]
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return config_from_dict(data, base_dir=tmp_path)


@contextlib.asynccontextmanager
async def serve_in_process(config: Config, *, ready_within: float = 30.0) -> AsyncIterator[Any]:
    """``postlane serve`` in this process (worker, API, SMTP, listeners) for the block; yields
    its ``AsyncPostlane`` once it is ready, and stops it after. A serve that fails before it is
    ready raises its own error here, not a timeout."""
    from postlane import serve

    stop = asyncio.Event()
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_ready(app: Any) -> None:
        started.set_result(app)

    running = asyncio.create_task(serve.run(config, stop=stop, on_ready=on_ready))
    try:
        await asyncio.wait({started, running}, timeout=ready_within, return_when="FIRST_COMPLETED")
        if running.done():
            running.result()  # its error
            raise AssertionError("serve stopped before it was ready")
        if not started.done():
            raise TimeoutError(f"serve was not ready within {ready_within:.0f}s")
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)


@contextlib.asynccontextmanager
async def api_client(app: Any, token: str | None = None) -> AsyncIterator[Any]:
    """An httpx client of ``app``'s HTTP API in process (ASGI), from a client that is not
    loopback (10.1.2.3), with ``token`` as its bearer token."""
    import httpx

    from postlane.ingest.door import FrontDoor
    from postlane.ingest.http import build_app
    from postlane.metrics import Metrics

    asgi = build_app(FrontDoor(app.config, app, Metrics(app)))
    transport = httpx.ASGITransport(app=asgi, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://postlane") as client:
        if token is not None:
            client.headers["Authorization"] = f"Bearer {token}"
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _postgres_url() -> str | None:
    return os.environ.get("POSTLANE_TEST_POSTGRES")


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A PostgreSQL store URL with a fresh schema of its own (``?schema=``), dropped after."""
    async with postgres_schema() as url:
        yield url


def postgres_url_or_skip(who: str) -> str:
    """``$POSTLANE_TEST_POSTGRES``; without it the test fails in CI and is skipped elsewhere,
    the reason starting with ``who`` ("the outbox test needs")."""
    url = _postgres_url()
    if url is None:
        if IN_CI:
            pytest.fail("POSTLANE_TEST_POSTGRES is not set in CI")
        pytest.skip(f"{who} POSTLANE_TEST_POSTGRES=postgresql://...")
    return url


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """What :func:`pg_schema` gives, for fixtures that choose their store themselves."""
    url = postgres_url_or_skip("PostgreSQL tests need")
    from postlane.store.postgres import PostgresStore

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{url}{'&' if '?' in url else '?'}schema={schema}"
    store = PostgresStore(url, schema=schema)
    await store.open()
    await store.drop_schema()
    await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Every backend, so one contract test body runs against each."""
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "store.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    url = _postgres_url()
    if url is None:
        if IN_CI:
            pytest.fail("POSTLANE_TEST_POSTGRES is not set in CI")
        pytest.skip("PostgreSQL tests need POSTLANE_TEST_POSTGRES=postgresql://...")
    try:
        from postlane.store.postgres import PostgresStore
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("the PostgreSQL store is not available")
    pg = PostgresStore(url, schema=f"test_{os.getpid()}_{id(request)}")
    await pg.open()
    try:
        yield pg
    finally:
        await pg.drop_schema()
        await pg.close()


# -- a scripted SMTP server ----------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    #: the parameters of its MAIL command (BODY=8BITMIME, SMTPUTF8, SIZE=...)
    mail_options: list[str] = field(default_factory=list)


@dataclass
class ScriptedHandler:
    """Records what it receives; replies as scripted.

    ``rcpt`` maps a recipient address to the reply its RCPT gets; ``data`` is a list of replies
    for successive DATA commands (then 250); ``mail`` likewise for MAIL FROM."""

    received: list[Received] = field(default_factory=list)
    rcpt: dict[str, str] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    mail: list[str] = field(default_factory=list)
    connections: int = 0
    #: close the connection (no reply) on the next DATA this many times
    drop_data: int = 0
    data_delay: float = 0.0
    #: offer SMTPUTF8 (aiosmtpd does not by default)
    smtputf8: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.mail:
            reply = self.mail.pop(0)
            if not reply.startswith("2"):
                return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self.rcpt.get(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.drop_data > 0:
            self.drop_data -= 1
            server.transport.close()
            return "421 closing"  # never seen by the client: the transport is closed
        if self.data:
            reply = self.data.pop(0)
            if not reply.startswith("2"):
                return reply
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(envelope.original_content),
                list(envelope.mail_options),
            )
        )
        self.event.set()
        return "250 2.0.0 OK queued"

    def message_ids(self) -> list[str]:
        out = []
        for r in self.received:
            head = r.content.split(b"\r\n\r\n", 1)[0]
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    out.append(line.split(b":", 1)[1].strip().decode())
        return out


@dataclass
class SMTPPeer:
    host: str
    port: int
    handler: ScriptedHandler

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


@pytest.fixture
async def smtp_peer() -> AsyncIterator[SMTPPeer]:
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()

    def factory() -> SMTPServer:
        handler.connections += 1
        return SMTPServer(
            handler, hostname="peer.test", loop=loop, enable_SMTPUTF8=handler.smtputf8
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield SMTPPeer("127.0.0.1", port, handler)
    server.close()
    await server.wait_closed()


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTLANE_CONFIG", raising=False)
    yield tmp_path
