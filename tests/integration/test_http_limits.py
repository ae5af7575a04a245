"""The HTTP listener under clients that never finish and clients that send too much, over real
sockets: audit finding 7 (3,000 half-sent requests held their descriptors for minutes) and
finding 10 (six 130 MB batches at once took 1.5 GB; ``benchmarks/batch_memory.py`` measures
the memory, these tests the rule that bounds it)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import ApiContext, build_app
from postlane.ingest.server import HttpLimits, serve_http
from tests.conftest import free_port, make_config

MESSAGE = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Served:
    def __init__(self, address: str, api: ApiContext) -> None:
        self.address = address
        self.api = api
        split = urlsplit(address)
        self.host, self.port = str(split.hostname), int(split.port or 80)

    async def connect(self) -> Connection:
        return await asyncio.open_connection(self.host, self.port)


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """The API on a real socket, with the limits the test names (short, to be quick)."""
    limits = getattr(request, "param", None) or HttpLimits(
        header_timeout=1.0, body_timeout=1.0, keep_alive=5, max_connections=200
    )
    config = make_config(
        tmp_path, http={"listen": f"127.0.0.1:{free_port()}"}, smtp={"max_size": "100KB"}
    )
    async with AsyncPostlane(config) as app:
        asgi = build_app(FrontDoor(config, app), limits=limits)
        async with serve_http(
            asgi, config, limits=limits, refusals=asgi.state.api.refusals
        ) as address:
            yield Served(address, asgi.state.api)


async def answer_of(connection: Connection, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    reader, _ = connection
    return await asyncio.wait_for(reader.read(), timeout)


async def healthy(address: str) -> bool:
    async with httpx.AsyncClient(base_url=address, timeout=2) as client:
        return (await client.get("/healthz")).status_code == 200


# -- finding 7: unfinished request heads, and a cap on connections -------------------------------


async def test_finding_7_half_sent_requests_are_closed_after_the_header_timeout(
    served: Served,
) -> None:
    started = time.monotonic()
    half = []
    for _ in range(60):
        connection = await served.connect()
        connection[1].write(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        half.append(connection)
    silent = [await served.connect() for _ in range(20)]  # connect, and say nothing at all
    for _ in range(5):  # meanwhile the probe answers, at once
        probe = time.monotonic()
        assert await healthy(served.address)
        assert time.monotonic() - probe < 0.5
        await asyncio.sleep(0.1)
    answers = await asyncio.gather(*(answer_of(c) for c in half + silent))
    elapsed = time.monotonic() - started
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:2]
    assert b"request_timeout" in answers[0]
    assert 0.9 <= elapsed < 4.0, elapsed  # closed by the timeout, not before, not much after
    assert await healthy(served.address)
    for _, writer in half + silent:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
    ],
)
async def test_a_request_no_parser_can_read_gets_the_apis_json_error(
    served: Served, garbage: bytes
) -> None:
    """What h11 refuses before the application sees a request is still said the API's way."""
    connection = await served.connect()
    connection[1].write(garbage)
    answer = await answer_of(connection)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "malformed_request" and error["message"].startswith("HTTP: ")
    connection[1].close()
    assert await healthy(served.address)


@pytest.mark.parametrize("size", [17_000, 100_000])
async def test_a_request_head_over_16_kib_is_refused_even_when_it_arrives_whole(
    served: Served, size: int
) -> None:
    connection = await served.connect()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    connection[1].write(head)  # one write: h11 alone would take it whole
    answer = await answer_of(connection)
    connection[1].close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"over 16 KiB" in answer
    assert await healthy(served.address)  # a head within the limit still goes


async def test_a_forwarded_for_header_does_not_make_a_guesser_a_new_client(
    tmp_path: Path,
) -> None:
    """uvicorn believes X-Forwarded-For from loopback by default: each guess would count for
    another "client" and the guessing limit would never hold (a security audit: 200 guesses
    in 2 s, every one checked)."""
    token = "admin-t0ken-for-the-tests"
    config = make_config(tmp_path, http={"listen": f"127.0.0.1:{free_port()}", "tokens": [token]})
    async with AsyncPostlane(config) as app:
        asgi = build_app(FrontDoor(config, app))
        async with (
            serve_http(asgi, config, refusals=asgi.state.api.refusals) as address,
            httpx.AsyncClient(base_url=address) as client,
        ):
            statuses = []
            for n in range(12):
                headers = {
                    "Authorization": f"Bearer guess-{n:04d}-xxxxxxxxxxxx",
                    "X-Forwarded-For": f"203.0.113.{n + 1}",
                    "Forwarded": f"for=198.51.100.{n + 1}",
                }
                statuses.append((await client.get("/v1/stats", headers=headers)).status_code)
    assert statuses[:5] == [401] * 5
    assert 429 in statuses[5:]  # one client, whatever it says it forwards


async def test_finding_7_a_kept_alive_connection_must_finish_its_next_head_in_time(
    served: Served,
) -> None:
    reader, writer = await served.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 5)
    assert first.startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # the next one, never finished
    rest = await answer_of((reader, writer))
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert 0.9 <= time.monotonic() - started < 4.0
    writer.close()


async def test_finding_7_a_stalled_body_is_dropped_after_the_body_timeout(served: Served) -> None:
    reader, writer = await served.connect()
    body = json.dumps(MESSAGE).encode()
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10])
    )
    started = time.monotonic()
    answer = await answer_of((reader, writer))
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    assert 0.9 <= time.monotonic() - started < 4.0
    assert served.api.budget.used == 0  # what it held is given back
    writer.close()


@pytest.mark.parametrize(
    "served",
    [HttpLimits(header_timeout=5.0, body_timeout=5.0, keep_alive=5, max_connections=30)],
    indirect=True,
)
async def test_finding_7_a_flood_of_unfinished_requests_cannot_keep_out_whole_ones(
    served: Served,
) -> None:
    """At the cap, a newcomer takes the place of the connection idle the longest: the flood
    churns through its own connections, and a client sending whole requests is served."""
    flood = []
    for n in range(150):  # five times the cap, none of them ever finishing its head
        connection = await served.connect()
        connection[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-N: %d" % n)
        flood.append(connection)
        if n % 25 == 24:
            probe = time.monotonic()
            assert await healthy(served.address)  # whole requests still get in, at once
            assert time.monotonic() - probe < 0.5
    oldest = await answer_of(flood[0], timeout=1)  # the first ones made room, told why
    assert oldest.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in oldest
    assert served.api.refusals.counts["evicted"] >= 120
    for _, writer in flood:
        writer.close()


@pytest.mark.parametrize(
    "served",
    [HttpLimits(header_timeout=3.0, body_timeout=3.0, keep_alive=5, max_connections=10)],
    indirect=True,
)
async def test_finding_7_when_every_connection_is_busy_a_new_one_is_refused_at_once(
    served: Served,
) -> None:
    body = json.dumps(MESSAGE).encode()
    busy = []
    for _ in range(10):  # the cap, each with a request under way (its body still arriving)
        connection = await served.connect()
        connection[1].write(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body[:5])
        )
        busy.append(connection)
    await asyncio.sleep(0.2)
    for _ in range(5):
        started = time.monotonic()
        refused = await served.connect()
        answer = await answer_of(refused, timeout=2)
        refused[1].close()
        assert time.monotonic() - started < 0.5  # refused at once, not left to time out
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
        assert b"Retry-After: 1" in answer
    assert served.api.refusals.counts["connections"] == 5
    for _, writer in busy:  # once they go, everyone is served again
        writer.close()
    deadline = time.monotonic() + 5
    while not await healthy_or_refused(served.address):
        assert time.monotonic() < deadline, "the server did not recover"
        await asyncio.sleep(0.05)


async def healthy_or_refused(address: str) -> bool:
    try:
        return await healthy(address)
    except httpx.HTTPError:
        return False


# -- finding 10: request bytes in flight are bounded -----------------------------------------------


@pytest.mark.parametrize(
    "served",
    [HttpLimits(header_timeout=5.0, body_timeout=5.0, max_connections=100, request_bytes=400_000)],
    indirect=True,
)
async def test_finding_10_large_requests_beyond_the_budget_are_refused_with_retry_after(
    served: Served,
) -> None:
    text = "x" * 60_000
    batch = json.dumps({"messages": [{**MESSAGE, "text": text}] * 5}).encode()  # about 300 kB
    assert 250_000 < len(batch) < served.api.batch_limit
    # a first large batch, its body still arriving: it holds its declared size
    reader, writer = await served.connect()
    writer.write(
        b"POST /v1/messages/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(batch), batch[:1000])
    )
    deadline = time.monotonic() + 5
    while served.api.budget.used < len(batch):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=served.address, timeout=10) as client:
        second = await client.post(
            "/v1/messages/batch", content=batch, headers={"Content-Type": "application/json"}
        )
        assert second.status_code == 503, second.text
        assert second.json()["error"]["code"] == "busy" and second.headers["retry-after"] == "2"
        small = await client.post("/v1/messages", json=MESSAGE)  # ordinary sends still fit
        assert small.status_code == 202
        writer.write(batch[1000:])  # the first one finishes
        first = await answer_of((reader, writer), timeout=30)
        assert first.startswith(b"HTTP/1.1 202 ")
        assert served.api.budget.used == 0
        retried = await client.post(
            "/v1/messages/batch", content=batch, headers={"Content-Type": "application/json"}
        )
        assert retried.status_code == 202
    assert served.api.budget.used == 0
    writer.close()


@pytest.mark.parametrize(
    "served",
    [HttpLimits(header_timeout=5.0, body_timeout=5.0, max_connections=100, request_bytes=400_000)],
    indirect=True,
)
async def test_finding_10_a_chunked_body_is_counted_as_it_arrives(served: Served) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"messages": ['
        for n in range(10):
            yield (b", " if n else b"") + json.dumps({**MESSAGE, "text": "y" * 60_000}).encode()
        yield b"]}"

    async with httpx.AsyncClient(base_url=served.address, timeout=10) as client:
        r = await client.post(
            "/v1/messages/batch", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
    assert served.api.budget.used == 0
