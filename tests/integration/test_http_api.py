"""The HTTP API through a real HTTP client (httpx over ASGI, and one test over a real socket)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from postlane.ingest.http import build_app, start_http
from postlane.metrics import Metrics
from tests.conftest import free_port, make_config

TOKEN = "t0ken-for-tests"
MESSAGE = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    config = make_config(tmp_path, http={"tokens": [TOKEN]}, smtp={"max_size": "20KB"})
    async with AsyncPostlane(config, clock=clock) as postlane:
        yield postlane


@pytest.fixture
async def client(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    asgi = build_app(app.config, app, Metrics(app))
    transport = httpx.ASGITransport(app=asgi, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://postlane") as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


async def queue_is_empty(app: AsyncPostlane) -> bool:
    return await app.messages() == []


async def test_post_then_get(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/messages", json={**MESSAGE, "lane": "high", "metadata": {"user": 7}}
    )
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"id", "duplicate"} and body["duplicate"] is False
    message = (await client.get(f"/v1/messages/{body['id']}")).json()
    assert message["lane"] == "high" and message["metadata"] == {"user": 7}
    assert message["recipients"][0]["history"] == []


async def test_idempotency_key_in_body_or_header(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/messages", json={**MESSAGE, "idempotency_key": "k"})).json()
    second = await client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "k"})
    assert second.status_code == 202
    assert second.json() == {"id": first["id"], "duplicate": True}


async def test_attachments_and_raw(client: httpx.AsyncClient, app: AsyncPostlane) -> None:
    attachment = {
        "filename": "a.txt",
        "content": base64.b64encode(b"hello").decode(),
        "content_type": "text/plain",
    }
    r = await client.post("/v1/messages", json={**MESSAGE, "attachments": [attachment]})
    assert r.status_code == 202
    content = await app.content(r.json()["id"])
    assert b"a.txt" in content
    raw = "From: a@example.com\r\nTo: b@example.net\r\nSubject: raw\r\n\r\nbody\r\n"
    r = await client.post(
        "/v1/messages", json={"raw": raw, "from": "a@example.com", "to": ["b@example.net"]}
    )
    assert r.status_code == 202


async def test_batch_is_one_result_per_item(client: httpx.AsyncClient, app: AsyncPostlane) -> None:
    items = [MESSAGE, {**MESSAGE, "to": ["bad@@x"]}, {**MESSAGE, "lane": "urgent"}, MESSAGE]
    r = await client.post("/v1/messages/batch", json={"messages": items})
    assert r.status_code == 207
    body = r.json()
    assert body["accepted"] == 2 and body["refused"] == 2
    assert "id" in body["results"][0] and "id" in body["results"][3]
    assert body["results"][1]["error"]["code"] == "invalid_message"
    assert len(await app.messages()) == 2


async def test_stats_and_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/messages", json=MESSAGE)
    stats = (await client.get("/v1/stats")).json()
    assert stats["lanes"]["normal"]["ready"] == 1
    metrics = await client.get("/metrics", headers={"Authorization": ""})
    assert metrics.status_code == 200
    assert 'postlane_queue_depth{lane="normal",state="queued"} 1.0' in metrics.text
    assert "postlane_oldest_message_age_seconds" in metrics.text
    assert (await client.get("/healthz", headers={"Authorization": ""})).json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("request_kw", "status", "code"),
    [
        ({"headers": {"Authorization": ""}}, 401, "unauthorized"),
        ({"headers": {"Authorization": "Bearer wrong"}}, 401, "unauthorized"),
        ({"json": {**MESSAGE, "to": ["not-an-address"]}}, 422, "invalid_message"),
        ({"json": {**MESSAGE, "subject": "x\r\nBcc: v@example.org"}}, 422, "invalid_message"),
        (
            {"json": {**MESSAGE, "headers": {"X-A": "1\nBcc: v@example.org"}}},
            422,
            "invalid_message",
        ),
        ({"json": {**MESSAGE, "to": []}}, 422, "invalid_message"),
        ({"json": {**MESSAGE, "lane": "urgent"}}, 422, "invalid_message"),
        ({"json": {**MESSAGE, "text": "x" * 30_000}}, 413, "message_too_large"),
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"json": {**MESSAGE, "form": "typo@example.com"}}, 400, "unknown_field"),
        ({"json": {**MESSAGE, "to": 5}}, 400, "invalid_field"),
        ({"json": ["not", "an", "object"]}, 400, "invalid_field"),
    ],
)
async def test_refusals_are_json_errors_and_store_nothing(
    client: httpx.AsyncClient,
    app: AsyncPostlane,
    request_kw: dict[str, Any],
    status: int,
    code: str,
) -> None:
    kw = {"json": MESSAGE, **request_kw}
    response = await client.post("/v1/messages", **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert await queue_is_empty(app)


async def test_unknown_message_and_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/messages/doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.delete("/v1/stats")
    assert r.status_code == 405


async def test_without_tokens_only_loopback_is_answered(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config) as postlane:
        asgi = build_app(config, postlane)
        for host, expected in (("127.0.0.1", 202), ("::1", 202), ("192.0.2.7", 403)):
            transport = httpx.ASGITransport(app=asgi, client=(host, 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://p") as c:
                r = await c.post("/v1/messages", json=MESSAGE)
                assert r.status_code == expected, (host, r.text)


async def test_served_over_a_real_socket(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, http={"listen": f"127.0.0.1:{port}"})
    async with (
        AsyncPostlane(config) as postlane,
        start_http(config, postlane) as address,
        httpx.AsyncClient(base_url=address) as c,
    ):
        r = await c.post("/v1/messages", json=MESSAGE)
        assert r.status_code == 202
        assert (await c.get("/healthz")).status_code == 200


SEND_TOKEN = "send-scope-token"


@pytest.fixture
async def scoped(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[AsyncPostlane, Any]]:
    config = make_config(tmp_path, http={"tokens": [TOKEN], "send_tokens": [SEND_TOKEN, "other"]})
    async with AsyncPostlane(config, clock=clock) as postlane:
        asgi = build_app(config, postlane, Metrics(postlane))
        transport = httpx.ASGITransport(app=asgi, client=("10.1.2.3", 5555))

        def client(token: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport,
                base_url="http://postlane",
                headers={"Authorization": f"Bearer {token}"},
            )

        yield postlane, client


async def test_a_send_token_reads_only_its_own_messages(scoped: tuple[AsyncPostlane, Any]) -> None:
    _, client = scoped
    async with client(SEND_TOKEN) as mine, client("other") as theirs, client(TOKEN) as admin:
        queue_id = (await mine.post("/v1/messages", json=MESSAGE)).json()["id"]
        assert (await mine.get(f"/v1/messages/{queue_id}")).status_code == 200
        r = await theirs.get(f"/v1/messages/{queue_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await admin.get(f"/v1/messages/{queue_id}")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/stats", None),
        ("GET", "/v1/messages", None),
        ("POST", "/v1/queue/hold", {"all": True}),
        ("GET", "/v1/dlq", None),
        ("GET", "/v1/suppressions", None),
        ("POST", "/v1/suppressions", {"address": "x@example.net"}),
    ],
)
async def test_a_send_token_cannot_operate(
    scoped: tuple[AsyncPostlane, Any], method: str, path: str, body: Any
) -> None:
    _, client = scoped
    async with client(SEND_TOKEN) as c:
        r = await c.request(method, path, json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


async def test_admin_operations_over_http(scoped: tuple[AsyncPostlane, Any]) -> None:
    _, client = scoped
    async with client(TOKEN) as c:
        ids = [
            (
                await c.post(
                    "/v1/messages", json={**MESSAGE, "to": [f"u{i}@example.net"], "lane": lane}
                )
            ).json()["id"]
            for i, lane in enumerate(["high", "low", "low"])
        ]
        listed = (await c.get("/v1/queue", params={"lane": "low"})).json()
        assert {m["id"] for m in listed} == set(ids[1:])
        dry = (
            await c.post("/v1/queue/hold", json={"all": True, "lane": "low", "dry_run": True})
        ).json()
        assert sum(g["count"] for g in dry["would_touch"]) == 2
        assert (await c.post("/v1/queue/hold", json={"all": True, "lane": "low"})).json() == {
            "action": "hold",
            "count": 2,
        }
        held = (await c.get("/v1/messages", params={"state": "held"})).json()
        assert {m["id"] for m in held} == set(ids[1:])
        r = await c.post("/v1/queue/delete", json={"lane": "low"})
        assert r.status_code == 400  # needs ids or all
        r = await c.post("/v1/queue/explode", json={"all": True})
        assert r.status_code == 404
        r = await c.post("/v1/queue/requeue", json={"all": True})  # a dead-letter action
        assert r.status_code == 404
        assert (await c.post("/v1/dlq/requeue", json={"all": True})).json()["count"] == 0
        r = await c.post("/v1/queue/hold", json={"ids": ["nosuchid"]})
        assert r.status_code == 404
        assert (
            await c.post("/v1/suppressions", json={"address": "gone@example.net"})
        ).status_code == 201
        assert [s["address"] for s in (await c.get("/v1/suppressions")).json()] == [
            "gone@example.net"
        ]
        assert (await c.delete("/v1/suppressions/gone@example.net")).status_code == 200
        assert (await c.delete("/v1/suppressions/gone@example.net")).status_code == 404
        assert (await c.get("/v1/dlq")).json() == []
        assert (await c.get("/v1/dlq/groups")).json() == []


async def test_the_api_describes_itself(scoped: tuple[AsyncPostlane, Any]) -> None:
    _, client = scoped
    async with client("no token needed") as c:
        document = (await c.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/messages", "/v1/messages/batch", "/v1/stats"} <= set(document["paths"])
