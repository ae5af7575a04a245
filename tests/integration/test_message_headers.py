"""The HTTP API's ``headers`` field refuses what no submitter may send: ``Return-Path`` (RFC 5321
4.4) and postlane's own ``X-Postlane-*`` control headers, which SMTP submission and the Django
backend read and remove, and which the API would otherwise send on to every recipient."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from tests.conftest import api_client, make_config

SEND_TOKEN = "send-scope-token-headers"
MESSAGE = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    config = make_config(tmp_path, http={"send_tokens": [SEND_TOKEN]})
    async with AsyncPostlane(config, clock=clock) as postlane:
        yield postlane


@pytest.fixture
async def client(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app, SEND_TOKEN) as c:
        yield c


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("Return-Path", "the receiving server adds it from the envelope sender, RFC 5321 4.4"),
        ("X-Postlane-Lane", "use the 'lane' field"),
        ("X-Postlane-Idempotency-Key", "use the 'idempotency_key' field"),
        ("X-Postlane-Metadata", "use the 'metadata' field"),
        ("x-postlane-send-at", "use the 'send_at' field"),
        ("X-Postlane-Expires-At", "use the 'expires_at' field"),
        ("X-Postlane-Envelope-From", "X-Postlane-* headers are postlane's own"),
    ],
)
async def test_a_reserved_header_in_headers_is_422_naming_what_to_use_instead(
    client: httpx.AsyncClient, app: AsyncPostlane, name: str, says: str
) -> None:
    r = await client.post("/v1/messages", json={**MESSAGE, "headers": {name: "v"}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_message"
    assert error["message"].startswith(f"header {name} cannot be set in headers (")
    assert says in error["message"]
    assert await app.messages() == []  # nothing stored


async def test_a_batch_with_a_reserved_header_refuses_only_that_message(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    bad = {**MESSAGE, "headers": {"Return-Path": "<bounces@example.com>"}}
    r = await client.post("/v1/messages/batch", json={"messages": [MESSAGE, bad]})
    assert r.status_code == 207
    results = r.json()["results"]
    assert "id" in results[0]
    assert results[1]["error"]["code"] == "invalid_message"
    assert "Return-Path" in results[1]["error"]["message"]
    assert len(await app.messages()) == 1


async def test_the_fields_do_what_the_control_headers_would(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    r = await client.post(
        "/v1/messages",
        json={
            **MESSAGE,
            "headers": {"Reply-To": "help@example.com"},
            "lane": "high",
            "idempotency_key": "order-1",
            "metadata": {"order": 1},
        },
    )
    assert r.status_code == 202, r.text
    view = await app.get(r.json()["id"])
    assert (view.lane, view.idempotency_key) == ("high", "order-1")
    assert dict(view.metadata) == {"order": 1}
    content = await app.content(view.id)
    assert b"Reply-To: help@example.com\r\n" in content
    assert b"X-Postlane" not in content and b"Return-Path" not in content


async def test_a_raw_messages_utf8_subject_is_stored_as_written(
    app: AsyncPostlane, client: httpx.AsyncClient
) -> None:
    """RFC 6532: a raw (or SMTP) message's header may hold UTF-8. The bytes were kept, but the
    stored subject (the API's, `queue show`'s) came out ``gr����e``; and a bound token's
    refusal named a From domain just as garbled."""
    raw = (
        "From: Jörg <jorg@example.com>\r\nTo: ada@example.net\r\n"
        "Subject: grüße, =?utf-8?q?caf=C3=A9?=\r\n\r\nhi\r\n"
    )
    r = await client.post(
        "/v1/messages", json={"from": "jorg@example.com", "to": ["ada@example.net"], "raw": raw}
    )
    assert r.status_code == 202, r.text
    shown = (await client.get(f"/v1/messages/{r.json()['id']}")).json()
    assert shown["subject"].startswith("grüße, ")
    assert "grüße".encode() in await app.content(r.json()["id"])  # the bytes as sent
