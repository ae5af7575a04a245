"""What the outside audit broke over HTTP, each test named after its finding: cross-site writes
(1), input that broke later reads (5), store faults (6), NUL bytes (12), empty bodies (17.7).

Through real clients: httpx over ASGI for the API's answers, a real SQLite file corrupted under
a running application, and the installed ``postlane`` script for the CLI's side of the rule."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postlane.app import AsyncPostlane
from postlane.clock import FakeClock
from postlane.ingest.door import FrontDoor
from postlane.metrics import Metrics
from postlane.serve import build_app
from tests.conftest import make_config
from tests.processes import clean_environment

MESSAGE = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[AsyncPostlane]:
    """The default configuration: no token, so the API answers local clients only."""
    async with AsyncPostlane(make_config(tmp_path), clock=clock) as postlane:
        yield postlane


@pytest.fixture
async def local(app: AsyncPostlane) -> AsyncIterator[httpx.AsyncClient]:
    """A client on this machine addressing the server as 127.0.0.1 (what a local page's
    fetch() also is: the Host check lets it in; only what the browser says keeps it out)."""
    transport = httpx.ASGITransport(app=build_app(FrontDoor(app.config, app, Metrics(app))))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as client:
        yield client


async def waiting(app: AsyncPostlane) -> int:
    return len(await app.messages())


# -- finding 1: cross-site writes ------------------------------------------------------------------

#: what the audit's page sent: "simple" requests a browser makes without asking first
SIMPLE_WRITES = [
    ("/v1/messages", MESSAGE),
    ("/v1/queue/delete", {"all": True}),
    ("/v1/suppressions", {"address": "victim@example.net", "reason": "x"}),
    ("/v1/messages/batch", {"messages": [MESSAGE]}),
    ("/v1/dlq/purge", {"all": True}),
]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None],
)
@pytest.mark.parametrize(("path", "body"), SIMPLE_WRITES, ids=[p for p, _ in SIMPLE_WRITES])
async def test_finding_1_a_json_endpoint_refuses_what_a_page_can_post_without_asking(
    local: httpx.AsyncClient,
    app: AsyncPostlane,
    path: str,
    body: dict[str, Any],
    content_type: str | None,
) -> None:
    await app.send(**{"sender": "a@example.com", "to": ["keep@example.net"], "text": "keep me"})
    headers = {"Content-Type": content_type} if content_type else {}
    r = await local.post(path, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["error"]["message"]
    assert await waiting(app) == 1  # nothing enqueued, nothing deleted
    assert await app.suppressions() == []


async def test_finding_1_the_import_takes_json_lines_only(local: httpx.AsyncClient) -> None:
    r = await local.post(
        "/v1/queue/import", content=b"{}\n", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and "application/x-ndjson" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "said",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9999"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port of 127.0.0.1 is the same *site*
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:8025"},
    ],
)
async def test_finding_1_a_request_a_browser_says_comes_from_another_site_is_refused(
    local: httpx.AsyncClient, app: AsyncPostlane, said: dict[str, str]
) -> None:
    for path, body in SIMPLE_WRITES:
        r = await local.post(path, json=body, headers=said)  # even as JSON (after a preflight)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "cross_site"
    assert (await local.get("/v1/stats", headers=said)).status_code == 403
    assert (await local.delete("/v1/suppressions/a@example.net", headers=said)).status_code == 403
    assert (await local.get("/healthz", headers=said)).status_code == 200  # probes stay open
    assert await waiting(app) == 0 and await app.suppressions() == []


@pytest.mark.parametrize(
    "said",
    [
        {},  # a script, curl, postlane.Client, the Django backend: no browser headers at all
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8025"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
        {"Origin": "http://127.0.0.1:8025"},  # an older browser, same origin
    ],
)
async def test_finding_1_programs_and_the_same_origin_still_get_in(
    local: httpx.AsyncClient, app: AsyncPostlane, said: dict[str, str]
) -> None:
    r = await local.post("/v1/messages", json=MESSAGE, headers=said)
    assert r.status_code == 202, r.text
    r = await local.post("/v1/suppressions", json={"address": "v@example.net"}, headers=said)
    assert r.status_code == 201, r.text


async def test_finding_1_the_dashboards_forms_refuse_another_sites_posts(
    local: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    page = await local.get("/suppressions")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    form = {"address": "victim@example.net", "csrf": csrf}
    forged = await local.post("/suppressions", data=form, headers={"Sec-Fetch-Site": "same-site"})
    assert forged.status_code == 403
    assert await app.suppressions() == []
    ours = await local.post(
        "/suppressions",
        data=form,
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8025"},
    )
    assert ours.status_code == 303
    assert [s.address for s in await app.suppressions()] == ["victim@example.net"]


# -- finding 5: accepted input that broke later reads, and 500s --------------------------------

#: raw bodies as the audit sent them: each was stored (202) then broke reads, or was a 500
BROKEN_BODIES = {
    "metadata NaN": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"n": NaN}}',
    "metadata Infinity": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"n": -Infinity}}',
    "metadata 1e999": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"n": 1e999}}',
    "metadata huge integer": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"n": ' + "9" * 5000 + "}}",
    "metadata lone surrogate": '{"from": "a@example.com", "to": ["b@example.net"], '
    '"text": "x", "metadata": {"n": "\\ud800"}}',
    "metadata key lone surrogate": '{"from": "a@example.com", "to": ["b@example.net"], '
    '"text": "x", "metadata": {"\\udc00": 1}}',
    "subject lone surrogate": '{"from": "a@example.com", "to": ["b@example.net"], '
    '"subject": "\\ud83d", "text": "x"}',
    "text lone surrogate": '{"from": "a@example.com", "to": ["b@example.net"], '
    '"text": "a\\udfffb"}',
    "raw lone surrogate": '{"raw": "Subject: s\\r\\n\\r\\n\\ud800", "from": "a@example.com", '
    '"to": ["b@example.net"]}',
    "100k-deep nesting": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"d": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    "metadata 40 deep": '{"from": "a@example.com", "to": ["b@example.net"], "text": "x", '
    '"metadata": {"d": ' + "[" * 40 + "]" * 40 + "}}",
}


@pytest.mark.parametrize("body", list(BROKEN_BODIES.values()), ids=list(BROKEN_BODIES))
async def test_finding_5_input_that_would_break_later_reads_is_refused_and_nothing_stored(
    app: AsyncPostlane, body: str
) -> None:
    config = make_config(app.config.base_dir, smtp={"max_size": "1MB"})
    transport = httpx.ASGITransport(app=build_app(FrontDoor(config, app, Metrics(app))))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as c:
        r = await c.post("/v1/messages", content=body.encode(), headers=JSON)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["code"] in ("invalid_json", "invalid_message")
        batch = '{"messages": [' + body + "]}"
        r = await c.post("/v1/messages/batch", content=batch.encode(), headers=JSON)
        if r.status_code == 207:  # a batch refuses an item on its own, in its result
            assert r.json()["accepted"] == 0 and r.json()["results"][0]["error"]["code"]
        else:
            assert 400 <= r.status_code < 500, r.text
        assert (await c.get("/v1/queue")).status_code == 200
    assert await waiting(app) == 0


async def test_finding_5_a_suppression_reason_with_a_lone_surrogate_is_a_400(
    local: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    body = b'{"address": "a@example.net", "reason": "\\ud800"}'
    r = await local.post("/v1/suppressions", content=body, headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    deep = b'{"address": "a@example.net", "reason": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    r = await local.post("/v1/suppressions", content=deep, headers=JSON)
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"]
    assert await app.suppressions() == []


async def test_finding_5_what_an_older_version_stored_is_still_readable(
    local: httpx.AsyncClient, app: AsyncPostlane
) -> None:
    """A NaN stored before this fix: the queue and the message still answer (as null)."""
    from postlane.message import Message, prepare

    prepared = prepare(Message("a@example.com", ["b@example.net"], text="x"), max_size=10**6)
    stored = dataclass_replace(prepared, metadata={"n": float("nan"), "s": "\ud800"})
    [result] = await app.send_prepared([stored])
    listed = await local.get("/v1/queue")
    assert listed.status_code == 200 and listed.json()[0]["metadata"]["n"] is None
    shown = await local.get(f"/v1/messages/{result.id}")
    assert shown.status_code == 200 and shown.json()["metadata"] == {"n": None, "s": "\ud800"}


def dataclass_replace(value: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(value, **changes)


# -- finding 12: NUL bytes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/messages", {**MESSAGE, "text": "a\x00b"}, "text"),
        ("/v1/messages", {**MESSAGE, "html": "<p>\x00</p>"}, "html"),
        ("/v1/messages", {**MESSAGE, "metadata": {"k": "v\x00"}}, "metadata"),
        ("/v1/messages", {**MESSAGE, "metadata": {"k\x00": "v"}}, "metadata"),
        (
            "/v1/messages",
            {"raw": "Subject: s\r\n\r\nbo\x00dy\r\n", "from": "a@example.com", "to": ["b@x.net"]},
            "raw",
        ),
        ("/v1/suppressions", {"address": "a@example.net", "reason": "r\x00"}, "reason"),
    ],
)
async def test_finding_12_nul_bytes_are_refused_like_other_bad_fields(
    local: httpx.AsyncClient, app: AsyncPostlane, path: str, body: dict[str, Any], field: str
) -> None:
    r = await local.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_message" and field in error["message"]
    assert "NUL" in error["message"]
    assert await waiting(app) == 0 and await app.suppressions() == []


# -- finding 6: store faults are 503 with Retry-After, and /readyz says so -----------------------


def corrupt(path: Path) -> None:
    """Overwrite every page but the first few with garbage, as a failing disk would."""
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(8 * page, len(data) - page, page):
        data[start + 8 : start + page] = b"\xa5" * (page - 8)
    path.write_bytes(bytes(data))


async def test_finding_6_a_corrupted_database_is_503_with_retry_after_and_not_ready(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    db = tmp_path / "postlane.db"
    async with AsyncPostlane(config, clock=clock) as seeding:
        for n in range(200):
            await seeding.send(sender="a@example.com", to=[f"u{n}@example.net"], text="x" * 500)
    async with AsyncPostlane(config, clock=clock) as app:
        transport = httpx.ASGITransport(
            app=build_app(FrontDoor(config, app, Metrics(app))), raise_app_exceptions=False
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as c:
            assert (await c.get("/readyz")).status_code == 200
            queue_id = (await c.get("/v1/queue", params={"limit": 1})).json()[0]["id"]
            corrupt(db)  # under the running application

            answers = {}
            for method, path, body in [
                ("POST", "/v1/messages", MESSAGE),
                ("POST", "/v1/messages/batch", {"messages": [MESSAGE]}),
                ("GET", "/v1/queue", None),
                ("GET", f"/v1/messages/{queue_id}", None),
                ("GET", "/v1/stats", None),
                ("GET", "/v1/dlq", None),
                ("POST", "/v1/queue/hold", {"all": True}),
                ("POST", "/v1/suppressions", {"address": "a@example.net"}),
            ]:
                r = await c.request(method, path, json=body)
                answers[path] = r.status_code
                if r.status_code < 300:  # pages still whole may still be read
                    continue
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "store_unavailable", path
                assert int(r.headers["retry-after"]) > 0, path
            assert answers["/v1/messages"] == answers["/v1/queue"] == 503, answers
            for page in ("/", "/queue", "/dlq", "/suppressions", f"/queue/{queue_id}"):
                r = await c.get(page)
                assert r.status_code in (200, 503), (page, r.status_code)
                assert "Traceback" not in r.text
                if r.status_code == 503:
                    assert r.headers["retry-after"] and "cannot answer" in r.text
            assert (await c.get("/queue")).status_code == 503
            # the small write of the check lands on a page still whole; the failed requests
            # keep the instance out of rotation all the same
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            assert "malformed" in ready.json()["error"] and ready.headers["retry-after"]
            assert (await c.get("/healthz")).status_code == 200  # alive, not ready
            for page in ("/", "/queue", "/dlq", "/suppressions", f"/queue/{queue_id}"):
                r = await c.get(page)
                assert r.status_code == 503, (page, r.status_code)
                assert "Traceback" not in r.text and r.headers["retry-after"]


async def test_finding_6_readyz_makes_a_write_so_a_full_disk_is_not_ready(
    local: httpx.AsyncClient, app: AsyncPostlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    from postlane.errors import StoreUnavailable

    calls: list[float] = []

    async def full_disk(now: float) -> None:
        calls.append(now)
        raise StoreUnavailable("database or disk is full")

    assert (await local.get("/readyz")).json() == {"status": "ok"}
    monkeypatch.setattr(app.store, "check", full_disk)
    ready = await local.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "error": "database or disk is full"}
    assert calls == [app.clock.now()]


# -- issue 17.7: one rule for an empty body, over HTTP and from the command line ------------------


@pytest.mark.parametrize("text", ["", "  \n", None])
async def test_issue_17_7_an_empty_text_is_no_body_over_http(
    local: httpx.AsyncClient, app: AsyncPostlane, text: str | None
) -> None:
    body: dict[str, Any] = {**MESSAGE, "text": text}
    r = await local.post("/v1/messages", json=body)
    assert r.status_code == 422 and "no body" in r.json()["error"]["message"]
    assert await waiting(app) == 0


def test_issue_17_7_postlane_send_without_a_text_is_refused(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "postlane"
    env = clean_environment()
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
        f'[delivery]\nrelay = "capture://{tmp_path / "captured"}"\n'
    )

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), "send", "--from", "a@example.com", "--to", "b@example.net", *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = subprocess.run(  # only serve, worker and migrate make a queue
        [str(script), "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    missing = send("--subject", "no text")
    assert missing.returncode != 0, missing.stdout
    assert "no body" in missing.stderr and "Traceback" not in missing.stderr
    empty = send("--subject", "empty text", "--text", "")
    assert empty.returncode != 0 and "no body" in empty.stderr
    sent = send("--subject", "with text", "--text", "hello", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["duplicate"] is False


# -- finding 11: bearer token guessing, short tokens -----------------------------------------------

TOKEN = "audit-admin-token-0123456789"


async def test_finding_11_wrong_bearer_tokens_get_429_with_retry_after(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, http={"tokens": [TOKEN]})
    async with AsyncPostlane(config, clock=clock) as app:
        asgi = build_app(FrontDoor(config, app, Metrics(app)))
        guesser = httpx.ASGITransport(app=asgi, client=("203.0.113.9", 5555))
        async with httpx.AsyncClient(transport=guesser, base_url="http://postlane") as c:
            for n in range(5):
                r = await c.get("/v1/stats", headers={"Authorization": f"Bearer guess-{n:011d}"})
                assert r.status_code == 401
            sixth = await c.get("/v1/stats", headers={"Authorization": "Bearer guess-0000000006"})
            assert sixth.status_code == 401  # looked at, and now it must wait
            r = await c.get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "too_many_attempts"
            await clock.advance(1)
            r = await c.get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200
            r = await c.get("/v1/stats", headers={"Authorization": "Bearer guess-0000000007"})
            assert r.status_code == 401
            r = await c.get("/v1/stats", headers={"Authorization": "Bearer guess-0000000008"})
            assert r.status_code == 429 and r.headers["retry-after"] == "2"  # twice as long
            metrics = (await c.get("/metrics")).text
            assert 'postlane_http_auth_failures_total{door="api"} 7.0' in metrics
            assert 'postlane_http_auth_throttled_total{door="api"} 2.0' in metrics


def test_finding_11_serve_refuses_a_short_token_at_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[http]\ntokens = ["hunter2"]\n'
    )
    env = clean_environment()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "postlane"), "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "http.tokens" in output and "at least 16" in output, output
    assert "hunter2" not in output and "Traceback" not in output
    assert not (tmp_path / "q.db").exists()  # refused before anything was opened
