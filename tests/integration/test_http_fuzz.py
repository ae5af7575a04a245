"""A bounded property-based fuzz run of the HTTP API from its own OpenAPI document
(schemathesis): whatever a client sends, the API answers without a 5xx; and a property test
mixing valid and broken submissions: a message is stored whole or not at all."""

from __future__ import annotations

import asyncio
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
from postlane.ingest.http import start_http
from postlane.ingest.openapi import openapi_document
from postlane.metrics import Metrics
from tests.conftest import free_port, make_config

TOKEN = "fuzz-token"


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
        async with AsyncPostlane(config) as app, start_http(config, app, Metrics(app)) as url:
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
