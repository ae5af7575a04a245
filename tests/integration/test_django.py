"""The Django email backend in a real Django project (tests/integration/django_project), driven
by Django's test client: views send with Django's own mail API, and the mail reaches a real SMTP
server through postlane's queue and worker, content, attachments and envelope intact.

Three ways in: a local postlane store (the default), a postlane server over HTTP
(``POSTLANE_URL``), and the transactional outbox on PostgreSQL (``POSTLANE_OUTBOX``)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import django
import psycopg
import pytest
from django.conf import settings
from django.core import mail as django_mail
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import Client as DjangoClient
from django.test import override_settings
from psycopg import sql

import postlane
import postlane.django
from postlane.app import AsyncPostlane
from postlane.config import Config, load_config
from postlane.django import SettingsError
from postlane.errors import PostlaneError, ValidationError
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import start_http
from postlane.message import Lane
from postlane.pytest_plugin import PostlaneMail
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import SMTPPeer, free_port, postgres_url_or_skip
from tests.integration.django_project.views import RECEIPT_PDF
from tests.processes import clean_environment

SETTINGS_MODULE = "tests.integration.django_project.settings"
TOKEN = "django-test-token"
RECEIPT = {
    "to": ["ada@example.net"],
    "cc": ["bob@example.org"],
    "bcc": ["audit@example.com"],
    "lane": "high",
    "key": "receipt-8812",
}


@pytest.fixture(scope="module", autouse=True)
def django_project() -> Iterator[None]:
    """Django configured from the test project's settings, for this module only: the variable
    is put back afterwards (Django's settings, once read, stay for the process)."""
    previous = os.environ.get("DJANGO_SETTINGS_MODULE")
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    try:
        django.setup()
        yield
    finally:
        postlane.django.reset()
        if previous is None:
            del os.environ["DJANGO_SETTINGS_MODULE"]
        else:
            os.environ["DJANGO_SETTINGS_MODULE"] = previous


@pytest.fixture
def web() -> DjangoClient:
    return DjangoClient()


def write_config(folder: Path, store_url: str, relay: str, **http: Any) -> Path:
    """A postlane.toml, as a project would have one, for POSTLANE_CONFIG."""
    lines = [
        "[store]",
        f"url = {json.dumps(store_url)}",
        "[delivery]",
        f"relay = {json.dumps(relay)}",
        "[retry]",
        "jitter = 0",
    ]
    if http:
        lines += ["[http]", *(f"{key} = {json.dumps(value)}" for key, value in http.items())]
    path = folder / "postlane.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def local_postlane(tmp_path: Path, smtp_peer: SMTPPeer) -> Iterator[Config]:
    """The default mode: the backend's own postlane on a SQLite file, relaying to smtp_peer."""
    path = write_config(tmp_path, f"sqlite:///{tmp_path / 'postlane.db'}", smtp_peer.url)
    with override_settings(POSTLANE_CONFIG=str(path)):
        yield load_config(path)


async def deliver(app: AsyncPostlane) -> int:
    """Run a worker over ``app``'s store until nothing is due, as ``postlane worker`` would."""
    transport = transport_for(app.config)
    try:
        return await Worker.from_config(app.config, app.store, transport).run_until_idle()
    finally:
        await transport.close()


def parse(content: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(content)
    assert isinstance(message, EmailMessage)
    return message


def lines(content: Any) -> Any:
    """Text with the wire's CRLF line ends as Python's; bytes as they are."""
    return content.replace("\r\n", "\n") if isinstance(content, str) else content


def assert_is_the_receipt(content: bytes) -> None:
    """What the recipients' server got is what the view wrote, minus Bcc and postlane's
    control headers."""
    message = parse(content)
    assert message["Subject"] == "Your receipt — order 8812"
    assert message["From"] == "Shop <shop@example.com>"
    assert message["To"] == "ada@example.net"
    assert message["Cc"] == "bob@example.org"
    assert message["Reply-To"] == "help@example.com"
    assert message["X-Order"] == "8812"
    assert message["Message-ID"]
    for hidden in ("Bcc", "X-Postlane-Lane", "X-Postlane-Idempotency-Key", "X-Postlane-Metadata"):
        assert hidden not in message, hidden
    assert b"audit@example.com" not in content
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert lines(text.get_content()) == "Thank you for your order.\nTotal: 12,50 €\n"
    assert lines(html.get_content()) == "<p>Thank you for your order.</p><p>Total: 12,50 €</p>"
    attachments = {
        part.get_filename(): (part.get_content_type(), lines(part.get_content()))
        for part in message.iter_attachments()
    }
    assert attachments == {
        "receipt.pdf": ("application/pdf", RECEIPT_PDF),
        "notes.txt": ("text/plain", "Delivered to the café.\n"),
    }


# -- the default mode: a local postlane store ----------------------------------------------------


async def test_a_view_sends_a_receipt_that_reaches_the_smtp_server_intact(
    web: DjangoClient, local_postlane: Config, smtp_peer: SMTPPeer
) -> None:
    response = await asyncio.to_thread(web.post, "/receipt/", RECEIPT)
    assert response.status_code == 200
    assert response.json()["sent"] == 1
    queue_id = response.json()["id"]
    async with AsyncPostlane(local_postlane) as app:
        view = await app.get(queue_id)
        assert view.lane is Lane.HIGH
        assert view.idempotency_key == "receipt-8812"
        assert view.metadata == {"order": "8812"}
        assert view.sender == "shop@example.com"
        assert await deliver(app) == 3
        assert {r.state for r in (await app.get(queue_id)).recipients} == {"sent"}
    [received] = smtp_peer.handler.received  # one domain-less relay: one transaction
    assert received.mail_from == "shop@example.com"
    assert sorted(received.rcpt_tos) == ["ada@example.net", "audit@example.com", "bob@example.org"]
    assert_is_the_receipt(received.content)


async def test_the_idempotency_header_makes_a_repeated_view_store_one_message(
    web: DjangoClient, local_postlane: Config
) -> None:
    first = await asyncio.to_thread(web.post, "/receipt/", RECEIPT)
    again = await asyncio.to_thread(web.post, "/receipt/", RECEIPT)
    assert first.json()["id"] == again.json()["id"]
    assert again.json()["sent"] == 1  # accepted: that message is queued already
    async with AsyncPostlane(local_postlane) as app:
        assert [m.id for m in await app.messages()] == [first.json()["id"]]


def test_the_default_lane_applies_without_a_header(local_postlane: Config) -> None:
    with override_settings(POSTLANE_DEFAULT_LANE="low"):
        message = django_mail.EmailMessage("Hi", "Hello", to=["ada@example.net"])
        assert message.send() == 1
        with postlane.Postlane(local_postlane) as app:
            assert app.get(message.postlane_id).lane is Lane.LOW


def test_a_sender_django_chose_names_the_setting_when_refused(local_postlane: Config) -> None:
    """mail_admins with Django's default SERVER_EMAIL (root@localhost): the refusal said only
    "... It should have a period." (a day-one audit); it names the setting to change."""
    admins = override_settings(ADMINS=[("Ops", "ops@example.net")], SERVER_EMAIL="root@localhost")
    with admins, pytest.raises(postlane.ValidationError) as refused:
        django_mail.mail_admins("Disk", "is full")
    assert refused.value.field == "from"
    assert refused.value.message.endswith(
        "(Django's SERVER_EMAIL chose it: set SERVER_EMAIL to an address of yours)"
    )
    with pytest.raises(postlane.ValidationError) as own:  # one the application gave: as it is
        django_mail.send_mail("Hi", "x", "not-an-address", ["ada@example.net"])
    assert "Django's" not in own.value.message


def test_mail_is_handed_over_on_commit_and_never_for_a_rollback(
    web: DjangoClient, local_postlane: Config
) -> None:
    assert web.post("/sign-up/", {"email": "gone@example.net", "fail": "1"}).json() == {
        "committed": False
    }
    assert web.post("/sign-up/", {"email": "new@example.net"}).json() == {"committed": True}
    with postlane.Postlane(local_postlane) as app:
        [message] = app.messages()
    assert [r.address for r in message.recipients] == ["new@example.net"]
    assert message.subject == "Welcome"


def test_threads_share_one_store_and_every_message_is_stored(local_postlane: Config) -> None:
    barrier = threading.Barrier(8)
    counts: list[int] = []

    def send(n: int) -> None:
        barrier.wait(timeout=10)
        counts.append(django_mail.send_mail("Hi", "Hello", None, [f"user{n}@example.net"]))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert counts == [1] * 8
    assert len(postlane.django._senders) == 1  # one postlane per process, not per thread
    with postlane.Postlane(local_postlane) as app:
        assert len(app.messages()) == 8


def test_refused_messages_raise_unless_fail_silently(local_postlane: Config) -> None:
    with pytest.raises(ValidationError, match="not a valid address"):
        django_mail.send_mail("Hi", "Hello", None, ["not an address"])
    assert django_mail.send_mail("Hi", "Hello", None, ["not an address"], fail_silently=True) == 0
    bad_lane = django_mail.EmailMessage(
        "Hi", "Hello", to=["ada@example.net"], headers={"X-Postlane-Lane": "urgent"}
    )
    with pytest.raises(ValidationError, match="unknown lane 'urgent'"):
        bad_lane.send()
    bad_metadata = django_mail.EmailMessage(
        "Hi", "Hello", to=["ada@example.net"], headers={"X-Postlane-Metadata": "[1]"}
    )
    with pytest.raises(ValidationError, match="must be a JSON object"):
        bad_metadata.send()
    # a mistyped control header is refused, as SMTP submission refuses it: it would send mail
    # in the wrong lane, and show the header to its recipients
    typo = django_mail.EmailMessage(
        "Hi", "Hello", to=["ada@example.net"], headers={"X-Postlane-Lanes": "high"}
    )
    with pytest.raises(ValidationError, match="unknown control header X-Postlane-Lanes"):
        typo.send()
    # a message with no recipient at all is skipped, as Django's SMTP backend does
    assert django_mail.EmailMessage("Hi", "Hello").send() == 0
    with postlane.Postlane(local_postlane) as app:
        assert app.messages() == []


@pytest.mark.parametrize(
    ("settings", "setting", "error"),
    [
        ({"POSTLANE_URL": "127.0.0.1:8025"}, "POSTLANE_URL", "must start with http://"),
        ({"POSTLANE_URL": "http://127.0.0.1:8025/v1"}, "POSTLANE_URL", "without /v1"),
        (
            {"POSTLANE_URL": "http://127.0.0.1:8025", "POSTLANE_TIMEOUT": "abc"},
            "POSTLANE_TIMEOUT",
            "must be a number of seconds above 0",
        ),
        (
            {"POSTLANE_URL": "http://127.0.0.1:8025", "POSTLANE_TIMEOUT": 0},
            "POSTLANE_TIMEOUT",
            "must be a number of seconds above 0",
        ),
        ({"POSTLANE_DEFAULT_LANE": "urgent"}, "POSTLANE_DEFAULT_LANE", "unknown lane"),
        ({"POSTLANE_CONFIG": 42}, "POSTLANE_CONFIG", "must be a path or a postlane.Config"),
        ({"POSTLANE_CONFIG": "/nonexistent/postlane.toml"}, "POSTLANE_CONFIG", "/nonexistent"),
        (
            {"POSTLANE_URL": "http://127.0.0.1:8025", "POSTLANE_OUTBOX": True},
            "POSTLANE_URL",
            "not both",
        ),
    ],
)
def test_wrong_settings_are_never_silent_and_name_the_setting(
    local_postlane: Config, settings: dict[str, object], setting: str, error: str
) -> None:
    """fail_silently swallows what is wrong with a message, never what is wrong with the
    settings; and the error is one class, both postlane's ConfigError and Django's
    ImproperlyConfigured, naming the setting (a bad POSTLANE_URL was a ConfigError without
    the setting's name, a bad POSTLANE_TIMEOUT an ImproperlyConfigured only)."""
    with override_settings(**settings), pytest.raises(SettingsError) as raised:
        django_mail.send_mail("Hi", "Hello", None, ["ada@example.net"], fail_silently=True)
    assert isinstance(raised.value, postlane.ConfigError)
    assert isinstance(raised.value, ImproperlyConfigured)
    assert raised.value.setting == setting
    assert setting in str(raised.value)
    assert error in str(raised.value)


def test_without_postlane_config_the_error_names_the_django_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only EMAIL_BACKEND and DEFAULT_FROM_EMAIL set, send_mail said to name the queue
    with "--config, $POSTLANE_CONFIG, or Postlane('path/to/postlane.toml')": none of them a
    Django setting. No new queue is made in the working directory either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTLANE_CONFIG", raising=False)
    with override_settings(POSTLANE_CONFIG=None), pytest.raises(SettingsError) as raised:
        django_mail.send_mail("Hi", "Hello", None, ["ada@example.net"])
    assert raised.value.setting == "POSTLANE_CONFIG"
    assert f"there is no queue at {tmp_path / 'postlane.db'}" in str(raised.value)
    assert 'set POSTLANE_CONFIG = "/path/to/postlane.toml"' in str(raised.value)
    assert "--config" not in str(raised.value)
    assert not (tmp_path / "postlane.db").exists()


def test_a_scheduled_reminder_is_cancelled_by_its_postlane_id(local_postlane: Config) -> None:
    import time

    email = django_mail.EmailMessage(
        "Your trial ends tomorrow",
        "Upgrade?",
        to=["ada@example.net"],
        headers={"X-Postlane-Send-At": str(int(time.time()) + 86400)},
    )
    assert email.send() == 1
    cancelled = postlane.django.cancel(email.postlane_id)
    assert cancelled == {"id": email.postlane_id, "cancelled": 1, "left": []}
    with pytest.raises(postlane.NotFound):
        postlane.django.cancel(email.postlane_id)
    with postlane.Postlane(local_postlane) as app:
        assert app.messages() == []


def test_the_outbox_cancels_in_the_callers_transaction(
    web: DjangoClient, outbox_schema: tuple[Path, str]
) -> None:
    """An audit: the outbox's cancel ran on a connection of its own, so inside the transaction
    that sent the mail it said NotFound and the reminder went; and it committed even when the
    view's transaction rolled back."""
    from django.db import transaction

    path, _ = outbox_schema

    def reminder() -> Any:
        email = django_mail.EmailMessage("Hi", "Hello", "app@example.com", ["ada@example.net"])
        assert email.send() == 1
        return email

    with override_settings(
        POSTLANE_CONFIG=str(path), POSTLANE_OUTBOX=True, POSTLANE_OUTBOX_DATABASE="postgres"
    ):
        with transaction.atomic(using="postgres"):  # sent and cancelled in one transaction
            sent = reminder()
            assert postlane.django.cancel(sent.postlane_id) == {
                "id": sent.postlane_id,
                "cancelled": 1,
                "left": [],
            }
        kept = reminder()  # committed on its own
        with pytest.raises(RuntimeError), transaction.atomic(using="postgres"):
            assert postlane.django.cancel(kept.postlane_id)["cancelled"] == 1
            raise RuntimeError("the view failed: its cancel goes with it")
    with postlane.Postlane(config_path=path) as app:
        assert [m.id for m in app.messages()] == [kept.postlane_id]


def test_schedule_headers_become_send_at_and_expires_at(local_postlane: Config) -> None:
    import time
    from datetime import UTC, datetime

    send_at = int(time.time()) + 86400
    email = django_mail.EmailMessage(
        "Your code",
        "123456",
        to=["ada@example.net"],
        headers={
            "X-Postlane-Send-At": datetime.fromtimestamp(send_at, UTC).isoformat(),
            "X-Postlane-Expires-At": str(send_at + 3600),
        },
    )
    assert email.send() == 1
    with postlane.Postlane(local_postlane) as app:
        [listed] = app.messages()
        view = app.get(listed.id)
        assert (view.send_at, view.expires_at) == (send_at, send_at + 3600)
        assert b"X-Postlane" not in app.content(listed.id)
    naive = django_mail.EmailMessage(
        "Hi", "Hello", to=["ada@example.net"], headers={"X-Postlane-Send-At": "2027-01-01 08:00"}
    )
    with pytest.raises(ValidationError, match="no time zone"):
        naive.send()


def test_a_project_can_send_through_the_pytest_plugins_postlane(
    web: DjangoClient, postlane_mail: PostlaneMail
) -> None:
    with override_settings(POSTLANE_CONFIG=postlane_mail.config):
        web.post("/sign-up/", {"email": "ada@example.net"})
    postlane_mail.deliver()
    [message] = postlane_mail.messages
    assert (message["To"], message["Subject"]) == ("ada@example.net", "Welcome")
    assert message.envelope_from == "shop@example.com"


# -- HTTP mode: a postlane server ----------------------------------------------------------------


@pytest.fixture
async def postlane_server(tmp_path: Path, smtp_peer: SMTPPeer) -> AsyncIterator[AsyncPostlane]:
    """A postlane server (HTTP API on a free port, a bearer token), relaying to smtp_peer; the
    Django project sends to it with POSTLANE_URL."""
    path = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'server.db'}",
        smtp_peer.url,
        listen=f"127.0.0.1:{free_port()}",
        tokens=[TOKEN],
    )
    config = load_config(path)
    async with AsyncPostlane(config) as app, start_http(FrontDoor(config, app)) as address:
        with override_settings(POSTLANE_URL=address, POSTLANE_TOKEN=TOKEN):
            yield app


async def test_http_mode_sends_to_a_postlane_server_which_delivers_it_intact(
    web: DjangoClient, postlane_server: AsyncPostlane, smtp_peer: SMTPPeer
) -> None:
    # the view runs in a thread: its blocking HTTP call needs this loop free to answer
    response = await asyncio.to_thread(web.post, "/receipt/", RECEIPT)
    queue_id = response.json()["id"]
    view = await postlane_server.get(queue_id)
    assert (view.lane, view.idempotency_key) == (Lane.HIGH, "receipt-8812")
    assert sorted(r.address for r in view.recipients) == [
        "ada@example.net",
        "audit@example.com",
        "bob@example.org",
    ]
    again = await asyncio.to_thread(web.post, "/receipt/", RECEIPT)
    assert again.json()["id"] == queue_id
    assert await deliver(postlane_server) == 3
    [received] = smtp_peer.handler.received
    assert sorted(received.rcpt_tos) == ["ada@example.net", "audit@example.com", "bob@example.org"]
    assert_is_the_receipt(received.content)


async def test_http_mode_reports_a_refusal_as_one_postlane_error(
    postlane_server: AsyncPostlane,
) -> None:
    def send_with_a_wrong_token() -> int:
        with override_settings(POSTLANE_TOKEN="wrong"):
            return django_mail.send_mail("Hi", "Hello", None, ["ada@example.net"])

    # a configuration error (the token is the settings' fault), and still a PostlaneError
    with pytest.raises(SettingsError) as raised:
        await asyncio.to_thread(send_with_a_wrong_token)
    assert isinstance(raised.value, PostlaneError)
    assert isinstance(raised.value, ImproperlyConfigured)
    assert raised.value.setting == "POSTLANE_TOKEN"
    assert str(raised.value).startswith("POSTLANE_TOKEN: ")
    assert "(HTTP 401 unauthorized): the token is not valid" in str(raised.value)

    def silently_with_a_wrong_token() -> int:  # a wrong token is the settings' fault
        with override_settings(POSTLANE_TOKEN="wrong"):
            return django_mail.send_mail(
                "Hi", "Hello", None, ["ada@example.net"], fail_silently=True
            )

    with pytest.raises(PostlaneError, match="unauthorized"):
        await asyncio.to_thread(silently_with_a_wrong_token)
    assert await postlane_server.messages() == []


async def test_http_mode_names_postlane_url_when_it_reaches_no_postlane_route(
    postlane_server: AsyncPostlane,
) -> None:
    def send_to_a_path_in_front() -> int:
        with override_settings(POSTLANE_URL=f"{settings.POSTLANE_URL}/mail"):
            return django_mail.send_mail(
                "Hi", "Hello", None, ["ada@example.net"], fail_silently=True
            )

    with pytest.raises(SettingsError, match=r"^POSTLANE_URL: .*reaches no postlane"):
        await asyncio.to_thread(send_to_a_path_in_front)


# -- the transactional outbox on PostgreSQL ------------------------------------------------------


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"schema": schema})))


@pytest.fixture
def outbox_schema(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """postlane's tables in a schema of their own in the PostgreSQL database Django's
    ``postgres`` alias uses, and a sign-up table beside them; all dropped afterwards."""
    url = postgres_url_or_skip("the outbox test needs PostgreSQL: set")
    schema = f"dj_{uuid.uuid4().hex[:12]}"
    path = write_config(tmp_path, with_schema(url, schema), f"capture://{tmp_path / 'captured'}")
    with postlane.Postlane(config_path=path):  # creates the schema and postlane's tables
        pass
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.signups (email text)").format(sql.Identifier(schema)))
    try:
        yield path, schema
    finally:
        connections["postgres"].close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_the_outbox_commits_the_mail_with_the_views_transaction_or_not_at_all(
    web: DjangoClient, outbox_schema: tuple[Path, str]
) -> None:
    path, schema = outbox_schema
    with override_settings(
        POSTLANE_CONFIG=str(path),
        POSTLANE_OUTBOX=True,
        POSTLANE_OUTBOX_DATABASE="postgres",
        SIGNUP_TABLE=f'"{schema}".signups',
    ):
        kept = web.post("/sign-up-outbox/", {"email": "new@example.net"}).json()
        gone = web.post("/sign-up-outbox/", {"email": "gone@example.net", "fail": "1"}).json()
    assert kept == {"committed": True, "sent": 1}
    assert gone == {"committed": False}
    with postlane.Postlane(config_path=path) as app:
        [message] = app.messages()
    assert [r.address for r in message.recipients] == ["new@example.net"]
    with connections["postgres"].cursor() as cursor:
        cursor.execute(f'SELECT email FROM "{schema}".signups')
        assert cursor.fetchall() == [("new@example.net",)]


def test_an_outbox_on_a_database_postlane_never_opened_says_to_migrate(tmp_path: Path) -> None:
    """A day-one audit got psycopg's raw ``relation "suppressions" does not exist``: the
    outbox writes in the caller's transaction and creates no tables there."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import transaction

    url = postgres_url_or_skip("the outbox test needs PostgreSQL: set")
    schema = f"dj_{uuid.uuid4().hex[:12]}"  # never opened by postlane: no tables
    path = write_config(tmp_path, with_schema(url, schema), f"capture://{tmp_path / 'captured'}")
    try:
        with (
            override_settings(
                POSTLANE_CONFIG=str(path), POSTLANE_OUTBOX=True, POSTLANE_OUTBOX_DATABASE="postgres"
            ),
            pytest.raises(ImproperlyConfigured, match="POSTLANE_OUTBOX") as caught,
            transaction.atomic(using="postgres"),
        ):
            django_mail.send_mail("Hi", "Hello", "app@example.com", ["ada@example.net"])
    finally:
        connections["postgres"].close()
    message = str(caught.value)
    assert f"postlane's tables are not in the schema {schema!r}" in message
    assert "postlane --config FILE migrate" in message
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)


def test_the_outbox_refuses_a_store_that_is_not_postgresql(local_postlane: Config) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with (
        override_settings(POSTLANE_OUTBOX=True),
        pytest.raises(ImproperlyConfigured, match=r"store\.url to be the PostgreSQL database"),
    ):
        django_mail.send_mail("Hi", "Hello", None, ["ada@example.net"], fail_silently=True)


SCRIPT = """
import sys
import django
from django.conf import settings
settings.configure(EMAIL_BACKEND="postlane.django.EmailBackend", POSTLANE_CONFIG=sys.argv[1])
django.setup()
from django.core.mail import send_mail
assert send_mail("Hi", "Body", "app@example.com", ["ada@example.net"]) == 1
"""


def test_a_process_that_sent_mail_exits_without_a_traceback(tmp_path: Path) -> None:
    """The backend closes its local store at exit (atexit): by then the interpreter has shut
    down the default thread pool, and closing through it printed "Exception ignored in atexit
    callback ... cannot schedule new futures after shutdown" after every script and shell."""
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}", "capture://captured")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    stored = sqlite3.connect(tmp_path / "q.db").execute("SELECT count(*) FROM messages").fetchone()
    assert stored == (1,)
