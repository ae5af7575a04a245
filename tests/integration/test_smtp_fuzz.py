"""The SMTP submission listener against hostile input: garbage commands, 10 kB lines, bare LF,
a missing final dot, pipelined commands, SMTP smuggling. No crash, no 250 for a half message,
nothing half-stored, and the listener still serves the next client."""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postlane.app import AsyncPostlane
from postlane.ingest.door import FrontDoor
from postlane.ingest.smtp import start_smtp
from tests.conftest import free_port, make_config


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[tuple[AsyncPostlane, int]]:
    port = free_port()
    config = make_config(tmp_path, smtp={"listen": f"127.0.0.1:{port}", "max_size": "20KB"})
    async with AsyncPostlane(config) as app, start_smtp(FrontDoor(config, app)):
        yield app, port


async def converse(port: int, data: bytes, *, read_for: float = 0.5) -> bytes:
    """Send raw bytes, then read whatever the server says until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=read_for)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        await writer.wait_closed()


async def still_serves(port: int) -> None:
    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@example.com", ["b@example.net"], b"Subject: ok\r\n\r\nfine\r\n")

    await asyncio.to_thread(submit)


ENVELOPE = b"EHLO fuzz\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


async def test_pipelined_commands_are_answered_in_order(
    listener: tuple[AsyncPostlane, int],
) -> None:
    app, port = listener
    reply = await converse(port, ENVELOPE + b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    codes = [line[:3] for line in reply.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(await app.messages()) == 1


async def test_a_missing_final_dot_stores_nothing(listener: tuple[AsyncPostlane, int]) -> None:
    app, port = listener
    reply = await converse(port, ENVELOPE + b"Subject: cut\r\n\r\nno end")
    assert b"queued as" not in reply
    assert await app.messages() == []
    await still_serves(port)


async def test_bare_lf_dot_does_not_end_the_message(listener: tuple[AsyncPostlane, int]) -> None:
    """SMTP smuggling: "\\n.\\n" or "\\r\\n.\\n" must not end DATA and start a hidden second
    message (the smuggled MAIL/RCPT stays inside the first message's body)."""
    app, port = listener
    smuggled = (
        b"Subject: outer\r\n\r\nbody\n.\nMAIL FROM:<evil@example.com>\r\n"
        b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: inner\r\n\r\nx\r\n.\r\nQUIT\r\n"
    )
    await converse(port, ENVELOPE + smuggled)
    [message] = await app.messages()
    assert [r.address for r in message.recipients] == ["b@example.net"]
    assert b"victim@example.org" in await app.content(message.id)  # still just body text


async def test_a_10kb_command_line_is_refused_and_the_listener_lives(
    listener: tuple[AsyncPostlane, int],
) -> None:
    app, port = listener
    reply = await converse(
        port, b"EHLO " + b"x" * 10_000 + b"\r\nMAIL FROM:<" + b"y" * 10_000 + b">\r\n"
    )
    lines = reply.splitlines()
    assert lines[0].startswith(b"220")  # the greeting, then each over-long line refused alone
    assert lines[1:] == [b"500 Command line too long"] * 2
    assert await app.messages() == []
    await still_serves(port)


async def test_a_10kb_body_line_is_stored_or_refused_never_cut(
    listener: tuple[AsyncPostlane, int],
) -> None:
    app, port = listener
    body = b"Subject: long\r\n\r\n" + b"z" * 10_000 + b"\r\n.\r\nQUIT\r\n"
    reply = await converse(port, ENVELOPE + body)
    stored = await app.messages()
    if b"queued as" in reply:
        [message] = stored
        assert b"z" * 10_000 in await app.content(message.id)
    else:
        assert stored == []


async def test_data_without_recipients_is_refused(listener: tuple[AsyncPostlane, int]) -> None:
    app, port = listener
    reply = await converse(port, b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nDATA\r\n.\r\nQUIT\r\n")
    assert b"503" in reply
    assert await app.messages() == []


GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from(
            [
                b"EHLO x\r\n",
                b"HELO\r\n",
                b"MAIL FROM:<a@example.com>\r\n",
                b"MAIL FROM:<>\r\n",
                b"MAIL FROM:a@b\r\n",
                b"RCPT TO:<b@example.net>\r\n",
                b"RCPT TO:<\x00@\xff>\r\n",
                b"DATA\r\n",
                b".\r\n",
                b"\n.\n",
                b"RSET\r\n",
                b"NOOP\r\n",
                b"AUTH PLAIN AGFwcABwdw==\r\n",
                b"STARTTLS\r\n",
                b"BDAT 10 LAST\r\n",
                b"\r\n",
            ]
        ),
    ),
    max_size=12,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(chunks=GARBAGE)
async def test_garbage_never_crashes_or_half_stores(
    listener: tuple[AsyncPostlane, int], chunks: list[bytes]
) -> None:
    app, port = listener
    before = len(await app.messages(limit=10_000))
    reply = await converse(port, b"".join(chunks), read_for=0.2)
    assert not reply or reply.startswith(b"220")
    after = await app.messages(limit=10_000)
    assert len(after) - before == reply.count(b"queued as")  # stored iff acknowledged
    for message in after:
        assert message.recipients  # a stored message always has its recipients


# -- the lean server's reading: any split, any line ------------------------------------------------

#: a reply line as RFC 5321 4.2 writes it: three digits, then a space or a hyphen and text
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -][\x20-\x7e\x80-\xff]*)?")
TRANSACTION = (
    b"EHLO split\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\n"
    b"RCPT TO:<c@example.org>\r\nDATA\r\n"
    b"Subject: split\r\n\r\n..one dot\r\n...two\r\n..\r\n"  # dot-stuffed lines
    b"last line\r\n.\r\nQUIT\r\n"
)


def reply_lines(said: bytes) -> list[bytes]:
    lines = said.split(b"\r\n")
    assert lines[-1] == b"", said  # every reply ends with CRLF
    for line in lines[:-1]:
        assert REPLY_LINE.fullmatch(line), (line, said)
    return lines[:-1]


def final_codes(said: bytes) -> list[bytes]:
    return [line[:3] for line in reply_lines(said) if line[3:4] != b"-"]


async def send_in_pieces(port: int, pieces: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # let the server read each piece on its own
        async with asyncio.timeout(10):
            return await reader.read()  # until QUIT closes
    finally:
        writer.close()


async def test_a_pipelined_transaction_split_at_every_byte_boundary(
    listener: tuple[AsyncPostlane, int],
) -> None:
    """The same pipelined transaction, cut in two at each of its bytes (and once sent a byte at
    a time): the same replies in the same order, and the same message stored, every time."""
    app, port = listener
    splits = [[TRANSACTION[:i], TRANSACTION[i:]] for i in range(1, len(TRANSACTION))]
    splits.append([bytes([b]) for b in TRANSACTION])
    expected = [b"220", b"250", b"250", b"250", b"250", b"354", b"250", b"221"]
    for start in range(0, len(splits), 25):
        said = await asyncio.gather(*(send_in_pieces(port, s) for s in splits[start : start + 25]))
        for reply in said:
            assert final_codes(reply) == expected, reply
    messages = await app.messages(limit=1000)
    assert len(messages) == len(splits)
    contents = {await app.content(m.id) for m in messages}
    assert {c.partition(b"\r\n\r\n")[2] for c in contents} == {
        b".one dot\r\n..two\r\n.\r\nlast line\r\n"
    }


COMMAND_LINE = st.one_of(
    st.binary(max_size=80).filter(lambda b: b"\n" not in b),
    st.builds(
        lambda verb, arg: verb + b" " + arg,
        st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"EHLO", b"HELO", b"VRFY", b"NOOP", b"RSET"]),
        st.binary(max_size=60).filter(lambda b: b"\n" not in b),
    ),
    st.sampled_from(
        [b"EHLO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"x" * 600]
    ),
)
#: these change what the next lines are (a message, a TLS hello, an AUTH answer) or close
_SPECIAL = (b"DATA", b"AUTH", b"STARTTLS", b"QUIT", b"BDAT")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(lines=st.lists(COMMAND_LINE, min_size=1, max_size=15))
async def test_each_command_line_gets_exactly_one_valid_reply_in_order(
    listener: tuple[AsyncPostlane, int], lines: list[bytes]
) -> None:
    """Random command lines, pipelined in one write and ended with NOOP: one well-formed reply
    per line, in order (NOOP's last), unless too many unknown commands closed the session."""
    app, port = listener
    lines = [line for line in lines if not line.lstrip().upper().startswith(_SPECIAL)]
    said = await converse(port, b"".join(line + b"\r\n" for line in lines) + b"NOOP\r\n")
    codes = final_codes(said)
    assert codes[0] == b"220"
    if codes[-1] == b"502":  # five unknown commands: "goodbye", and nothing more is read
        assert said.endswith(b"502 5.5.1 Too many unrecognized commands, goodbye.\r\n")
    else:
        assert len(codes) == len(lines) + 2, (lines, said)
        assert codes[-1] == b"250"
    assert await app.messages() == []


BDAT_TRANSACTION = (
    b"EHLO split\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
    b"BDAT 28\r\nSubject: chunks\r\n\r\n.\r\nBDAT\r\n"
    b"BDAT 14 LAST\r\nlast\r\nQUIT\r\n\r\nQUIT\r\n"
)


async def test_a_chunked_transaction_split_at_every_byte_boundary(
    listener: tuple[AsyncPostlane, int],
) -> None:
    """BDAT chunks whose octets look like commands ("BDAT", "QUIT"), cut at every byte: the
    same replies and the same message every time, the look-alikes stored as they came."""
    app, port = listener
    splits = [[BDAT_TRANSACTION[:i], BDAT_TRANSACTION[i:]] for i in range(1, len(BDAT_TRANSACTION))]
    expected = [b"220", b"250", b"250", b"250", b"250", b"250", b"221"]
    for start in range(0, len(splits), 25):
        said = await asyncio.gather(*(send_in_pieces(port, s) for s in splits[start : start + 25]))
        for reply in said:
            assert final_codes(reply) == expected, reply
    messages = await app.messages(limit=1000)
    assert len(messages) == len(splits)
    contents = {(await app.content(m.id)).partition(b"\r\n\r\n")[2] for m in messages}
    assert contents == {b".\r\nBDAT\r\nlast\r\nQUIT\r\n\r\n"}
