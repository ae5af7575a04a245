"""SMTP submission with real clients (Python's smtplib; swaks when installed): trusted networks,
AUTH only after STARTTLS, per-recipient answers, SIZE, and 250 only after the durable commit."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from postlane.app import AsyncPostlane
from postlane.errors import StoreUnavailable
from postlane.ingest.smtp import hash_password, start_smtp, verify_password
from postlane.store.sqlite import SQLiteStore
from tests.conftest import free_port, make_config

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
    tmp_path: Path, ca: trustme.CA | None, store: Any = None, **smtp: Any
) -> AsyncIterator[Listener]:
    port = free_port()
    settings: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "max_size": "50KB", **smtp}
    if ca is not None:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
        settings.update(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.pem"))
    config = make_config(tmp_path, smtp=settings)
    async with AsyncPostlane(config, store=store) as app, start_smtp(config, app):
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
