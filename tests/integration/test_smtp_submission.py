"""SMTP submission with real clients (Python's smtplib; swaks when installed): trusted networks,
AUTH only after STARTTLS, per-recipient answers, SIZE, and 250 only after the durable commit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import smtplib
import sqlite3
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import trustme

from postlane.app import AsyncPostlane
from postlane.errors import StoreUnavailable
from postlane.ingest.door import FrontDoor
from postlane.ingest.smtp import hash_password, start_smtp, verify_password
from postlane.message import Message, prepare
from postlane.metrics import Metrics
from postlane.records import Selector
from postlane.store import sqlite as sqlite_module
from postlane.store.sqlite import SQLiteStore
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import IN_CI, _postgres_url, free_port, make_config

T = TypeVar("T")
MESSAGE = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


@dataclass
class Listener:
    app: AsyncPostlane
    port: int
    ca: trustme.CA | None


async def in_thread(func: Callable[[], T]) -> T:
    return await asyncio.to_thread(func)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def listen(
    tmp_path: Path,
    ca: trustme.CA | None,
    store: Any = None,
    metrics: Metrics | None = None,
    **smtp: Any,
) -> AsyncIterator[Listener]:
    port = free_port()
    settings: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "max_size": "50KB", **smtp}
    if ca is not None:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
        settings.update(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.pem"))
    config = make_config(tmp_path, smtp=settings)
    async with (
        AsyncPostlane(config, store=store) as app,
        start_smtp(FrontDoor(config, app, metrics)),
    ):
        yield Listener(app, port, ca)


@pytest.fixture
async def trusted(tmp_path: Path) -> AsyncIterator[Listener]:
    async with listen(tmp_path, None) as listener:
        yield listener


@pytest.fixture
async def auth_only(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Listener]:
    users = {"app": hash_password("s3cret"), "plain": "clear-pass"}
    async with listen(tmp_path, ca, trusted_networks=[], users=users) as listener:
        yield listener


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_trusted_client_submits_without_auth(trusted: Listener) -> None:
    def submit() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            return s.sendmail("app@example.com", ["ada@example.net", "bob@example.org"], MESSAGE)

    refused = await in_thread(submit)
    assert refused == {}
    [message] = await trusted.app.messages()
    assert [r.address for r in message.recipients] == ["ada@example.net", "bob@example.org"]
    content = await trusted.app.content(message.id)
    assert content.startswith(b"Received: from ")
    assert message.message_id.endswith("@example.com>")  # added, since the client gave none
    assert b"Message-ID: " + message.message_id.encode() in content


async def test_client_message_id_is_kept(trusted: Listener) -> None:
    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.sendmail(
                "app@example.com",
                ["ada@example.net"],
                b"Message-ID: <mine@app.example>\r\n" + MESSAGE,
            )

    await in_thread(submit)
    [message] = await trusted.app.messages()
    assert message.message_id == "<mine@app.example>"


async def test_each_rcpt_is_answered_on_its_own(trusted: Listener) -> None:
    def submit() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            s.mail("app@example.com")
            good = s.rcpt("ada@example.net")
            bad = s.rcpt("not@@valid")
            s.rcpt("bob@example.org")
            data = s.data(MESSAGE)
            return good, bad, data

    good, bad, data = await in_thread(submit)
    assert good[0] == 250 and bad[0] == 553 and data[0] == 250
    assert b"queued as" in data[1]
    [message] = await trusted.app.messages()
    assert [r.address for r in message.recipients] == ["ada@example.net", "bob@example.org"]


async def test_size_is_announced_and_enforced(trusted: Listener) -> None:
    def submit() -> tuple[int, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            size = int(s.esmtp_features["size"])
            s.mail("app@example.com")
            s.rcpt("ada@example.net")
            return size, s.data(MESSAGE + (b"x" * 70 + b"\r\n") * 900)

    size, reply = await in_thread(submit)
    assert size == 50_000
    assert reply[0] == 552
    assert await trusted.app.messages() == []


async def test_unauthenticated_untrusted_client_is_refused(auth_only: Listener) -> None:
    def submit() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.ehlo()
            assert not s.has_extn("auth")  # AUTH is never offered before STARTTLS
            return s.mail("app@example.com")

    code, text = await in_thread(submit)
    assert code == 530 and b"STARTTLS" in text
    assert await auth_only.app.messages() == []


async def test_auth_after_starttls_with_a_hashed_password(auth_only: Listener) -> None:
    assert auth_only.ca is not None
    context = client_context(auth_only.ca)

    def submit() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.starttls(context=context)
            s.login("app", "s3cret")
            return s.sendmail("app@example.com", ["ada@example.net"], MESSAGE)

    assert await in_thread(submit) == {}
    [message] = await auth_only.app.messages()
    assert b"with ESMTPSA" in await auth_only.app.content(message.id)


async def test_plain_password_in_config_works_too(auth_only: Listener) -> None:
    assert auth_only.ca is not None
    context = client_context(auth_only.ca)

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.starttls(context=context)
            s.login("plain", "clear-pass")

    await in_thread(submit)


async def test_an_empty_message_is_refused(trusted: Listener) -> None:
    """DATA then the final dot at once (or BDAT 0 LAST) was stored: the Received line postlane
    puts on top passed for a header section, while the API refuses an empty raw message."""

    def submit() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            s.mail("app@example.com")
            s.rcpt("ada@example.net")
            try:
                return s.data(b"")
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error

    code, text = await in_thread(submit)
    assert code == 554 and b"empty" in text
    content = b"X-Postlane-Lane: high\r\n\r\n"  # postlane's control headers only
    code, text = await in_thread(lambda: submit_one(trusted.port, content))
    assert code == 554 and b"empty" in text
    assert await trusted.app.messages() == []


async def test_a_header_section_past_its_limit_is_refused_without_reading_it_line_by_line(
    tmp_path: Path,
) -> None:
    """A security audit: millions of short header fields held the event loop for seconds (the
    control headers are read line by line, then the header parser). Past 1 MiB the section
    is refused before either: 554 5.6.0, nothing stored."""
    content = (
        b"From: app@example.com\r\nTo: ada@example.net\r\nX-Postlane-Lane: high\r\n"
        + b"X-A: b\r\n" * 140_000
        + b"Subject: s\r\n\r\nbody\r\n"
    )
    async with listen(tmp_path, None, max_size="25MB") as listener:
        code, text = await in_thread(lambda: submit_one(listener.port, content))
        assert code == 554 and b"header section is" in text
        assert await listener.app.messages() == []


@pytest.fixture
async def bound(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Listener]:
    users = {"shop": hash_password("s3cret"), "any": "clear-pass"}
    async with listen(
        tmp_path,
        ca,
        trusted_networks=[],
        users=users,
        user_senders={"shop": ["shop.example.com", "xn--bcher-kva.example"]},
    ) as listener:
        yield listener


def submit_as(
    listener: Listener, user: str, password: str, sender: str, content: bytes
) -> tuple[tuple[int, bytes], tuple[int, bytes] | None]:
    """MAIL FROM ``sender`` after AUTH as ``user``, then (if MAIL was taken) the message:
    the answers to MAIL and to the final dot."""
    assert listener.ca is not None
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as s:
        s.starttls(context=client_context(listener.ca))
        s.login(user, password)
        mail = s.mail(sender)
        if mail[0] != 250:
            return mail, None
        assert s.rcpt("ada@example.net")[0] == 250
        return mail, s.data(content)


async def test_a_user_bound_to_sender_domains_sends_only_from_them(bound: Listener) -> None:
    """``[smtp] user_senders``: one application's SMTP login may not send as another's domain,
    neither in the envelope (refused at MAIL, as Postfix's reject_sender_login_mismatch does)
    nor in the From header (refused at the final dot); nothing is stored. Users not named there
    send from any domain, as before."""
    shop = b"From: Shop <orders@shop.example.com>\r\nTo: ada@example.net\r\n\r\nhello\r\n"
    bank = b"From: Bank <alerts@bank.example>\r\nTo: ada@example.net\r\n\r\nhello\r\n"

    mail, _ = await in_thread(lambda: submit_as(bound, "shop", "s3cret", "ceo@bank.example", shop))
    assert mail[0] == 553 and mail[1].startswith(b"5.7.1 ")
    assert b"shop.example.com, xn--bcher-kva.example only" in mail[1] and b"bank.example" in mail[1]

    def idn_mail() -> tuple[int, bytes]:  # a domain listed in its ASCII form, sent in Unicode
        assert bound.ca is not None
        with smtplib.SMTP("127.0.0.1", bound.port, timeout=10) as s:
            s.starttls(context=client_context(bound.ca))
            s.login("shop", "s3cret")
            return s.mail("orders@bücher.example", ["SMTPUTF8"])

    assert (await in_thread(idn_mail))[0] == 250

    mail, data = await in_thread(
        lambda: submit_as(bound, "shop", "s3cret", "orders@shop.example.com", bank)
    )
    assert mail[0] == 250
    assert data is not None and data[0] == 550 and data[1].startswith(b"5.7.1 ")
    assert b"bank.example (its From header)" in data[1]
    assert await bound.app.messages() == []

    mail, data = await in_thread(
        lambda: submit_as(bound, "shop", "s3cret", "Orders@Shop.Example.COM", shop)
    )
    assert data is not None and data[0] == 250, data
    _, data = await in_thread(lambda: submit_as(bound, "any", "clear-pass", "x@bank.example", bank))
    assert data is not None and data[0] == 250, data
    # the domain is stored lower-cased, as prepare always does
    assert sorted(m.sender for m in await bound.app.messages()) == [
        "Orders@shop.example.com",
        "x@bank.example",
    ]


async def test_wrong_credentials_get_535_and_nothing_is_stored(auth_only: Listener) -> None:
    assert auth_only.ca is not None
    context = client_context(auth_only.ca)

    def submit() -> int:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.starttls(context=context)
            try:
                s.login("app", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
        return 0

    assert await in_thread(submit) == 535
    assert await auth_only.app.messages() == []


async def test_auth_login_works_and_repeated_failures_slow_down_then_disconnect(
    auth_only: Listener,
) -> None:
    assert auth_only.ca is not None
    context = client_context(auth_only.ca)

    def login_mechanism() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.starttls(context=context)
            s.ehlo()
            s.user, s.password = "app", "s3cret"
            return s.auth("LOGIN", s.auth_login, initial_response_ok=False)

    code, _ = await in_thread(login_mechanism)
    assert code == 235

    def guess_three_times() -> list[tuple[int, float]]:
        answers = []
        s = smtplib.SMTP("127.0.0.1", auth_only.port, timeout=30)
        try:
            s.starttls(context=context)
            s.ehlo()
            for attempt in range(3):
                started = time.monotonic()
                s.user, s.password = "app", f"guess{attempt}"
                try:
                    s.auth("PLAIN", s.auth_plain)  # one mechanism: login() would try two
                except smtplib.SMTPAuthenticationError as exc:
                    answers.append((exc.smtp_code, time.monotonic() - started))
                except smtplib.SMTPServerDisconnected:
                    answers.append((421, time.monotonic() - started))
                    break
                except smtplib.SMTPResponseException as exc:
                    answers.append((exc.smtp_code, time.monotonic() - started))
            try:  # the third failure's 535 is followed by a 421 and the end of the session
                answers.append((s.noop()[0], 0.0))
            except smtplib.SMTPServerDisconnected:
                answers.append((-1, 0.0))
        finally:
            s.close()  # no QUIT: the server hung up
        return answers

    (first, _), (second, t2), (third, t3), (after, _) = await in_thread(guess_three_times)
    assert (first, second, third) == (535, 535, 535)
    assert after in (421, -1)  # closed: "421 Too many failed authentications", then hung up
    # the server takes no next command until a growing delay has passed: 1 s, then 2 s
    assert t2 >= 0.9 and t3 >= 1.9


async def test_hash_password_prints_a_hash_that_verifies(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        "postlane", "hash-password", "--stdin", cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate(b"correct horse\n")
    assert process.returncode == 0, err
    printed = out.decode().strip()
    assert printed.startswith("scrypt$") and "correct horse" not in printed
    assert verify_password("correct horse", printed)
    empty = await asyncio.create_subprocess_exec(
        "postlane", "hash-password", "--stdin", cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await empty.communicate(b"\n")
    assert empty.returncode != 0 and b"Traceback" not in err


class BrokenStore(SQLiteStore):
    async def enqueue(self, messages: Any, now: float) -> Any:
        raise StoreUnavailable("disk full")


async def test_store_failure_answers_421_and_no_250(tmp_path: Path) -> None:
    async with listen(tmp_path, None, store=BrokenStore(tmp_path / "broken.db")) as listener:
        port = listener.port

        def submit() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo()
                s.mail("app@example.com")
                s.rcpt("ada@example.net")
                try:
                    return s.data(MESSAGE)
                except smtplib.SMTPServerDisconnected:
                    return (421, b"disconnected")

        code, _ = await in_thread(submit)
        assert code == 421


def test_password_hashes_verify() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$")
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("x", "scrypt$broken")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_submits(trusted: Listener) -> None:
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{trusted.port}",
        "--from",
        "app@example.com",
        "--to",
        "ada@example.net",
        "--header",
        "Subject: from swaks",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out.decode()
    [message] = await trusted.app.messages()
    assert message.subject == "from swaks"


# -- audit finding 6: postlane's own trouble is temporary, and says nothing of its insides ---------


def submit_one(port: int, message: bytes = MESSAGE) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA: the DATA reply (or, if the server hung up, what it said before)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.mail("app@example.com")
        s.rcpt("ada@example.net")
        try:
            return s.data(message)
        except smtplib.SMTPServerDisconnected:
            return (-1, b"disconnected without an answer")


def queue_of(count: int) -> list[Any]:
    return [
        prepare(
            Message(
                sender="app@example.com", to=[f"u{n}@example.net"], subject="s", text="x" * 500
            ),
            max_size=10**6,
        )
        for n in range(count)
    ]


async def test_finding_6_a_corrupted_sqlite_file_answers_421_never_5xx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database file is damaged under a running listener: every client is told 421 4.3.0
    (try later), never 5xx (the sender would bounce the mail) nor the database's own words.
    The log says it at once, then a line a minute with the count, not a line per client (a
    durability audit: a full disk wrote one ERROR line per refused message)."""
    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    await store.open()
    await store.enqueue(queue_of(200), time.time())
    await store.close()
    whole = path.read_bytes()
    async with listen(tmp_path, None, store=SQLiteStore(path)) as listener:
        damaged = bytearray(whole)
        for start in range(8 * 4096, len(damaged) - 4096, 4096):  # as test_sqlite_files does
            damaged[start + 8 : start + 4096] = b"\xa5" * (4096 - 8)
        path.write_bytes(bytes(damaged))

        def submit_then_noop() -> tuple[int, bytes, bool]:
            with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as s:
                s.ehlo()
                s.mail("app@example.com")
                s.rcpt("ada@example.net")
                code, text = s.data(MESSAGE)
                try:
                    s.noop()
                except smtplib.SMTPServerDisconnected:
                    return code, text, True
                return code, text, False

        for _ in range(3):
            code, text, hung_up = await in_thread(submit_then_noop)
            assert code == 421 and text.startswith(b"4.3.0"), (code, text)
            assert b"malformed" not in text and b"Error" not in text
            assert hung_up  # 421: "closing transmission channel" (RFC 5321 4.2.2)
    said = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    # the first refusal at once; the next ones join the line a minute later
    assert len(said) == 1 and said[0].startswith("SMTP: 1 submitted message(s) not stored"), said
    path.write_bytes(whole)  # nothing was half stored: the queue is as it was
    store = SQLiteStore(path)
    await store.open()
    try:
        assert len(await store.list_messages(Selector(), limit=1000)) == 200
    finally:
        await store.close()


async def test_a_full_disk_answers_452_4_3_1_and_the_session_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's disk is full (SQLite's own SQLITE_FULL: the file may not grow past a few
    pages more): a client is told ``452 4.3.1`` (insufficient system storage), as Postfix
    says it, not 421 and a closed connection; it may go on and try later. Nothing is half
    stored."""
    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    await store.open()  # migrated: the file only has to hold messages from now on
    await store.close()
    opened = sqlite_module.connect

    def with_little_room(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = opened(*args, **kwargs)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 4}")
        return conn

    monkeypatch.setattr(sqlite_module, "connect", with_little_room)
    body = MESSAGE + (b"x" * 70 + b"\r\n") * 60  # 4 KB
    async with listen(tmp_path, None, store=SQLiteStore(path)) as listener:

        def submit_until_full() -> tuple[int, bytes, int, int]:
            with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as s:
                s.ehlo()
                for stored in range(100):
                    s.mail("app@example.com")
                    s.rcpt("ada@example.net")
                    code, text = s.data(body)
                    if code != 250:
                        return code, text, stored, s.noop()[0]
            raise AssertionError("100 messages stored in a few pages")

        code, text, stored, noop = await in_thread(submit_until_full)
        assert (code, noop) == (452, 250), (code, text)
        assert text.startswith(b"4.3.1 Insufficient system storage")
        views = await listener.app.store.list_messages(Selector(), limit=1000)
        assert len(views) == stored and all(len(v.recipients) == 1 for v in views)


class CuttablePostgres:
    """A TCP relay in front of PostgreSQL that can be cut (every connection dropped, new ones
    refused) and restored on the same port: the database "stops" under a running store."""

    def __init__(self, url: str) -> None:
        self.target = urlsplit(url)
        self.port = free_port()
        user, at, _ = self.target.netloc.rpartition("@")
        self.url = urlunsplit(self.target._replace(netloc=f"{user}{at}127.0.0.1:{self.port}"))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = self.target.hostname or "127.0.0.1", self.target.port or 5432
        server_r, server_w = await asyncio.open_connection(host, port)
        self._writers |= {client_w, server_w}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self._server = None


async def test_finding_6_a_lost_postgresql_answers_421_and_stores_nothing_half(
    tmp_path: Path,
) -> None:
    url = _postgres_url()
    if url is None:
        if IN_CI:
            pytest.fail("POSTLANE_TEST_POSTGRES is not set in CI")
        pytest.skip("PostgreSQL tests need POSTLANE_TEST_POSTGRES=postgresql://...")
    from postlane.store.postgres import PostgresStore

    database = CuttablePostgres(url)
    await database.start()
    store = PostgresStore(database.url, schema=f"t_{uuid.uuid4().hex[:12]}", timeout=3)
    async with listen(tmp_path, None, store=store) as listener:
        try:
            await database.cut()
            code, text = await in_thread(lambda: submit_one(listener.port))
            assert code == 421 and text.startswith(b"4.3.0"), (code, text)
            await database.start()
            code, text = await in_thread(lambda: submit_one(listener.port))
            assert code == 250, (code, text)
            [message] = await listener.app.messages()  # the refused one left nothing behind
            assert text.endswith(message.id.encode())
        finally:
            await store.drop_schema()
    await database.cut()


class ExplodingStore(SQLiteStore):
    async def enqueue(self, messages: Any, now: float) -> Any:
        raise RuntimeError("internal detail: /var/lib/postlane/secret")


async def test_finding_6_an_unexpected_error_is_451_or_421_never_a_500_with_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ExplodingStore(tmp_path / "exploding.db")
    async with listen(tmp_path, None, store=store) as listener:
        code, text = await in_thread(lambda: submit_one(listener.port))
        assert code == 451 and text.startswith(b"4.3.0"), (code, text)
        assert b"RuntimeError" not in text and b"internal detail" not in text

        def explode(*args: Any) -> Any:
            raise RuntimeError("internal detail in MAIL")

        monkeypatch.setattr("postlane.ingest.smtp.parse_address", explode)

        def mail_from() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as s:
                s.ehlo()
                return s.mail("app@example.com")

        code, text = await in_thread(mail_from)
        assert code == 421 and text.startswith(b"4.3.0"), (code, text)
        assert b"internal detail" not in text


# -- audit finding 12: NUL bytes -------------------------------------------------------------------


async def test_finding_12_a_message_with_nul_bytes_is_refused(trusted: Listener) -> None:
    for message in (MESSAGE.replace(b"hello", b"hel\x00lo"), b"X-Odd: a\x00b\r\n" + MESSAGE):
        code, text = await in_thread(lambda m=message: submit_one(trusted.port, m))  # type: ignore[misc]
        assert code == 554 and text.startswith(b"5.6.0") and b"NUL" in text, (code, text)
    assert await trusted.app.messages() == []


# -- issue 17.6: control headers -------------------------------------------------------------------


async def test_issue_17_6_x_postlane_lane_chooses_the_lane_and_never_reaches_the_recipient(
    trusted: Listener, tmp_path: Path
) -> None:
    message = (
        b"X-Postlane-Lane: high\r\nFrom: app@example.com\r\nTo: ada@example.net\r\n"
        b"X-Postlane-Idempotency-Key:\r\n reset-8812\r\nSubject: reset\r\n"
        b'X-Postlane-Metadata: {"user": 42}\r\n\r\nyour code\r\n'
    )
    first = await in_thread(lambda: submit_one(trusted.port, message))
    again = await in_thread(lambda: submit_one(trusted.port, message))
    assert first[0] == again[0] == 250
    [stored] = await trusted.app.messages()
    assert stored.lane == "high" and stored.idempotency_key == "reset-8812"
    assert stored.metadata == {"user": 42}
    assert again[1].split()[4] == stored.id.encode() and b"duplicate" in again[1]
    assert b"x-postlane" not in (await trusted.app.content(stored.id)).lower()
    transport = transport_for(trusted.app.config)
    try:
        await Worker.from_config(trusted.app.config, trusted.app.store, transport).run_until_idle()
    finally:
        await transport.close()
    [delivered] = (tmp_path / "captured").glob("*.eml")
    # the capture folder's own envelope lines (X-Postlane-Envelope-*) aside, as sent
    content = delivered.read_bytes().split(b"\r\n", 2)[2]
    assert content.startswith(b"Received: ") and b"Subject: reset" in content
    assert b"x-postlane" not in content.lower()


async def test_schedule_headers_set_send_at_and_expires_at(trusted: Listener) -> None:
    import time
    from datetime import UTC, datetime, timedelta, timezone

    send_at = datetime.fromtimestamp(int(time.time()) + 86400, UTC)  # tomorrow, this second
    message = (
        b"X-Postlane-Send-At: "
        + send_at.astimezone(timezone(timedelta(hours=1))).isoformat().encode()
        + b"\r\nFrom: app@example.com\r\nTo: ada@example.net\r\nX-Postlane-Expires-At: "
        + str(int(send_at.timestamp()) + 3600).encode()
        + b"\r\nSubject: later\r\n\r\nhappy new year\r\n"
    )
    reply = await in_thread(lambda: submit_one(trusted.port, message))
    assert reply[0] == 250
    [stored] = await trusted.app.messages()
    view = await trusted.app.get(stored.id)
    assert view.send_at == send_at.timestamp()
    assert view.expires_at == send_at.timestamp() + 3600
    assert b"x-postlane" not in (await trusted.app.content(stored.id)).lower()
    naive = message.replace(b"+01:00", b"")
    refused = await in_thread(lambda: submit_one(trusted.port, naive))
    assert refused[0] == 554 and b"no time zone" in refused[1]


async def test_issue_17_6_an_unknown_lane_or_control_header_is_refused_naming_the_choices(
    trusted: Listener,
) -> None:
    urgent = await in_thread(
        lambda: submit_one(trusted.port, b"X-Postlane-Lane: urgent\r\n" + MESSAGE)
    )
    assert urgent[0] == 550 and urgent[1].startswith(b"5.6.0"), urgent
    assert b"urgent" in urgent[1] and b"high, normal, low" in urgent[1]
    typo = await in_thread(
        lambda: submit_one(trusted.port, b"X-Postlane-Lanes: high\r\n" + MESSAGE)
    )
    assert typo[0] == 550 and b"(known: X-Postlane-Lane, X-Postlane-Idempotency-Key" in typo[1]
    assert await trusted.app.messages() == []


async def test_issue_17_6_a_captured_message_can_be_submitted_again(
    trusted: Listener, tmp_path: Path
) -> None:
    """The capture folder's X-Postlane-Envelope-* lines are postlane's own trace: dropped (with
    their folded lines), not refused as unknown control headers."""
    captured = (
        b"X-Postlane-Envelope-From: <app@example.com>\r\n"
        b"X-Postlane-Envelope-To: <ada@example.net>,\r\n <bob@example.org>\r\n" + MESSAGE
    )
    code, _ = await in_thread(lambda: submit_one(trusted.port, captured))
    assert code == 250
    [stored] = await trusted.app.messages()
    content = await trusted.app.content(stored.id)
    assert b"x-postlane" not in content.lower() and b"bob@" not in content


# -- audit finding 13: stopping with sessions open -----------------------------------------------


class SlowStore(SQLiteStore):
    """Takes half a second to store, and says when a store has begun."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.storing = asyncio.Event()

    async def enqueue(self, messages: Any, now: float) -> Any:
        self.storing.set()
        await asyncio.sleep(0.5)
        return await super().enqueue(messages, now)


async def test_finding_13_at_shutdown_a_message_being_stored_is_answered_and_the_rest_get_421(
    tmp_path: Path,
) -> None:
    store = SlowStore(tmp_path / "slow.db")
    stack = contextlib.AsyncExitStack()
    listener = await stack.enter_async_context(listen(tmp_path, None, store=store))
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", listener.port)
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", listener.port)
    for reader, writer in ((idle_r, idle_w), (busy_r, busy_w)):
        writer.write(b"EHLO client\r\n")
        assert (await reader.readline()).startswith(b"220")
    busy_w.write(
        b"MAIL FROM:<app@example.com>\r\nRCPT TO:<ada@example.net>\r\nDATA\r\n" + MESSAGE + b".\r\n"
    )
    await asyncio.wait_for(store.storing.wait(), timeout=10)
    stopping = asyncio.create_task(stack.aclose())  # as serve does on SIGTERM
    idle_said = await asyncio.wait_for(idle_r.read(), timeout=10)
    busy_said = await asyncio.wait_for(busy_r.read(), timeout=10)
    await asyncio.wait_for(stopping, timeout=10)
    assert idle_said.splitlines()[-1].startswith(b"421 4.3.2"), idle_said
    replies = busy_said.splitlines()
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued as"), busy_said
    assert replies[-1].startswith(b"421 4.3.2"), busy_said
    for writer in (idle_w, busy_w):
        writer.close()
    store = SQLiteStore(tmp_path / "slow.db")
    await store.open()
    try:
        assert len(await store.list_messages(Selector(), limit=10)) == 1
    finally:
        await store.close()


async def test_two_listeners_can_share_one_socket(tmp_path: Path) -> None:
    """What ``serve --processes`` needs: a socket bound once, served by several listeners
    (here two in one process, each with its own descriptor of the socket, as a forked process
    has); every message is stored once."""
    from postlane.ingest.server import bind

    port = free_port()
    config = make_config(tmp_path, smtp={"listen": f"127.0.0.1:{port}"})
    sock = bind(config.smtp.listen, "smtp.listen")
    async with (
        AsyncPostlane(config) as app,
        start_smtp(FrontDoor(config, app), sock=sock) as first,
        start_smtp(FrontDoor(config, app), sock=sock.dup()) as second,
    ):
        assert first == second == f"127.0.0.1:{port}"
        for _ in range(4):
            await in_thread(lambda: submit_one(port))
        assert len(await app.messages()) == 4


async def test_a_helo_name_is_one_word_never_a_header_break(trusted: Listener) -> None:
    """A security audit put a bare CR in its EHLO name: the Received line carried it into the
    stored message as header breaks, forging X-Postlane-Lane and other headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", trusted.port)
    assert (await reader.readline()).startswith(b"220")
    for hello in (b"EHLO x\rX-Postlane-Lane: high\r\n", b"HELO two words\r\n", b"EHLO a\x00b\r\n"):
        writer.write(hello)
        assert (await reader.readline()).startswith(b"501 Syntax: ")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    assert await trusted.app.messages() == []


# -- what a relaying MTA sends (an audit put Postfix in front of postlane) ----------------------


async def test_the_null_sender_is_accepted_for_bounces(trusted: Listener) -> None:
    """RFC 5321 4.5.5: bounces and DSNs come from ``<>``; refusing it lost every bounce a
    relaying Postfix sent through postlane."""
    bounce = (
        b"From: MAILER-DAEMON@relay.example.com\r\nTo: app@example.com\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n"
    )

    def submit() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            assert s.mail("")[0] == 250  # MAIL FROM:<>
            assert s.rcpt("app@example.com")[0] == 250
            return s.data(bounce)

    code, _ = await in_thread(submit)
    assert code == 250
    [message] = await trusted.app.messages()
    assert message.sender == ""  # sent on from <>
    assert message.message_id.endswith("@relay.example.com>")


async def test_a_message_of_headers_only_is_accepted(trusted: Listener) -> None:
    """RFC 5322 3.5: the body is optional; Postfix's sendmail sends such a message as is."""
    head_only = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: ping\r\n"

    def submit() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            return s.sendmail("app@example.com", ["ada@example.net"], head_only)

    assert await in_thread(submit) == {}
    [message] = await trusted.app.messages()
    content = await trusted.app.content(message.id)
    head, blank, body = content.partition(b"\r\n\r\n")
    assert blank and body == b"" and b"Subject: ping" in head


async def test_the_size_limit_counts_the_clients_octets_and_says_5_3_4(trusted: Listener) -> None:
    """An audit's message of exactly max_size bytes was refused: the limit counted the
    Received line postlane adds. Every 552 carries its enhanced code (RFC 3463 5.3.4)."""
    limit = 50_000
    head = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: big\r\n\r\n"
    line = b"x" * 98 + b"\r\n"
    body = line * ((limit - len(head)) // len(line))
    exact = head + body + b"y" * (limit - len(head) - len(body) - 2) + b"\r\n"
    assert len(exact) == limit

    def submit() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            s.mail("app@example.com", [f"SIZE={limit}"])
            s.rcpt("ada@example.net")
            fits = s.data(exact)
            announced = s.mail("app@example.com", [f"SIZE={limit + 1}"])
            s.rset()
            s.mail("app@example.com")
            s.rcpt("ada@example.net")
            over = s.data(exact + b"z\r\n")
            return fits, announced, over

    fits, announced, over = await in_thread(submit)
    assert fits[0] == 250
    assert announced[0] == 552 and announced[1].startswith(b"5.3.4 ")
    assert over[0] == 552 and over[1].startswith(b"5.3.4 ")
    assert len(await trusted.app.messages()) == 1


async def test_a_second_from_or_subject_header_is_refused(trusted: Listener) -> None:
    """RFC 5322 3.6 allows From and Subject once: an audit's message with two From headers was
    accepted and signed with both (receivers refuse it; DKIM verifiers fail it)."""
    two_froms = b"From: app@example.com\r\nFrom: evil@example.org\r\nSubject: x\r\n\r\nhi\r\n"
    two_subjects = b"From: app@example.com\r\nSubject: x\r\nSubject: y\r\n\r\nhi\r\n"

    def submit(content: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            s.mail("app@example.com")
            s.rcpt("ada@example.net")
            return s.data(content)

    for content, name in ((two_froms, b"From"), (two_subjects, b"Subject")):
        code, text = await in_thread(lambda content=content: submit(content))
        assert code == 554 and text.startswith(b"5.6.0 ") and b"2 " + name in text
    assert await trusted.app.messages() == []


async def test_non_ascii_addresses_need_smtputf8_and_valid_utf8(trusted: Listener) -> None:
    """RFC 6531 3.4: a non-ASCII address in a transaction whose MAIL did not say SMTPUTF8 gets
    553 5.6.7; bytes that are not UTF-8 are a malformed address (not Python's surrogates)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", trusted.port)

    async def say(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        reply = b""
        while reply[3:4] != b" ":
            reply = await reader.readline()
        return reply

    assert (await reader.readline()).startswith(b"220")
    await say(b"EHLO client.example")
    assert (await say(b"MAIL FROM:<app@example.com>")).startswith(b"250")
    assert (await say("RCPT TO:<z\u00fc@example.org>".encode())).startswith(b"553 5.6.7")
    assert (await say(b"RSET")).startswith(b"250")
    assert (await say(b"MAIL FROM:<app@example.com> SMTPUTF8")).startswith(b"250")
    bad = await say(b"RCPT TO:<\xfc@example.org>")
    assert bad.startswith(b"553 5.1.3") and b"UTF-8" in bad and b"surrogate" not in bad
    assert (await say("RCPT TO:<z\u00fc@example.org>".encode())).startswith(b"250")
    await say(b"QUIT")
    writer.close()
    assert await trusted.app.messages() == []


async def test_the_received_line_is_ascii_and_dates_use_a_numeric_zone(trusted: Listener) -> None:
    """RFC 5322 3.3: ``GMT`` is the obsolete zone form (never generated); an EHLO name with
    8-bit bytes went raw into a message that was not SMTPUTF8."""

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10, local_hostname="caf\u00e9") as s:
            s.command_encoding = "utf-8"  # the EHLO name goes as UTF-8 bytes
            s.sendmail("app@example.com", ["ada@example.net"], MESSAGE)

    await in_thread(submit)
    [message] = await trusted.app.messages()
    content = await trusted.app.content(message.id)
    head = content.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    assert head.startswith(b"Received: from caf? ([127.0.0.1])")
    received, date = head.split(b"\r\n\tby ")[1], head.split(b"\r\nDate: ")[1]
    assert received.split(b";\r\n\t")[1].split(b"\r\n")[0].endswith(b" +0000")
    assert date.split(b"\r\n")[0].endswith(b" +0000")


async def test_auth_on_mail_is_read_and_plain_auth_acts_only_as_itself(
    auth_only: Listener,
) -> None:
    """RFC 4954 5: a server offering AUTH reads MAIL's AUTH= parameter (Postfix sends
    ``AUTH=<>``); RFC 4616 2: a login cannot ask to act as another identity."""
    assert auth_only.ca is not None
    context = client_context(auth_only.ca)

    def submit() -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", auth_only.port, timeout=10) as s:
            s.starttls(context=context)
            s.ehlo()
            other = base64.b64encode(b"plain\x00app\x00s3cret").decode()
            as_other = s.docmd("AUTH", f"PLAIN {other}")[0]
            s.login("app", "s3cret")
            mail = s.mail("app@example.com", ["AUTH=<>"])[0]
            s.rcpt("ada@example.net")
            s.data(MESSAGE)
            return as_other, mail

    as_other, mail = await in_thread(submit)
    assert as_other == 535
    assert mail == 250
    assert len(await auth_only.app.messages()) == 1


def _reply_line_octets(code: int, text: bytes) -> int:
    """The octets of the reply line smtplib read: ``550 `` (or ``550-``), text, CRLF."""
    return len(str(code)) + 1 + len(text) + 2


async def test_a_refusal_repeating_a_long_value_stays_within_a_512_octet_reply_line(
    trusted: Listener,
) -> None:
    """RFC 5321 4.5.3.1.5: a reply line is at most 512 octets. A 900-digit X-Postlane-Send-At
    was repeated whole (a 554 of about 1,000 octets); it is cut, with an ellipsis."""
    digits = b"9" * 900
    message = b"X-Postlane-Send-At: " + digits + b"\r\n" + MESSAGE
    code, text = await in_thread(lambda: submit_one(trusted.port, message))
    assert code == 554 and text.startswith(b"5.6.0 send_at"), text
    assert _reply_line_octets(code, text) <= 512
    assert text.endswith(b"...") and b"9" * 30 in text  # the value, cut where errors cut it
    # an unknown control header's name is repeated too
    name = b"X-Postlane-" + b"n" * 900
    code, text = await in_thread(lambda: submit_one(trusted.port, name + b": 1\r\n" + MESSAGE))
    assert code == 550 and _reply_line_octets(code, text) <= 512, text
    # non-ASCII text is cut between characters, never inside one
    lane = "ü".encode() * 600
    code, text = await in_thread(
        lambda: submit_one(trusted.port, b"X-Postlane-Lane: " + lane + b"\r\n" + MESSAGE)
    )
    assert code == 550 and _reply_line_octets(code, text) <= 512, text
    text.decode("utf-8")  # whole characters
    assert await trusted.app.messages() == []


async def test_a_long_bad_address_is_repeated_cut_and_the_reason_still_said(
    trusted: Listener,
) -> None:
    """A From header's address is repeated in the refusal: a long one is cut to its start, so
    the reason after it still fits the reply line."""
    bounce = b"From: " + b"x" * 900 + b"@example.com\r\nTo: app@example.com\r\n\r\nsorry\r\n"

    def submit() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            assert s.mail("")[0] == 250  # MAIL FROM:<>: the From header is read
            assert s.rcpt("app@example.com")[0] == 250
            return s.data(bounce)

    code, text = await in_thread(submit)
    assert code == 554 and _reply_line_octets(code, text) <= 512, text
    assert b"x" * 100 + b"...'" in text and b"is not a valid address: " in text
    assert b"too long" in text or b"RFC 5321 4.5.3.1.1" in text, text


async def test_a_local_part_over_64_octets_is_refused_at_rcpt(trusted: Listener) -> None:
    """RFC 5321 4.5.3.1.1: a local part is at most 64 octets."""

    def submit() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            s.mail("app@example.com")
            return s.rcpt("a" * 64 + "@example.net"), s.rcpt("a" * 65 + "@example.net")

    fits, over = await in_thread(submit)
    assert fits[0] == 250
    assert over[0] == 553 and b"65 octets" in over[1] and b"at most 64" in over[1], over
