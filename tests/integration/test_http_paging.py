"""Paging the HTTP API's listings (/v1/messages, /v1/queue, /v1/dlq, /v1/suppressions) with a
cursor, through a real HTTP client on SQLite and PostgreSQL: every entry once, in the listing's
order, whatever is added between two pages; the last page has no next; a cursor the listing did
not give is a 400."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.message import Lane, RecipientState
from postlane.records import AttemptRecord, Outcome
from tests.conftest import api_client, make_config, postgres_schema

TOKEN = "t0ken-for-the-paging-tests"
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]
PAGED = ["/v1/messages", "/v1/queue", "/v1/dlq", "/v1/suppressions"]
#: numbers for addresses no other message of a test uses
NUMBERS = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
async def app(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[AsyncPostlane]:
    async with contextlib.AsyncExitStack() as stack:
        sections: dict[str, Any] = {"http": {"tokens": [TOKEN]}}
        if request.param == "postgres":
            sections["store"] = {"url": await stack.enter_async_context(postgres_schema())}
        config = make_config(tmp_path, **sections)
        yield await stack.enter_async_context(AsyncPostlane(config, clock=clock))


@pytest.fixture
async def client(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app, TOKEN) as c:
        yield c


async def send(app: AsyncPostlane, n: int, *, lane: str = "normal", to: int = 1) -> list[str]:
    """``n`` messages of ``to`` recipients each; their ids in arrival order."""
    ids = []
    for _ in range(n):
        result = await app.send(
            sender="app@example.com",
            to=[f"r{next(NUMBERS)}@example.net" for _ in range(to)],
            subject="s",
            text="t",
            lane=lane,
        )
        ids.append(result.id)
    return ids


async def kill(app: AsyncPostlane, n: int, *, to: int = 1) -> None:
    """``n`` new messages whose every recipient is dead-lettered now (one death time)."""
    await send(app, n, to=to)
    now = app.clock.now()
    claimed = await app.store.claim_due("w", ALL_LANES, limit=1000, now=now, lease_until=now + 60)
    attempt = AttemptRecord(
        now, ReplyClass.HARD_BOUNCE, 550, "5.1.1", "550 5.1.1 no such user", "smtp://r:25", "x", 7
    )
    outcomes = [
        Outcome(d.id, RecipientState.DEAD, 1, 0, None, attempt)
        for m in claimed
        for d in m.deliveries
    ]
    await app.store.record("w", outcomes, now)


def next_link(response: httpx.Response) -> str | None:
    """The next page's URL from ``Link``, checked against ``X-Next-Cursor``: both or neither."""
    link = response.links.get("next")
    cursor = response.headers.get("x-next-cursor")
    assert (link is None) == (cursor is None), response.headers
    if link is None:
        return None
    url = httpx.URL(link["url"])
    assert url.params["cursor"] == cursor
    return link["url"]


async def walk(
    client: httpx.AsyncClient,
    path: str,
    params: dict[str, Any],
    between: Any = None,
) -> list[list[Any]]:
    """Every page from the first, following ``Link: rel="next"``; ``between()`` runs before
    each next page is asked for."""
    pages = []
    url: str | None = path
    first = True
    while url is not None:
        response = await client.get(url, params=params if first else None)
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), list)  # the listing's shape, as before paging
        pages.append(response.json())
        first = False
        url = next_link(response)
        if url is not None and between is not None:
            await between()
    return pages


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/queue"])
async def test_messages_page_in_arrival_order_and_new_mail_between_pages_is_read_once(
    client: httpx.AsyncClient, app: AsyncPostlane, path: str
) -> None:
    ids = await send(app, 10, to=2)  # 20 recipients: pages are messages, not recipients
    added: list[str] = []

    async def enqueue_one() -> None:
        added.extend(await send(app, 1))

    pages = await walk(client, path, {"limit": 3}, between=enqueue_one)
    seen = [m["id"] for page in pages for m in page]
    assert all(len(page) <= 3 for page in pages)
    assert [len(page) for page in pages[:3]] == [3, 3, 3]
    assert seen[:10] == ids  # nothing skipped, nothing repeated, in arrival order
    assert seen == ids + added[: len(seen) - 10]  # the new mail comes after, once each
    assert len(set(seen)) == len(seen)
    assert all(len(m["recipients"]) == 2 for page in pages for m in page if m["id"] in ids)


async def test_a_message_walk_keeps_its_selector_in_the_next_link(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    low = []
    for _ in range(4):
        low += await send(app, 2, lane="low")
        await send(app, 1, lane="high")
    first = await client.get("/v1/messages", params={"lane": "low", "limit": 3})
    link = next_link(first)
    assert link is not None and httpx.URL(link).params["lane"] == "low"
    pages = await walk(client, "/v1/messages", {"lane": "low", "limit": 3})
    assert [m["id"] for page in pages for m in page] == low
    assert [len(page) for page in pages] == [3, 3, 2]


async def test_dead_letters_page_newest_first_and_new_deaths_do_not_disturb_a_walk(
    client: httpx.AsyncClient, app: AsyncPostlane, clock: FakeClock
) -> None:
    for count in (4, 3, 4):  # several deaths share a time: a page boundary falls among them
        await kill(app, count)
        clock.set(clock.now() + 60)
    everything = (await client.get("/v1/dlq", params={"limit": 1000})).json()
    assert len(everything) == 11

    async def another_death() -> None:
        clock.set(clock.now() + 60)
        await kill(app, 1)

    pages = await walk(client, "/v1/dlq", {"limit": 3}, between=another_death)
    assert [len(page) for page in pages] == [3, 3, 3, 2]
    walked = [page_row for page in pages for page_row in page]
    assert walked == everything  # the newest deaths came before the cursor: not listed again
    keys = [(row["id"], row["address"]) for row in walked]
    assert len(set(keys)) == len(keys)
    assert len((await client.get("/v1/dlq", params={"limit": 1000})).json()) == 14


async def test_dead_letter_pages_follow_the_selector(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    await kill(app, 5, to=2)
    everything = (await client.get("/v1/dlq", params={"class": "hard_bounce"})).json()
    pages = await walk(client, "/v1/dlq", {"class": "hard_bounce", "limit": 4})
    assert [len(page) for page in pages] == [4, 4, 2]
    assert [row for page in pages for row in page] == everything
    assert await walk(client, "/v1/dlq", {"class": "policy_block", "limit": 4}) == [[]]


async def test_suppressions_page_newest_first_and_entries_added_between_pages_are_not_repeated(
    client: httpx.AsyncClient, app: AsyncPostlane, clock: FakeClock
) -> None:
    for i in range(10):
        if i % 4 == 0:
            clock.set(clock.now() + 60)  # a few entries share each time
        scope = "shop.example" if i % 3 == 0 else None
        await app.suppress(f"s{i}@example.net", scope=scope)
    await app.suppress("s1@example.net", scope="news.example")  # one address in two scopes
    everything = (await client.get("/v1/suppressions")).json()
    assert len(everything) == 11

    async def suppress_another() -> None:
        await app.suppress(f"new{next(NUMBERS)}@example.net")
        clock.set(clock.now() + 1)

    pages = await walk(client, "/v1/suppressions", {"limit": 3}, between=suppress_another)
    assert [len(page) for page in pages] == [3, 3, 3, 2]
    assert [entry for page in pages for entry in page] == everything
    assert len((await client.get("/v1/suppressions")).json()) == 14


@pytest.mark.parametrize("path", PAGED)
async def test_the_last_page_says_there_is_no_next(
    client: httpx.AsyncClient, app: AsyncPostlane, path: str
) -> None:
    empty = await client.get(path, params={"limit": 3})
    assert empty.json() == [] and next_link(empty) is None
    if path == "/v1/dlq":
        await kill(app, 3)
    elif path == "/v1/suppressions":
        for i in range(3):
            await app.suppress(f"s{i}@example.net")
    else:
        await send(app, 3)
    exactly = await client.get(path, params={"limit": 3})  # a full page, and nothing after it
    assert len(exactly.json()) == 3 and next_link(exactly) is None
    assert "link" not in exactly.headers and "x-next-cursor" not in exactly.headers
    two = await client.get(path, params={"limit": 2})
    following = next_link(two)
    assert following is not None
    last = await client.get(following)
    assert len(last.json()) == 1 and next_link(last) is None


def _cursor(*values: Any) -> str:
    raw = json.dumps(list(values)).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


MALFORMED = [
    "",
    "x",
    "not a cursor!",
    "%%%",
    "A" * 5000,
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    _cursor(),
    _cursor("m"),
    _cursor("m", -1),
    _cursor("m", True),
    _cursor("m", 1.5),
    _cursor("m", 2**64),
    _cursor("m", "1"),
    _cursor("m", 1, 2),
    _cursor("d", 1.0),
    _cursor("d", "soon", 1),
    _cursor("s", 1.0, "a@example.net"),
    _cursor("s", 1.0, "a" * 600, "*"),
    base64.urlsafe_b64encode(b'["d", NaN, 1]').decode(),
    base64.urlsafe_b64encode(b'["d", Infinity, 1]').decode(),
    base64.urlsafe_b64encode(b'{"m": 1}').decode(),
    _cursor("q", 1),
]


@pytest.mark.parametrize("path", PAGED)
@pytest.mark.parametrize("cursor", MALFORMED, ids=range(len(MALFORMED)))
async def test_a_malformed_cursor_is_a_400_naming_the_field(
    client: httpx.AsyncClient, app: AsyncPostlane, path: str, cursor: str
) -> None:
    await send(app, 1)
    r = await client.get(path, params={"cursor": cursor})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "invalid_field" and "cursor" in error["message"]


async def test_a_cursor_of_another_listing_is_refused(
    client: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    await kill(app, 3)
    await send(app, 3)
    for i in range(3):
        await app.suppress(f"s{i}@example.net")
    cursors = {}
    for path in ("/v1/messages", "/v1/dlq", "/v1/suppressions"):
        response = await client.get(path, params={"limit": 1})
        cursors[path] = response.headers["x-next-cursor"]
    for path, cursor in cursors.items():
        for other in ("/v1/messages", "/v1/dlq", "/v1/suppressions"):
            r = await client.get(other, params={"limit": 1, "cursor": cursor})
            assert r.status_code == (200 if other == path else 400), (path, other, r.text)
    # /v1/queue is the same listing as /v1/messages: their cursors go together
    r = await client.get("/v1/queue", params={"limit": 1, "cursor": cursors["/v1/messages"]})
    assert r.status_code == 200
    # the groups are not paged: a cursor there is an unknown field, not silently ignored
    r = await client.get("/v1/dlq/groups", params={"cursor": cursors["/v1/dlq"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"


async def test_suppressions_take_a_limit(client: httpx.AsyncClient, app: AsyncPostlane) -> None:
    for i in range(3):
        await app.suppress(f"s{i}@example.net")
    assert len((await client.get("/v1/suppressions", params={"limit": 2})).json()) == 2
    for limit in ("0", "10001", "x", "²"):
        r = await client.get("/v1/suppressions", params={"limit": limit})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_field"


async def test_the_api_describes_the_cursor_and_the_next_page_headers(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    for path in PAGED:
        operation = document["paths"][path]["get"]
        assert "cursor" in [p["name"] for p in operation["parameters"]], path
        assert {"Link", "X-Next-Cursor"} <= set(operation["responses"]["200"]["headers"]), path
    groups = document["paths"]["/v1/dlq/groups"]["get"]
    assert "cursor" not in [p["name"] for p in groups["parameters"]]
