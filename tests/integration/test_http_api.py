"""The HTTP API through a real HTTP client (httpx over ASGI, and one test over a real socket)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.config import Config
from postlane.errors import StoreUnavailable
from postlane.ingest import api_core
from postlane.ingest import http as http_module
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import build_app, start_http
from postlane.message import Lane, RecipientState
from postlane.metrics import Metrics
from postlane.records import AttemptRecord, Outcome
from tests.conftest import api_client, free_port, make_config

TOKEN = "t0ken-for-the-tests"
NDJSON = {"Content-Type": "application/x-ndjson"}
MESSAGE = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    config = make_config(tmp_path, http={"tokens": [TOKEN]}, smtp={"max_size": "20KB"})
    async with AsyncPostlane(config, clock=clock) as postlane:
        yield postlane


@pytest.fixture
async def client(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app, TOKEN) as c:
        yield c


@pytest.fixture
async def small_exports(
    app: AsyncPostlane, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an API whose export (and import) size limit is its floor: twice the body
    limit (about 180 kB with max_size 20KB)."""
    monkeypatch.setattr(api_core, "EXPORT_BYTES", 0)
    async with api_client(app, TOKEN) as c:
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
    both = {**MESSAGE, "idempotency_key": "k"}
    same = await client.post("/v1/messages", json=both, headers={"Idempotency-Key": "k"})
    assert same.json() == {"id": first["id"], "duplicate": True}
    # two different keys for one message: neither is silently dropped
    differ = await client.post("/v1/messages", json=both, headers={"Idempotency-Key": "k2"})
    assert differ.status_code == 400 and "differ" in differ.json()["error"]["message"]


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
        asgi = build_app(FrontDoor(config, postlane))
        for host, expected in (("127.0.0.1", 202), ("::1", 202), ("192.0.2.7", 403)):
            transport = httpx.ASGITransport(app=asgi, client=(host, 1234))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1:8025"
            ) as c:
                r = await c.post("/v1/messages", json=MESSAGE)
                assert r.status_code == expected, (host, r.text)
        # a loopback peer that calls us by another name is a browser tricked by DNS
        # rebinding (evil.example re-pointed at 127.0.0.1): refused, however it connects
        stored = len(await postlane.messages())
        transport = httpx.ASGITransport(app=asgi, client=("127.0.0.1", 1234))
        for base, expected in (
            ("http://evil.example:8025", 403),
            ("http://localhost:8025", 202),
            ("http://[::1]:8025", 202),
            ("http://127.0.0.1", 202),
        ):
            async with httpx.AsyncClient(transport=transport, base_url=base) as c:
                r = await c.post("/v1/messages", json=MESSAGE)
                assert r.status_code == expected, (base, r.text)
        assert len(await postlane.messages()) == stored + 3  # the refused one stored nothing


async def test_served_over_a_real_socket(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, http={"listen": f"127.0.0.1:{port}"})
    async with (
        AsyncPostlane(config) as postlane,
        start_http(FrontDoor(config, postlane)) as address,
        httpx.AsyncClient(base_url=address) as c,
    ):
        r = await c.post("/v1/messages", json=MESSAGE)
        assert r.status_code == 202
        assert (await c.get("/healthz")).status_code == 200


SEND_TOKEN = "send-scope-token-0001"
OTHER_TOKEN = "send-scope-token-0002"


@pytest.fixture
async def scoped(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[AsyncPostlane, Any]]:
    config = make_config(
        tmp_path, http={"tokens": [TOKEN], "send_tokens": [SEND_TOKEN, OTHER_TOKEN]}
    )
    async with clients_of(config, clock) as scoped:
        yield scoped


@contextlib.asynccontextmanager
async def clients_of(config: Config, clock: FakeClock) -> AsyncIterator[tuple[AsyncPostlane, Any]]:
    """The application of ``config``, and a maker of its API's clients by bearer token."""
    async with AsyncPostlane(config, clock=clock) as postlane:
        asgi = build_app(FrontDoor(config, postlane, Metrics(postlane)))
        transport = httpx.ASGITransport(app=asgi, client=("10.1.2.3", 5555))

        def client(token: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport,
                base_url="http://postlane",
                headers={"Authorization": f"Bearer {token}"},
            )

        yield postlane, client


SHOP_TOKEN = "shop-send-token-0003"
BRANDS_TOKEN = "brands-send-token-0004"
SHOP = {**MESSAGE, "from": "orders@shop.example.com"}


@pytest.fixture
async def tenants(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[AsyncPostlane, Any]]:
    """Send tokens of tenants, each bound to its sender domains, beside a plain send token
    (any sender) and an admin token."""
    bound = [
        {"token": SHOP_TOKEN, "senders": ["shop.example.com"]},
        {"token": BRANDS_TOKEN, "senders": ["brand.example", "Mail.Brand.Example"]},
    ]
    config = make_config(tmp_path, http={"tokens": [TOKEN], "send_tokens": [SEND_TOKEN, *bound]})
    async with clients_of(config, clock) as scoped:
        yield scoped


async def test_a_token_bound_to_senders_enqueues_mail_from_them(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    app, client = tenants
    async with client(SHOP_TOKEN) as shop, client(BRANDS_TOKEN) as brands:
        sent = await shop.post("/v1/messages", json=SHOP)
        assert sent.status_code == 202, sent.text
        assert (await shop.get(f"/v1/messages/{sent.json()['id']}")).status_code == 200
        for sender in ("news@brand.example", "Team@MAIL.Brand.example"):  # any case
            r = await brands.post("/v1/messages", json={**MESSAGE, "from": sender})
            assert r.status_code == 202, r.text
    assert len(await app.messages()) == 3


@pytest.mark.parametrize(
    "sender",
    [
        "ceo@other.example",
        "orders@news.shop.example.com",  # a subdomain is a domain of its own: listed, or refused
        "orders@example.com",
        "Shop <orders@shop.example.com.evil.example>",
    ],
)
async def test_a_token_bound_to_senders_is_refused_any_other_and_nothing_is_stored(
    tenants: tuple[AsyncPostlane, Any], sender: str
) -> None:
    """A security audit: a send token enqueued mail from any address, so one tenant sent as
    another's domain through the shared, DKIM-signing queue."""
    app, client = tenants
    async with client(SHOP_TOKEN) as shop:
        r = await shop.post("/v1/messages", json={**MESSAGE, "from": sender})
    assert r.status_code == 403
    domain = sender.rstrip(">").rpartition("@")[2]
    assert r.json() == {
        "error": {
            "code": "sender_not_allowed",
            "message": f"this token may send from shop.example.com only, not from {domain}",
        }
    }
    assert await queue_is_empty(app)


async def test_a_bound_token_is_told_every_domain_it_may_use(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    _, client = tenants
    async with client(BRANDS_TOKEN) as brands:
        r = await brands.post("/v1/messages", json=SHOP)
    assert r.status_code == 403
    assert r.json()["error"]["message"] == (
        "this token may send from brand.example, mail.brand.example only, not from shop.example.com"
    )


@pytest.mark.parametrize(
    ("raw", "shown", "as_bounce"),
    [
        (
            "From: ceo@other.example\r\nTo: ada@example.net\r\nSubject: x\r\n\r\nbody\r\n",
            "other.example",
            403,
        ),
        (
            "From: a@shop.example.com, ceo@other.example\r\nSender: a@shop.example.com\r\n"
            "To: ada@example.net\r\n\r\nbody\r\n",
            "other.example",
            403,
        ),
        # no domain to check: an encoded word some readers show as an address, an empty group
        (
            "From: =?utf-8?q?ceo=40other.example?=\r\nTo: ada@example.net\r\n\r\nbody\r\n",
            "=?utf-8?q?ceo=40other.example?=",
            422,  # from <>: prepare wants a From address for its Message-ID
        ),
        ("From: undisclosed:;\r\nTo: ada@example.net\r\n\r\nbody\r\n", "no address", 422),
    ],
)
async def test_a_bound_token_is_refused_a_raw_message_whose_from_header_is_another_domain(
    tenants: tuple[AsyncPostlane, Any], raw: str, shown: str, as_bounce: int
) -> None:
    """The From header is what a reader sees, what DKIM signs for and DMARC checks: a raw
    message's may differ from its envelope sender. One naming no domain cannot be checked,
    and is refused too."""
    app, client = tenants
    async with client(SHOP_TOKEN) as shop:
        r = await shop.post("/v1/messages", json={"raw": raw, "from": "a@shop.example.com"})
        bounce = await shop.post("/v1/messages", json={"raw": raw, "from": "<>"})
    assert bounce.status_code == as_bounce, bounce.text
    for refused in (r, bounce) if as_bounce == 403 else (r,):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == {
            "code": "sender_not_allowed",
            "message": f"this token may send from shop.example.com only, not from {shown} "
            "(its From header)",
        }
    assert await queue_is_empty(app)


@pytest.mark.parametrize("name", ["Sender", "Resent-From", "Resent-Sender"])
async def test_a_bound_token_is_refused_a_sender_or_resent_header_of_another_domain(
    tenants: tuple[AsyncPostlane, Any], name: str
) -> None:
    """A security audit: a bound token's Sender (which readers show as "ceo@bank.example on
    behalf of ...") and Resent-From could name any domain, signed by the token's own DKIM
    key. In headers and in a raw message alike, refused; the token's own domain goes."""
    app, client = tenants
    raw = (
        f"From: a@shop.example.com\r\n{name}: ceo@bank.example\r\nTo: ada@example.net\r\n\r\nx\r\n"
    )
    async with client(SHOP_TOKEN) as shop:
        built = await shop.post(
            "/v1/messages", json={**SHOP, "headers": {name: "ceo@bank.example"}}
        )
        whole = await shop.post("/v1/messages", json={"raw": raw})
        for refused in (built, whole):
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["message"] == (
                f"this token may send from shop.example.com only, not from bank.example "
                f"(its {name} header)"
            )
        assert await queue_is_empty(app)
        own = {**SHOP, "headers": {name: "desk@shop.example.com"}}
        assert (await shop.post("/v1/messages", json=own)).status_code == 202


async def test_a_first_line_a_parser_skips_but_a_signer_reads_is_refused_for_every_token(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    """A first line a mail parser takes for an mbox separator, a DKIM signer for a From field:
    refused as no header field (422), before any token's senders are looked at, so an admin
    or unbound token cannot have it signed for another domain either."""
    app, client = tenants
    raw = "From : ceo@other.example\r\nFrom: a@shop.example.com\r\nTo: ada@example.net\r\n\r\nx\r\n"
    async with client(SHOP_TOKEN) as shop, client(TOKEN) as admin:
        for caller in (shop, admin):
            r = await caller.post("/v1/messages", json={"raw": raw, "from": "a@shop.example.com"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_message"
            assert "line 1 of the raw message's header section is no header field" in r.text
    assert await queue_is_empty(app)
    raw = "From: a@shop.example.com\r\nTo: ada@example.net\r\n\r\nbody\r\n"
    async with client(SHOP_TOKEN) as shop:
        assert (await shop.post("/v1/messages", json={"raw": raw})).status_code == 202


async def test_a_batch_refuses_each_message_from_another_domain_and_stores_the_rest(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    app, client = tenants
    items = [SHOP, {**MESSAGE, "from": "ceo@other.example"}]
    async with client(SHOP_TOKEN) as shop:
        r = await shop.post("/v1/messages/batch", json={"messages": items})
    assert r.status_code == 207
    body = r.json()
    assert body["accepted"] == 1 and body["refused"] == 1
    assert "id" in body["results"][0]
    assert body["results"][1] == {
        "error": {
            "code": "sender_not_allowed",
            "message": "this token may send from shop.example.com only, not from other.example",
        }
    }
    [stored] = await app.messages()
    assert stored.id == body["results"][0]["id"] and stored.sender == "orders@shop.example.com"


async def test_plain_send_tokens_and_admin_tokens_send_from_any_domain(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    app, client = tenants
    other = {**MESSAGE, "from": "ceo@other.example"}
    async with client(SEND_TOKEN) as plain, client(TOKEN) as admin:
        assert (await plain.post("/v1/messages", json=other)).status_code == 202
        assert (await admin.post("/v1/messages", json=other)).status_code == 202
        r = await plain.post("/v1/messages/batch", json={"messages": [other, SHOP]})
        assert r.status_code == 202 and r.json()["accepted"] == 2
    assert len(await app.messages()) == 4


async def test_a_bound_token_cannot_learn_who_unsubscribed_from_another_domain(
    tenants: tuple[AsyncPostlane, Any],
) -> None:
    """The audit's second half: a recipient suppressed for a sender domain is recorded
    suppressed at enqueue, and its submitter reads that state back; a token sending "from"
    another tenant's domain learnt who had unsubscribed from it."""
    app, client = tenants
    await app.suppress("ada@example.net", reason="unsubscribe", scope="other.example")
    async with client(SHOP_TOKEN) as shop:
        probe = await shop.post("/v1/messages", json={**MESSAGE, "from": "x@other.example"})
        assert probe.status_code == 403 and "id" not in probe.json()
        own = (await shop.post("/v1/messages", json=SHOP)).json()["id"]
        [recipient] = (await shop.get(f"/v1/messages/{own}")).json()["recipients"]
    assert recipient["state"] == "queued"  # its own domain's mail: not suppressed
    assert [m.id for m in await app.messages()] == [own]


async def test_a_send_token_reads_only_its_own_messages(scoped: tuple[AsyncPostlane, Any]) -> None:
    _, client = scoped
    async with client(SEND_TOKEN) as mine, client(OTHER_TOKEN) as theirs, client(TOKEN) as admin:
        queue_id = (await mine.post("/v1/messages", json=MESSAGE)).json()["id"]
        assert (await mine.get(f"/v1/messages/{queue_id}")).status_code == 200
        r = await theirs.get(f"/v1/messages/{queue_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await admin.get(f"/v1/messages/{queue_id}")).status_code == 200


async def test_json_answers_tell_browsers_not_to_guess_their_type(
    client: httpx.AsyncClient,
) -> None:
    """A security audit: an unknown path is repeated in the error answer; without nosniff an old
    browser could read that JSON as a page."""
    missing = await client.get("/v1/<script>alert(1)</script>")
    ok = await client.get("/v1/stats")
    for answer in (missing, ok):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-type"] == "application/json"
    assert missing.status_code == 404


async def test_a_send_token_cancels_only_its_own_messages(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    app, client = scoped
    later = {**MESSAGE, "send_at": app.clock.now() + 3600}
    async with client(SEND_TOKEN) as mine, client(OTHER_TOKEN) as theirs, client(TOKEN) as admin:
        queue_id = (await mine.post("/v1/messages", json=later)).json()["id"]
        r = await theirs.delete(f"/v1/messages/{queue_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await app.get(queue_id)).recipients[0].state is RecipientState.QUEUED
        r = await mine.delete(f"/v1/messages/{queue_id}")
        assert r.status_code == 200
        assert r.json() == {"id": queue_id, "cancelled": 1, "left": []}
        assert (await mine.get(f"/v1/messages/{queue_id}")).status_code == 404
        r = await mine.delete(f"/v1/messages/{queue_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # an admin token cancels any message
        queue_id = (await theirs.post("/v1/messages", json=later)).json()["id"]
        r = await admin.delete(f"/v1/messages/{queue_id}")
        assert r.status_code == 200 and r.json()["cancelled"] == 1
        [deleted, _] = (await admin.get("/v1/events", params={"type": "deleted"})).json()["events"]
        assert deleted["text"] == "cancelled by the application"


async def test_finding_3_idempotency_keys_are_scoped_to_the_submitter_and_payload_compared(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    """Finding 3: another token could claim a key first and the real receipt was then never
    sent; a reused key with another payload was a silent duplicate."""
    app, client = scoped
    receipt = {**MESSAGE, "subject": "Receipt 9001", "idempotency_key": "receipt-9001"}
    squatter = {**MESSAGE, "to": ["attacker@example.net"], "idempotency_key": "receipt-9001"}
    async with client(OTHER_TOKEN) as theirs, client(SEND_TOKEN) as mine:
        claimed = await theirs.post("/v1/messages", json=squatter)
        assert claimed.status_code == 202
        first = await mine.post("/v1/messages", json=receipt)
        assert first.status_code == 202 and first.json()["duplicate"] is False
        assert first.json()["id"] != claimed.json()["id"]  # the real receipt is stored
        retry = await mine.post("/v1/messages", json=receipt)
        assert retry.status_code == 202
        assert retry.json() == {"id": first.json()["id"], "duplicate": True}
        reused = await mine.post("/v1/messages", json={**receipt, "subject": "Another message"})
        assert reused.status_code == 409
        error = reused.json()["error"]
        assert error["code"] == "idempotency_conflict" and error["id"] == first.json()["id"]
        assert error["key"] == "receipt-9001"
    assert len(await app.messages()) == 2  # nothing stored by the refused one


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


async def test_a_message_without_a_sender_is_told_it_is_missing(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    _, client = scoped
    async with client(TOKEN) as c:
        r = await c.post("/v1/messages", json={"to": ["u@example.net"], "text": "x"})
        blank = await c.post("/v1/messages", json={**MESSAGE, "from": "  "})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "from is missing: give an address (app@example.com)"
    assert blank.status_code == 422 and blank.json()["error"]["message"] == "from is empty"


async def test_the_queue_listing_selects_on_metadata_in_its_query_string(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    """``metadata=KEY=VALUE``, repeated for each key, as ``postlane queue list --metadata``
    takes it: a query string carries strings, so the JSON object form could never be sent."""
    _, client = scoped
    async with client(TOKEN) as c:
        ids = [
            (
                await c.post(
                    "/v1/messages",
                    json={**MESSAGE, "to": [f"u{n}@example.net"], "metadata": metadata},
                )
            ).json()["id"]
            for n, metadata in enumerate(
                [{"user": "7", "tenant": "acme"}, {"user": "7", "tenant": "other"}, {"user": "8"}]
            )
        ]
        one = await c.get("/v1/queue", params={"metadata": "user=7"})
        assert one.status_code == 200 and {m["id"] for m in one.json()} == set(ids[:2])
        both = await c.get(
            "/v1/messages", params=[("metadata", "user=7"), ("metadata", "tenant=acme")]
        )
        assert [m["id"] for m in both.json()] == ids[:1]
        bad = await c.get("/v1/queue", params={"metadata": "user"})
        assert bad.status_code == 400
        assert bad.json()["error"] == {
            "code": "invalid_field",
            "message": "metadata: 'user' is not KEY=VALUE",
        }


async def test_a_time_past_the_year_9999_is_refused_and_the_lists_keep_working(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    """An audit stored a suppression expiring at 1e300 (201), after which every listing of
    suppressions answered 500; and a send_at of 10**400 (an integer JSON allows) gave 500."""
    app, client = scoped
    async with client(TOKEN) as c:
        for expires in (1e300, 10**400, "9999-12-31T23:59:59-01:00"):
            r = await c.post(
                "/v1/suppressions", json={"address": "far@example.net", "expires_at": expires}
            )
            assert r.status_code in (400, 422), r.text
            assert r.json()["error"]["message"].startswith("expires_at must be a time before"), (
                r.text
            )
        for field in ("send_at", "expires_at"):
            one = {"from": "a@example.com", "to": ["b@example.net"], "text": "x", field: 10**400}
            r = await c.post("/v1/messages", json=one)
            assert r.status_code == 422 and "before the year 10000" in r.text, r.text
            r = await c.post("/v1/messages/batch", json={"messages": [one]})
            assert r.status_code == 207, r.text
            assert "before the year 10000" in r.json()["results"][0]["error"]["message"]
        assert await app.messages() == []
        assert (await c.get("/v1/suppressions")).json() == []


async def test_an_addresss_suppression_entries_are_found_by_address(
    scoped: tuple[AsyncPostlane, Any],
) -> None:
    app, client = scoped
    await app.suppress("ada@example.net", reason="hard_bounce")
    await app.suppress("ada@example.net", reason="unsubscribe", lanes=["low"])
    await app.suppress("bob@example.net")
    async with client(TOKEN) as c:
        r = await c.get("/v1/suppressions", params={"address": ["Ada@example.net", "x@y.example"]})
        assert r.status_code == 200, r.text
        assert sorted(e["reason"] for e in r.json()) == ["hard_bounce", "unsubscribe"]
        assert {e["address"] for e in r.json()} == {"ada@example.net"}
        assert "link" not in r.headers  # one page
    assert [s.address for s in await app.suppressions_of(["BOB@example.net"])] == [
        "bob@example.net"
    ]
    assert await app.suppressions_of([]) == []


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
        # one reason's entry at a time: a mistaken bounce goes, the unsubscribe stays
        for reason, lanes in (("unsubscribe", ["low"]), ("hard_bounce", None)):
            entry = {"address": "ada@example.net", "reason": reason, "lanes": lanes}
            assert (await c.post("/v1/suppressions", json=entry)).status_code == 201
        r = await c.delete("/v1/suppressions/ada@example.net", params={"reason": "hard_bounce"})
        assert r.status_code == 200
        [left] = (await c.get("/v1/suppressions")).json()
        assert (left["reason"], left["lanes"]) == ("unsubscribe", ["low"])
        r = await c.delete("/v1/suppressions/ada@example.net", params={"reason": "bounce"})
        assert r.status_code == 422 and "reason must be one of" in r.text
        r = await c.delete("/v1/suppressions/ada@example.net", params={"reasons": "x"})
        assert r.status_code == 400
        assert (await c.delete("/v1/suppressions/ada@example.net")).status_code == 200
        assert (await c.get("/v1/dlq")).json() == []
        assert (await c.get("/v1/dlq/groups")).json() == []


async def test_the_api_describes_itself(scoped: tuple[AsyncPostlane, Any]) -> None:
    _, client = scoped
    async with client("no token needed") as c:
        document = (await c.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/messages", "/v1/messages/batch", "/v1/stats"} <= set(document["paths"])


# -- safe deletes: export, then import ------------------------------------------------------------

ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


async def with_history(app: AsyncPostlane, queue_id: str, state: RecipientState, text: str) -> None:
    """Give a message's recipients one attempt each, leaving them ``state``."""
    now = app.clock.now()
    claimed = await app.store.claim_due("w", ALL_LANES, limit=100, now=now, lease_until=now + 60)
    cls = ReplyClass.TEMPORARY if state is RecipientState.DEFERRED else ReplyClass.HARD_BOUNCE
    code = int(text[:3])
    attempt = AttemptRecord(now, cls, code, text[4:9], text, "smtp://relay:25", "x", 7)
    due = now + 3600 if state is RecipientState.DEFERRED else None
    outcomes = [
        Outcome(d.id, state, 1, 0, due, attempt)
        for m in claimed
        if m.queue_id == queue_id
        for d in m.deliveries
    ]
    await app.store.record("w", outcomes, now)
    await app.store.hand_back("w", None, now)


async def snapshot(app: AsyncPostlane, ids: list[str]) -> dict[str, Any]:
    out = {}
    for queue_id in ids:
        view = await app.get(queue_id)
        out[queue_id] = (
            await app.content(queue_id),
            view.message_id,
            [
                (r.address, r.state, r.attempts, [a.text for a in r.history or ()])
                for r in view.recipients
            ],
        )
    return out


def export_lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


async def test_delete_with_export_then_import_restores_content_ids_and_history(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    ids = [
        (await client.post("/v1/messages", json={**MESSAGE, "to": to})).json()["id"]
        for to in (["ada@example.net", "bob@example.org"], ["cy@example.net"])
    ]
    await with_history(app, ids[0], RecipientState.DEFERRED, "451 4.3.0 try again later")
    before = await snapshot(app, ids)
    response = await client.post("/v1/queue/delete", json={"all": True, "export": True})
    records = export_lines(response)
    assert response.headers["x-postlane-count"] == "3"
    assert [r["id"] for r in records] == ids and all(
        r["format"] == "postlane-export/1" for r in records
    )
    assert await queue_is_empty(app)

    imported = await client.post(
        "/v1/queue/import",
        content=response.content,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"records": 2, "imported": 3}
    after = await snapshot(app, ids)
    for queue_id in ids:
        content, message_id, recipients = after[queue_id]
        old_content, old_message_id, old_recipients = before[queue_id]
        assert content == old_content and message_id == old_message_id
        # the same recipients, attempts and histories; waiting ones come back due now
        assert [(a, n, h) for a, _s, n, h in recipients] == [
            (a, n, h) for a, _s, n, h in old_recipients
        ]
    assert after[ids[0]][2][0][3] == ["451 4.3.0 try again later"]
    again = await client.post("/v1/queue/import", headers=NDJSON, content=response.content)
    assert again.json() == {"records": 2, "imported": 0}  # already there: skipped


async def test_purge_with_export_then_import_brings_the_dead_letter_back(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    queue_id = (await client.post("/v1/messages", json=MESSAGE)).json()["id"]
    await with_history(app, queue_id, RecipientState.DEAD, "550 5.1.1 no such user")
    before = (await client.get("/v1/dlq")).json()
    assert [d["id"] for d in before] == [queue_id]
    response = await client.post("/v1/dlq/purge", json={"ids": [queue_id], "export": True})
    [record] = export_lines(response)
    assert record["recipients"][0]["state"] == "dead"
    assert (await client.get("/v1/dlq")).json() == []
    r = await client.post("/v1/queue/import", headers=NDJSON, content=response.content)
    assert r.json() == {"records": 1, "imported": 1}
    assert (await client.get("/v1/dlq")).json() == before


async def test_issue_17_1_a_requeue_over_http_of_a_suppressed_address_is_409_naming_it(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """Issue 17.1 over HTTP (and so for the dashboard: both call AsyncPostlane.act): a hard
    bounce's address is suppressed, so a requeue as it stands would vanish as `suppressed` with
    no attempt. It is refused, naming the address, and nothing changes; "unsuppress" lifts it."""
    queue_id = (await client.post("/v1/messages", json=MESSAGE)).json()["id"]
    await with_history(app, queue_id, RecipientState.DEAD, "550 5.1.1 no such user")
    await app.suppress("ada@example.net")
    refused = await client.post("/v1/dlq/requeue", json={"ids": [queue_id]})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "suppressed_recipients"
    assert error["addresses"] == ["ada@example.net"] and "ada@example.net" in error["message"]
    assert [d["id"] for d in (await client.get("/v1/dlq")).json()] == [queue_id]
    assert [s.address for s in await app.suppressions()] == ["ada@example.net"]
    flag = await client.post("/v1/dlq/purge", json={"ids": [queue_id], "unsuppress": True})
    assert flag.status_code == 400  # a requeue's flag only
    done = await client.post("/v1/dlq/requeue", json={"ids": [queue_id], "unsuppress": True})
    assert done.status_code == 200, done.text
    assert done.json() == {"action": "requeue", "count": 1, "unsuppressed": ["ada@example.net"]}
    assert (await client.get("/v1/dlq")).json() == [] and await app.suppressions() == []
    [recipient] = (await client.get(f"/v1/messages/{queue_id}")).json()["recipients"]
    assert recipient["state"] == "queued"


async def test_an_export_with_nothing_selected_is_empty(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/queue/delete", json={"all": True, "export": True})
    assert export_lines(response) == [] and response.headers["x-postlane-count"] == "0"


def _valid_line(queue_id: str = "AAAA1111", **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "format": "postlane-export/1",
        "id": queue_id,
        "lane": "normal",
        "sender": "app@example.com",
        "subject": "Hi",
        "message_id": f"<{queue_id}@example.com>",
        "idempotency_key": None,
        "metadata": {},
        "created_at": 1_800_000_000.0,
        "content": base64.b64encode(b"Subject: Hi\r\n\r\nHello\r\n").decode(),
        "recipients": [
            {
                "address": "ada@example.net",
                "domain": "example.net",
                "destination": "example.net",
                "state": "queued",
                "attempts": 0,
                "deferrals": 0,
                "next_attempt_at": 1_800_000_000.0,
                "created_at": 1_800_000_000.0,
                "last_response": None,
                "reason": None,
                "history": [],
            }
        ],
    }
    record["recipients"][0].update(changes.pop("recipient", {}))
    return {**record, **changes}


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("not json", "line 2"),
        ("[1, 2]", "one JSON object"),
        (_line({**_valid_line("BBBB2222"), "format": "other/1"}), "format"),
        (
            _line({k: v for k, v in _valid_line("BBBB2222").items() if k != "recipients"}),
            "recipients",
        ),
        (_line(_valid_line("../../etc")), "message id"),
        (_line(_valid_line("BBBB2222", subject="a\u0000b")), "NUL"),
        (
            _line(_valid_line("BBBB2222", recipient={"address": "x\r\nRCPT TO:<v@evil.example>"})),
            "line 2",
        ),
        (_line(_valid_line("BBBB2222", recipient={"domain": "other.example"})), "domain"),
        (_line(_valid_line("BBBB2222", recipient={"attempts": 10**30})), "attempts"),
        (_line(_valid_line("BBBB2222", created_at=1e300)), "year 10000"),
        (_line(_valid_line("BBBB2222", recipient={"state": "lost"})), "line 2"),
        (_line(_valid_line("BBBB2222", recipients=[])), "no recipients"),
        ("[" * 100_000, "line 2"),
    ],
    ids=[
        "not json",
        "not an object",
        "another format",
        "no recipients field",
        "a path for an id",
        "NUL",
        "SMTP injection",
        "address outside its domain",
        "huge count",
        "far future",
        "unknown state",
        "empty recipients",
        "nested too deep",
    ],
)
async def test_a_bad_import_line_is_a_400_and_imports_nothing(
    client: httpx.AsyncClient, app: AsyncPostlane, bad: str, says: str
) -> None:
    body = _line(_valid_line()) + "\n" + bad + "\n"
    r = await client.post("/v1/queue/import", headers=NDJSON, content=body.encode())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_export" and says in error["message"], error
    assert error["message"].startswith("line 2:")
    assert await queue_is_empty(app)  # not even the good first line


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"", 400), (b"\n\n", 400), (b"\xff\xfe not utf-8", 400), (b"x" * 300_000, 413)],
    ids=["empty", "blank lines", "not utf-8", "too large"],
)
async def test_import_refuses_empty_undecodable_and_oversized_bodies(
    small_exports: httpx.AsyncClient, app: AsyncPostlane, body: bytes, status: int
) -> None:
    r = await small_exports.post("/v1/queue/import", headers=NDJSON, content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert await queue_is_empty(app)


async def test_a_valid_import_line_is_queued_due_now(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    r = await client.post("/v1/queue/import", headers=NDJSON, content=_line(_valid_line()))
    assert r.json() == {"records": 1, "imported": 1}
    view = await app.get("AAAA1111")
    assert view.message_id == "<AAAA1111@example.com>"
    assert view.recipients[0].state is RecipientState.QUEUED


async def test_an_export_from_before_the_local_part_limit_imports(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """Older versions queued local parts over 64 octets (the doors refuse them now): what they
    exported comes back, and the receiving server decides."""
    long = "bounces+" + "x" * 70
    r = await client.post("/v1/messages", json={**MESSAGE, "to": [f"{long}@example.net"]})
    assert r.status_code == 422 and "64" in r.json()["error"]["message"], r.text
    line = _valid_line(sender=f"{long}@example.com", recipient={"address": f"{long}@example.net"})
    r = await client.post("/v1/queue/import", headers=NDJSON, content=_line(line))
    assert r.json() == {"records": 1, "imported": 1}, r.text
    view = await app.get("AAAA1111")
    assert view.sender == f"{long}@example.com"
    assert [r.address for r in view.recipients] == [f"{long}@example.net"]
    # and an operator can suppress it (its bounce suppresses it too) and lift that again
    assert await app.suppress(f"{long}@example.net", reason="hard_bounce")
    assert await app.unsuppress(f"{long}@example.net")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/queue/flush", {"all": True, "export": True}, 400),
        ("/v1/queue/hold", {"all": True, "export": True}, 400),
        ("/v1/dlq/requeue", {"all": True, "export": True}, 400),
        ("/v1/queue/delete", {"all": True, "export": "yes"}, 400),
        ("/v1/queue/delete", {"all": True, "dry_run": "no"}, 400),
    ],
)
async def test_export_applies_to_delete_and_purge_only(
    client: httpx.AsyncClient, app: AsyncPostlane, path: str, body: Any, status: int
) -> None:
    await client.post("/v1/messages", json=MESSAGE)
    r = await client.post(path, json=body)
    assert r.status_code == status and r.json()["error"]["code"] == "invalid_field", r.text
    [message] = await app.messages()
    assert message.recipients[0].state is RecipientState.QUEUED  # nothing done


async def test_an_export_over_the_limits_is_refused_before_anything_is_deleted(
    small_exports: httpx.AsyncClient, app: AsyncPostlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = small_exports
    for i in range(12):  # about 20 kB each once in base64: past the 2 x body limit (~180 kB)
        r = await client.post("/v1/messages", json={**MESSAGE, "text": f"{i}" + "x" * 14_000})
        assert r.status_code == 202
    r = await client.post("/v1/queue/delete", json={"all": True, "export": True})
    assert r.status_code == 413 and r.json()["error"]["code"] == "export_too_large"
    assert len(await app.messages()) == 12
    monkeypatch.setattr(http_module, "MAX_EXPORT_RECIPIENTS", 5)
    r = await client.post("/v1/queue/delete", json={"all": True, "export": True})
    assert r.status_code == 413 and "at most 5 recipients" in r.json()["error"]["message"]
    assert len(await app.messages()) == 12


async def test_an_export_that_fails_part_way_is_undone(
    client: httpx.AsyncClient, app: AsyncPostlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The selection grew past one slice while deleting, and the store failed on the second:
    the first slice, already deleted, is imported back before the error is returned."""
    ids = [
        (await client.post("/v1/messages", json={**MESSAGE, "to": [f"u{i}@example.net"]})).json()[
            "id"
        ]
        for i in range(3)
    ]
    before = await snapshot(app, ids)
    monkeypatch.setattr(http_module, "MAX_EXPORT_RECIPIENTS", 2)

    async def nothing_selected(*_: Any) -> list[Any]:
        return []  # as if the 3 arrived after the count

    monkeypatch.setattr(app, "summarize", nothing_selected)
    real_delete = app.store.delete_deliveries
    calls = []

    async def fail_the_second(delivery_ids: Any, states: Any) -> int:
        calls.append(list(delivery_ids))
        if len(calls) == 2:
            raise StoreUnavailable("the store went away")
        return await real_delete(delivery_ids, states)

    monkeypatch.setattr(app.store, "delete_deliveries", fail_the_second)
    r = await client.post("/v1/queue/delete", json={"all": True, "export": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert [len(c) for c in calls] == [2, 1]
    assert await snapshot(app, ids) == before


async def test_the_api_describes_export_and_import(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert (
        "application/x-ndjson"
        in document["paths"]["/v1/queue/import"]["post"]["requestBody"]["content"]
    )
    delete = document["paths"]["/v1/queue/{action}"]["post"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in delete
    assert "export" in document["components"]["schemas"]["Selector"]["properties"]


async def test_send_at_and_expires_at_over_http(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    now = clock.now()
    body = {"from": "a@example.com", "to": ["b@example.net"], "text": "later"}
    r = await client.post(
        "/v1/messages",
        json={**body, "send_at": "2027-01-15T10:00:00+01:00", "expires_at": now + 7200},
    )
    assert r.status_code == 202, r.text
    shown = (await client.get(f"/v1/messages/{r.json()['id']}")).json()
    assert shown["send_at"] == "2027-01-15T09:00:00.000Z"  # an hour from the clock's now
    assert datetime.fromisoformat(shown["expires_at"]).timestamp() == now + 7200
    assert shown["recipients"][0]["next_attempt_at"] == "2027-01-15T09:00:00.000Z"
    for bad, says in (
        ({"send_at": "2027-01-15T09:00:00"}, "no time zone"),
        ({"expires_at": now - 1}, "already passed"),
        ({"send_at": True}, "ISO 8601 text or Unix seconds"),
    ):
        r = await client.post("/v1/messages", json={**body, **bad})
        assert r.status_code in (400, 422) and says in r.json()["error"]["message"], r.text
    assert len((await client.get("/v1/messages")).json()) == 1


async def test_suppressions_take_reason_scope_expiry_and_detail_over_http(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    r = await client.post(
        "/v1/suppressions",
        json={
            "address": "ada@example.net",
            "reason": "complaint",
            "scope": "shop.example",
            "expires_at": clock.now() + 86400,
            "detail": "support ticket 88",
        },
    )
    assert r.status_code == 201, r.text
    [entry] = (await client.get("/v1/suppressions")).json()
    assert {k: entry[k] for k in ("address", "reason", "scope", "detail", "source")} == {
        "address": "ada@example.net",
        "reason": "complaint",
        "scope": "shop.example",
        "detail": "support ticket 88",
        "source": "api",
    }
    assert datetime.fromisoformat(entry["expires_at"]).timestamp() == clock.now() + 86400
    r = await client.post("/v1/suppressions", json={"address": "b@example.net", "scope": "x y"})
    assert r.status_code == 422 and "scope must be" in r.json()["error"]["message"]
    r = await client.post("/v1/suppressions", json={"address": "b@example.net", "why": "x"})
    assert r.status_code == 400 and "why" in r.json()["error"]["message"]
    r = await client.delete("/v1/suppressions/ada@example.net", params={"scope": "other.example"})
    assert r.status_code == 404
    r = await client.delete("/v1/suppressions/ada@example.net", params={"scope": "shop.example"})
    assert r.status_code == 200


async def test_suppressions_take_lanes_over_http(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    r = await client.post(
        "/v1/suppressions",
        json={"address": "ada@example.net", "scope": "shop.example", "lanes": ["LOW", "normal"]},
    )
    assert r.status_code == 201, r.text
    r = await client.post("/v1/suppressions", json={"address": "bob@example.net", "lanes": None})
    assert r.status_code == 201, r.text
    listed = {e["address"]: e for e in (await client.get("/v1/suppressions")).json()}
    assert listed["ada@example.net"]["lanes"] == ["normal", "low"]
    assert listed["bob@example.net"]["lanes"] is None
    # the same lanes again: already there; a high-lane reset from the shop still goes
    again = {"address": "ada@example.net", "scope": "shop.example", "lanes": ["low"]}
    r = await client.post("/v1/suppressions", json=again)
    assert (r.status_code, r.json()["added"]) == (200, False)
    sent = await app.send(sender="accounts@shop.example", to=["ada@example.net"], text="t",
                          lane="high")  # fmt: skip
    assert (await app.get(sent.id)).state is RecipientState.QUEUED
    for bad, status, says in (
        (["urgent"], 422, "unknown lane 'urgent'"),
        ([], 422, "lanes names no lane"),
        ([1], 400, "lanes must be a string or a list of strings"),
    ):
        r = await client.post("/v1/suppressions", json={"address": "c@example.net", "lanes": bad})
        assert r.status_code == status, r.text
        assert says in r.json()["error"]["message"]
    assert "c@example.net" not in {s.address for s in await app.suppressions()}


async def test_the_event_log_pages_in_order_with_a_cursor(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    # an empty log: the cursor to start from is 0, and reading after it is reading from the start
    assert (await client.get("/v1/events")).json() == {"events": [], "next": "0"}
    assert (await client.get("/v1/events", params={"after": "0"})).json() == {
        "events": [],
        "next": "0",
    }
    body = {"from": "a@example.com", "text": "x"}
    ids = [
        (await client.post("/v1/messages", json={**body, "to": [f"u{i}@example.net"]})).json()["id"]
        for i in range(3)
    ]
    await app.suppress("late@example.net")
    await client.post("/v1/messages", json={**body, "to": ["late@example.net"]})
    first = (await client.get("/v1/events", params={"limit": 2})).json()
    assert [e["message_id"] for e in first["events"]] == ids[:2]
    assert (await client.get("/v1/events", params={"limit": 2, "after": "0"})).json() == first
    assert first["next"] == first["events"][-1]["id"]
    rest = (await client.get("/v1/events", params={"after": first["next"]})).json()
    assert [e["type"] for e in rest["events"]] == ["queued", "suppressed"]
    only = (await client.get("/v1/events", params={"type": "suppressed"})).json()
    assert [e["recipient"] for e in only["events"]] == ["late@example.net"]
    assert set(only["events"][0]) == {
        "id", "type", "at", "message_id", "recipient", "lane", "class", "code", "enhanced",
        "text", "metadata",
    }  # fmt: skip
    end = (await client.get("/v1/events", params={"after": rest["next"]})).json()
    assert end == {"events": [], "next": rest["next"]}
    # a reader of some types only moves on with the log: its cursor is the last event looked
    # at, not its last match (else it reads everything again at each poll, and retention of
    # that old match would tell it it had lost events)
    rare = (await client.get("/v1/events", params={"type": "bounced"})).json()
    assert rare == {"events": [], "next": rest["next"]}
    only_next = (await client.get("/v1/events", params={"type": "suppressed", "limit": 1})).json()
    assert only_next["next"] == only["events"][0]["id"]  # a full page: its last match
    for params, status in (
        ({"after": "x"}, 400),
        ({"type": "opened"}, 400),
        ({"limit": "0"}, 400),
        ({"since": "1"}, 400),
    ):
        r = await client.get("/v1/events", params=params)
        assert r.status_code == status, (params, r.text)
    del client.headers["Authorization"]
    assert (await client.get("/v1/events")).status_code == 401


async def test_unmatched_reports_are_listed_without_content_and_shown_one_by_one(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    from postlane.feedback import Report

    content = b"From: ada@example.net\r\nSubject: Out of office\r\n\r\nBack on Monday.\r\n"
    kept = await app.store.record_unmatched(
        Report("bounce listener", "auto-reply", content, "ada@example.net", "b-1@bounce.example"),
        "an automatic reply, not a bounce",
        app.clock.now(),
    )
    [listed] = (await client.get("/v1/feedback/unmatched")).json()
    assert (listed["id"], listed["kind"], listed["size"]) == (kept, "auto-reply", len(content))
    assert "content" not in listed
    shown = (await client.get(f"/v1/feedback/unmatched/{kept}")).json()
    assert shown["content"] == content.decode() and shown["reason"].startswith("an automatic")
    assert (await client.get("/v1/feedback/unmatched/999999")).status_code == 404
    assert (await client.get("/v1/feedback/unmatched/x")).status_code == 404
    assert (await client.get("/v1/feedback/unmatched", params={"limit": "0"})).status_code == 400


@pytest.mark.parametrize(
    "path", ["/v1/messages", "/v1/queue", "/v1/dlq", "/v1/dlq/groups", "/v1/events"]
)
@pytest.mark.parametrize("limit", ["²", "1²", "\u0661\u0660", "-1", "1e3"])
async def test_a_limit_that_is_not_plain_digits_is_400_not_500(
    client: httpx.AsyncClient, path: str, limit: str
) -> None:
    """ "²".isdigit() is true and int("²") raises: such a limit was a 500 with a traceback."""
    r = await client.get(path, params={"limit": limit})
    assert r.status_code == 400, (path, limit, r.text)
    assert r.json()["error"]["code"]
    assert (await client.get(path, params={"limit": "2"})).status_code == 200  # still serving


async def test_one_key_on_two_different_messages_of_a_batch_is_refused_saying_so(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """The batch names no stored message (none was stored): it is the batch that is wrong."""
    first = {**MESSAGE, "idempotency_key": "order-7"}
    other = {**first, "subject": "something else"}
    r = await client.post("/v1/messages/batch", json={"messages": [MESSAGE, first, other]})
    body = r.json()
    assert r.status_code == 422, body
    assert body["error"]["code"] == "invalid_message"
    assert "two different messages of this batch" in body["error"]["message"]
    assert await app.messages() == []


async def test_with_no_webhook_endpoint_the_listing_is_empty(client: httpx.AsyncClient) -> None:
    """A listing lists what there is, nothing included (naming an endpoint is another matter)."""
    listed = await client.get("/v1/webhooks/out")
    assert listed.status_code == 200 and listed.json() == []
    assert (await client.get("/v1/webhooks/out/app/failures")).status_code == 404


async def test_a_batch_refuses_an_idempotency_key_header_and_stores_nothing(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """The header used to be ignored: the same batch sent twice made four messages."""
    batch = {"messages": [MESSAGE, {**MESSAGE, "to": ["bob@example.net"]}]}
    for key in ("batch-7", ""):
        r = await client.post("/v1/messages/batch", json=batch, headers={"Idempotency-Key": key})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_field"
        assert "its own idempotency_key" in error["message"]
    assert await queue_is_empty(app)
    # each message's own key is the way
    keyed = {
        "messages": [{**m, "idempotency_key": f"k{i}"} for i, m in enumerate(batch["messages"])]
    }
    for _ in range(2):
        assert (await client.post("/v1/messages/batch", json=keyed)).status_code == 202
    assert len(await app.messages()) == 2


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"messages": [MESSAGE], "extra": 1}, "unknown field 'extra'"),
        ({"message": [MESSAGE]}, "unknown field 'message' (did you mean 'messages'?)"),
    ],
)
async def test_a_batch_refuses_a_top_level_field_it_does_not_know(
    client: httpx.AsyncClient, app: AsyncPostlane, body: dict[str, Any], named: str
) -> None:
    r = await client.post("/v1/messages/batch", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"code": "unknown_field", "message": named}
    assert await queue_is_empty(app)


@pytest.mark.parametrize(
    ("name", "meant"),
    [("sender", "from"), ("from_email", "from"), ("recipients", "to"), ("body", "text")],
)
async def test_another_apis_name_for_a_field_is_refused_naming_the_field_meant(
    client: httpx.AsyncClient, app: AsyncPostlane, name: str, meant: str
) -> None:
    """A new user's audit: the Python API's ``sender=`` sent as JSON got "did you mean
    'send_at'?" (the nearest spelling), not the field it stands for, ``from``."""
    body = {k: v for k, v in MESSAGE.items() if k != meant}
    r = await client.post("/v1/messages", json={**body, name: MESSAGE[meant]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == f"unknown field {name!r} (did you mean {meant!r}?)"
    assert await queue_is_empty(app)


ATTACHMENT = {"filename": "a.txt", "content": base64.b64encode(b"hi").decode()}


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"headers": []}, "headers must be an object"),
        ({"headers": ""}, "headers must be an object"),
        ({"headers": 0}, "headers must be an object"),
        ({"headers": False}, "headers must be an object"),
        ({"attachments": {}}, "attachments must be a list"),
        ({"attachments": ""}, "attachments must be a list"),
        ({"attachments": 0}, "attachments must be a list"),
        ({"attachments": [{**ATTACHMENT, "filename": {"a": "b"}}]}, "filename must be a string"),
        ({"attachments": [{**ATTACHMENT, "filename": 5}]}, "filename must be a string"),
        ({"attachments": [{**ATTACHMENT, "content_type": 5}]}, "content_type must be a string"),
        ({"attachments": [{**ATTACHMENT, "content_type": ["text/plain"]}]}, "content_type must"),
    ],
)
async def test_headers_and_attachments_of_another_type_are_refused_not_read_as_none(
    client: httpx.AsyncClient, app: AsyncPostlane, fields: dict[str, Any], said: str
) -> None:
    """``"headers": []`` was read as no headers (``or {}``), a filename ``{"a": "b"}`` became
    the file name ``{'a': 'b'}``: a wrong type is a 400, and nothing is stored."""
    r = await client.post("/v1/messages", json={**MESSAGE, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_field" and said in error["message"]
    r = await client.post("/v1/messages/batch", json={"messages": [{**MESSAGE, **fields}]})
    assert r.status_code == 207 and r.json()["results"][0]["error"]["code"] == "invalid_field"
    assert await queue_is_empty(app)


async def test_null_headers_attachments_and_attachment_fields_are_as_if_absent(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """null is absent, as for every optional field of a message."""
    for fields in (
        {"headers": None, "attachments": None},
        {"attachments": [{**ATTACHMENT, "filename": None, "content_type": None}]},
    ):
        r = await client.post("/v1/messages", json={**MESSAGE, **fields})
        assert r.status_code == 202, r.text
    content = await app.content(r.json()["id"])
    assert b"application/octet-stream" in content and b'filename="attachment"' in content


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"disposition": "inline"}, "unknown attachment field 'disposition'"),
        ({"filname": "b.txt"}, "unknown attachment field 'filname' (did you mean 'filename'?)"),
        ({"contenttype": "text/plain"}, "(did you mean 'content_type'?)"),
    ],
)
async def test_an_attachment_field_postlane_does_not_know_is_refused_naming_it(
    client: httpx.AsyncClient, app: AsyncPostlane, extra: dict[str, Any], said: str
) -> None:
    attachment = {**ATTACHMENT, **extra}
    r = await client.post("/v1/messages", json={**MESSAGE, "attachments": [attachment]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_field" and said in error["message"], error
    assert await queue_is_empty(app)


async def test_a_message_field_postlane_does_not_know_is_named_with_the_nearest_one(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/messages", json={**MESSAGE, "form": "typo@example.com"})
    assert r.json()["error"] == {
        "code": "unknown_field",
        "message": "unknown field 'form' (did you mean 'from'?)",
    }


@pytest.mark.parametrize(
    "content_type",
    ["multipart/mixed", "Multipart/Alternative", "multipart/related", "message/rfc822"],
)
async def test_a_multipart_or_message_attachment_is_refused_as_it_cannot_be_valid_mime(
    client: httpx.AsyncClient, app: AsyncPostlane, content_type: str
) -> None:
    """It was rendered as a base64 part: a multipart without a boundary, a message/rfc822 in
    an encoding RFC 2046 5.2.1 forbids. Refused, saying what to do instead."""
    attachment = {**ATTACHMENT, "content_type": content_type}
    r = await client.post("/v1/messages", json={**MESSAGE, "attachments": [attachment]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_message"
    assert f"content type {content_type} cannot be an attachment" in error["message"]
    assert "application/octet-stream" in error["message"]
    assert await queue_is_empty(app)


async def test_a_message_global_attachment_is_taken_as_rfc_6532_allows_it_base64(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    attachment = {**ATTACHMENT, "filename": "fwd.eml", "content_type": "message/global"}
    r = await client.post("/v1/messages", json={**MESSAGE, "attachments": [attachment]})
    assert r.status_code == 202, r.text
    assert b"Content-Type: message/global" in await app.content(r.json()["id"])


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/queue?domain=%00", None, 400),
        ("GET", "/v1/queue?sender=a%00b@example.com", None, 400),
        ("GET", "/v1/queue?recipient=%00", None, 400),
        ("GET", "/v1/queue?metadata=k%3D%00", None, 400),
        ("GET", "/v1/dlq?domain=%00", None, 400),
        ("POST", "/v1/queue/hold", {"all": True, "domain": "\u0000"}, 400),
        # as a suppression's other arguments are refused (an unknown reason: 422)
        ("GET", "/v1/suppressions?address=%00", None, 422),
        ("DELETE", "/v1/suppressions/x%00@example.com", None, 422),
        ("DELETE", "/v1/suppressions/x@example.com?scope=%00", None, 422),
    ],
)
async def test_a_nul_in_a_selector_or_address_is_refused_at_the_door(
    client: httpx.AsyncClient, method: str, path: str, body: Any, status: int
) -> None:
    """A dashboard audit: a NUL in an admin selector reached PostgreSQL, which refused it as a
    store failure: a 503, and /readyz said unavailable for 30 s (a load balancer takes the node
    out). Refused at the door, naming the field."""
    r = await client.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert "NUL" in r.json()["error"]["message"]
    assert (await client.get("/readyz")).status_code == 200
