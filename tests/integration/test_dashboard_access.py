"""The dashboard's doors, through a real HTTP client (httpx over ASGI): who gets in, what a
forged form gets, what bad input gets. The pages themselves are tested in a browser
(tests/browser)."""

from __future__ import annotations

import re
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.auth import SESSION_COOKIE
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.ingest.door import FrontDoor
from postlane.message import Lane, RecipientState
from postlane.metrics import Metrics
from postlane.records import AttemptRecord, DestinationStatus, Outcome, Selector
from postlane.serve import build_app
from tests.conftest import make_config

TOKEN = "admin-t0ken-for-the-tests"
SEND_TOKEN = "send-t0ken-for-the-tests"


async def client_for(
    app: AsyncPostlane, host: str = "127.0.0.1"
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(FrontDoor(app.config, app)), client=(host, 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as client:
        yield client


@pytest.fixture
async def open_app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    async with AsyncPostlane(make_config(tmp_path), clock=clock) as app:
        yield app


@pytest.fixture
async def locked_app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    config = make_config(tmp_path, http={"tokens": [TOKEN], "send_tokens": [SEND_TOKEN]})
    async with AsyncPostlane(config, clock=clock) as app:
        yield app


def total_of(html: str) -> str:
    """The count a confirmation page asked about, as its form posts it back."""
    match = re.search(r'name="total" value="(\d+)"', html)
    assert match, "the page asks about no count"
    return match.group(1)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


async def test_without_tokens_only_loopback_clients_get_in(open_app: AsyncPostlane) -> None:
    async for local in client_for(open_app):
        page = await local.get("/")
        assert page.status_code == 200 and "Is mail flowing?" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert (await local.get("/ui/static/dashboard.js")).status_code == 200
    # DNS rebinding: a page of evil.example re-pointed at 127.0.0.1 connects from loopback,
    # but names itself in Host: no page, no CSRF token to steal, no action
    transport = httpx.ASGITransport(
        app=build_app(FrontDoor(open_app.config, open_app)), client=("127.0.0.1", 1)
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://evil.example") as rebound:
        for path in ("/", "/queue", "/suppressions", "/v1/stats"):
            page = await rebound.get(path)
            assert page.status_code == 403 and 'name="csrf"' not in page.text, path
        post = await rebound.post("/suppressions", data={"address": "a@example.net"})
        assert post.status_code == 403
    async for remote in client_for(open_app, host="203.0.113.9"):
        for path in ("/", "/queue", "/dlq"):
            assert (await remote.get(path)).status_code == 403
        post = await remote.post("/suppressions", data={"address": "a@example.net"})
        assert post.status_code == 403
    assert await open_app.suppressions() == []


async def test_an_admin_token_logs_in_and_nothing_else_does(locked_app: AsyncPostlane) -> None:
    async for client in client_for(locked_app):
        first = await client.get("/queue")
        assert first.status_code == 303 and first.headers["location"] == "/login?next=%2Fqueue"
        assert (await client.get("/login")).status_code == 200
        for wrong in ("nope", SEND_TOKEN, ""):
            refused = await client.post("/login", data={"token": wrong, "next": "/queue"})
            assert refused.status_code == 401 and "set-cookie" not in refused.headers
        ok = await client.post("/login", data={"token": TOKEN, "next": "/queue"})
        assert ok.status_code == 303 and ok.headers["location"] == "/queue"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert TOKEN.lower() not in cookie  # the cookie is derived from the token, not the token
        assert (await client.get("/queue")).status_code == 200
        # the next page is ours only: never a redirect to another site
        evil = await client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"})
        assert evil.headers["location"] == "/"
    async for script in client_for(locked_app):
        script.headers["Authorization"] = f"Bearer {TOKEN}"
        assert (await script.get("/dlq")).status_code == 200
        script.headers["Authorization"] = f"Bearer {SEND_TOKEN}"
        refused = await script.get("/dlq")  # a send token is not an admin, nor a guess
        assert refused.status_code == 403 and "never use the dashboard" in refused.text


async def test_with_send_tokens_alone_nobody_gets_in_not_even_locally(tmp_path: Path) -> None:
    """The API is locked for everyone then; so is the dashboard (a security audit deleted an
    application's message through it from this host, with no token at all)."""
    config = make_config(tmp_path, http={"send_tokens": [SEND_TOKEN]})
    async with AsyncPostlane(config) as app:
        async for local in client_for(app):
            page = await local.get("/queue")
            assert page.status_code == 403 and "needs an admin token" in page.text
            local.headers["Authorization"] = f"Bearer {SEND_TOKEN}"
            assert (await local.get("/queue")).status_code == 403


async def test_a_form_without_its_csrf_token_changes_nothing(open_app: AsyncPostlane) -> None:
    result = await open_app.send(
        sender="a@example.com", to=["b@example.net"], subject="s", text="t"
    )
    async for client in client_for(open_app):
        form = {"action": "hold", "ids": result.id, "back": "/queue"}
        forged = await client.post("/queue/action", data=form)
        assert forged.status_code == 403
        assert (await open_app.get(result.id)).recipients[0].state is RecipientState.QUEUED

        token = csrf_of((await client.get("/queue")).text)
        done = await client.post("/queue/action", data={**form, "csrf": token})
        assert done.status_code == 303
        assert done.headers["location"] == "/queue?done=held+1+recipient%28s%29"
        assert (await open_app.get(result.id)).recipients[0].state is RecipientState.HELD


async def test_bad_input_gets_a_page_saying_what_is_wrong(open_app: AsyncPostlane) -> None:
    async for client in client_for(open_app):
        token = csrf_of((await client.get("/suppressions")).text)
        bad_lane = await client.get("/queue?lane=urgent")
        assert bad_lane.status_code == 400 and "urgent" in bad_lane.text
        bad_age = await client.get("/queue?older_than=soon")
        assert bad_age.status_code == 400 and "older than" in bad_age.text
        missing = await client.get("/queue/06h2d8f54jxm527gfm")
        assert missing.status_code == 404 and "no message" in missing.text
        bad_action = await client.post("/queue/action", data={"action": "nuke", "csrf": token})
        assert bad_action.status_code == 400 and "nuke" in bad_action.text
        as_json = await client.post("/suppressions", json={"address": "a@example.net"})
        assert as_json.status_code == 400
        bad_address = await client.post(
            "/suppressions", data={"address": "not an address", "csrf": token}
        )
        assert bad_address.status_code == 400
        nothing = await client.post(
            "/queue/action", data={"action": "hold", "csrf": token, "back": "//evil.example"}
        )
        assert nothing.status_code == 303
        assert nothing.headers["location"].startswith("/?done=select+messages+first")
        for response in (bad_lane, bad_age, missing, bad_action, bad_address):
            assert "Traceback" not in response.text
    assert await open_app.suppressions() == []


async def test_the_suppression_form_adds_an_entry_for_some_lanes(open_app: AsyncPostlane) -> None:
    """An audit: narrowing an old unsubscribe to the bulk lanes, as unsubscribe.md tells, was
    possible from the command line and the API only."""
    async for client in client_for(open_app):
        page = await client.get("/suppressions")
        assert 'name="lanes" value="low"' in page.text
        token = csrf_of(page.text)
        form = {"address": "ada@example.net", "csrf": token, "reason": "unsubscribe"}
        added = await client.post("/suppressions", data={**form, "lanes": ["normal", "low"]})
        assert added.status_code == 303
        every = await client.post(
            "/suppressions", data={"address": "bob@example.net", "csrf": token}
        )
        assert every.status_code == 303
        bad = await client.post("/suppressions", data={**form, "lanes": ["urgent"]})
        assert bad.status_code == 400 and "urgent" in bad.text
    lanes = {s.address: s.lanes for s in await open_app.suppressions()}
    assert lanes == {"ada@example.net": (Lane.NORMAL, Lane.LOW), "bob@example.net": None}


async def test_an_address_is_found_on_a_suppression_list_past_its_first_page(
    open_app: AsyncPostlane,
) -> None:
    """A scale audit: the page showed the newest 1,000 entries, with no way to find an older
    one to lift, and sent the operator to a command that does not list them all."""
    await open_app.suppress("old@example.net", reason="hard_bounce")
    await open_app.suppress("old@example.net", reason="unsubscribe", lanes=["low"])
    await open_app.suppress("new@example.net")
    async for client in client_for(open_app):
        found = await client.get("/suppressions", params={"address": "OLD@example.net"})
        assert found.status_code == 200
        assert found.text.count('data-address="old@example.net"') == 2
        assert 'data-address="new@example.net"' not in found.text
        assert "2 entries for OLD@example.net" in found.text
        page = await client.get("/suppressions")
        assert 'data-address="new@example.net"' in page.text and "lists them all" not in page.text


async def test_the_dashboard_can_be_turned_off(tmp_path: Path) -> None:
    config = make_config(tmp_path, http={"dashboard": False})
    async with AsyncPostlane(config) as app:
        async for client in client_for(app):
            off = await client.get("/")
            assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"
            assert (await client.get("/v1/stats")).status_code == 200  # the API stays


# -- audit finding 11: login guessing, sessions ----------------------------------------------


async def test_finding_11_login_guessing_is_slowed_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit made 5,966 wrong /login tries in 5 s. Now: a handful are looked at, the rest
    are 429 with Retry-After, one summary line is logged (never a token), and /metrics counts."""
    config = make_config(tmp_path, http={"tokens": [TOKEN]})
    async with AsyncPostlane(config) as app:  # the real clock: real seconds
        asgi = build_app(FrontDoor(config, app, Metrics(app)))
        transport = httpx.ASGITransport(app=asgi, client=("203.0.113.9", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://postlane") as c:
            answers: Counter[int] = Counter()
            started = time.monotonic()
            while time.monotonic() - started < 5.0:
                guess = f"guess-{answers.total():08d}-xxxxxxxx"
                r = await c.post("/login", data={"token": guess, "next": "/"})
                answers[r.status_code] += 1
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1 and "try again" in r.text
            looked_at = answers[401]
            print(
                f"\n{answers.total()} tries in 5 s, {looked_at} looked at ({looked_at / 5:.1f}/s)"
            )
            assert set(answers) == {401, 429}
            assert looked_at <= 8  # 5 free, then after 1 s, after 2 more (4 more is past 5 s)
            right = await c.post("/login", data={"token": TOKEN, "next": "/"})
            assert right.status_code == 429  # while it waits, not even the right token is read
            metrics = (await c.get("/metrics")).text
            assert f'postlane_http_auth_failures_total{{door="login"}} {looked_at}.0' in metrics
            assert 'postlane_http_auth_throttled_total{door="login"}' in metrics
        other = httpx.ASGITransport(app=asgi, client=("198.51.100.4", 5555))
        async with httpx.AsyncClient(transport=other, base_url="http://postlane") as elsewhere:
            ok = await elsewhere.post("/login", data={"token": TOKEN, "next": "/"})
            assert ok.status_code == 303  # the operator at another address is not locked out
    lines = [r.getMessage() for r in caplog.records if r.name == "postlane.auth"]
    assert len(lines) == 1 and "203.0.113.9" in lines[0] and "failed attempt" in lines[0]
    assert "guess-" not in " ".join(lines) and TOKEN not in " ".join(lines)


async def test_processes_of_one_store_share_forms_and_logouts(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Two apps on one SQLite file, as two processes of ``serve --processes 2`` are: a form one
    renders posts to the other, a logout at one is refused by the other, and a form rendered
    before a restart still posts after it."""
    config = make_config(tmp_path, http={"tokens": [TOKEN]})
    async with AsyncPostlane(config, clock=clock) as one, AsyncPostlane(config, clock=clock) as two:
        result = await one.send(sender="a@example.com", to=["b@example.net"], text="hi")
        form = {"action": "hold", "ids": result.id, "back": "/queue"}
        async for first in client_for(one):
            async for second in client_for(two):
                login = await first.post("/login", data={"token": TOKEN, "next": "/queue"})
                second.cookies.set(SESSION_COOKIE, login.cookies[SESSION_COOKIE])
                token = csrf_of((await first.get("/queue")).text)
                held = await second.post("/queue/action", data={**form, "csrf": token})
                assert held.status_code == 303, held.text
                assert (await two.get(result.id)).recipients[0].state is RecipientState.HELD

                out = await first.post("/logout", data={"csrf": token})
                assert out.status_code == 303
                refused = await second.get("/queue")
                assert refused.status_code == 303
                assert refused.headers["location"].startswith("/login")

                kept = await first.post("/login", data={"token": TOKEN, "next": "/queue"})
                kept_cookie = kept.cookies[SESSION_COOKIE]
                kept_token = csrf_of((await first.get("/queue")).text)
    async with AsyncPostlane(config, clock=clock) as restarted:
        async for client in client_for(restarted):
            client.cookies.set(SESSION_COOKIE, kept_cookie)
            release = {**form, "action": "release", "csrf": kept_token}
            released = await client.post("/queue/action", data=release)
            assert released.status_code == 303, released.text
        assert (await restarted.get(result.id)).recipients[0].state is RecipientState.QUEUED


async def test_finding_11_a_session_ends_at_logout_and_after_its_lifetime(
    locked_app: AsyncPostlane, clock: FakeClock
) -> None:
    async for client in client_for(locked_app):
        login = await client.post("/login", data={"token": TOKEN, "next": "/queue"})
        cookie = login.cookies[SESSION_COOKIE]
        assert "max-age=43200" in login.headers["set-cookie"].lower()
        page = await client.get("/queue")
        assert page.status_code == 200
        out = await client.post("/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        client.cookies.set(SESSION_COOKIE, cookie)  # the cookie kept (copied, stolen) after it
        again = await client.get("/queue")
        assert again.status_code == 303 and again.headers["location"].startswith("/login")

        client.cookies.clear()
        await client.post("/login", data={"token": TOKEN, "next": "/"})
        assert (await client.get("/queue")).status_code == 200
        await clock.advance(12 * 3600 - 10)
        assert (await client.get("/queue")).status_code == 200
        await clock.advance(20)  # twelve hours after the login, however busy
        expired = await client.get("/queue")
        assert expired.status_code == 303 and expired.headers["location"].startswith("/login")


async def test_requeueing_suppressed_dead_letters_offers_to_lift_their_suppression(
    open_app: AsyncPostlane,
) -> None:
    """Requeued as they are, dead letters whose addresses are suppressed would never be tried:
    the confirmation says so and offers to lift the suppression (as ``dlq requeue
    --unsuppress`` does); a plain requeue is refused, changing nothing."""
    result = await open_app.send(sender="a@example.com", to=["gone@example.net"], text="x")
    now = open_app.clock.now()
    lanes = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]
    [claimed] = await open_app.store.claim_due("w", lanes, limit=10, now=now, lease_until=now + 60)
    bounce = AttemptRecord(
        now, ReplyClass.HARD_BOUNCE, 550, "5.1.1", "550 no such user", "mx", "x", 5
    )
    outcomes = [Outcome(d.id, RecipientState.DEAD, 1, 0, None, bounce) for d in claimed.deliveries]
    await open_app.store.record("w", outcomes, now)
    await open_app.suppress("gone@example.net", reason="hard bounce")
    form = {"action": "requeue", "ids": result.id, "back": "/dlq"}
    async for client in client_for(open_app):
        token = csrf_of((await client.get("/dlq")).text)
        confirm = await client.post("/queue/action", data={**form, "csrf": token})
        assert confirm.status_code == 200
        assert "on the suppression list" in confirm.text and "gone@example.net" in confirm.text
        assert 'name="unsuppress" value="1"' in confirm.text
        form["total"] = total_of(confirm.text)  # what the confirmation's form carries

        plain = await client.post("/queue/action", data={**form, "csrf": token, "confirm": "1"})
        assert plain.status_code == 400 and "nothing was requeued" in plain.text
        assert (await open_app.get(result.id)).recipients[0].state is RecipientState.DEAD

        lifted = {**form, "csrf": token, "confirm": "1", "unsuppress": "1"}
        done = await client.post("/queue/action", data=lifted)
        assert done.status_code == 303
        assert "requeued+1+recipient" in done.headers["location"]
        assert "1+address%28es%29+taken+off+the+suppression+list" in done.headers["location"]
    assert (await open_app.get(result.id)).recipients[0].state is RecipientState.QUEUED
    assert await open_app.suppressions() == []


async def test_deleting_from_a_messages_own_page_goes_back_to_the_queue(
    open_app: AsyncPostlane,
) -> None:
    """A dashboard audit: deleting from a message's page landed on its page again, now "Cannot
    do that: no message with id ..." under the note saying it was deleted."""
    gone = await open_app.send(sender="a@example.com", to=["b@example.net"], text="t")
    kept = await open_app.send(sender="a@example.com", to=["c@example.net"], text="t")
    async for client in client_for(open_app):
        token = csrf_of((await client.get(f"/queue/{gone.id}")).text)
        form = {"ids": gone.id, "back": f"/queue/{gone.id}", "csrf": token}
        asked = await client.post("/queue/action", data={**form, "action": "delete"})
        form |= {"confirm": "1", "total": total_of(asked.text)}
        done = await client.post("/queue/action", data={**form, "action": "delete"})
        assert done.status_code == 303
        assert done.headers["location"] == "/queue?done=deleted+1+recipient%28s%29"
        # a message still there is gone back to, as before
        form = {"ids": kept.id, "back": f"/queue/{kept.id}", "csrf": token}
        done = await client.post("/queue/action", data={**form, "action": "hold"})
        assert done.headers["location"] == f"/queue/{kept.id}?done=held+1+recipient%28s%29"


async def test_lifting_a_destination_says_whether_anything_was_held(
    open_app: AsyncPostlane,
) -> None:
    """A dashboard audit: "Lift pause" said "lifted the pause ... on no-such-destination" for
    any name typed, and never how many recipients it made due."""
    await open_app.store.save_destination_states(
        [DestinationStatus("down.example", None, None, 1e12, "3 connection failure(s)")]
    )
    async for client in client_for(open_app):
        token = csrf_of((await client.get("/destinations")).text)
        for name, said in (
            ("no-such.example", "no-such.example was neither paused nor slowed down"),
            ("down.example", "lifted the pause and slow-down on down.example: 0 recipient(s) due"),
        ):
            done = await client.post(
                "/destinations/lift", data={"destination": name, "csrf": token}
            )
            assert done.status_code == 303
            note = urllib.parse.parse_qs(urllib.parse.urlsplit(done.headers["location"]).query)
            assert note["done"][0].startswith(said), note


async def test_a_delete_confirmed_for_some_recipients_deletes_no_more(
    open_app: AsyncPostlane,
) -> None:
    """A dashboard audit: "Delete 30 recipient(s)?" was confirmed after 70 more had arrived
    matching the filter, and 100 were deleted. What changed since it was counted is asked
    about again; nothing is deleted unseen."""
    for i in range(3):
        await open_app.send(sender="a@example.com", to=[f"u{i}@race.example"], text="t")
    async for client in client_for(open_app):
        token = csrf_of((await client.get("/queue")).text)
        form = {"action": "delete", "all": "1", "domain": "race.example", "back": "/queue"}
        asked = await client.post("/queue/action", data={**form, "csrf": token})
        assert "Delete 3 recipient(s)?" in asked.text
        counted = total_of(asked.text)
        for i in range(7):  # more mail matching the filter arrives meanwhile
            await open_app.send(sender="a@example.com", to=[f"v{i}@race.example"], text="t")
        confirmed = {**form, "csrf": token, "confirm": "1", "export": "0", "total": counted}
        again = await client.post("/queue/action", data=confirmed)
        assert again.status_code == 200 and "Delete 10 recipient(s)?" in again.text
        assert "The selection changed since it was counted" in again.text
        assert len(await open_app.messages()) == 10  # nothing deleted
        confirmed["total"] = total_of(again.text)
        done = await client.post("/queue/action", data=confirmed)
        assert done.status_code == 303 and "deleted+10+recipient" in done.headers["location"]


async def test_a_dead_letter_group_older_than_the_newest_of_its_kind_can_be_requeued(
    open_app: AsyncPostlane, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard audit: behind 10,050 newer dead letters of the same class and domain, an
    older group was listed with its 100 but "empty now" when requeued (only the newest 10,000
    of the class and domain were read). Here the limit is made 4."""
    from postlane.dashboard import groups

    monkeypatch.setattr(groups, "GROUP_LIMIT", 4)
    lanes = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]

    async def dead(count: int, reply: str) -> list[str]:
        ids = []
        for i in range(count):
            result = await open_app.send(
                sender="a@example.com", to=[f"u{len(reply)}{i}@refuse.example"], text="x"
            )
            ids.append(result.id)
        now = clock.now()
        claimed = await open_app.store.claim_due("w", lanes, limit=100, now=now,
                                                 lease_until=now + 60)  # fmt: skip
        block = AttemptRecord(now, ReplyClass.POLICY_BLOCK, 554, "5.7.1", reply, "mx", "x", 5)
        outcomes = [
            Outcome(d.id, RecipientState.DEAD, 1, 0, None, block)
            for m in claimed
            for d in m.deliveries
        ]
        await open_app.store.record("w", outcomes, now)
        await clock.advance(60)
        return ids

    old = await dead(3, "554 5.7.1 blocked using zen.spamhaus.org")
    await dead(6, "554 5.7.1 rejected by policy")  # newer, more of them than the limit
    [older] = [g for g in await open_app.dead_groups(Selector()) if "spamhaus" in g.reply]
    form = {"action": "requeue", "group": groups.key_of_group(older), "back": "/dlq",
            "domain": "refuse.example", "class": "policy_block"}  # fmt: skip
    async for client in client_for(open_app):
        token = csrf_of((await client.get("/dlq")).text)
        asked = await client.post("/queue/action", data={**form, "csrf": token})
        assert asked.status_code == 200 and "Requeue 3 recipient(s)?" in asked.text, asked.text
        confirmed = {**form, "csrf": token, "confirm": "1", "total": total_of(asked.text)}
        done = await client.post("/queue/action", data=confirmed)
        assert "requeued+3+recipient" in done.headers["location"]
    for queue_id in old:
        assert (await open_app.get(queue_id)).recipients[0].state is RecipientState.QUEUED
