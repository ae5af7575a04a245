"""The webhook HTTP client against servers that answer in each way HTTP/1.1 allows: lengths,
chunks, the end of the connection, informational replies, closed idle connections, garbage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from postlane.webhooks.addresses import AddressRefused
from postlane.webhooks.endpoints import check_url
from postlane.webhooks.http import ConnectionFailed, EndpointClient, TimedOut
from tests.conftest import SMTPPeer, serve_in_process

Script = Callable[[bytes], bytes | None]


class RawServer:
    """Answers each request with the bytes ``script(request)`` gives (None: close at once);
    closes the connection after each answer when ``close_after`` is set."""

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script, close_after: bool = False) -> RawServer:
        raw = RawServer(script, close_after)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
        raw.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def client_for(port: int, *, timeout: float = 2.0, allow_private: bool = True) -> EndpointClient:
    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    return EndpointClient(
        check_url(f"http://hooks.test:{port}/in?x=1", allow_private),
        allow_private=allow_private,
        timeout=timeout,
        resolver=loopback,
    )


HEADERS = {"webhook-id": "evt_1", "webhook-timestamp": "1", "webhook-signature": "v1,x"}


async def test_the_request_is_a_plain_http11_post(serve: Callable[..., object]) -> None:
    server: RawServer = await serve(lambda r: b"HTTP/1.1 204 No Content\r\n\r\n")  # type: ignore[operator]
    client = client_for(server.port)
    reply = await client.post(HEADERS, b'{"a":1}')
    client.close()
    assert reply.ok and reply.status == 204 and reply.text == ""
    head, body = server.requests[0].split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /in?x=1 HTTP/1.1"
    assert f"Host: hooks.test:{server.port}" in lines
    assert "Content-Type: application/json" in lines and "Content-Length: 7" in lines
    assert "webhook-id: evt_1" in lines and body == b'{"a":1}'


@pytest.mark.parametrize(
    ("answer", "status", "text"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, "hello"),
        (
            b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nfail\r\n6;ext=1\r\ned now\r\n0\r\nX-Trailer: 1\r\n\r\n",
            500,
            "failed now",
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
            202,
            "",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", None, None),
    ],
)
async def test_replies_framed_by_length_chunks_or_after_an_informational_one(
    serve: Callable[..., object], answer: bytes, status: int | None, text: str | None
) -> None:
    server: RawServer = await serve(lambda r: answer)  # type: ignore[operator]
    client = client_for(server.port)
    if status is None:  # two lengths: "2, 2" is no number
        with pytest.raises(ConnectionFailed, match="Content-Length"):
            await client.post(HEADERS, b"{}")
        return
    first = await client.post(HEADERS, b"{}")
    second = await client.post(HEADERS, b"{}")
    client.close()
    assert (first.status, first.text) == (status, text) == (second.status, second.text)
    assert server.connections == 1  # kept alive


async def test_a_reply_ending_with_the_connection_is_read_to_its_end(
    serve: Callable[..., object],
) -> None:
    server: RawServer = await serve(  # type: ignore[operator]
        lambda r: b"HTTP/1.0 503 Busy\r\nRetry-After: 7\r\n\r\nback soon", close_after=True
    )
    client = client_for(server.port)
    first = await client.post(HEADERS, b"{}")
    second = await client.post(HEADERS, b"{}")
    client.close()
    assert (first.status, first.text, first.retry_after) == (503, "back soon", 7.0)
    assert first.describe() == "HTTP 503 Busy: back soon" and second.status == 503
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_replaced_without_a_failure(
    serve: Callable[..., object],
) -> None:
    # the server drops each connection after answering, without saying so
    server: RawServer = await serve(  # type: ignore[operator]
        lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", close_after=True
    )
    client = client_for(server.port)
    for _ in range(3):
        assert (await client.post(HEADERS, b"{}")).ok
        await asyncio.sleep(0.05)  # the close reaches the client
    client.close()
    assert len(server.requests) == 3 and server.connections == 3


async def test_retry_after_as_a_date(serve: Callable[..., object]) -> None:
    later = formatdate(time.time() + 120, usegmt=True)
    answer = f"HTTP/1.1 429 Slow Down\r\nRetry-After: {later}\r\nContent-Length: 0\r\n\r\n"
    server: RawServer = await serve(lambda r: answer.encode())  # type: ignore[operator]
    client = client_for(server.port)
    reply = await client.post(HEADERS, b"{}")
    client.close()
    assert reply.retry_after is not None and 100 < reply.retry_after <= 120


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (None, "closed before a reply"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None),  # then closed
    ],
)
async def test_no_reply_or_no_http_reply_is_a_connection_failure(
    serve: Callable[..., object], answer: bytes | None, error: str | None
) -> None:
    server: RawServer = await serve(lambda r: answer, close_after=True)  # type: ignore[operator]
    client = client_for(server.port)
    with pytest.raises(ConnectionFailed) as failed:
        await client.post(HEADERS, b"{}")
    client.close()
    if error is not None:
        assert error in failed.value.message


async def test_a_silent_server_times_out_and_a_closed_port_is_refused(
    serve: Callable[..., object],
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    silent = await asyncio.start_server(never, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = client_for(port, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimedOut, match=r"no reply within 0\.2s"):
        await client.post(HEADERS, b"{}")
    assert time.monotonic() - started < 1
    for writer in accepted:
        writer.close()
    silent.close()
    await silent.wait_closed()
    with pytest.raises(ConnectionFailed, match=r"cannot connect to hooks\.test"):
        await client_for(port).post(HEADERS, b"{}")


async def test_a_refused_address_is_never_connected_to(serve: Callable[..., object]) -> None:
    server: RawServer = await serve(lambda r: b"HTTP/1.1 200 OK\r\n\r\n")  # type: ignore[operator]
    with pytest.raises(AddressRefused, match="loopback"):
        await client_for(server.port, allow_private=False).post(HEADERS, b"{}")
    assert server.connections == 0


# -- serve: [[webhooks.out]] in the configuration is all it takes --------------------------------


async def test_serve_sends_signed_events_to_the_configured_endpoint_and_shows_it(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    import httpx

    from postlane.webhooks.endpoints import new_secret
    from tests.conftest import free_port, make_config
    from tests.webhook_receiver import WebhookReceiver

    secret = new_secret()
    (tmp_path / "hook.secret").write_text(secret + "\n")
    http_port = free_port()
    async with WebhookReceiver(secret) as receiver:
        config = make_config(
            tmp_path,
            delivery={"relay": smtp_peer.url, "poll_interval": "100ms"},
            http={"listen": f"127.0.0.1:{http_port}"},
            smtp={"listen": f"127.0.0.1:{free_port()}"},
            webhooks={
                "out": [
                    {
                        "url": receiver.url,
                        "secret_file": "hook.secret",
                        "allow_private": True,
                        "name": "app",
                        "events": ["sent", "bounced"],
                    }
                ]
            },
        )
        assert secret not in repr(config)
        async with serve_in_process(config) as app:
            queued = await app.send(
                sender="a@example.com", to=["ada@example.net"], text="x", metadata={"user": 7}
            )
            await receiver.wait_until(lambda: len(receiver.accepted) >= 1, "the sent event")
            [event] = receiver.events()  # "queued" is not among the endpoint's events
            assert (event["type"], event["message_id"]) == ("sent", queued.id)
            assert event["metadata"] == {"user": 7}
            assert all(request.verified for request in receiver.accepted)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:

                async def listed() -> dict[str, Any]:
                    rows = (await client.get("/v1/webhooks/out")).json()
                    return dict(rows[0])

                deadline = asyncio.get_running_loop().time() + 30
                row = await listed()
                while row.get("delivered", 0) < 1:  # the cursor is saved about once a second
                    assert asyncio.get_running_loop().time() < deadline, row
                    await asyncio.sleep(0.1)
                    row = await listed()
                assert (row["name"], row["state"]) == ("app", "healthy")
                assert secret not in json.dumps(row)
                metrics = (await client.get("/metrics")).text
                assert (
                    'postlane_webhook_deliveries_total{endpoint="app",outcome="delivered"} 1.0'
                    in metrics
                )
                assert 'postlane_webhook_consecutive_failures{endpoint="app"} 0.0' in metrics
                assert (await client.post("/v1/webhooks/out/nope/resume")).status_code == 404
