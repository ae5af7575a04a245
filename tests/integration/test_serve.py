"""`postlane serve` as a user runs it: one process with the worker, the HTTP API and SMTP
submission; it says where mail goes, delivers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow


async def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_serve_accepts_http_and_smtp_delivers_and_stops_on_sigterm(tmp_path: Path) -> None:
    http_port, smtp_port = free_port(), free_port()
    (tmp_path / "postlane.toml").write_text(
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postlane.cli",
        "serve",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:

            async def healthy() -> bool:
                return (await client.get("/healthz")).status_code == 200

            await wait_until(healthy, 30, "serve to answer /healthz")
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

            await wait_until(delivered, 30, "both messages to be delivered")
            metrics = (await client.get("/metrics")).text
            assert 'postlane_delivery_attempts_total{class="delivered"' in metrics
        assert len(list((tmp_path / "postlane-capture").glob("*.eml"))) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    log = err.decode()
    assert process.returncode == 0, log
    assert "nothing leaves this machine" in log
    assert "postlane stopped" in log
    assert "Traceback" not in log


async def test_a_worker_serves_its_own_metrics_and_probes_and_nothing_else(
    tmp_path: Path,
) -> None:
    """On a fleet each `postlane worker` counts its own attempts: it must be scrapable."""
    metrics_port = free_port()
    (tmp_path / "postlane.toml").write_text('[delivery]\npoll_interval = "100ms"\n')
    send = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postlane.cli", "send", "--from", "a@example.com",
        "--to", "b@example.net", "--subject", "s", "--text", "t", cwd=tmp_path,
    )  # fmt: skip
    assert await send.wait() == 0
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postlane.cli", "worker", "--metrics", f"127.0.0.1:{metrics_port}",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as client:

            async def counted() -> bool:
                text = (await client.get("/metrics")).text
                return 'postlane_delivery_attempts_total{class="delivered"' in text

            await wait_until(counted, 30, "the worker's /metrics to count its delivery")
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            for path in ("/v1/stats", "/", "/v1/queue"):  # no API, no dashboard on a worker
                assert (await client.get(path)).status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    assert "metrics and health probes on" in err.decode()
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postlane.cli", "worker", "--metrics", "nowhere",
        cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await bad.communicate()
    assert bad.returncode != 0 and "Traceback" not in err.decode()
    assert "HOST:PORT" in err.decode()
