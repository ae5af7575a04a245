"""A bounded property-based fuzz run of the HTTP API from its own OpenAPI document
(schemathesis): whatever a client sends, the API answers without a 5xx; a property test
mixing valid and broken submissions: a message is stored whole or not at all; and one over raw
request bodies (audit finding 5): NaN and Infinity literals, lone surrogates, deep nesting,
huge numbers and wrong types are 4xx, and nothing they leave behind breaks a later read."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from postlane.app import AsyncPostlane
from postlane.ingest.door import FrontDoor
from postlane.ingest.http import start_http
from postlane.ingest.openapi import openapi_document
from postlane.metrics import Metrics
from tests.conftest import free_port, make_config

TOKEN = "fuzz-token-0123456789"


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """postlane's HTTP API on a real socket, on its own event loop in a thread."""
    folder: Path = tmp_path_factory.mktemp("fuzz")
    config = make_config(
        folder,
        http={"listen": f"127.0.0.1:{free_port()}", "tokens": [TOKEN]},
        smtp={"max_size": "100KB"},
    )
    ready = threading.Event()
    stop: asyncio.Event | None = None
    loop = asyncio.new_event_loop()
    address: list[str] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with (
            AsyncPostlane(config) as app,
            start_http(FrontDoor(config, app, Metrics(app))) as url,
        ):
            address.append(url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the API did not start"
    yield address[0]
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


# The API's own OpenAPI document, read at collection so each operation is a test of its own.
# schemathesis's Python API (not its pytest plugin, which follows pytest's internals and broke on
# pytest 9.2): a hypothesis test per operation, calling the live server.
# JSON Lines (the import's body) are text to schemathesis: sent as text/plain would say
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_input_makes_the_api_fail(live_api: str, operation: Any) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy())
    def no_server_error(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=live_api,
            headers={"Authorization": f"Bearer {TOKEN}"},
            checks=[not_a_server_error],
        )

    no_server_error()


VALID = {"from": "app@example.com", "to": ["ada@example.net"], "subject": "Hi", "text": "Hello"}
MUTATIONS = st.sampled_from(
    [
        ("from", "not an address"),
        ("from", "app@example.com\r\nBcc: victim@example.org"),
        ("subject", "Hi\r\nBcc: victim@example.org"),
        ("subject", "x" * 2000),
        ("to", []),
        ("to", ["ok@example.net", "bad@@example.net"]),
        ("cc", ["carol@example.net"]),
        ("bcc", ["hidden@example.net"]),
        ("lane", "urgent"),
        ("lane", "high"),
        ("headers", {"X-Campaign": "winter"}),
        ("headers", {"X-Evil": "a\nb"}),
        ("html", "<p>hi</p>"),
        ("text", None),
        (
            "attachments",
            [{"filename": "a.txt", "content": "aGVsbG8=", "content_type": "text/plain"}],
        ),
        ("attachments", [{"filename": "a.txt", "content": "%%% not base64"}]),
        ("metadata", {"user": 7}),
        ("metadata", "not an object"),
        ("idempotency_key", "k" * 300),
        ("unknown_field", 1),
    ]
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(MUTATIONS, max_size=3))
def test_a_message_is_stored_whole_or_not_at_all(
    live_api: str, mutations: list[tuple[str, object]]
) -> None:
    """Valid and broken submissions mixed: a 202 is a whole, readable message; anything else
    stores nothing at all (the stats do not move)."""
    body: dict[str, object] = dict(VALID)
    for key, value in mutations:
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    with httpx.Client(base_url=live_api, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        before = client.get("/v1/stats").json()
        answer = client.post("/v1/messages", json=body)
        after = client.get("/v1/stats").json()
        assert answer.status_code in (202, 400, 413, 422), answer.text
        waiting = sum(lane["ready"] for lane in after["lanes"].values())
        waiting_before = sum(lane["ready"] for lane in before["lanes"].values())
        if answer.status_code != 202:
            assert answer.json()["error"]["code"]
            assert waiting == waiting_before  # nothing half-stored
            return
        message = client.get(f"/v1/messages/{answer.json()['id']}").json()
        to = body["to"] if isinstance(body["to"], list) else []
        expected = len(to) + len(body.get("cc", [])) + len(body.get("bcc", []))  # type: ignore[arg-type]
        assert len(message["recipients"]) == expected
        assert waiting == waiting_before + expected
        assert message["size"] > 0 and message["message_id"].startswith("<")


# -- audit finding 5: raw request bodies -------------------------------------------------------

#: any text, lone surrogates included (json.dumps writes them as \\udXXX escapes)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
#: any JSON value, and what JSON is not: NaN and the infinities (json.dumps writes the literals)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
#: literals written straight into a body: what json.dumps would never write
LITERALS = st.one_of(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1E+99999"]),
    st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\udbff\\udbff"', '"\\u0000"', '"a\\u0000"']),
    st.integers(300, 6000).map(lambda n: "9" * n),  # past int's 4300-digit limit, and below
    st.integers(2, 100_000).map(lambda n: "[" * n + "]" * n),  # nesting, to 100k deep
    st.integers(2, 50_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    ANY_JSON.map(lambda v: json.dumps(v, allow_nan=True)),
)
#: a message's fields, each left valid, given any JSON value, or given a raw literal
FIELDS = ["from", "to", "cc", "subject", "text", "html", "headers", "lane", "metadata", "raw"]


@st.composite
def message_bodies(draw: st.DrawFn) -> str:
    fields = {k: json.dumps(v) for k, v in VALID.items()}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        fields[name] = draw(LITERALS)
    if draw(st.booleans()):
        fields["metadata"] = "{" + f'"k": {draw(LITERALS)}' + "}"
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


#: where a body goes, and how it is wrapped there
TARGETS = {
    "/v1/messages": "{}",
    "/v1/messages/batch": '{{"messages": [{}]}}',
    "/v1/suppressions": '{{"address": "s@example.net", "reason": {}}}',
    "/v1/queue/hold": '{{"all": true, "metadata": {}}}',
    "/v1/dlq/requeue": '{{"ids": {}}}',
}
BODIES = st.one_of(
    message_bodies(),
    LITERALS,
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


def waiting_now(client: httpx.Client) -> int:
    stats = client.get("/v1/stats")
    assert stats.status_code == 200, stats.text
    return sum(lane["ready"] for lane in stats.json()["lanes"].values())


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(target=st.sampled_from(sorted(TARGETS)), body=BODIES, raw_target=st.booleans())
def test_finding_5_no_raw_json_body_makes_the_api_fail_or_breaks_a_later_read(
    live_api: str, target: str, body: str, raw_target: bool
) -> None:
    """Whatever the body, the answer is below 500 and an error is the JSON error body; a
    refused message stores nothing; what was stored can be read back, and so can the queue."""
    content = body if raw_target and target != "/v1/messages" else TARGETS[target].format(body)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=60) as client:
        before = waiting_now(client)
        answer = client.post(target, content=content.encode("utf-8", "surrogatepass"))
        assert answer.status_code < 500, (answer.status_code, answer.text, content[:300])
        if answer.status_code >= 400:
            assert answer.json()["error"]["code"], answer.text
            if target.startswith("/v1/messages"):
                assert waiting_now(client) == before  # nothing half-stored
        elif target == "/v1/messages":
            shown = client.get(f"/v1/messages/{answer.json()['id']}")
            assert shown.status_code == 200, shown.text
        for path in ("/v1/queue", "/v1/suppressions", "/v1/dlq"):
            read = client.get(path, params={"limit": 200} if path != "/v1/suppressions" else {})
            assert read.status_code == 200, (path, read.text)
