"""A bounded property-based fuzz run of the HTTP API from its own OpenAPI document
(schemathesis): whatever a client sends, the API answers without a 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from postlane.app import AsyncPostlane
from postlane.ingest.http import start_http
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


@pytest.fixture(scope="module")
def api_schema(live_api: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live_api}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_makes_the_api_fail(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error]
    )
