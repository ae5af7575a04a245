"""`postlane serve --processes N`: one supervisor, N serve processes on the same HTTP and SMTP
ports and the same store. Both doors reach every process, mail is delivered once whichever
process took it, /metrics adds up all the processes whichever answers, one process evaluates the
alerts, a process killed with SIGKILL is started again and loses nothing, and SIGTERM to the
supervisor stops them all with status 0."""

from __future__ import annotations

import asyncio
import email
import os
import re
import smtplib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMTPPeer, free_port, postgres_schema
from tests.processes import PostlaneProcess, run_postlane, start_postlane

pytestmark = pytest.mark.slow

#: what a client meets before the server listens
UNREACHABLE = (httpx.TransportError, OSError)
#: the log line of the one alert evaluator (process 0)
ALERTS_LINE = "alerts: evaluating the rules every"
TOKEN = "t0ken-for-the-processes-test"


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'postlane.db'}"
        return
    async with postgres_schema() as url:
        yield url


class Fleet:
    """A running `serve --processes N` seen from outside: its two doors and its log."""

    def __init__(self, process: PostlaneProcess, http_port: int, smtp_port: int) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{http_port}"
        self.smtp_port = smtp_port
        # no kept-alive connection: each request is a new connection the kernel gives to one
        # of the processes
        self.client = httpx.AsyncClient(
            base_url=self.base,
            limits=httpx.Limits(max_keepalive_connections=0),
            timeout=10,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )

    async def healthz(self) -> dict[str, int]:
        response = await self.client.get("/healthz")
        assert response.status_code == 200
        body: dict[str, int] = response.json()
        return body

    async def pids_answering(self, count: int, *, timeout: float = 60.0) -> dict[int, int]:
        """{process index: pid} once every one of ``count`` processes has answered /healthz."""
        seen: dict[int, int] = {}

        async def all_answered() -> bool:
            body = await self.healthz()
            seen[body["process"]] = body["pid"]
            return len(seen) == count

        await self.process.wait_until(
            all_answered,
            f"{count} processes to answer /healthz",
            ignoring=UNREACHABLE,
            timeout=timeout,
        )
        return seen

    async def send_http(self, subject: str) -> str:
        response = await self.client.post(
            "/v1/messages",
            json={
                "from": "a@example.com",
                "to": ["b@example.net"],
                "subject": subject,
                "text": "via http",
            },
        )
        assert response.status_code == 202, response.text
        message_id: str = response.json()["id"]
        return message_id

    def send_smtp(self, subject: str) -> str:
        """Submit one message on a new connection; the greeting's ident (which process)."""
        client = smtplib.SMTP(timeout=10)
        try:
            code, greeting = client.connect("127.0.0.1", self.smtp_port)
            assert code == 220
            client.sendmail(
                "a@example.com",
                ["c@example.net"],
                f"Subject: {subject}\r\n\r\nvia smtp\r\n".encode(),
            )
        finally:
            client.quit()
        match = re.search(rb"postlane process (\d+)", greeting)
        assert match is not None, greeting
        return match.group(1).decode()

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples (all its labels) in one scrape."""
        text = (await self.client.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")):
                total += float(line.rsplit(" ", 1)[1])
        return total


def subjects(peer: SMTPPeer) -> Counter[str]:
    return Counter(
        str(email.message_from_bytes(received.content)["Subject"])
        for received in peer.handler.received
    )


async def send_through_both_doors(fleet: Fleet, tag: str, count: int) -> set[str]:
    """``count`` messages by HTTP and at least ``count`` by SMTP, SMTP until every process has
    taken some; their subjects."""
    sent = set()
    for n in range(count):
        sent.add(f"{tag}-http-{n}")
        await fleet.send_http(f"{tag}-http-{n}")
    greeters: set[str] = set()
    n = 0
    while n < count or len(greeters) < 2:
        assert n < 200, f"one process took every SMTP connection: {greeters}"
        subject = f"{tag}-smtp-{n}"
        greeters.add(await asyncio.to_thread(fleet.send_smtp, subject))
        sent.add(subject)
        n += 1
    return sent


async def test_serve_processes_share_the_doors_the_queue_and_the_metrics(
    tmp_path: Path, smtp_peer: SMTPPeer, store_url: str
) -> None:
    http_port, smtp_port = free_port(), free_port()
    config = tmp_path / "postlane.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n'
        f'[delivery]\nrelay = "{smtp_peer.url}"\npoll_interval = "100ms"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\ntokens = ["{TOKEN}"]\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
    )
    log = tmp_path / "serve.log"
    async with start_postlane("serve", "--processes", "2", config=config, log=log) as process:
        fleet = Fleet(process, http_port, smtp_port)
        pids = await fleet.pids_answering(2)
        assert os.getpid() not in pids.values() and process.pid not in pids.values()

        sent = await send_through_both_doors(fleet, "first", 4)
        await process.wait_until(
            lambda: sum(subjects(smtp_peer).values()) >= len(sent), "the first mail delivered"
        )
        assert set(subjects(smtp_peer)) == sent
        assert max(subjects(smtp_peer).values()) == 1  # each once

        # the peer has a message before its sender has heard the 250 and counted the attempt
        async def attempts_counted() -> bool:
            return await fleet.metric("postlane_delivery_attempts_total") == len(sent)

        await process.wait_until(attempts_counted, "every attempt counted")
        # whichever process answers, /metrics counts what all of them did (several scrapes,
        # new connections: both processes answer some)
        for _ in range(6):
            assert await fleet.metric("postlane_enqueued_messages_total") == len(sent)
            attempts = await fleet.metric("postlane_delivery_attempts_total")
            assert attempts == len(sent)
            # read from the store once per scrape, not once per process
            assert await fleet.metric("postlane_recipients") == len(sent)
        assert process.output().count(ALERTS_LINE) == 1  # one evaluator: process 0

        # what each process counts in memory (the HTTP doors' refusals) adds up too
        for _ in range(6):
            wrong = await fleet.client.get("/v1/stats", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code in (401, 429)

        async def refusals_counted() -> bool:
            failures = await fleet.metric("postlane_http_auth_failures_total")
            throttled = await fleet.metric("postlane_http_auth_throttled_total")
            return failures + throttled == 6

        await process.wait_until(refusals_counted, "six refusals in /metrics")

        # SIGKILL process 0: it is started again (a new pid answers for it)
        os.kill(pids[0], 9)

        async def restarted() -> bool:
            body = await fleet.healthz()
            return body["process"] == 0 and body["pid"] != pids[0]

        await process.wait_until(restarted, "process 0 to come back", ignoring=UNREACHABLE)
        assert f"serve process 0 (pid {pids[0]}) was killed by SIGKILL" in process.output()
        await process.wait_until(  # the new process 0 evaluates them (it says so once started)
            lambda: process.output().count(ALERTS_LINE) == 2, "the new process 0's evaluator"
        )

        more = await send_through_both_doors(fleet, "second", 4)
        sent |= more
        await process.wait_until(
            lambda: sum(subjects(smtp_peer).values()) >= len(sent), "the second mail delivered"
        )
        assert set(subjects(smtp_peer)) == sent
        assert max(subjects(smtp_peer).values()) == 1  # nothing lost, nothing twice
        # the killed process's counts stay in the sums
        assert await fleet.metric("postlane_enqueued_messages_total") == len(sent)
        await fleet.client.aclose()

        assert await process.stop() == 0, process.describe()
    output = process.output()
    assert output.count("postlane stopped") == 2  # both children stopped gracefully
    assert "all serve processes stopped" in output
    assert "Traceback" not in output
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("args", "toml", "expected"),
    [
        (("--processes", "0"), "", "--processes"),
        (("--processes", "many"), "", "--processes"),
        ((), '[serve]\nprocesses = "many"\n', "serve.processes"),
        ((), "[serve]\nprocesses = 0\n", "serve.processes"),
    ],
)
async def test_processes_must_be_a_positive_integer_or_auto(
    tmp_path: Path, args: tuple[str, ...], toml: str, expected: str
) -> None:
    config = tmp_path / "postlane.toml"
    config.write_text(toml)
    bad = await run_postlane("serve", *args, config=config, log=tmp_path / "serve.log", check=False)
    output = bad.output()
    assert bad.returncode != 0 and "Traceback" not in output
    assert expected in output and 'a positive integer or "auto"' in output
    assert len(output.strip().splitlines()) == 1
