"""The worker and the SMTP relay transport against Postfix's smtp-sink: a server nobody on this
team wrote, started as a subprocess, told by its options how to misbehave (``-r`` soft rejects,
``-f``/``-B`` hard rejects, ``-Q`` 421 and disconnect, ``-q`` disconnect without a word).

smtp-sink's ``-d`` option writes each mail transaction to its own file; the tests count those files
by Message-ID to prove that every message arrived, and arrived once. The clock is injected and the
worker runs until idle, so retries are checked without sleeping.

Skipped when smtp-sink is not installed (``apt-get install postfix``), except under CI, which
installs it: there a missing smtp-sink fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass, classify
from postlane.clock import FakeClock
from postlane.message import Message, RecipientState
from postlane.records import RecipientView
from postlane.transports import transport_for
from postlane.transports.smtp import SMTPRelayTransport
from postlane.worker import Worker
from tests.conftest import IN_CI, free_port, make_config


def _find_smtp_sink() -> str | None:
    # /usr/sbin is not on every user's PATH, and that is where Debian's postfix puts it
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("smtp-sink", path=path)


SMTP_SINK = _find_smtp_sink()
if SMTP_SINK is None:
    if IN_CI:
        pytest.fail(
            "smtp-sink is not installed, but CI must run these tests (apt-get install postfix)",
            pytrace=False,
        )
    pytest.skip(
        "Postfix's smtp-sink is not installed (apt-get install postfix)", allow_module_level=True
    )

pytestmark = pytest.mark.smtp_sink

#: what smtp-sink answers to a command named in -Q before it disconnects
SINK_421 = "421 4.0.0 Server closing connection"
#: what smtp-sink answers to a command named in -r (its default soft-bounce reply)
SINK_450 = "450 4.3.0 Error: command failed"
#: how long smtp-sink may take to listen after it is started
START_DEADLINE = 10.0


@dataclass(frozen=True)
class Arrival:
    """One mail transaction as smtp-sink dumped it."""

    message_id: str
    recipients: tuple[str, ...]


class Sink:
    """One smtp-sink process on a fixed port, restartable with other options."""

    def __init__(self, executable: str, port: int, dump_dir: Path, log: Path) -> None:
        self.executable = executable
        self.port = port
        self.dump_dir = dump_dir
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def start(self, *options: str) -> None:
        assert self.process is None, "the sink is already running"
        command = [self.executable]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        # -d: one file per mail transaction, named after the minute plus a random suffix; the
        # file is complete (closed) before smtp-sink answers the final dot
        command += [*options, "-d", f"{self.dump_dir}/%M.", f"127.0.0.1:{self.port}", "100"]
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        await self._wait_until_serving(command)

    async def _wait_until_serving(self, command: Sequence[str]) -> None:
        """Poll until the sink greets on its port (it binds after a moment), with a deadline."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_DEADLINE
        while True:
            if self.process.returncode is not None:
                break
            try:
                async with asyncio.timeout(1.0):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    try:
                        greeting = await reader.readline()
                        writer.write(b"QUIT\r\n")
                        await reader.readline()
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                if greeting[:3].isdigit():  # 220, or what -f/-r/-Q connect make it say
                    return
            except (OSError, TimeoutError):
                pass
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.02)  # the poll interval, not a wait for something
        output = self.log.read_text(errors="replace")
        await self.stop()
        pytest.fail(f"{' '.join(command)} did not start listening: {output}")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        await process.wait()

    async def restart(self, *options: str) -> None:
        await self.stop()
        await self.start(*options)

    def arrivals(self) -> list[Arrival]:
        """Every transaction smtp-sink took in full (it unlinks the files of aborted ones, but
        may not have done so yet: those have no message content, hence no Message-ID)."""
        out = []
        for path in sorted(self.dump_dir.iterdir()):
            arrival = _parse_dump(path.read_bytes())
            if arrival is not None:
                out.append(arrival)
        return out

    def arrival_counts(self) -> Counter[str]:
        return Counter(arrival.message_id for arrival in self.arrivals())


def _parse_dump(dump: bytes) -> Arrival | None:
    """smtp-sink's dump: its own X-* headers and a Received header, then the message as received
    (dots unstuffed, LF line ends), then an empty line."""
    lines = dump.decode("utf-8", "replace").split("\n")
    recipients: list[str] = []
    index = 0
    while index < len(lines) and not lines[index].startswith("Received:"):
        if lines[index].startswith("X-Rcpt-Args:"):
            recipients.append(lines[index].split(":", 1)[1].strip().strip("<>"))
        index += 1
    index += 1
    while index < len(lines) and lines[index].startswith("\t"):  # the Received continuation
        index += 1
    for line in lines[index:]:
        if not line:
            break  # the end of the message's header
        name, _, value = line.partition(":")
        if name.strip().lower() == "message-id":
            return Arrival(value.strip(), tuple(recipients))
    return None


@pytest.fixture
def sink_dirs() -> Iterator[tuple[Path, Path]]:
    """A directory for smtp-sink's dumps and one for its output. Not under pytest's tmp_path,
    whose parents are 0700: smtp-sink writes its dumps as "nobody"."""
    dump_dir = Path(tempfile.mkdtemp(prefix="postlane-smtp-sink-"))
    dump_dir.chmod(0o777)
    log_dir = Path(tempfile.mkdtemp(prefix="postlane-smtp-sink-log-"))
    yield dump_dir, log_dir
    shutil.rmtree(dump_dir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture
async def sink(sink_dirs: tuple[Path, Path]) -> AsyncIterator[Sink]:
    """smtp-sink on a free port, not yet started (each test starts it with its options)."""
    assert SMTP_SINK is not None
    dump_dir, log_dir = sink_dirs
    server = Sink(SMTP_SINK, free_port(), dump_dir, log_dir / "smtp-sink.log")
    try:
        yield server
    finally:
        await server.stop()


class Harness:
    """An application (enqueue, inspect) and a worker sharing one store and a fake clock."""

    def __init__(self, app: AsyncPostlane, worker: Worker, clock: FakeClock) -> None:
        self.app = app
        self.worker = worker
        self.clock = clock
        self.queue_ids: list[str] = []

    async def send(self, recipient_lists: Sequence[Sequence[str]]) -> dict[str, list[str]]:
        """Enqueue one message per list of recipients; returns {Message-ID: recipients}."""
        messages = [
            Message(sender="app@example.com", to=list(to), subject=f"test {i}", text=f"body {i}")
            for i, to in enumerate(recipient_lists)
        ]
        sent = {}
        for result, to in zip(await self.app.send_many(messages), recipient_lists, strict=True):
            self.queue_ids.append(result.id)
            sent[(await self.app.get(result.id, history=False)).message_id] = list(to)
        return sent

    async def run(self) -> int:
        return await self.worker.run_until_idle()

    async def recipients(self, queue_ids: Sequence[str] | None = None) -> list[RecipientView]:
        """Every recipient of the messages sent (or of ``queue_ids``)."""
        out: list[RecipientView] = []
        for queue_id in self.queue_ids if queue_ids is None else queue_ids:
            out.extend((await self.app.get(queue_id, history=False)).recipients)
        return out

    async def states(self) -> Counter[RecipientState]:
        return Counter(r.state for r in await self.recipients())

    async def close(self) -> None:
        await self.worker.transport.close()
        await self.app.close()

    async def advance_to_next_due(self) -> None:
        due = await self.app.store.next_due_at()
        assert due is not None, "nothing is waiting for a retry"
        await self.clock.advance(max(0.0, due - self.clock.now()))

    async def retry_until_done(self, rounds: int = 20) -> int:
        """Advance to each next due time and deliver, until nothing waits (a relay paused after
        repeated connection failures is probed with one delivery before the rest follow).
        Returns the attempts made."""
        attempts = 0
        for _ in range(rounds):
            if await self.app.store.next_due_at() is None:
                return attempts
            await self.advance_to_next_due()
            attempts += await self.run()
        raise AssertionError("deliveries still waiting after the retries")


async def open_harness(
    tmp_path: Path, clock: FakeClock, sink: Sink, **delivery: str | int
) -> Harness:
    config = make_config(
        tmp_path,
        delivery={"relay": sink.url, "connect_timeout": "2s", "command_timeout": "2s", **delivery},
        retry={"delays": ["1m", "5m"], "max_attempts": 5},
    )
    app = AsyncPostlane(config, clock=clock)
    await app.open()
    worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
    return Harness(app, worker, clock)


@pytest.fixture
async def h(tmp_path: Path, clock: FakeClock, sink: Sink) -> AsyncIterator[Harness]:
    harness = await open_harness(tmp_path, clock, sink)
    yield harness
    await harness.close()


def _recipient_lists(count: int, prefix: str = "user") -> list[list[str]]:
    """``count`` messages; every fifth has three recipients at different domains."""
    lists = []
    for i in range(count):
        if i % 5 == 0:
            lists.append(
                [
                    f"{prefix}{i}a@example.net",
                    f"{prefix}{i}b@example.org",
                    f"{prefix}{i}c@example.com",
                ]
            )
        else:
            lists.append([f"{prefix}{i}@example.net"])
    return lists


def _total(sent: dict[str, list[str]]) -> int:
    """How many deliveries (recipients) the messages of ``sent`` have."""
    return sum(len(to) for to in sent.values())


# -- plain delivery ------------------------------------------------------------------------------


async def test_200_messages_reach_every_recipient_exactly_once_over_pipelining(
    h: Harness, sink: Sink
) -> None:
    await sink.start()
    sent = await h.send(_recipient_lists(200))
    assert await h.run() == _total(sent)

    # counted per (Message-ID, recipient): no recipient may get it twice, or not at all
    deliveries = Counter(
        (arrival.message_id, recipient)
        for arrival in sink.arrivals()
        for recipient in arrival.recipients
    )
    expected = {(message_id, to) for message_id, tos in sent.items() for to in tos}
    assert set(deliveries) == expected
    assert set(deliveries.values()) == {1}
    assert await h.states() == {RecipientState.SENT: _total(sent)}

    # smtp-sink offers PIPELINING: the pooled connections ran pipelined transactions
    transport = h.worker.transport
    assert isinstance(transport, SMTPRelayTransport)
    assert transport._idle and all(c.pipelining for c in transport._idle)


async def test_a_message_whose_recipients_are_due_together_goes_out_in_one_transaction(
    tmp_path: Path, clock: FakeClock, sink: Sink
) -> None:
    await sink.start()
    h = await open_harness(tmp_path, clock, sink, batch_size=4)
    try:
        # 1 + 1 + 3 recipients: a claim of 4 deliveries ends after the third message's second
        sent = await h.send(
            [
                ["a@example.net"],
                ["b@example.net"],
                ["c@example.net", "d@example.org", "e@example.com"],
            ]
        )
        assert await h.run() == _total(sent)
    finally:
        await h.close()
    arrivals = sink.arrivals()
    assert Counter(a.message_id for a in arrivals) == Counter(dict.fromkeys(sent, 1))
    for arrival in arrivals:  # every recipient in the one transaction, in order
        assert list(arrival.recipients) == sent[arrival.message_id]


# -- soft rejects (-r): deferred, retried, delivered once ---------------------------------------


@pytest.mark.parametrize("command", ["rcpt", "data"])
async def test_a_soft_reject_defers_as_temporary_and_delivers_once_after_the_retry(
    h: Harness, sink: Sink, command: str
) -> None:
    await sink.start("-r", command)  # (-r implies -p: no PIPELINING, commands one at a time)
    sent = await h.send(_recipient_lists(12))
    assert await h.run() == _total(sent)

    assert classify(SINK_450).cls is ReplyClass.TEMPORARY
    for r in await h.recipients():
        assert r.state is RecipientState.DEFERRED
        assert r.attempts == 1
        assert r.last_response is not None
        assert r.last_response.cls is ReplyClass.TEMPORARY
        assert (r.last_response.code, r.last_response.enhanced) == (450, "4.3.0")
    assert sink.arrivals() == []

    await sink.restart()
    await h.advance_to_next_due()
    assert await h.run() == _total(sent)
    assert sink.arrival_counts() == Counter(dict.fromkeys(sent, 1))
    for r in await h.recipients():
        assert r.state is RecipientState.SENT and r.attempts == 2


# -- hard rejects (-f with a -B reply): dead letters, suppression as the class says -------------


@pytest.mark.parametrize(
    ("command", "reply", "cls", "suppressed"),
    [
        ("rcpt", "550 5.1.1 User unknown", ReplyClass.HARD_BOUNCE, True),
        ("data", "554 5.7.1 Message rejected as spam", ReplyClass.POLICY_BLOCK, False),
    ],
)
async def test_a_hard_reject_dead_letters_and_suppresses_only_unknown_users(
    h: Harness, sink: Sink, command: str, reply: str, cls: ReplyClass, suppressed: bool
) -> None:
    await sink.start("-f", command, "-B", reply)
    sent = await h.send(_recipient_lists(6))
    assert await h.run() == _total(sent)

    addresses: list[str] = []
    for r in await h.recipients():
        addresses.append(r.address)
        assert r.state is RecipientState.DEAD
        assert r.last_response is not None
        assert r.last_response.cls is cls
        assert r.last_response.code == int(reply[:3])
        assert r.last_response.enhanced == reply.split()[1]
        assert r.last_response.text == reply.split(" ", 2)[2]
    letters = [letter for queue_id in h.queue_ids for letter in await h.app.dead_letter(queue_id)]
    assert sorted(letter.address for letter in letters) == sorted(addresses)
    assert {letter.cls for letter in letters} == {cls}
    assert len(addresses) == _total(sent)
    assert await h.app.store.is_suppressed(addresses) == dict.fromkeys(addresses, suppressed)
    assert sink.arrivals() == []
    # nothing is retried
    await h.clock.advance(86400)
    assert await h.run() == 0


# -- refusals before any message: the relay, not the message ----------------------------------


async def test_a_relay_without_esmtp_is_greeted_with_helo_and_takes_the_mail(
    h: Harness, sink: Sink
) -> None:
    await sink.start("-e")  # answers EHLO with "500 5.5.1 Error: unknown command"
    sent = await h.send(_recipient_lists(6))
    assert await h.run() == _total(sent)
    assert await h.states() == {RecipientState.SENT: _total(sent)}
    assert sink.arrival_counts() == Counter(dict.fromkeys(sent, 1))


async def test_a_5xx_greeting_defers_the_queue_instead_of_dead_lettering_it(
    h: Harness, sink: Sink
) -> None:
    await sink.start("-f", "connect", "-B", "554 5.7.1 No SMTP service here")
    sent = await h.send(_recipient_lists(6))
    assert await h.run() == _total(sent)
    assert await h.states() == {RecipientState.DEFERRED: _total(sent)}
    assert await h.app.dead_letters() == []


# -- 421 and disconnect (-Q) --------------------------------------------------------------------


async def test_a_421_after_data_defers_as_classify_says_and_nothing_is_lost(
    h: Harness, sink: Sink
) -> None:
    # RFC 5321's plain 421 ("closing transmission channel") is temporary, not a rate limit
    assert classify(SINK_421).cls is ReplyClass.TEMPORARY
    await sink.start("-Q", "data")
    sent = await h.send(_recipient_lists(15))
    assert await h.run() == _total(sent)

    for r in await h.recipients():
        assert r.state is RecipientState.DEFERRED
        assert r.last_response is not None
        assert r.last_response.code == 421
        assert r.last_response.cls is ReplyClass.TEMPORARY
        assert r.attempts == 1  # temporary uses an attempt (throttled would not)
    assert sink.arrivals() == []

    await sink.restart()
    await h.advance_to_next_due()
    assert await h.run() == _total(sent)
    assert sink.arrival_counts() == Counter(dict.fromkeys(sent, 1))
    assert await h.states() == {RecipientState.SENT: _total(sent)}


# -- disconnect without a reply (-q) ------------------------------------------------------------


async def test_a_disconnect_after_data_defers_as_connection_without_an_attempt(
    h: Harness, sink: Sink
) -> None:
    await sink.start("-q", "data")
    sent = await h.send(_recipient_lists(15))
    assert await h.run() == _total(sent)

    for r in await h.recipients():
        assert r.state is RecipientState.DEFERRED
        assert r.last_response is not None
        assert r.last_response.cls is ReplyClass.CONNECTION
        assert r.last_response.code is None
        assert r.attempts == 0
    assert sink.arrivals() == []  # the message was never sent: DATA got no 354

    await sink.restart()
    assert await h.retry_until_done() == _total(sent)
    assert sink.arrival_counts() == Counter(dict.fromkeys(sent, 1))
    assert await h.states() == {RecipientState.SENT: _total(sent)}


async def test_a_disconnect_after_the_final_dot_loses_nothing_and_duplicates_at_most_once(
    h: Harness, sink: Sink
) -> None:
    await sink.start()
    before = await h.send(_recipient_lists(10, prefix="early"))
    await h.run()
    await sink.restart("-q", ".")
    in_flight = await h.send(_recipient_lists(10, prefix="late"))
    in_flight_ids = h.queue_ids[-len(in_flight) :]
    assert await h.run() == _total(in_flight)

    # the sink took each message but answered nothing: the sender cannot know, so it retries
    for r in await h.recipients(in_flight_ids):
        assert r.state is RecipientState.DEFERRED
        assert r.last_response is not None
        assert r.last_response.cls is ReplyClass.CONNECTION
        assert r.attempts == 0

    await sink.restart()
    assert await h.retry_until_done() == _total(in_flight)
    counts = sink.arrival_counts()
    assert set(counts) == set(before) | set(in_flight)  # nothing lost
    for message_id in before:
        assert counts[message_id] == 1  # delivered before the fault: exactly once
    for message_id in in_flight:
        assert 1 <= counts[message_id] <= 2  # in flight at the fault: at most one duplicate
    assert await h.states() == {RecipientState.SENT: _total(before) + _total(in_flight)}
