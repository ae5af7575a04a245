"""The SMTP listeners against clients nobody here wrote: swaks, Python's smtplib, aiosmtplib,
Postfix's smtp-source and Postfix itself relaying into the submission port. Each speaks the parts
of RFC 5321 and its extensions it knows (PIPELINING, 8BITMIME, SMTPUTF8, SIZE, STARTTLS, AUTH);
what it sends must arrive as it was sent."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from postlane.ingest.smtp import hash_password
from tests.conftest import IN_CI, free_port
from tests.integration.test_smtp_submission import Listener, client_context, listen
from tests.postfix import WHY_NOT, PrivatePostfix
from tests.postfix import postfix_root as postfix_root  # a fixture

SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"
SWAKS = shutil.which("swaks")
SMTP_SOURCE = shutil.which("smtp-source", path=SBIN)
MESSAGE = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def need(tool: str | None, name: str) -> str:
    if tool is None:
        if IN_CI:
            pytest.fail(f"{name} must be installed in CI")
        pytest.skip(f"{name} is not installed")
    return tool


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def trusted(tmp_path: Path) -> AsyncIterator[Listener]:
    async with listen(tmp_path, None) as listener:
        yield listener


@pytest.fixture
async def auth_only(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Listener]:
    users = {"app": hash_password("s3cret")}
    async with listen(tmp_path, ca, trusted_networks=[], users=users) as listener:
        yield listener


async def run(*command: str, timeout: float = 60) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


async def wait_for_messages(listener: Listener, count: int, *, within: float) -> None:
    """Poll the store until ``count`` messages are there (Postfix relays on its own time)."""
    async with asyncio.timeout(within):
        while len(await listener.app.messages(limit=count + 10)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the poll interval, not a wait for something


# -- swaks -----------------------------------------------------------------------------------------


async def test_swaks_pipelines_a_transaction(trusted: Listener) -> None:
    swaks = need(SWAKS, "swaks")
    said = await run(
        swaks, "--server", f"127.0.0.1:{trusted.port}", "--pipeline",
        "--from", "app@example.com", "--to", "ada@example.net,bob@example.org",
        "--header", "Subject: pipelined",
    )  # fmt: skip
    assert "250-PIPELINING" in said
    # swaks sends MAIL, both RCPTs and DATA in one write, then reads the four replies
    assert "queued as" in said
    [message] = await trusted.app.messages()
    assert message.subject == "pipelined"
    assert [r.address for r in message.recipients] == ["ada@example.net", "bob@example.org"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_then_auth(auth_only: Listener, mechanism: str) -> None:
    swaks = need(SWAKS, "swaks")
    said = await run(
        swaks, "--server", f"127.0.0.1:{auth_only.port}", "--tls",
        "--auth", mechanism, "--auth-user", "app", "--auth-password", "s3cret",
        "--from", "app@example.com", "--to", "ada@example.net",
        "--header", f"Subject: {mechanism}",
    )  # fmt: skip
    assert "235 2.7.0" in said
    [message] = await auth_only.app.messages()
    assert message.subject == mechanism
    assert b"with ESMTPSA" in await auth_only.app.content(message.id)


# -- smtplib ---------------------------------------------------------------------------------------


async def test_smtplib_8bitmime_and_smtputf8_arrive_byte_for_byte(trusted: Listener) -> None:
    body = "Grüße aus Köln — 東京\r\n.leading dot\r\n..two dots\r\n".encode()
    raw = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: utf8\r\n\r\n" + body

    def submit() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            assert s.has_extn("8bitmime") and s.has_extn("smtputf8")
            return s.sendmail(
                "app@example.com", ["ada@example.net"], raw, ["BODY=8BITMIME", "SMTPUTF8"]
            )

    assert await asyncio.to_thread(submit) == {}
    [message] = await trusted.app.messages()
    assert (await trusted.app.content(message.id)).endswith(body)


async def test_smtplib_size_over_the_limit_is_refused_at_mail(trusted: Listener) -> None:
    def submit() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            s.ehlo()
            too_big = s.mail("app@example.com", ["SIZE=50001"])
            fits = s.mail("app@example.com", ["SIZE=50000"])
            return too_big, fits

    too_big, fits = await asyncio.to_thread(submit)
    assert too_big[0] == 552 and fits[0] == 250


async def test_smtplib_rset_noop_vrfy_help_and_errors(trusted: Listener) -> None:
    def converse() -> dict[str, int]:
        with smtplib.SMTP("127.0.0.1", trusted.port, timeout=10) as s:
            codes = {"rcpt first": s.rcpt("ada@example.net")[0]}  # before HELO
            s.ehlo()
            codes["rcpt before mail"] = s.rcpt("ada@example.net")[0]
            codes["mail"] = s.mail("app@example.com")[0]
            codes["nested mail"] = s.mail("app@example.com")[0]
            codes["rset"] = s.rset()[0]
            codes["mail again"] = s.mail("app@example.com")[0]
            codes["bad param"] = s.docmd("RCPT TO:<ada@example.net> NOTIFY=NEVER")[0]
            codes["noop"] = s.noop()[0]
            codes["vrfy"] = s.verify("ada@example.net")[0]
            codes["help"] = s.docmd("HELP")[0]
            codes["unknown"] = s.docmd("FROB")[0]
            codes["bad body"] = s.docmd("MAIL FROM:<a@example.com> BODY=BINARYMIME")[0]
            return codes

    assert await asyncio.to_thread(converse) == {
        "rcpt first": 503,
        "rcpt before mail": 503,
        "mail": 250,
        "nested mail": 503,
        "rset": 250,
        "mail again": 250,
        "bad param": 555,
        "noop": 250,
        "vrfy": 252,  # RFC 5321 3.5.3: says nothing of whether the mailbox exists
        "help": 214,  # RFC 5321 4.2: 211 or 214
        "unknown": 500,
        "bad body": 503,  # nested: the transaction is still open
    }


# -- aiosmtplib ------------------------------------------------------------------------------------


async def test_aiosmtplib_starttls_auth_and_send(auth_only: Listener) -> None:
    assert auth_only.ca is not None
    errors, reply = await aiosmtplib.send(
        MESSAGE,
        sender="app@example.com",
        recipients=["ada@example.net", "bob@example.org"],
        hostname="127.0.0.1",
        port=auth_only.port,
        start_tls=True,
        tls_context=client_context(auth_only.ca),
        username="app",
        password="s3cret",
        timeout=10,
    )
    assert errors == {} and "queued as" in reply
    [message] = await auth_only.app.messages()
    assert len(message.recipients) == 2


async def test_aiosmtplib_many_messages_on_one_connection(trusted: Listener) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=trusted.port, timeout=10) as client:
        assert client.supports_extension("pipelining")
        for n in range(20):
            await client.sendmail(
                "app@example.com", [f"r{n}@example.net"], MESSAGE.replace(b"hi", b"hi %d" % n)
            )
    messages = await trusted.app.messages(limit=100)
    assert sorted(m.subject for m in messages) == sorted(f"hi {n}" for n in range(20))


# -- raw: what the RFCs ask beyond the common path -------------------------------------------------


async def test_what_was_pipelined_after_starttls_is_discarded(auth_only: Listener) -> None:
    """RFC 3207 5: commands sent in clear after STARTTLS, before the handshake, are dropped
    (an attacker in the middle could inject them), and the session starts anew over TLS."""
    assert auth_only.ca is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", auth_only.port)
    try:
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO x\r\nSTARTTLS\r\nAUTH PLAIN AGFwcABzM2NyZXQ=\r\n")
        while not (line := await reader.readline()).startswith(b"250 "):
            pass
        assert (await reader.readline()).startswith(b"220")
        await writer.start_tls(client_context(auth_only.ca), server_hostname="127.0.0.1")
        writer.write(b"MAIL FROM:<app@example.com>\r\n")
        assert (await reader.readline()).startswith(b"503")  # EHLO again first: a new session
        writer.write(b"EHLO x\r\n")
        ehlo = []
        while not (line := await reader.readline()).startswith(b"250 "):
            ehlo.append(line)
        assert b"250-AUTH LOGIN PLAIN\r\n" in ehlo and b"250-STARTTLS\r\n" not in ehlo
        writer.write(b"MAIL FROM:<app@example.com>\r\n")
        # the injected AUTH was never run: this session is not authenticated
        assert (await reader.readline()).startswith(b"530")
    finally:
        writer.close()
    assert await auth_only.app.messages() == []


# -- Postfix ---------------------------------------------------------------------------------------


async def test_smtp_source_sessions_all_arrive(trusted: Listener) -> None:
    source = need(SMTP_SOURCE, "Postfix's smtp-source")
    # 10 sessions; -d: several messages per connection (RSET-free MAIL after DATA)
    for extra in ([], ["-d"]):
        await run(
            source, "-s", "10", "-m", "100", "-l", "3000", *extra,
            "-f", "app@example.com", "-t", "ada@example.net", f"127.0.0.1:{trusted.port}",
        )  # fmt: skip
    assert len(await trusted.app.messages(limit=1000)) == 200


@pytest.mark.slow
async def test_postfix_relays_into_submission_with_pipelining(
    trusted: Listener, postfix_root: Path
) -> None:
    """Postfix's smtp client (PIPELINING, 8BITMIME, one connection for many messages) relays
    what smtp-source gives it into postlane's submission port."""
    if WHY_NOT is not None:
        if IN_CI:
            pytest.fail(f"CI must run the Postfix relay test, but {WHY_NOT}")
        pytest.skip(WHY_NOT)
    source = need(SMTP_SOURCE, "Postfix's smtp-source")
    postfix = PrivatePostfix(postfix_root, free_port(), {"example.net": trusted.port})
    await postfix.start()
    try:
        await run(
            source, "-s", "5", "-m", "50", "-l", "2000", "-r", "2",
            "-f", "app@example.com", "-t", "ada@example.net", f"127.0.0.1:{postfix.port}",
        )  # fmt: skip
        await wait_for_messages(trusted, 50, within=60)
    finally:
        await postfix.stop()
    log = postfix.log_text()
    assert log.count(f"relay=127.0.0.1[127.0.0.1]:{trusted.port}") >= 50, log
    messages = await trusted.app.messages(limit=100)
    assert len(messages) == 50
    assert all(len(m.recipients) == 2 for m in messages)  # -r 2: two recipients each
    content = await trusted.app.content(messages[0].id)
    assert b"Received: from postfix.test" in content


# -- CHUNKING (RFC 3030) ---------------------------------------------------------------------------


async def converse(port: int, data: bytes) -> bytes:
    """Send ``data`` in one write (it ends with QUIT) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def codes(said: bytes) -> list[bytes]:
    return [line[:3] for line in said.split(b"\r\n") if line[:3].isdigit() and line[3:4] != b"-"]


ENVELOPE = b"EHLO chunks\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ada@example.net>\r\n"


def bdat(chunk: bytes, *, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


async def test_bdat_chunks_make_one_message_taken_as_is(trusted: Listener) -> None:
    """Chunks are octets, pipelined with their commands: no dot-stuffing, no end-of-data line;
    a lone "." line is part of the message."""
    first = b"From: app@example.com\r\nTo: ada@example.net\r\nSubject: chunked\r\n\r\n"
    second = b".\r\n..two dots stay two\r\n"
    said = await converse(
        trusted.port, ENVELOPE + bdat(first) + bdat(second, last=True) + b"QUIT\r\n"
    )
    assert b"250-CHUNKING" in said
    assert codes(said) == [b"220", b"250", b"250", b"250", b"250", b"250", b"221"], said
    assert b"250 2.0.0 %d octets received" % len(first) in said
    [message] = await trusted.app.messages()
    assert (await trusted.app.content(message.id)).endswith(b"\r\n\r\n" + second)


async def test_sizes_that_are_not_plain_digits_are_syntax_errors(trusted: Listener) -> None:
    """ "²".isdigit() is true and int("²") raises: a SIZE or BDAT size like it is a 501, and
    the session goes on."""
    said = await converse(
        trusted.port,
        "EHLO sizes\r\nMAIL FROM:<app@example.com> SIZE=²\r\n"
        "MAIL FROM:<app@example.com>\r\nRCPT TO:<ada@example.net>\r\n"
        "BDAT ² LAST\r\nNOOP\r\nQUIT\r\n".encode(),
    )
    assert codes(said) == [b"220", b"250", b"501", b"250", b"250", b"501", b"250", b"221"], said
    assert await trusted.app.messages() == []


async def test_a_chunk_larger_than_any_message_ends_the_session_at_once(trusted: Listener) -> None:
    """BDAT 10^20 would otherwise be read (a refused chunk is read) until data_timeout."""
    said = await converse(
        trusted.port, ENVELOPE + b"BDAT 99999999999999999999 LAST\r\n" + b"x" * 1000
    )  # no QUIT: the server closes
    assert codes(said) == [b"220", b"250", b"250", b"250", b"552"], said
    assert await trusted.app.messages() == []


async def test_a_refused_chunk_is_still_read_and_never_run_as_commands(trusted: Listener) -> None:
    smuggled = b"MAIL FROM:<evil@example.com>\r\n"
    said = await converse(
        trusted.port,
        b"EHLO chunks\r\n" + bdat(smuggled, last=True) + b"NOOP\r\nQUIT\r\n",
    )
    assert codes(said) == [b"220", b"250", b"503", b"250", b"221"], said  # no MAIL reply
    assert await trusted.app.messages() == []


async def test_bdat_and_data_do_not_mix_and_rset_drops_the_chunks(trusted: Listener) -> None:
    said = await converse(
        trusted.port,
        ENVELOPE + bdat(b"Subject: a\r\n") + b"DATA\r\nRSET\r\n"
        + b"MAIL FROM:<app@example.com>\r\nRCPT TO:<ada@example.net>\r\n"
        + bdat(b"Subject: b\r\n\r\nbody\r\n", last=True) + b"QUIT\r\n",
    )  # fmt: skip
    assert codes(said) == [
        *[b"220", b"250", b"250", b"250"],
        *[b"250", b"503", b"250"],  # the chunk, DATA refused, RSET
        *[b"250", b"250", b"250", b"221"],
    ], said
    [message] = await trusted.app.messages()
    content = await trusted.app.content(message.id)
    assert b"Subject: b" in content and b"Subject: a" not in content


async def test_chunks_over_the_size_limit_are_read_and_refused(trusted: Listener) -> None:
    chunk = b"x" * 30_000  # two of them: over the 50 kB limit
    said = await converse(
        trusted.port,
        ENVELOPE + bdat(chunk) + bdat(chunk, last=True) + b"NOOP\r\nQUIT\r\n",
    )
    assert codes(said) == [b"220", b"250", b"250", b"250", b"250", b"552", b"250", b"221"], said
    assert await trusted.app.messages() == []


def test_starttls_and_auth_on_uvloop(tmp_path: Path, ca: trustme.CA) -> None:
    """What serve runs on: uvloop's start_tls, with the connection's reading paused between
    the 220 and the handshake."""
    import uvloop

    async def scenario() -> int:
        users = {"app": hash_password("s3cret")}
        async with listen(tmp_path, ca, trusted_networks=[], users=users) as listener:
            context = client_context(ca)

            def submit() -> None:
                for _ in range(5):
                    with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as s:
                        s.starttls(context=context)
                        s.login("app", "s3cret")
                        s.sendmail("app@example.com", ["ada@example.net"], MESSAGE)

            await asyncio.to_thread(submit)
            return len(await listener.app.messages())

    assert uvloop.run(scenario()) == 5
