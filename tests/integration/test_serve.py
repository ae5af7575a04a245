"""`postlane serve` as a user runs it: one process with the worker, the HTTP API and SMTP
submission; it says where mail goes, delivers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.processes import run_postlane, start_postlane

pytestmark = pytest.mark.slow

#: what a client meets before the server listens
UNREACHABLE = (httpx.TransportError, OSError)


async def test_serve_accepts_http_and_smtp_delivers_and_stops_on_sigterm(tmp_path: Path) -> None:
    http_port, smtp_port = free_port(), free_port()
    (tmp_path / "postlane.toml").write_text(
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
    )
    base = f"http://127.0.0.1:{http_port}"
    async with start_postlane("serve", cwd=tmp_path, log=tmp_path / "serve.log") as process:
        async with httpx.AsyncClient(base_url=base) as client:

            async def ready() -> bool:  # every listener up and the worker running
                return (await client.get("/readyz")).status_code == 200

            await process.wait_until(ready, "serve to answer /readyz", ignoring=UNREACHABLE)
            assert (await client.get("/healthz")).status_code == 200
            r = await client.post(
                "/v1/messages",
                json={"from": "a@example.com", "to": ["b@example.net"], "text": "via http"},
            )
            assert r.status_code == 202
            http_id = r.json()["id"]

            def submit() -> None:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as s:
                    s.sendmail(
                        "a@example.com", ["c@example.net"], b"Subject: via smtp\r\n\r\nhi\r\n"
                    )

            await asyncio.to_thread(submit)

            async def delivered() -> bool:
                message = (await client.get(f"/v1/messages/{http_id}")).json()
                stats = (await client.get("/v1/stats")).json()
                return message["state"] == "sent" and stats["sent"] == 2

            await process.wait_until(
                delivered, "both messages to be delivered", ignoring=UNREACHABLE
            )
            metrics = (await client.get("/metrics")).text
            assert 'postlane_delivery_attempts_total{class="delivered"' in metrics
        assert len(list((tmp_path / "postlane-capture").glob("*.eml"))) == 2
        assert await process.stop() == 0, process.describe()
    log = process.output()
    assert "nothing leaves this machine" in log
    assert "postlane stopped" in log
    assert "Traceback" not in log


async def test_a_worker_serves_its_own_metrics_and_probes_and_nothing_else(
    tmp_path: Path,
) -> None:
    """On a fleet each `postlane worker` counts its own attempts: it must be scrapable."""
    metrics_port = free_port()
    (tmp_path / "postlane.toml").write_text('[delivery]\npoll_interval = "100ms"\n')
    log = tmp_path / "postlane.log"
    send = ("send", "--from", "a@example.com", "--to", "b@example.net", "--subject", "s")
    await run_postlane("worker", "--burst", cwd=tmp_path, log=log)  # creates the queue
    await run_postlane(*send, "--text", "t", cwd=tmp_path, log=log)
    listen = f"127.0.0.1:{metrics_port}"
    async with start_postlane("worker", "--metrics", listen, cwd=tmp_path, log=log) as process:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as client:

            async def counted() -> bool:
                text = (await client.get("/metrics")).text
                return 'postlane_delivery_attempts_total{class="delivered"' in text

            await process.wait_until(
                counted, "the worker's /metrics to count its delivery", ignoring=UNREACHABLE
            )
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            for path in ("/v1/stats", "/", "/v1/queue"):  # no API, no dashboard on a worker
                assert (await client.get(path)).status_code == 404
        assert await process.stop() == 0, process.describe()
    assert "metrics and health probes on" in process.output()
    bad = await run_postlane("worker", "--metrics", "nowhere", cwd=tmp_path, log=log, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.output()
    assert "HOST:PORT" in bad.output()
