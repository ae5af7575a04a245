"""postlane's events as Django signals, in the test Django project (which has ``postlane.django``
in ``INSTALLED_APPS``): mail sent through the email backend is delivered by a real worker to an
in-process SMTP server (aiosmtpd), and ``manage.py postlane_events`` tells the receivers what
happened, in order, from a cursor file a restart goes on from. Also: the HTTP API as the source,
``--follow`` ended by its stop, failing receivers, and the in-process ``EventSubscribers`` hook."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core import mail as django_mail
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.test import override_settings
from psycopg import sql

import postlane
import postlane.django
from postlane.app import AsyncPostlane
from postlane.config import Config, load_config
from postlane.django.events import CursorFile, EventRelay, connect_subscribers
from postlane.django.signals import SIGNALS, mail_event
from postlane.errors import NotFound
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import start_http
from postlane.webhooks.subscribers import EventSubscribers
from tests.conftest import SMTPPeer, free_port, postgres_url_or_skip
from tests.integration.test_django import (  # noqa: F401 (fixtures: used by name)
    SETTINGS_MODULE,
    TOKEN,
    deliver,
    django_project,
    postlane_server,
    with_schema,
    write_config,
)
from tests.polling import until

METADATA = {"user": "42", "plan": "pro"}
#: a token with the send scope only: what an application's POSTLANE_TOKEN usually is
SEND_TOKEN = "django-test-send-token"


@dataclass
class Heard:
    """What the receivers were told: ``(signal, event)``, in order (mail_event is "*")."""

    told: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, signal: str, event: dict[str, Any]) -> None:
        with self.lock:
            self.told.append((signal, event))

    def events(self, signal: str = "*") -> list[dict[str, Any]]:
        with self.lock:
            return [event for name, event in self.told if name == signal]

    def types(self, signal: str = "*") -> list[str]:
        return [event["type"] for event in self.events(signal)]


@pytest.fixture
def heard() -> Iterator[Heard]:
    """Receivers on mail_event and on every per-type signal, recording what they hear."""
    record = Heard()
    connected: list[tuple[Any, Callable[..., None]]] = []

    def on_any(sender: Any, event: dict[str, Any], **kwargs: Any) -> None:
        record.add("*", event)

    mail_event.connect(on_any, weak=False)
    connected.append((mail_event, on_any))
    for name, typed in SIGNALS.items():

        def on_type(sender: Any, event: dict[str, Any], _name: str = name, **kw: Any) -> None:
            record.add(_name, event)

        typed.connect(on_type, weak=False)
        connected.append((typed, on_type))
    try:
        yield record
    finally:
        for connected_signal, receiver in connected:
            connected_signal.disconnect(receiver)


@pytest.fixture
def receiver() -> Iterator[Callable[[Callable[..., None]], None]]:
    """Connect a receiver to mail_event for this test only."""
    connected: list[Callable[..., None]] = []

    def connect(function: Callable[..., None]) -> None:
        mail_event.connect(function, weak=False)
        connected.append(function)

    yield connect
    for function in connected:
        mail_event.disconnect(function)


@pytest.fixture
def cursor_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state" / "postlane-events.json"
    with override_settings(
        POSTLANE_EVENTS_CURSOR_FILE=str(path),
        POSTLANE_EVENTS_RETRY_DELAY=0,
        POSTLANE_EVENTS_POLL=0.05,
    ):
        yield path


@pytest.fixture
def local_postlane(tmp_path: Path, smtp_peer: SMTPPeer) -> Iterator[Config]:
    path = write_config(tmp_path, f"sqlite:///{tmp_path / 'postlane.db'}", smtp_peer.url)
    with override_settings(POSTLANE_CONFIG=str(path)):
        yield load_config(path)


def send_welcome(to: str = "ada@example.net") -> str:
    """What a view does: Django's mail API, metadata in postlane's header."""
    message = django_mail.EmailMessage(
        "Welcome",
        "Hello!",
        to=[to],
        headers={"X-Postlane-Metadata": json.dumps(METADATA)},
    )
    assert message.send() == 1
    return str(message.postlane_id)


def run_command(*args: str, **options: Any) -> str:
    out = io.StringIO()
    call_command("postlane_events", *args, stdout=out, **options)
    return out.getvalue()


async def command(*args: str, **options: Any) -> str:
    """The command in a thread: the loop stays free for the SMTP server and postlane."""
    return await asyncio.to_thread(run_command, *args, **options)


def saved_cursor(path: Path) -> str | None:
    return CursorFile(path).load()


def assert_told(event: dict[str, Any], kind: str, queue_id: str, to: str) -> None:
    assert event["type"] == kind
    assert event["message_id"] == queue_id
    assert event["recipient"] == to
    assert event["lane"] == "normal"
    assert event["metadata"] == METADATA


# -- the command, reading the local store --------------------------------------------------------


async def test_the_command_tells_queued_then_sent_in_order_and_a_restart_repeats_none(
    local_postlane: Config, smtp_peer: SMTPPeer, heard: Heard, cursor_file: Path
) -> None:
    queue_id = await asyncio.to_thread(send_welcome)
    async with AsyncPostlane(local_postlane) as app:
        assert await deliver(app) == 1
    [received] = smtp_peer.handler.received
    assert received.rcpt_tos == ["ada@example.net"]

    output = await command()
    assert heard.types() == ["queued", "sent"]
    queued, sent = heard.events()
    assert_told(queued, "queued", queue_id, "ada@example.net")
    assert_told(sent, "sent", queue_id, "ada@example.net")
    assert (sent["code"], sent["class"]) == (250, "delivered")
    assert int(queued["id"]) < int(sent["id"])
    # each per-type signal after mail_event, with the same event
    assert heard.told == [("*", queued), ("queued", queued), ("*", sent), ("sent", sent)]
    assert saved_cursor(cursor_file) == sent["id"]
    assert f"2 event(s) relayed from sqlite:///{local_postlane.store.url[10:]}" in output
    assert f"cursor {sent['id']}" in output

    # a restart: nothing is told again
    assert "0 event(s) relayed" in await command()
    assert len(heard.told) == 4

    # new mail: only its events
    second = await asyncio.to_thread(send_welcome, "bob@example.org")
    async with AsyncPostlane(local_postlane) as app:
        assert await deliver(app) == 1
    await command()
    assert heard.types() == ["queued", "sent", "queued", "sent"]
    assert [e["message_id"] for e in heard.events()[2:]] == [second, second]
    assert saved_cursor(cursor_file) == heard.events()[-1]["id"]


async def test_types_and_after_choose_what_is_told(
    local_postlane: Config, heard: Heard, cursor_file: Path
) -> None:
    first = await asyncio.to_thread(send_welcome)
    async with AsyncPostlane(local_postlane) as app:
        await deliver(app)
    await command("--type", "sent", "-v", "2")
    assert heard.types() == ["sent"]
    assert heard.events()[0]["message_id"] == first
    # --after replays from an event of one's choosing, and the cursor moves on from there
    heard.told.clear()
    await command("--after", "0")
    assert heard.types() == ["queued", "sent"]


async def test_follow_tells_new_events_as_they_happen_until_stopped(
    local_postlane: Config, smtp_peer: SMTPPeer, heard: Heard, cursor_file: Path
) -> None:
    stop = threading.Event()
    following = asyncio.create_task(command("--follow", stop=stop))
    try:
        queue_id = await asyncio.to_thread(send_welcome)
        await until(lambda: heard.types() == ["queued"], "the queued event")
        async with AsyncPostlane(local_postlane) as app:
            assert await deliver(app) == 1
        await until(lambda: heard.types() == ["queued", "sent"], "the sent event")
        assert not following.done()
    finally:
        stop.set()
        output = await asyncio.wait_for(following, 30)
    assert [e["message_id"] for e in heard.events()] == [queue_id, queue_id]
    assert saved_cursor(cursor_file) == heard.events()[-1]["id"]
    assert "2 event(s) relayed" in output


# -- failing receivers ---------------------------------------------------------------------------


async def test_a_receiver_that_fails_is_retried_alone_then_logged_and_the_relay_goes_on(
    local_postlane: Config,
    heard: Heard,
    receiver: Callable[[Callable[..., None]], None],
    cursor_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: dict[str, list[str]] = {"flaky": [], "broken": []}

    def flaky(sender: Any, event: dict[str, Any], **kwargs: Any) -> None:
        calls["flaky"].append(event["type"])
        if calls["flaky"] == ["queued"]:
            raise ConnectionError("the database went away")  # once: a retry succeeds

    def broken(sender: Any, event: dict[str, Any], **kwargs: Any) -> None:
        calls["broken"].append(event["type"])
        if event["type"] == "queued":
            raise KeyError("user")  # a bug: every try fails

    receiver(flaky)
    receiver(broken)
    await asyncio.to_thread(send_welcome)
    async with AsyncPostlane(local_postlane) as app:
        await deliver(app)
    with override_settings(POSTLANE_EVENTS_RETRIES=2), caplog.at_level(logging.WARNING):
        output = await command()

    assert calls["flaky"] == ["queued", "queued", "sent"]  # retried once, then went on
    assert calls["broken"] == ["queued", "queued", "queued", "sent"]  # 1 + 2 retries, given up
    assert heard.types() == ["queued", "sent"]  # the others were told each event once
    queued, sent = heard.events()
    given_up = [
        r for r in caplog.records if r.name == "postlane.django.events" and r.levelname == "ERROR"
    ]
    assert len(given_up) == 1
    assert f"on event {queued['id']} (queued) after 3 tries" in given_up[0].getMessage()
    assert "broken" in given_up[0].getMessage()
    assert "1 with a failing receiver" in output
    assert saved_cursor(cursor_file) == sent["id"]  # not stuck at the event


async def test_stop_on_error_keeps_the_cursor_before_the_event_for_the_next_run(
    local_postlane: Config,
    heard: Heard,
    receiver: Callable[[Callable[..., None]], None],
    cursor_file: Path,
) -> None:
    fixed = threading.Event()

    def fails_on_sent(sender: Any, event: dict[str, Any], **kwargs: Any) -> None:
        if event["type"] == "sent" and not fixed.is_set():
            raise RuntimeError("not yet")

    receiver(fails_on_sent)
    await asyncio.to_thread(send_welcome)
    async with AsyncPostlane(local_postlane) as app:
        await deliver(app)
    with override_settings(POSTLANE_EVENTS_RETRIES=0):
        failed = r"\(sent\): .*fails_on_sent .*RuntimeError: not yet"
        with pytest.raises(CommandError, match=failed):
            await command("--stop-on-error")
        queued = heard.events()[0]
        assert saved_cursor(cursor_file) == queued["id"]
        fixed.set()
        await command("--stop-on-error")
    # the failed event is told again (to every receiver: at least once), then the cursor moves
    assert heard.types() == ["queued", "sent", "sent"]
    assert saved_cursor(cursor_file) == heard.events()[-1]["id"]


# -- the HTTP API as the source ------------------------------------------------------------------


async def test_http_mode_reads_the_events_through_the_api(
    postlane_server: AsyncPostlane,  # noqa: F811 (the fixture imported from test_django)
    smtp_peer: SMTPPeer,
    heard: Heard,
    cursor_file: Path,
) -> None:
    queue_id = await asyncio.to_thread(send_welcome)
    assert await deliver(postlane_server) == 1
    assert len(smtp_peer.handler.received) == 1
    output = await command("--batch", "1")  # a page per event: the cursor carries across pages
    assert heard.types() == ["queued", "sent"]
    for event, kind in zip(heard.events(), ["queued", "sent"], strict=True):
        assert_told(event, kind, queue_id, "ada@example.net")
    assert "2 event(s) relayed from http://" in output
    assert saved_cursor(cursor_file) == heard.events()[-1]["id"]
    await command()
    assert len(heard.events()) == 2


async def test_http_mode_needs_an_admin_token(
    postlane_server: AsyncPostlane,  # noqa: F811 (the fixture imported from test_django)
    cursor_file: Path,
) -> None:
    with (
        override_settings(POSTLANE_EVENTS_TOKEN="wrong"),
        pytest.raises(CommandError, match=r"^POSTLANE_EVENTS_TOKEN: .*HTTP 401"),
    ):
        await command()


async def test_a_send_token_is_refused_naming_the_setting_that_wants_an_admin_token(
    tmp_path: Path, smtp_peer: SMTPPeer, cursor_file: Path
) -> None:
    """The application's POSTLANE_TOKEN is a send token, usually: the command used it, and the
    error said "this needs a token with the admin scope" without naming where to put one."""
    path = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'server.db'}",
        smtp_peer.url,
        listen=f"127.0.0.1:{free_port()}",
        tokens=[TOKEN],
        send_tokens=[SEND_TOKEN],
    )
    config = load_config(path)
    async with AsyncPostlane(config) as app, start_http(FrontDoor(config, app)) as address:
        with (
            override_settings(POSTLANE_URL=address, POSTLANE_TOKEN=SEND_TOKEN),
            pytest.raises(CommandError) as fallback,
        ):
            await command()
        with (
            override_settings(POSTLANE_URL=address, POSTLANE_EVENTS_TOKEN=SEND_TOKEN),
            pytest.raises(CommandError) as events_token,
        ):
            await command()
    assert "admin scope" in str(fallback.value)
    assert "set POSTLANE_EVENTS_TOKEN to a token with the admin scope" in str(fallback.value)
    assert str(events_token.value).startswith("POSTLANE_EVENTS_TOKEN: ")
    assert "admin scope" in str(events_token.value)


# -- options and settings the command refuses ----------------------------------------------------


def run_with_a_deadline(*args: str, seconds: float = 10) -> str:
    """The command, stopped after ``seconds`` if it is still following: a refused option must
    fail at once, and without a refusal the test fails instead of spinning for ever."""
    stop = threading.Event()
    deadline = threading.Timer(seconds, stop.set)
    deadline.start()
    try:
        return run_command(*args, stop=stop)
    finally:
        deadline.cancel()


@pytest.mark.parametrize("poll", ["0", "-1", "nan", "inf", "soon"])
def test_a_poll_interval_that_is_no_positive_number_is_refused(
    local_postlane: Config, cursor_file: Path, poll: str
) -> None:
    """--poll -1 --follow spun the CPU: waiting -1 s returns at once, and so does every look."""
    with pytest.raises(CommandError, match=r"argument --poll: must be a number of seconds"):
        run_with_a_deadline("--follow", "--poll", poll)


@pytest.mark.parametrize("poll", [0, -1, "soon"])
def test_a_poll_setting_that_is_no_positive_number_is_refused(
    local_postlane: Config, cursor_file: Path, poll: object
) -> None:
    with (
        override_settings(POSTLANE_EVENTS_POLL=poll),
        pytest.raises(CommandError, match=r"^POSTLANE_EVENTS_POLL must be a number of seconds"),
    ):
        run_with_a_deadline("--follow")


@pytest.mark.parametrize("batch", ["0", "-5", "1001", "5000", "many"])
def test_a_batch_out_of_1_to_1000_is_refused_naming_the_option(
    local_postlane: Config, cursor_file: Path, batch: str
) -> None:
    """--batch 0 printed a traceback (ValueError); --batch 5000 went through on a local store
    and, in HTTP mode, failed naming the API's "limit" field."""
    with pytest.raises(CommandError, match=r"argument --batch: must be 1 to 1000"):
        run_command("--batch", batch)
    assert "0 event(s) relayed" in run_command("--batch", "1000")  # the most is fine


# -- a cursor the store does not keep ------------------------------------------------------------


async def test_a_cursor_the_store_never_wrote_is_refused_not_replayed_from_the_start(
    local_postlane: Config, heard: Heard, cursor_file: Path
) -> None:
    """--after 999999 (or a cursor file from another store) said "removed by retention" and
    told every receiver the whole log again; only a cursor older than the oldest event kept
    was removed by retention."""
    await asyncio.to_thread(send_welcome)
    with pytest.raises(CommandError, match=r"^event 999999 is not kept .*given as after"):
        await command("--after", "999999")
    CursorFile(cursor_file).save("999999")
    with pytest.raises(CommandError, match=rf"event 999999 is not kept .*read from {cursor_file}"):
        await command()
    assert heard.told == []
    assert saved_cursor(cursor_file) == "999999"  # kept as it was, for the operator to look at


async def test_http_mode_refuses_a_cursor_the_server_never_wrote(
    postlane_server: AsyncPostlane,  # noqa: F811 (the fixture imported from test_django)
    heard: Heard,
    cursor_file: Path,
) -> None:
    await asyncio.to_thread(send_welcome)
    with pytest.raises(CommandError, match=r"^event 999999 is not kept .*given as after"):
        await command("--after", "999999")
    assert heard.told == []


# -- the cursor file -----------------------------------------------------------------------------


def test_the_command_needs_a_cursor_file_and_refuses_a_bad_one(
    local_postlane: Config, tmp_path: Path
) -> None:
    with pytest.raises(CommandError, match="set POSTLANE_EVENTS_CURSOR_FILE"):
        run_command()
    bad = tmp_path / "cursor.json"
    bad.write_text("garbage")
    with pytest.raises(CommandError, match=f"the cursor file {bad} is not postlane's"):
        run_command("--cursor-file", str(bad))


def test_two_relays_never_share_a_cursor_file(local_postlane: Config, cursor_file: Path) -> None:
    with (
        CursorFile(cursor_file).locked(),
        pytest.raises(CommandError, match="another postlane_events is running"),
    ):
        run_command()
    assert "0 event(s) relayed" in run_command()


def test_the_cursor_is_written_atomically(tmp_path: Path) -> None:
    cursor = CursorFile(tmp_path / "c.json")
    assert cursor.load() is None
    cursor.save("17")
    cursor.save("42")
    assert cursor.load() == "42"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


class _Source:
    """An event source whose cursor retention removed: NotFound, then the oldest events."""

    description = "fake"

    def __init__(self) -> None:
        self.reads: list[str | None] = []

    def read(self, after: str | None, limit: int, types: Any) -> list[dict[str, Any]]:
        self.reads.append(after)
        if after == "5":
            raise NotFound("event 5 is no longer kept")
        if after is None:
            return [{"id": "9", "type": "sent", "message_id": "m", "metadata": {}}]
        return []

    def close(self) -> None:
        pass


def test_a_cursor_removed_by_retention_goes_on_from_the_oldest_event_kept(
    heard: Heard, tmp_path: Path
) -> None:
    source = _Source()
    relay = EventRelay(source, CursorFile(tmp_path / "c.json"), after="5")
    assert relay.run() == 1
    # the oldest event kept (9) is after the cursor: retention removed it; then read from 9
    assert source.reads == ["5", None, None]
    assert heard.types() == ["sent"]
    assert CursorFile(tmp_path / "c.json").load() == "9"


async def test_the_command_names_the_store_as_serve_does(
    tmp_path: Path, smtp_peer: SMTPPeer, cursor_file: Path
) -> None:
    """A store.url relative to postlane.toml was printed as it is written (sqlite:///q.db),
    where serve prints the file it opened."""
    path = write_config(tmp_path, "sqlite:///q.db", smtp_peer.url)
    with override_settings(POSTLANE_CONFIG=str(path)):
        await asyncio.to_thread(send_welcome)
        output = await command()
    assert f"1 event(s) relayed from sqlite:///{tmp_path / 'q.db'};" in output


# -- in process: EventSubscribers ----------------------------------------------------------------


async def test_an_embedding_process_sends_the_signals_from_event_subscribers(
    local_postlane: Config, smtp_peer: SMTPPeer, heard: Heard
) -> None:
    async with AsyncPostlane(local_postlane) as app:
        subscribers = EventSubscribers(app.store, after=None, poll=0.05)
        disconnect = connect_subscribers(subscribers, types=["queued", "sent"])
        stop = asyncio.Event()
        running = asyncio.create_task(subscribers.run(stop))
        try:
            queue_id = await asyncio.to_thread(send_welcome)
            assert await deliver(app) == 1
            await until(lambda: heard.types() == ["queued", "sent"], "queued and sent")
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            disconnect()
    for event, kind in zip(heard.events(), ["queued", "sent"], strict=True):
        assert_told(event, kind, queue_id, "ada@example.net")
    assert heard.types("sent") == ["sent"]


# -- the outbox's PostgreSQL store as the source -------------------------------------------------


@pytest.fixture
def outbox_postlane(tmp_path: Path, smtp_peer: SMTPPeer) -> Iterator[Config]:
    """postlane's tables in a schema of their own in the database of Django's ``postgres``
    alias, relaying to smtp_peer; the project writes mail through the outbox."""
    url = postgres_url_or_skip("needs PostgreSQL: set")
    schema = f"dje_{uuid.uuid4().hex[:12]}"
    path = write_config(tmp_path, with_schema(url, schema), smtp_peer.url)
    with postlane.Postlane(config_path=path):  # creates the schema and postlane's tables
        pass
    try:
        with override_settings(
            POSTLANE_CONFIG=str(path), POSTLANE_OUTBOX=True, POSTLANE_OUTBOX_DATABASE="postgres"
        ):
            yield load_config(path)
    finally:
        connections["postgres"].close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_the_command_reads_the_outboxs_postgresql_store(
    outbox_postlane: Config, smtp_peer: SMTPPeer, heard: Heard, cursor_file: Path
) -> None:
    def send_in_a_transaction() -> str:
        try:
            with transaction.atomic(using="postgres"):
                return send_welcome()
        finally:
            connections["postgres"].close()  # this thread's connection

    queue_id = await asyncio.to_thread(send_in_a_transaction)
    async with AsyncPostlane(outbox_postlane) as app:
        assert await deliver(app) == 1
    assert len(smtp_peer.handler.received) == 1
    # on PostgreSQL an event is read once every transaction that began writing before it
    # ended (a process of an earlier test may still be writing in this database): run the
    # command again until both are told, as a --follow would
    relayed = 0
    deadline = time.monotonic() + 30
    while len(heard.events()) < 2:
        if time.monotonic() > deadline:
            pytest.fail(f"only {heard.types()} told in 30 s")
        output = await command()
        found = re.search(r"(\d+) event\(s\) relayed from postgresql://", output)
        assert found is not None, output
        relayed += int(found[1])
    for event, kind in zip(heard.events(), ["queued", "sent"], strict=True):
        assert_told(event, kind, queue_id, "ada@example.net")
    assert relayed == 2
    await command()
    assert heard.types() == ["queued", "sent"]


# -- a real process: SIGTERM ---------------------------------------------------------------------


async def test_sigterm_ends_a_following_process_with_its_cursor_saved(
    local_postlane: Config, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    cursor = tmp_path / "cursor.json"
    root = Path(__file__).parents[2]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "django",
        "postlane_events",
        "--follow",
        "--poll",
        "0.05",
        "--cursor-file",
        str(cursor),
        "-v",
        "2",
        f"--settings={SETTINGS_MODULE}",
        cwd=root,
        env={
            **os.environ,
            "PYTHONPATH": str(root),
            "POSTLANE_CONFIG": str(local_postlane.source),
            "PYTHONUNBUFFERED": "1",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        queue_id = await asyncio.to_thread(send_welcome)
        async with AsyncPostlane(local_postlane) as app:
            assert await deliver(app) == 1
            [*_, sent] = (await app.events()).events
        assert sent.type == "sent"
        await until(lambda: CursorFile(cursor).load() == str(sent.id), "the cursor at sent")
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    # -v 2: "ID  TYPE  MESSAGE  RECIPIENT" for each event relayed
    told = [line.split("  ") for line in out.decode().splitlines() if "  " in line]
    assert [parts[1:] for parts in told] == [
        ["queued", queue_id, "ada@example.net"],
        ["sent", queue_id, "ada@example.net"],
    ]
    assert told[-1][0] == str(sent.id)
    assert "2 event(s) relayed" in out.decode()
