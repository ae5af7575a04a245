"""postlane's HTTP client against a live postlane HTTP API: used from a Flask app (the sync
``Client``) and a FastAPI app (the ``AsyncClient``), each driven by its framework's test client;
its retries, through a proxy that loses answers, answers 503 or never answers; and its errors.

The API runs on an event loop of its own in a thread, as a separate server would: the Flask
view blocks on its HTTP call, and FastAPI's test client runs the app on a loop of its own."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from flask import Flask, jsonify
from flask import request as flask_request
from pydantic import BaseModel

import postlane
from postlane.app import AsyncPostlane
from postlane.client import BatchRefused
from postlane.errors import MessageTooLarge, NotFound, StoreUnavailable, ValidationError
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import start_http
from postlane.records import MessageView
from tests.conftest import free_port, make_config

T = TypeVar("T")
TOKEN = "client-test-token"


class LoopThread:
    """An event loop on a thread of its own: servers run there while the test blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@dataclass
class LiveAPI:
    url: str
    app: AsyncPostlane
    thread: LoopThread

    def messages(self) -> list[MessageView]:
        return self.thread.run(self.app.messages())

    def content(self, queue_id: str) -> bytes:
        return self.thread.run(self.app.content(queue_id))


@pytest.fixture
def server_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def live_api(tmp_path: Path, server_thread: LoopThread) -> Iterator[LiveAPI]:
    """postlane's HTTP API on a free port, with a bearer token, and a 20 KB size limit."""
    config = make_config(
        tmp_path,
        http={"listen": f"127.0.0.1:{free_port()}", "tokens": [TOKEN]},
        smtp={"max_size": "20KB"},
    )
    stack = AsyncExitStack()

    async def start() -> tuple[AsyncPostlane, str]:
        app = await stack.enter_async_context(AsyncPostlane(config))
        return app, await stack.enter_async_context(start_http(FrontDoor(config, app)))

    app, url = server_thread.run(start())
    yield LiveAPI(url, app, server_thread)
    server_thread.run(stack.aclose())


# -- a Flask app with the sync client ------------------------------------------------------------


def make_flask_app(mail: postlane.Client) -> Flask:
    """A shop that mails receipts: one client per process, shared by every request."""
    app = Flask("shop")

    @app.post("/orders/<order>/receipt")
    def send_receipt(order: str) -> Any:
        data = flask_request.get_json()
        result = mail.send(
            sender="Shop <shop@example.com>",
            to=[data["email"]],
            subject=f"Receipt for order {order}",
            text="Thank you!",
            html="<p>Thank you!</p>",
            attachments=[postlane.Attachment("receipt.txt", b"order " + order.encode())],
            lane="high",
            idempotency_key=f"receipt-{order}",  # a double-click sends one receipt
            metadata={"order": order},
        )
        return jsonify(id=result.id, duplicate=result.duplicate), 202

    @app.errorhandler(ValidationError)
    def refused(error: ValidationError) -> Any:
        return jsonify(error=error.message), 400

    return app


def test_a_flask_view_sends_through_the_client_once_per_idempotency_key(
    live_api: LiveAPI,
) -> None:
    with postlane.Client(live_api.url, token=TOKEN) as mail:
        web = make_flask_app(mail).test_client()
        first = web.post("/orders/8812/receipt", json={"email": "ada@example.net"})
        again = web.post("/orders/8812/receipt", json={"email": "ada@example.net"})
        refused = web.post("/orders/8813/receipt", json={"email": "not an address"})
        stored = mail.get(first.json["id"])
    assert first.status_code == 202 and first.json["duplicate"] is False
    assert again.json == {"id": first.json["id"], "duplicate": True}
    assert refused.status_code == 400
    assert "is not a valid address" in refused.json["error"]
    assert stored["lane"] == "high" and stored["metadata"] == {"order": "8812"}
    assert [r["address"] for r in stored["recipients"]] == ["ada@example.net"]
    [message] = live_api.messages()
    content = live_api.content(message.id)
    assert b"Subject: Receipt for order 8812" in content
    assert b'filename="receipt.txt"' in content
    assert base64.b64encode(b"order 8812") in content


def test_a_time_that_is_no_time_is_refused_before_any_request(live_api: LiveAPI) -> None:
    import datetime

    with postlane.Client(live_api.url, token=TOKEN) as mail:
        for when in (datetime.date(2027, 1, 15), datetime.timedelta(hours=1)):
            with pytest.raises(postlane.ValidationError, match="must be a time") as caught:
                mail.send(sender="a@example.com", to=["b@example.net"], text="x", send_at=when)
            assert caught.value.field == "send_at"
    assert live_api.messages() == []


# -- a FastAPI app with the async client ---------------------------------------------------------


class SignUp(BaseModel):
    email: str


class SignUps(BaseModel):
    emails: list[str]


def make_fastapi_app(url: str) -> FastAPI:
    """A sign-up service: its AsyncClient opens and closes with the app (its lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with postlane.AsyncClient(url, token=TOKEN) as mail:
            app.state.mail = mail
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/sign-up", status_code=202)
    async def sign_up(body: SignUp, request: Request) -> dict[str, Any]:
        mail: postlane.AsyncClient = request.app.state.mail
        result = await mail.send(
            {"from": "hello@example.com", "to": [body.email], "subject": "Welcome", "text": "Hi"}
        )
        stored = await mail.get(result.id)
        return {"id": result.id, "state": stored["state"]}

    @app.post("/invite", status_code=202)
    async def invite(body: SignUps, request: Request) -> list[str]:
        mail: postlane.AsyncClient = request.app.state.mail
        messages = [
            postlane.Message(sender="hello@example.com", to=[e], subject="Join us", text="Hi")
            for e in body.emails
        ]
        return [result.id for result in await mail.send_many(messages)]

    return app


def test_a_fastapi_endpoint_sends_through_the_async_client(live_api: LiveAPI) -> None:
    with TestClient(make_fastapi_app(live_api.url)) as web:
        response = web.post("/sign-up", json={"email": "ada@example.net"})
        invited = web.post("/invite", json={"emails": ["bob@example.org", "eve@example.com"]})
    assert response.status_code == 202
    assert response.json()["state"] == "queued"
    assert invited.status_code == 202 and len(invited.json()) == 2
    stored = {m.id: [r.address for r in m.recipients] for m in live_api.messages()}
    assert stored == {
        response.json()["id"]: ["ada@example.net"],
        invited.json()[0]: ["bob@example.org"],
        invited.json()[1]: ["eve@example.com"],
    }


# -- retries -------------------------------------------------------------------------------------


@dataclass
class FlakyProxy:
    """An HTTP proxy in front of the API that misbehaves as scripted, one action per request:
    ``forward``; ``lose`` (forward, then close without answering: the message is stored but the
    client never hears so); ``503``; ``hang`` (never answer)."""

    upstream: str
    script: list[str]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.strip().split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = dict(line.split(": ", 1) for line in header_lines)
            length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
            body = await reader.readexactly(length)
            if body:
                self.bodies.append(json.loads(body))
            action = self.script.pop(0) if self.script else "forward"
            if action == "hang":
                await self._release.wait()
                return
            if action == "503":
                error = {"error": {"code": "store_unavailable", "message": "busy, retry"}}
                self.answer(writer, 503, json.dumps(error).encode())
                return
            async with httpx.AsyncClient() as http:
                answer = await http.request(
                    method,
                    self.upstream + target,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Content-Type": "application/json",
                    },
                )
            if action == "forward":
                self.answer(writer, answer.status_code, answer.content)
        finally:
            writer.close()

    @staticmethod
    def answer(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[FlakyProxy]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self._release.set()
            server.close()
            await server.wait_closed()


@pytest.fixture
def proxy(live_api: LiveAPI) -> Iterator[FlakyProxy]:
    stack = AsyncExitStack()

    async def start() -> FlakyProxy:
        return await stack.enter_async_context(FlakyProxy(live_api.url, []).serving())

    yield live_api.thread.run(start())
    live_api.thread.run(stack.aclose())


MESSAGE = {"sender": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Yo"}


def test_a_lost_answer_is_retried_with_the_same_key_and_stored_once(
    proxy: FlakyProxy, live_api: LiveAPI
) -> None:
    proxy.script = ["lose"]
    with postlane.Client(proxy.url, token=TOKEN, backoff=0.01) as mail:
        result = mail.send(**MESSAGE)  # no idempotency key: the client makes one
    # the first try stored it; the retry, with the same key, was told so
    assert result.duplicate is True
    first, retry = proxy.bodies
    assert first["idempotency_key"] == retry["idempotency_key"]
    [message] = live_api.messages()
    assert (message.id, message.idempotency_key) == (result.id, first["idempotency_key"])


async def test_the_async_client_retries_503_and_keeps_its_key(
    proxy: FlakyProxy, live_api: LiveAPI
) -> None:
    proxy.script = ["503", "503"]
    async with postlane.AsyncClient(proxy.url, token=TOKEN, backoff=0.01) as mail:
        result = await mail.send(**MESSAGE)
    assert result.duplicate is False
    assert len(proxy.bodies) == 3
    assert len({body["idempotency_key"] for body in proxy.bodies}) == 1
    assert [m.id for m in await asyncio.to_thread(live_api.messages)] == [result.id]


def test_an_application_cancels_its_message_and_a_lost_answer_is_no_error(
    proxy: FlakyProxy, live_api: LiveAPI
) -> None:
    with postlane.Client(proxy.url, token=TOKEN, backoff=0.01) as mail:
        first = mail.send(**MESSAGE, send_at=live_api.app.clock.now() + 3600)
        assert mail.cancel(first.id) == {"id": first.id, "cancelled": 1, "left": []}
        with pytest.raises(NotFound):  # gone: a second cancel says so
            mail.cancel(first.id)
        second = mail.send(**MESSAGE, send_at=live_api.app.clock.now() + 3600)
        proxy.script = ["lose"]  # the cancel is done, its answer lost: the retry finds it gone
        assert mail.cancel(second.id) == {"id": second.id, "cancelled": None, "left": []}
        # postlane's own 503 did nothing: a 404 after it is a 404 (an audit: a typo'd id came
        # back "cancelled" after a failed first try)
        proxy.script = ["503"]
        with pytest.raises(NotFound):
            mail.cancel("nosuchmessage0000")
    assert live_api.messages() == []


async def test_the_async_client_cancels(live_api: LiveAPI) -> None:
    async with postlane.AsyncClient(live_api.url, token=TOKEN) as mail:
        sent = await mail.send(**MESSAGE, send_at=live_api.app.clock.now() + 3600)
        assert (await mail.cancel(sent.id))["cancelled"] == 1
        with pytest.raises(NotFound):
            await mail.cancel("nosuchmessage")


def test_a_callers_own_key_is_kept_for_its_retries(proxy: FlakyProxy, live_api: LiveAPI) -> None:
    proxy.script = ["503"]
    with postlane.Client(proxy.url, token=TOKEN, backoff=0.01) as mail:
        mail.send(**MESSAGE, idempotency_key="welcome-ada")
    assert [body["idempotency_key"] for body in proxy.bodies] == ["welcome-ada"] * 2


def test_timeouts_use_up_the_retries_then_raise_store_unavailable(
    proxy: FlakyProxy, live_api: LiveAPI
) -> None:
    proxy.script = ["hang", "hang", "hang"]
    with (
        postlane.Client(proxy.url, token=TOKEN, timeout=0.3, retries=2, backoff=0.01) as mail,
        pytest.raises(StoreUnavailable, match="after 3 tries: the connection timed out") as info,
    ):
        mail.send(**MESSAGE)
    assert info.value.__cause__ is None and info.value.__context__ is None  # no httpx trace
    assert len(proxy.bodies) == 3
    assert live_api.messages() == []


def test_an_unreachable_server_is_store_unavailable_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        postlane.Client(url, retries=1, backoff=0.01) as mail,
        pytest.raises(StoreUnavailable, match=f"postlane at {url} did not take") as info,
    ):
        mail.send(**MESSAGE)
    assert "after 2 tries: the connection failed" in str(info.value)
    assert "\n" not in str(info.value)


# -- errors --------------------------------------------------------------------------------------


def test_refusals_are_postlanes_own_errors_with_the_servers_message(live_api: LiveAPI) -> None:
    with postlane.Client(live_api.url, token=TOKEN) as mail:
        with pytest.raises(ValidationError, match="unknown lane 'urgent'") as refused:
            mail.send(**MESSAGE, lane="urgent")
        assert refused.value.code == "invalid_message"
        with pytest.raises(MessageTooLarge, match="over the limit of 20000 bytes"):
            mail.send(**{**MESSAGE, "text": "x" * 30_000})
        with pytest.raises(NotFound):
            mail.get("0000000000000000nope")
        with pytest.raises(ValidationError, match="unknown field 'colour'"):
            mail.send({"from": "app@example.com", "to": ["ada@example.net"], "colour": "red"})
        with pytest.raises(BatchRefused, match="1 of 2 messages refused") as batch:
            mail.send_many([MESSAGE, {**MESSAGE, "to": ["bad@@example.net"]}])
        assert batch.value.results[0] is not None and batch.value.results[1] is None
        assert list(batch.value.errors) == [1]
    with (
        postlane.Client(live_api.url, token="wrong") as intruder,
        pytest.raises(postlane.PostlaneError, match="401 unauthorized"),
    ):
        intruder.send(**MESSAGE)
    assert [m.id for m in live_api.messages()] == [batch.value.results[0].id]


def test_finding_3_a_key_reused_for_another_message_is_an_idempotency_conflict(
    live_api: LiveAPI,
) -> None:
    with postlane.Client(live_api.url, token=TOKEN) as mail:
        first = mail.send(**MESSAGE, idempotency_key="order-7")
        assert mail.send(**MESSAGE, idempotency_key="order-7").id == first.id  # a retry
        with pytest.raises(postlane.IdempotencyConflict) as refused:
            mail.send(**{**MESSAGE, "subject": "Another"}, idempotency_key="order-7")
    assert (refused.value.key, refused.value.existing_id) == ("order-7", first.id)
    assert [m.id for m in live_api.messages()] == [first.id]


def test_a_raw_message_that_is_not_utf8_is_refused_before_sending(live_api: LiveAPI) -> None:
    raw = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\n\r\ncaf\xe9\r\n"
    with (
        postlane.Client(live_api.url, token=TOKEN) as mail,
        pytest.raises(ValidationError, match="not UTF-8"),
    ):
        mail.send(postlane.Message(sender="a@example.com", to=["b@example.net"], raw=raw))
    assert live_api.messages() == []


def test_a_cancel_after_a_connection_never_made_is_not_found(live_api: LiveAPI) -> None:
    """A refused connection sent nothing: the retry's 404 is the answer."""

    class RefusedOnce(httpx.HTTPTransport):
        refused = False

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if not self.refused:
                self.refused = True
                raise httpx.ConnectError("refused", request=request)
            return super().handle_request(request)

    with (
        postlane.Client(live_api.url, token=TOKEN, backoff=0.01, transport=RefusedOnce()) as mail,
        pytest.raises(NotFound),
    ):
        mail.cancel("nosuchmessage0000")
