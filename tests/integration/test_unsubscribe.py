"""One-click unsubscribe end to end: each recipient's copy carries its own List-Unsubscribe link
and List-Unsubscribe-Post over real SMTP, signed by DKIM (checked by dkimpy); the provider APIs
carry them too; POST /u/{token} through the real Starlette app (and serve over HTTP) suppresses
the recipient in the right scope and writes the event `unsubscribed` on both stores, once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from postlane import serve
from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from postlane.dkim import generate_key
from postlane.errors import StoreUnavailable
from postlane.feedback.unsubscribe import UnsubscribeLinks, UnsubscribeTransport
from postlane.feedback.verp import ReturnPaths
from postlane.ingest.door import FrontDoor
from postlane.message import Lane, Message, RecipientState, prepare
from postlane.metrics import Metrics
from postlane.transports import transport_for
from postlane.transports.base import Envelope
from postlane.transports.mailgun import MailgunTransport
from postlane.transports.postmark import PostmarkTransport
from postlane.transports.sendgrid import SendGridTransport
from postlane.transports.ses import SESTransport
from postlane.worker import Worker
from tests.conftest import SMTPPeer, free_port, make_config, serve_in_process
from tests.integration.test_dkim import published, signature_fields, signed_field_names
from tests.integration.test_provider_apis import serving

T0 = 1_800_000_000.0
URL = "https://mail.example.test/unsubscribe"
LINK = re.compile(rb"^List-Unsubscribe: <([^>]+)>\r$", re.MULTILINE)
ONE_CLICK_FIELD = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


def links_in(content: bytes) -> list[str]:
    return [link.decode() for link in LINK.findall(content.split(b"\r\n\r\n", 1)[0])]


def token_of(link: str) -> str:
    return link.rpartition("/")[2]


# -- the headers on each recipient's copy, over SMTP, under DKIM --------------------------------


@dataclass
class Signed:
    """A relay configuration signing mail from shop.example, and its published key."""

    config: Any
    records: dict[str, str]


def signed_relay(tmp_path: Path, peer: SMTPPeer, **sections: Any) -> Signed:
    key = generate_key("shop.example", "s2026")
    pem = tmp_path / "shop.pem"
    pem.write_bytes(key.private_pem)
    config = make_config(
        tmp_path,
        delivery={"relay": peer.url, "tls_verify": False},
        dkim={"shop.example": {"selector": "s2026", "private_key": str(pem)}},
        **sections,
    )
    return Signed(config, {"s2026._domainkey.shop.example": key.dns_record})


def message(extra: bytes = b"") -> bytes:
    return (
        b"From: Shop <news@shop.example>\r\nTo: ada@example.net, bob@example.net\r\n"
        b"Subject: This week's deals\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <deals-1@shop.example>\r\n" + extra + b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nHalf price, this week only.\r\n"
    )


def envelope(lane: str, content: bytes, ids: tuple[int, ...] = (41, 42)) -> Envelope:
    return Envelope(
        "q1",
        "news@shop.example",
        ("ada@example.net", "bob@example.net"),
        content,
        "<deals-1@shop.example>",
        lane=lane,
        delivery_ids=ids,
    )


async def test_each_low_lane_recipient_gets_its_own_signed_one_click_link(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    relay = signed_relay(
        tmp_path, smtp_peer, bounces={"domain": "bounce.shop.example"}, unsubscribe={"url": URL}
    )
    unsubscribe_key, verp_key = bytes(range(32)), bytes(range(1, 33))
    transport = transport_for(relay.config, verp_key=verp_key, unsubscribe_key=unsubscribe_key)
    try:
        responses = await transport.send(envelope("low", message()))
    finally:
        await transport.close()
    assert [r.code for r in responses] == [250, 250]
    links = UnsubscribeLinks(URL, unsubscribe_key)
    paths = ReturnPaths("bounce.shop.example", verp_key)
    received = {r.rcpt_tos[0]: r for r in smtp_peer.handler.received}
    assert set(received) == {"ada@example.net", "bob@example.net"}  # a transaction each
    for address, delivery_id in (("ada@example.net", 41), ("bob@example.net", 42)):
        copy = received[address]
        assert copy.rcpt_tos == [address]
        assert paths.delivery_id(copy.mail_from) == delivery_id  # VERP still applies
        [link] = links_in(copy.content)
        assert link.startswith(URL + "/")
        assert links.delivery_id(token_of(link)) == delivery_id
        assert copy.content.count(ONE_CLICK_FIELD) == 1
        # RFC 8058 4: the signature covers both fields, and one added later breaks it
        [signature] = signature_fields(copy.content)
        names = signed_field_names(signature)
        assert names.count("list-unsubscribe") == 2  # signed, and oversigned
        assert names.count("list-unsubscribe-post") == 2
        assert dkim.verify(copy.content, dnsfunc=published(relay.records))
        other = links.link(99).encode()
        for forged in (
            copy.content.replace(token_of(link).encode(), token_of(other.decode()).encode()),
            b"List-Unsubscribe: <" + other + b">\r\n" + copy.content,
        ):
            assert not dkim.verify(forged, dnsfunc=published(relay.records))


async def test_other_lanes_and_the_applications_own_list_unsubscribe_are_left_alone(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    relay = signed_relay(tmp_path, smtp_peer, unsubscribe={"url": URL, "lanes": ["low"]})
    transport = transport_for(relay.config, unsubscribe_key=bytes(32))
    own = message(b"List-Unsubscribe: <mailto:leave@shop.example?subject=leave>\r\n")
    try:
        await transport.send(envelope("normal", message()))
        await transport.send(envelope("high", message()))
        await transport.send(envelope("low", own))
    finally:
        await transport.close()
    received = smtp_peer.handler.received
    # one transaction per message (no VERP configured, nothing split), nothing added
    assert [r.rcpt_tos for r in received] == [["ada@example.net", "bob@example.net"]] * 3
    assert [links_in(r.content) for r in received] == [
        [],
        [],
        ["mailto:leave@shop.example?subject=leave"],
    ]
    assert not any(b"List-Unsubscribe-Post" in r.content for r in received)
    assert received[2].content.endswith(own)  # the application's message, only signed
    assert all(dkim.verify(r.content, dnsfunc=published(relay.records)) for r in received)


async def test_without_an_unsubscribe_url_or_key_nothing_is_added(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    without_url = make_config(tmp_path, delivery={"relay": smtp_peer.url, "tls_verify": False})
    with_url = make_config(
        tmp_path, delivery={"relay": smtp_peer.url, "tls_verify": False}, unsubscribe={"url": URL}
    )
    for transport in (
        transport_for(without_url, unsubscribe_key=bytes(32)),
        transport_for(with_url),
    ):
        assert not isinstance(transport, UnsubscribeTransport)
        await transport.send(envelope("low", message()))
        await transport.close()
    assert [links_in(r.content) for r in smtp_peer.handler.received] == [[], []]


# -- the provider APIs carry each recipient's link ----------------------------------------------


@dataclass
class Seen:
    path: str
    body: bytes


def provider_links(provider: str, body: bytes) -> tuple[list[str], bool]:
    """The List-Unsubscribe links a provider's request carries, and whether it carries
    List-Unsubscribe-Post = One-Click."""
    if provider == "sendgrid":
        headers = json.loads(body)["headers"]
        post = headers.get("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        return [headers["List-Unsubscribe"].strip("<>")], post
    if provider == "postmark":
        pairs = [(h["Name"], h["Value"]) for h in json.loads(body)["Headers"]]
        links = [value.strip("<>") for name, value in pairs if name == "List-Unsubscribe"]
        return links, ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click") in pairs
    if provider == "ses":
        body = base64.b64decode(json.loads(body)["Content"]["Raw"]["Data"])
    else:  # mailgun: the stored MIME as a file part of the form
        body = body[body.index(b"List-Unsubscribe:") :]
    return links_in(body), ONE_CLICK_FIELD in body


PROVIDERS = {
    "sendgrid": lambda url: SendGridTransport("SG.key", base_url=url, timeout=5),
    "postmark": lambda url: PostmarkTransport("pm-token", base_url=url, timeout=5),
    "mailgun": lambda url: MailgunTransport("key", "mg.shop.example", base_url=url, timeout=5),
    "ses": lambda url: SESTransport("AKID", "secret", "us-east-1", base_url=url, timeout=5),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_each_provider_api_carries_each_recipients_link(provider: str) -> None:
    seen: list[Seen] = []

    async def accept(request: Request) -> JSONResponse:
        seen.append(Seen(request.url.path, await request.body()))
        return JSONResponse({"MessageId": "m", "ErrorCode": 0, "id": "m"}, 200)

    api = Starlette(routes=[Route("/{path:path}", accept, methods=["POST"])])
    links = UnsubscribeLinks(URL, bytes(32))
    async with serving(api) as base_url:
        transport = UnsubscribeTransport(PROVIDERS[provider](base_url), links, ["low"])
        responses = await transport.send(envelope("low", message()))
        await transport.close()
    assert [r.code for r in responses] == [250, 250]
    carried = sorted(provider_links(provider, one.body) for one in seen)
    assert carried == sorted([([links.link(41)], True), ([links.link(42)], True)])


# -- the endpoint, on both stores ----------------------------------------------------------------


async def unsubscribed_events(store: Any, at_least: int = 0) -> list[Any]:
    """The ``unsubscribed`` events, once there are ``at_least`` (PostgreSQL shows an event
    once no older transaction of the server may still write one: another session's
    transaction can delay it a moment, so this polls, with a deadline)."""
    deadline = time.monotonic() + 10
    while True:
        events = await store.events_after(None, limit=100, types=["unsubscribed"])
        if len(events) >= at_least:
            return list(events)
        assert time.monotonic() < deadline, f"{len(events)} events, expected {at_least}"
        await asyncio.sleep(0.02)


@dataclass
class Shop:
    """A store with a message from news@shop.example to ada and bob, the app and the API."""

    app: AsyncPostlane
    client: httpx.AsyncClient
    links: UnsubscribeLinks
    metrics: Metrics
    ids: dict[str, int]
    queue_id: str

    def path(self, address: str) -> str:
        return "/u/" + self.links.token(self.ids[address])

    async def suppressions(self) -> set[tuple[str, str, str]]:
        listed = await self.app.store.list_suppressions(limit=100)
        return {(s.address, s.scope, s.reason) for s in listed}

    async def events(self, at_least: int = 0) -> list[Any]:
        return await unsubscribed_events(self.app.store, at_least)

    async def feedback_counted(self) -> str:
        exposition = (await self.metrics.exposition()).decode()
        found = re.search(
            r'^postlane_feedback_total\{source="unsubscribe",type="unsubscribed"\} (\S+)$',
            exposition,
            re.MULTILINE,
        )
        return found.group(1) if found else "0"


@pytest.fixture(params=["sender-domain", "global"])
async def shop(request: pytest.FixtureRequest, store: Any, tmp_path: Path) -> AsyncIterator[Shop]:
    config = make_config(tmp_path, unsubscribe={"url": URL, "scope": request.param})
    app = AsyncPostlane(config, store=store, clock=FakeClock(T0))
    to = ["ada@example.net", "bob@example.net"]
    prepared = prepare(
        Message(
            sender="news@shop.example", to=to, subject="Deals", text="Half price.", lane=Lane.LOW
        ),
        max_size=1_000_000,
    )
    await store.enqueue([prepared], T0)
    ids = {a: (await store.find_deliveries(a, queue_id=prepared.id))[0].delivery_id for a in to}
    metrics = Metrics(app)
    asgi = serve.build_app(FrontDoor(config, app, metrics))  # mounted as serve mounts it
    links = UnsubscribeLinks(URL, await store.secret("unsubscribe", T0))
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://mail.example.test"
    ) as client:
        yield Shop(app, client, links, metrics, ids, prepared.id)


async def test_a_one_click_post_suppresses_the_recipient_and_tells_the_app(shop: Shop) -> None:
    before = {r.address: r.state for r in (await shop.app.get(shop.queue_id)).recipients}
    answer = await shop.client.post(
        shop.path("ada@example.net"), content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    scope = "*" if shop.app.config.unsubscribe.scope == "global" else "shop.example"
    assert await shop.suppressions() == {("ada@example.net", scope, "unsubscribe")}
    [event] = await shop.events(at_least=1)
    assert (event.type, event.recipient, event.queue_id) == (
        "unsubscribed",
        "ada@example.net",
        shop.queue_id,
    )
    after = {r.address: r.state for r in (await shop.app.get(shop.queue_id)).recipients}
    assert after == before  # no state changes
    [entry] = await shop.app.store.list_suppressions(limit=10)
    assert (entry.source, entry.expires_at, entry.queue_id) == ("unsubscribe", None, shop.queue_id)
    assert entry.detail
    assert await shop.feedback_counted() == "1.0"
    # the suppression holds for mail from the sender's domain (or for all mail: global)
    same = await shop.app.store.is_suppressed(["ada@example.net"], sender="deals@shop.example")
    other = await shop.app.store.is_suppressed(["ada@example.net"], sender="it@other.example")
    assert (same["ada@example.net"], other["ada@example.net"]) == (True, scope == "*")


async def test_an_unsubscribe_stops_the_bulk_lane_and_never_a_password_reset(
    shop: Shop, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    """A day-one audit: with [unsubscribe] lanes = ["low"], a recipient who unsubscribed from a
    newsletter had their next password reset (lane high) from the same domain recorded
    suppressed. An unsubscribe stops the kind of mail that offered it, at enqueue and at send
    time, whatever the scope."""
    app = shop.app

    def to_ada(lane: Lane, subject: str) -> Message:
        sender = "accounts@shop.example" if lane is Lane.HIGH else "news@shop.example"
        return Message(sender=sender, to=["ada@example.net"], subject=subject, text="b", lane=lane)

    # queued before the click: checked again when a worker picks it up
    reset_before = await app.send(to_ada(Lane.HIGH, "reset before"))
    answer = await shop.client.post(
        shop.path("ada@example.net"), content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert answer.status_code == 200
    # at enqueue: the next reset is queued, the next newsletter suppressed
    reset_after = await app.send(to_ada(Lane.HIGH, "reset after"))
    deals_after = await app.send(to_ada(Lane.LOW, "deals after"))
    assert (await app.get(reset_after.id)).state is RecipientState.QUEUED
    assert (await app.get(deals_after.id)).state is RecipientState.SUPPRESSED
    # at send time: both resets are delivered; the newsletter queued before the click goes to
    # bob only
    relay = make_config(tmp_path, delivery={"relay": smtp_peer.url, "tls_verify": False})
    transport = transport_for(relay)
    worker = Worker.from_config(relay, app.store, transport, clock=app.clock)
    try:
        await worker.run_until_idle()
    finally:
        await transport.close()
    received = sorted((r.rcpt_tos[0], r.content) for r in smtp_peer.handler.received)
    subjects = [
        (address, next(line for line in content.splitlines() if line.startswith(b"Subject:")))
        for address, content in received
    ]
    assert subjects == [
        ("ada@example.net", b"Subject: reset after"),
        ("ada@example.net", b"Subject: reset before"),
        ("bob@example.net", b"Subject: Deals"),
    ]
    for sent in (reset_before, reset_after):
        assert (await app.get(sent.id)).state is RecipientState.SENT
    deals = {r.address: r.state for r in (await app.get(shop.queue_id)).recipients}
    assert deals == {
        "ada@example.net": RecipientState.SUPPRESSED,
        "bob@example.net": RecipientState.SENT,
    }
    [entry] = await app.suppressions()  # as the operator sees it
    assert (entry.reason, entry.lanes) == ("unsubscribe", (Lane.LOW,))
    assert entry.as_json()["lanes"] == ["low"]


async def test_an_unsubscribe_from_mail_of_a_lane_no_longer_configured_stops_that_lane_too(
    store: Any, tmp_path: Path
) -> None:
    """[unsubscribe] lanes moved from low to normal after a newsletter left: its link still
    stops the newsletter's lane, beside the lanes configured now."""
    config = make_config(tmp_path, unsubscribe={"url": URL, "lanes": ["normal"]})
    app = AsyncPostlane(config, store=store, clock=FakeClock(T0))
    deals = prepare(
        Message(sender="news@shop.example", to=["ada@example.net"], text="b", lane=Lane.LOW),
        max_size=1_000_000,
    )
    await store.enqueue([deals], T0)
    [ref] = await store.find_deliveries("ada@example.net", queue_id=deals.id)
    links = UnsubscribeLinks(URL, await store.secret("unsubscribe", T0))
    asgi = serve.build_app(FrontDoor(config, app, Metrics(app)))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://mail.example.test"
    ) as client:
        answer = await client.post("/u/" + links.token(ref.delivery_id), headers=ONE_CLICK)
    assert answer.status_code == 200
    [entry] = await store.list_suppressions(limit=10)
    assert (entry.scope, entry.lanes) == ("shop.example", (Lane.NORMAL, Lane.LOW))


async def test_a_repeated_post_answers_the_same_and_changes_nothing_more(shop: Shop) -> None:
    path = shop.path("ada@example.net")
    first = await shop.client.post(path, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    listed = await shop.app.store.list_suppressions(limit=10)
    await shop.app.clock.advance(3600)  # type: ignore[attr-defined]
    again = await shop.client.post(path)  # an empty body is tolerated
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.text == again.text
    assert await shop.app.store.list_suppressions(limit=10) == listed
    assert len(await shop.events(at_least=1)) == 1
    assert await shop.feedback_counted() == "1.0"  # counted only when an event is written


async def test_a_forged_token_is_not_found_and_changes_nothing(shop: Shop) -> None:
    token = shop.links.token(shop.ids["ada@example.net"])
    mac = token.rpartition("-")[2]
    forged = [
        token[:-1] + ("b" if token.endswith("a") else "a"),  # one character off
        UnsubscribeLinks(URL, bytes(32)).token(shop.ids["ada@example.net"]),  # another key
        ReturnPaths("b.example", await shop.app.store.secret("verp", T0)).local_part(
            shop.ids["ada@example.net"]
        ),  # a VERP token
        shop.links.token(10**9),  # a valid token naming no delivery (purged)
        f"u-zzzz-{mac}",
        "x" * 300,
    ]
    answers = [await shop.client.post(f"/u/{t}", headers=ONE_CLICK) for t in forged]
    assert {a.status_code for a in answers} == {404}
    bodies = {a.content for a in answers}
    assert len(bodies) == 1  # never says why
    assert json.loads(bodies.pop())["error"]["code"] == "not_found"
    assert await shop.suppressions() == set()
    assert await shop.events() == []


async def test_a_get_shows_a_form_and_never_unsubscribes(shop: Shop) -> None:
    answer = await shop.client.get(shop.path("ada@example.net"))
    assert answer.status_code == 200
    page = answer.text
    assert re.search(r'<form method="post">', page)  # to the address it was shown at
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert "<script" not in page and "ada@example.net" not in page
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["referrer-policy"] == "no-referrer"  # the token is in the URL
    assert answer.headers["cache-control"] == "no-store"
    assert (await shop.client.head(shop.path("ada@example.net"))).status_code == 200
    assert (await shop.client.get("/u/u-1-" + "a" * 26)).status_code == 404
    assert await shop.suppressions() == set()
    assert await shop.events() == []
    # what the form sends unsubscribes
    posted = await shop.client.post(
        shop.path("ada@example.net"), data={"List-Unsubscribe": "One-Click"}
    )
    assert posted.status_code == 200
    assert len(await shop.events(at_least=1)) == 1


async def test_a_body_over_the_limit_is_refused_and_changes_nothing(shop: Shop) -> None:
    answer = await shop.client.post(shop.path("ada@example.net"), content=b"x" * 100_000)
    assert answer.status_code == 413
    assert await shop.suppressions() == set()


async def test_a_store_that_cannot_record_gets_503_and_the_retry_works(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is locked")

    path = shop.path("bob@example.net")
    with monkeypatch.context() as patch:
        patch.setattr(shop.app.store, "record_feedback", unavailable)
        refused = await shop.client.post(path, content=b"List-Unsubscribe=One-Click")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert await shop.suppressions() == set()
    assert (await shop.client.post(path)).status_code == 200
    assert {s[0] for s in await shop.suppressions()} == {"bob@example.net"}


async def test_store_unsubscribes_apply_once_per_address_and_scope(store: Any) -> None:
    """The store's rule behind the endpoint's idempotency, with items in one batch too."""
    from postlane.feedback import Feedback, FeedbackKind

    prepared = [
        prepare(
            Message(sender=f"n@{d}", to=["ada@example.net"], subject="s", text="b"), max_size=10**6
        )
        for d in ("shop.example", "shop.example", "other.example")
    ]
    await store.enqueue(prepared, T0)
    ids = [
        (await store.find_deliveries("ada@example.net", queue_id=p.id))[0].delivery_id
        for p in prepared
    ]

    def item(delivery_id: int, scope: str) -> Feedback:
        return Feedback(
            FeedbackKind.UNSUBSCRIBED, delivery_id, T0, "unsubscribe",
            suppression=(scope, "unsubscribe", None),
        )  # fmt: skip

    results = await store.record_feedback(
        [item(ids[0], "shop.example"), item(ids[1], "shop.example"), item(ids[2], "other.example")],
        T0,
    )
    assert [r.changed for r in results] == [True, False, True]
    again = await store.record_feedback([item(ids[1], "shop.example")], T0 + 1)
    assert [r.changed for r in again] == [False]
    events = await unsubscribed_events(store, at_least=2)
    assert sorted(e.queue_id for e in events) == sorted([prepared[0].id, prepared[2].id])
    # taken off the list by an operator, a later click counts again
    assert await store.remove_suppression("ada@example.net", "shop.example")
    [after] = await store.record_feedback([item(ids[1], "shop.example")], T0 + 2)
    assert after.changed
    assert len(await unsubscribed_events(store, at_least=3)) == 3


# -- serve, over HTTP ------------------------------------------------------------------------------


async def test_serve_sends_low_lane_mail_with_a_link_that_unsubscribes_over_http(
    tmp_path: Path, smtp_peer: SMTPPeer
) -> None:
    """[unsubscribe] url is all it takes: serve's worker adds the links, serve answers them,
    and the next message from that sender to the address is suppressed at enqueue."""
    http_port, smtp_port = free_port(), free_port()
    config = make_config(
        tmp_path,
        delivery={"relay": smtp_peer.url, "poll_interval": "100ms"},
        http={"listen": f"127.0.0.1:{http_port}"},
        smtp={"listen": f"127.0.0.1:{smtp_port}"},
        # the proxy would map https://mail.example/unsubscribe/TOKEN to /u/TOKEN; here serve
        # is the link's host itself (http is allowed to loopback)
        unsubscribe={"url": f"http://127.0.0.1:{http_port}/u", "lanes": ["low"]},
    )
    async with serve_in_process(config) as app:
        to = ["ada@example.net", "bob@example.net"]
        deals = Message(sender="news@shop.example", to=to, subject="d", text="b", lane=Lane.LOW)
        receipt = Message(sender="news@shop.example", to=to, subject="r", text="b")
        await app.send(deals)
        await app.send(receipt)
        deadline = time.monotonic() + 30
        while len(smtp_peer.handler.received) < 3:  # ada's and bob's deals, one receipt
            assert time.monotonic() < deadline, "the worker did not deliver"
            await asyncio.sleep(0.02)
        copies = {tuple(r.rcpt_tos): links_in(r.content) for r in smtp_peer.handler.received}
        assert copies[("ada@example.net", "bob@example.net")] == []  # the normal lane's
        [link] = copies[("ada@example.net",)]
        assert link.startswith(f"http://127.0.0.1:{http_port}/u/u-")
        async with httpx.AsyncClient() as client:
            assert (await client.get(link)).status_code == 200
            answer = await client.post(
                link, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
            )
            assert answer.status_code == 200
            metrics = (await client.get(f"http://127.0.0.1:{http_port}/metrics")).text
        assert 'postlane_feedback_total{source="unsubscribe",type="unsubscribed"} 1.0' in metrics
        again = await app.send(deals)
        states = {r.address: r.state for r in (await app.get(again.id)).recipients}
        assert states["ada@example.net"] is RecipientState.SUPPRESSED
        assert states["bob@example.net"] is not RecipientState.SUPPRESSED  # only ada left
