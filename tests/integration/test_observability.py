"""Metrics, alerts and logs, driven with an injected clock through growth, steady state and
recovery: the metrics and `postlane alerts` verdicts at each step, the webhook's
notifications, and the shipped Prometheus rules."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from aiosmtpd.smtp import SMTP as SMTPServer
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from postlane.alerts import AlertMonitor, load_rules, prometheus_rules
from postlane.app import AsyncPostlane, QueueAction
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.config import LogConfig
from postlane.ingest.door import FrontDoor
from postlane.logs import JSONFormatter, setup_logging
from postlane.message import Lane, Message, RecipientState
from postlane.metrics import Metrics
from postlane.records import AttemptRecord, DestinationStatus, Outcome, Selector
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import IN_CI, ScriptedHandler, free_port, make_config
from tests.processes import clean_environment, start_postlane

ROOT = Path(__file__).resolve().parents[2]
ALL = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[tuple[str, list[list[dict[str, Any]]]]]:
    """A local Alertmanager stand-in recording what it is sent."""
    received: list[list[dict[str, Any]]] = []

    async def alerts(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/api/v2/alerts", alerts, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn has no started event)
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/api/v2/alerts", received
    finally:
        server.should_exit = True
        await task


def firing(alerts: list[Any]) -> set[str]:
    return {a.key for a in alerts if a.firing}


def pending(alerts: list[Any]) -> set[str]:
    """Alerts whose condition holds, not yet for their rule's ``for``."""
    return {a.key for a in alerts if a.pending}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition text (labels in any order)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exposed")


async def test_growth_steady_state_and_recovery(tmp_path: Path, clock: FakeClock) -> None:
    async with webhook() as (url, received):
        config = make_config(tmp_path, alerts={"webhook": url})
        async with AsyncPostlane(config, clock=clock) as app:
            metrics = Metrics(app)
            monitor = AlertMonitor.from_config(app, config)
            worker = Worker.from_config(
                config, app.store, transport_for(config), clock=clock, observer=metrics
            )

            async def enqueue(count: int) -> None:
                await app.send_many(
                    [
                        Message(sender="a@x.example", to=[f"u{i}@y.example"], text="x", lane="low")
                        for i in range(count)
                    ]
                )

            # -- growth: mail arrives, nothing goes out, for 20 minutes
            for _ in range(20):
                await enqueue(10)
                verdicts = await monitor.run_once(clock.now())
                await clock.advance(60)
            assert "PostlaneOldestMessageAgeGrowing{lane=low}" in firing(verdicts)
            assert "PostlaneNoDeliveries" in firing(verdicts)
            assert "PostlaneOldestMessageAgeGrowing{lane=normal}" not in firing(verdicts)
            text = (await metrics.exposition()).decode()
            assert metric(text, "postlane_queue_depth", lane="low", state="queued") == 200
            assert metric(text, "postlane_oldest_message_age_seconds", lane="low") >= 19 * 60
            fired = [a for batch in received for a in batch if "endsAt" not in a]
            assert {a["labels"]["alertname"] for a in fired} >= {
                "PostlaneOldestMessageAgeGrowing",
                "PostlaneNoDeliveries",
            }
            assert all(a["annotations"]["runbook_url"].endswith(".md") for a in fired)

            # -- recovery and steady state: everything waiting goes out, then each minute's mail
            for _ in range(20):
                await enqueue(10)
                await worker.run_until_idle()
                verdicts = await monitor.run_once(clock.now())
                await clock.advance(60)
            assert firing(verdicts) == set()
            resolved = [a for batch in received for a in batch if "endsAt" in a]
            assert {a["labels"]["alertname"] for a in resolved} >= {
                "PostlaneOldestMessageAgeGrowing",
                "PostlaneNoDeliveries",
            }
            text = (await metrics.exposition()).decode()
            assert metric(text, "postlane_queue_depth", lane="low", state="queued") == 0
            delivered = metric(
                text,
                "postlane_delivery_attempts_total",
                lane="low",
                destination="y.example",
                **{"class": "delivered"},
            )
            assert delivered == 400
            assert metric(text, "postlane_delivery_latency_seconds_count", lane="low") == 400

            # postlane alerts reads the same recorded history
            history = await app.store.samples(clock.now() - 3600)
            assert {s.lane for s in history} == {"high", "normal", "low", "*"}
            assert sum(s.sent for s in history if s.lane == "*") >= 390


async def test_a_deep_queue_that_drains_stays_quiet(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        monitor = AlertMonitor.from_config(app, config)

        async def deliver(count: int) -> None:  # a worker that delivers `count` a minute
            now = clock.now()
            claimed = await app.store.claim_due(
                "w", ALL, limit=count, now=now, lease_until=now + 60
            )
            ok = AttemptRecord(now, ReplyClass.DELIVERED, 250, None, "ok", "r", "d", 1)
            await app.store.record(
                "w",
                [
                    Outcome(d.id, RecipientState.SENT, 1, 0, None, ok)
                    for m in claimed
                    for d in m.deliveries
                ],
                now,
            )

        for _ in range(20):  # a backlog builds: 100 a minute, none out
            await app.send_many(
                [
                    Message(sender="a@x.example", to=[f"u{i}@y.example"], text="x")
                    for i in range(100)
                ]
            )
            verdicts = await monitor.run_once(clock.now())
            await clock.advance(60)
        assert "PostlaneOldestMessageAgeGrowing{lane=normal}" in firing(verdicts)
        for minute in range(12):  # it drains: 200 out, 100 in, every minute; still deep
            await app.send_many(
                [
                    Message(sender="a@x.example", to=[f"v{minute}-{i}@y.example"], text="x")
                    for i in range(100)
                ]
            )
            await deliver(200)
            verdicts = await monitor.run_once(clock.now())
            await clock.advance(60)
        stats = await app.stats()
        assert stats.lanes[Lane.NORMAL].ready >= 500  # still a deep queue
        assert "PostlaneOldestMessageAgeGrowing{lane=normal}" not in firing(verdicts)
        assert "PostlaneNoDeliveries" not in firing(verdicts)


async def test_dead_letter_spike_and_hard_bounce_ratio(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        monitor = AlertMonitor.from_config(app, config)
        await app.send_many(
            [Message(sender="a@x.example", to=[f"u{i}@y.example"], text="x") for i in range(80)]
        )
        await clock.advance(60)
        now = clock.now()
        claimed = await app.store.claim_due("w", ALL, limit=100, now=now, lease_until=now + 60)
        bounce = AttemptRecord(
            now, ReplyClass.HARD_BOUNCE, 550, "5.1.1", "no such user", "r", "d", 1
        )
        await app.store.record(
            "w",
            [
                Outcome(d.id, RecipientState.DEAD, 1, 0, None, bounce)
                for m in claimed
                for d in m.deliveries
            ],
            now,
        )
        await clock.advance(60)
        verdicts = await monitor.run_once(clock.now())
        assert "PostlaneDeadLetterSpike" in firing(verdicts)  # for 0m: at once
        # for 5m, as Prometheus: pending while the ratio has held for less
        assert "PostlaneHardBounceRatio" in pending(verdicts) - firing(verdicts)
        for _ in range(4):
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
            assert "PostlaneHardBounceRatio" in pending(verdicts) - firing(verdicts)
        await clock.advance(60)
        verdicts = await monitor.run_once(clock.now())
        assert {"PostlaneDeadLetterSpike", "PostlaneHardBounceRatio"} <= firing(verdicts)
        for _ in range(31):
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
        assert firing(verdicts) == set()


async def deliver_all(app: AsyncPostlane, count: int) -> list[int]:
    """Enqueue and deliver ``count`` messages now; their delivery ids."""
    await app.send_many(
        [
            Message(sender="news@shop.example", to=[f"u{i}@y.example"], text="x")
            for i in range(count)
        ]
    )
    now = app.clock.now()
    claimed = await app.store.claim_due("w", ALL, limit=count, now=now, lease_until=now + 60)
    ok = AttemptRecord(now, ReplyClass.DELIVERED, 250, None, "ok", "r", "d", 1)
    ids = [d.id for m in claimed for d in m.deliveries]
    await app.store.record("w", [Outcome(i, RecipientState.SENT, 1, 0, None, ok) for i in ids], now)
    return ids


async def test_complaints_over_a_tenth_and_three_tenths_of_a_percent_fire_the_complaint_alerts(
    tmp_path: Path, clock: FakeClock
) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        monitor = AlertMonitor.from_config(app, config)
        delivered = await deliver_all(app, 2000)

        async def complaints(ids: list[int]) -> None:
            now = clock.now()
            await app.store.record_feedback(
                [Feedback(FeedbackKind.COMPLAINED, i, now, "arf") for i in ids], now
            )

        await complaints(delivered[:3])  # 0.15%: over Gmail's 0.1%, under 0.3%
        await clock.advance(60)
        verdicts = await monitor.run_once(clock.now())
        # both rules wait 15 minutes (`for`), as Prometheus does
        assert "PostlaneComplaintRateHigh" in pending(verdicts)
        assert "PostlaneComplaintRateCritical" not in pending(verdicts) | firing(verdicts)
        for _ in range(15):
            assert "PostlaneComplaintRateHigh" not in firing(verdicts)
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
        assert "PostlaneComplaintRateHigh" in firing(verdicts)
        assert "PostlaneComplaintRateCritical" not in firing(verdicts)
        await complaints(delivered[3:8])  # 0.4%
        await clock.advance(60)
        verdicts = await monitor.run_once(clock.now())
        assert "PostlaneComplaintRateHigh" in firing(verdicts)  # still holding: still firing
        assert "PostlaneComplaintRateCritical" in pending(verdicts)
        for _ in range(15):
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
        assert {"PostlaneComplaintRateHigh", "PostlaneComplaintRateCritical"} <= firing(verdicts)
        detail = next(a.detail for a in verdicts if a.key == "PostlaneComplaintRateCritical")
        assert detail == "8 complaint(s) for 2000 delivered (0.40%)"


async def test_bounces_heard_after_delivery_count_in_the_hard_bounce_ratio(
    tmp_path: Path, clock: FakeClock
) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        monitor = AlertMonitor.from_config(app, config)
        delivered = await deliver_all(app, 100)
        await clock.advance(60)
        await monitor.run_once(clock.now())  # serve records every minute
        now = clock.now()
        await app.store.record_feedback(  # a relay's DSNs, minutes later
            [
                Feedback(FeedbackKind.BOUNCED, i, now, "dsn", ReplyClass.HARD_BOUNCE, 550)
                for i in delivered[:10]
            ],
            now,
        )
        await clock.advance(60)
        verdicts = await monitor.run_once(clock.now())
        assert "PostlaneHardBounceRatio" in pending(verdicts)  # then 5 minutes (`for`)
        for _ in range(5):
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
        assert "PostlaneHardBounceRatio" in firing(verdicts)


async def dead_letter(app: AsyncPostlane, now: float) -> str:
    """A message whose one recipient a worker dead-lettered at ``now`` (554 5.7.1)."""
    [result] = await app.send_many([Message(sender="a@x.example", to=["b@y.example"], text="x")])
    [m] = await app.store.claim_due("w", ALL, limit=1, now=now, lease_until=now + 60)
    fail = AttemptRecord(now, ReplyClass.POLICY_BLOCK, 554, "5.7.1", "blocked", "r", "d", 1)
    await app.store.record(
        "w", [Outcome(m.deliveries[0].id, RecipientState.DEAD, 1, 0, None, fail)], now
    )
    return result.id


async def test_recovery_time_runs_from_dead_to_delivered_whoever_requeued(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        metrics = Metrics(app)
        await metrics.exposition()  # the first scrape learns where history ends
        queue_id = await dead_letter(app, clock.now())
        await clock.advance(3600)
        async with AsyncPostlane(config, clock=clock) as operator:  # e.g. the CLI
            await operator.act(QueueAction.REQUEUE, Selector(ids=(queue_id,)))
        text = (await metrics.exposition()).decode()
        assert metric(text, "postlane_dead_letter_recovery_seconds_count") == 0  # not yet delivered
        await clock.advance(600)
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        assert await worker.run_until_idle() == 1
        text = (await metrics.exposition()).decode()
        assert metric(text, "postlane_dead_letter_recovery_seconds_count") == 1
        assert metric(text, "postlane_dead_letter_recovery_seconds_sum") == pytest.approx(4200)


async def test_a_recovery_is_counted_once_in_a_fleet(tmp_path: Path, clock: FakeClock) -> None:
    """An audit scraped a serve and a postlane worker on one store: each counted the one
    recovered dead letter, so the sum over targets (what the docs tell operators to take)
    said two. The store hands each recovery to one process's scrape."""
    config = make_config(tmp_path)
    async with (
        AsyncPostlane(config, clock=clock) as app,
        AsyncPostlane(config, clock=clock) as other,
    ):
        here, there = Metrics(app), Metrics(other)  # two processes' metrics
        queue_id = await dead_letter(app, clock.now())
        await clock.advance(300)
        await app.act(QueueAction.REQUEUE, Selector(ids=(queue_id,)))
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        assert await worker.run_until_idle() == 1
        counts = []
        for metrics in (there, here, there):
            text = (await metrics.exposition()).decode()
            counts.append(metric(text, "postlane_dead_letter_recovery_seconds_count"))
        assert counts == [1, 0, 1]  # the first scrape took it; the other process never saw it


def test_the_shipped_rules_are_the_generated_ones_and_their_runbooks_exist() -> None:
    shipped = (ROOT / "deploy/prometheus/postlane.rules.yml").read_text()
    assert shipped == prometheus_rules(), "regenerate: postlane alerts --prometheus-rules"
    for rule in load_rules():
        path = rule.runbook_url.split("/blob/main/", 1)[1]
        runbook = ROOT / path
        assert runbook.is_file(), f"{rule.name}: {path} is missing"
        assert rule.name in runbook.read_text()


@pytest.mark.skipif(
    shutil.which("promtool") is None and not IN_CI, reason="promtool is not installed"
)
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    folder = ROOT / "deploy/prometheus"
    check = subprocess.run(
        ["promtool", "check", "rules", "postlane.rules.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", "postlane.rules.test.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stdout + test.stderr


async def test_one_log_line_per_attempt_and_no_secret_or_body(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    caplog.set_level(logging.INFO)
    async with AsyncPostlane(config, clock=clock) as app:
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        result = await app.send(
            sender="a@x.example",
            to=["secret-person@y.example"],
            text="TOP SECRET BODY",
            subject="s",
        )
        await worker.run_until_idle()
    [line] = [r for r in caplog.records if r.name == "postlane.attempts"]
    text = line.getMessage()
    assert f"id={result.id}" in text and "domain=y.example" in text and "class=delivered" in text
    assert "duration_ms=" in text
    assert "TOP SECRET BODY" not in caplog.text and "secret-person" not in caplog.text
    data = json.loads(JSONFormatter().format(line))
    assert data["event"] == "attempt" and data["class"] == "delivered" and data["id"] == result.id
    assert data["code"] == 250


@pytest.mark.parametrize(
    ("mode", "shown"),
    [
        ("hash", hashlib.sha256(b"ada@y.example").hexdigest()[:16]),
        ("full", "Ada@y.example"),
    ],
)
async def test_issue_17_11_attempt_lines_can_say_which_recipient_got_which_reply(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, mode: str, shown: str
) -> None:
    """Three recipients of one message answered 550, 450 and 250: with [log] recipients the
    lines tell them apart (by a pseudonym or the address); by default only the domain shows."""
    # the domain is normalised at enqueue (Ada@y.example); the local part is kept as given
    peer_replies = {"Ada@y.example": "550 5.1.1 no such user", "bob@y.example": "450 4.2.1 busy"}
    handler = ScriptedHandler(rcpt=peer_replies)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTPServer(handler, loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = make_config(
            tmp_path, delivery={"relay": f"smtp://127.0.0.1:{port}"}, log={"recipients": mode}
        )
        caplog.set_level(logging.INFO)
        async with AsyncPostlane(config, clock=clock) as app:
            worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
            await app.send(sender="a@x.example", to=["Ada@Y.example", "bob@y.example",
                                                     "cy@y.example"], text="x")  # fmt: skip
            await worker.run_until_idle()
            await worker.transport.close()
    finally:
        server.close()
        await server.wait_closed()
    lines = [r.getMessage() for r in caplog.records if r.name == "postlane.attempts"]
    [refused] = [line for line in lines if "code=550" in line]
    assert f"recipient={shown}" in refused
    assert len({line.split("recipient=")[1].split()[0] for line in lines}) == 3


async def test_issue_17_11_by_default_attempt_lines_name_the_domain_only(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Privacy by default: without [log] recipients, the same three replies are logged with
    the domain and no address, pseudonym or local part."""
    peer_replies = {"ada@y.example": "550 5.1.1 no such user", "bob@y.example": "450 4.2.1 busy"}
    handler = ScriptedHandler(rcpt=peer_replies)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTPServer(handler, loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = make_config(tmp_path, delivery={"relay": f"smtp://127.0.0.1:{port}"})
        assert config.log.recipients == "none"
        caplog.set_level(logging.INFO)
        async with AsyncPostlane(config, clock=clock) as app:
            worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
            to = ["ada@y.example", "bob@y.example", "cy@y.example"]
            await app.send(sender="a@x.example", to=to, text="x")
            await worker.run_until_idle()
            await worker.transport.close()
    finally:
        server.close()
        await server.wait_closed()
    lines = [r.getMessage() for r in caplog.records if r.name == "postlane.attempts"]
    assert {code for line in lines for code in ("550", "450", "250") if f"code={code}" in line} == {
        "550",
        "450",
        "250",
    }
    hashed = {hashlib.sha256(a.encode()).hexdigest()[:16] for a in to}
    for line in lines:
        assert "domain=y.example" in line and "recipient=" not in line, line
        assert "@" not in line, line  # no address at all
        # no value is a local part or a pseudonym (compared whole: a random id may hold "ada")
        values = {field.partition("=")[2] for field in line.split()}
        assert not values & {"ada", "bob", "cy", *hashed}, line
        assert not any(h in line for h in hashed), line


def test_setup_logging_json(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(LogConfig(format="json"))
        logging.getLogger("postlane.test").warning("hello %s", "world", extra={"event": "x"})
        err = capfd.readouterr().err.strip().splitlines()[-1]
        data = json.loads(err)
        assert (
            data["message"] == "hello world" and data["level"] == "warning" and data["event"] == "x"
        )
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_readyz_reflects_the_store_and_the_worker(tmp_path: Path) -> None:
    import httpx

    from postlane.ingest.http import build_app

    config = make_config(tmp_path)
    async with AsyncPostlane(config) as app:
        worker = Worker.from_config(config, app.store, transport_for(config))
        asgi = build_app(FrontDoor(config, app, worker=worker))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://p"
        ) as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 503  # the worker is not running
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            deadline = time.monotonic() + 10
            while not worker.running:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert (await c.get("/readyz")).json() == {"status": "ok"}
            stop.set()
            await task


async def record_twenty_minutes_of_growth(config: Any) -> None:
    """What serve would have recorded over the last twenty minutes (up to a minute ago): five
    low-lane messages a minute arriving, none leaving."""
    clock = FakeClock(start=time.time() - 21 * 60)
    async with AsyncPostlane(config, clock=clock) as app:
        monitor = AlertMonitor(app)  # records the history only, notifies nobody
        for minute in range(20):
            await app.send_many(
                [
                    Message(sender="a@x.example", to=[f"u{minute}-{i}@y.example"], text="x",
                            lane="low")
                    for i in range(5)
                ]
            )  # fmt: skip
            await monitor.record(clock.now())
            await clock.advance(60)


async def test_the_alerts_command_reads_the_recorded_history_and_this_minute(
    tmp_path: Path,
) -> None:
    """`postlane alerts` as an operator runs it: serve recorded the last 20 minutes of a low
    lane that only grows; the command adds the current minute itself and reports the alerts."""
    await record_twenty_minutes_of_growth(make_config(tmp_path))
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "postlane.db"}"\n'
    )
    env = clean_environment()

    def postlane(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postlane", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    done = await asyncio.to_thread(postlane, "alerts", "--json")
    assert done.returncode == 0, done.stderr
    verdicts = {
        (a["alert"], tuple(sorted(a["labels"].items()))): a for a in json.loads(done.stdout)
    }
    growing = verdicts[("PostlaneOldestMessageAgeGrowing", (("lane", "low"),))]
    assert growing["firing"] is True and growing["runbook_url"].endswith(".md")
    assert verdicts[("PostlaneNoDeliveries", ())]["firing"] is True
    assert verdicts[("PostlaneOldestMessageAgeGrowing", (("lane", "high"),))]["firing"] is False
    human = await asyncio.to_thread(postlane, "alerts")
    assert "FIRING" in human.stdout and "runbooks:" in human.stdout


async def test_the_alerts_command_shows_an_alert_pending_until_it_has_held_for_its_for(
    tmp_path: Path,
) -> None:
    """A high-lane message over 5 minutes old for the last 3 minutes only: the rule holds, but
    not yet for its 5 minutes, so `postlane alerts` says pending (and the webhook hears
    nothing), as Prometheus would. (The command reads the real clock: 3 minutes, not 4, so a
    machine under load may take up to two minutes to get there, not one.)"""
    from click.testing import CliRunner

    from postlane.cli import main

    config = make_config(tmp_path)
    clock = FakeClock(start=time.time() - 10 * 60)
    async with AsyncPostlane(config, clock=clock) as app:
        await app.send(sender="a@x.example", to=["b@y.example"], text="code", lane="high")
        await clock.advance(7 * 60)
        monitor = AlertMonitor(app)  # records the history only, notifies nobody
        for _ in range(3):
            await monitor.record(clock.now())
            await clock.advance(60)
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "postlane.db"}"\n'
    )

    def alerts(*args: str) -> str:
        with CliRunner().isolation() as (out, _err, _), contextlib.suppress(SystemExit):
            main(["--config", str(tmp_path / "postlane.toml"), "alerts", *args])
        return out.getvalue().decode()

    listed = json.loads(await asyncio.to_thread(alerts, "--json"))
    verdicts = {(a["alert"], tuple(sorted(a["labels"].items()))): a for a in listed}
    stale = verdicts[("PostlaneHighLaneStale", (("lane", "high"),))]
    assert (stale["state"], stale["firing"], stale["for"]) == ("pending", False, "5m")
    states = [a["state"] for a in listed]
    assert "firing" not in states
    assert states == sorted(states, key=["pending", "inactive"].index)  # pending ones first
    human = await asyncio.to_thread(alerts)
    [line] = [line for line in human.splitlines() if "PostlaneHighLaneStale" in line]
    assert "pending" in line and "FIRING" not in human


async def test_the_alerts_command_and_the_dashboard_see_a_failing_webhook_endpoint(
    tmp_path: Path,
) -> None:
    """``PostlaneWebhookEndpointFailing`` fires in `postlane alerts` as in serve's own loop."""
    from click.testing import CliRunner

    from postlane.cli import main

    config = make_config(tmp_path)
    async with AsyncPostlane(config) as app:
        now = app.clock.now()
        await app.store.claim_webhook_endpoint(
            "app", "w", now=now, lease_until=now + 30, start_after=0
        )
        for n in range(10):
            await app.store.webhook_failed(
                "app", "w", error="HTTP 500", paused_until=now + 60, now=now + n
            )
    (tmp_path / "postlane.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "postlane.db"}"\n'
    )

    def alerts_json() -> str:
        with CliRunner().isolation() as (out, _err, _), contextlib.suppress(SystemExit):
            main(["--config", str(tmp_path / "postlane.toml"), "alerts", "--json"])
        return out.getvalue().decode()

    listed = json.loads(await asyncio.to_thread(alerts_json))
    verdicts = {(a["alert"], tuple(sorted(a["labels"].items()))): a for a in listed}
    failing = verdicts[("PostlaneWebhookEndpointFailing", (("endpoint", "app"),))]
    assert failing["firing"] is True


async def test_serve_evaluates_the_rules_on_its_own_and_notifies_the_webhook(
    tmp_path: Path,
) -> None:
    """The monitor inside `postlane serve`: with twenty minutes of growth recorded and the relay
    down, serve evaluates the rules by itself and posts the firing alerts to the webhook."""
    dead_relay = f"smtp://127.0.0.1:{free_port()}"  # nothing listens: mail keeps waiting
    async with webhook() as (url, received):
        await record_twenty_minutes_of_growth(make_config(tmp_path, delivery={"relay": dead_relay}))
        (tmp_path / "postlane.toml").write_text(
            f'[store]\nurl = "sqlite:///{tmp_path / "postlane.db"}"\n'
            f'[delivery]\nrelay = "{dead_relay}"\n'
            f'[alerts]\nwebhook = "{url}"\ninterval = "1s"\n'
            f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        async with start_postlane("serve", cwd=tmp_path, log=tmp_path / "serve.log") as serve:
            await serve.wait_until(
                lambda: any(a for batch in received for a in batch),
                "serve to notify the webhook",
            )
            await serve.stop()
    names = {a["labels"]["alertname"] for batch in received for a in batch if "endsAt" not in a}
    assert {"PostlaneOldestMessageAgeGrowing", "PostlaneNoDeliveries"} <= names
    assert "alert PostlaneOldestMessageAgeGrowing{lane=low} firing" in serve.output()


async def test_destination_labels_are_bounded_and_go_to_the_busiest_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        quiet = [Message(sender="a@x.example", to=[f"u@quiet{q:02}.example"], text="x")
                 for q in range(30)]  # fmt: skip
        busy = [Message(sender="a@x.example", to=[f"u{i}@busy{b}.example"], text="x")
                for b in range(5) for i in range(10)]  # fmt: skip
        await app.send_many(quiet + busy)  # the quiet ones are seen first
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        await worker.run_until_idle()
        await clock.advance(3600)

        metrics = Metrics(app)  # a process starting an hour later
        await metrics.seed_destinations()
        label = metrics.destination_label
        assert [label(f"busy{b}.example") for b in range(5)] == [
            f"busy{b}.example" for b in range(5)
        ]
        named = [q for q in range(30) if label(f"quiet{q:02}.example") != "other"]
        assert named == list(range(15))  # 20 labels: the 5 busiest, then 15 others by name
        assert label("brand-new.example") == "other"
        assert label("google") == "google"  # known providers are always their own label
        assert label("busy0.example") == "busy0.example"  # a label never changes


async def test_attempt_series_are_shown_at_zero_before_their_first_try(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A series that appears with its first count in it shows no ``increase()``: an audit's
    first hard bounce to a destination after a restart never reached a bounce-rate alert.
    Every lane and class of a labelled destination is shown at 0 before it counts."""
    config = make_config(tmp_path, destinations={"ok.example": {"rate": 10}})
    async with AsyncPostlane(config, clock=clock) as app:
        await app.send(Message(sender="a@x.example", to=["u@busy.example"], text="x"))
        await Worker.from_config(
            config, app.store, transport_for(config), clock=clock
        ).run_until_idle()
        await clock.advance(60)

        metrics = Metrics(app)  # a process starting later: busy.example is seeded
        await metrics.seed_destinations()
        text = (await metrics.exposition()).decode()
        name = "postlane_delivery_attempts_total"
        for destination in ("ok.example", "busy.example"):  # configured, seeded
            for lane in Lane:
                for cls in ReplyClass:
                    labels = {"lane": lane.value, "destination": destination, "class": cls.value}
                    assert metric(text, name, **labels) == 0
        assert "google" not in text  # providers are shown once used, not all at start

        worker = Worker.from_config(
            config, app.store, transport_for(config), clock=clock, observer=metrics
        )
        await app.send(Message(sender="a@x.example", to=["u@fresh.example"], text="x"))
        await worker.run_until_idle()
        text = (await metrics.exposition()).decode()
        fresh = {"lane": "normal", "destination": "fresh.example"}
        assert metric(text, name, **fresh, **{"class": "delivered"}) == 1
        assert metric(text, name, **fresh, **{"class": "hard_bounce"}) == 0
        assert (
            metric(text, name, lane="high", destination="fresh.example", **{"class": "temporary"})
            == 0
        )


async def test_relays_and_configured_destinations_keep_their_labels_and_other_hides_no_pause(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An operator audit saw the relay reported as ``other`` (throttling.md tells operators to
    watch destination="relay"), and a paused destination folded into ``other`` next to one
    that was fine: ``other`` said paused 0, and the pause disappeared from /metrics."""
    config = make_config(tmp_path, destinations={"ok.example": {"rate": 10}})
    async with AsyncPostlane(config, clock=clock) as app:
        metrics = Metrics(app)
        label = metrics.destination_label
        for n in range(25):
            label(f"filler{n}.example")  # the bounded labels all given
        assert label("relay") == "relay"
        assert label("relay:127.0.0.1:2525") == "relay:127.0.0.1:2525"
        assert label("ok.example") == "ok.example"  # [destinations.NAME]: always its own
        assert label("late.example") == label("later.example") == "other"
        now = clock.now()
        await app.store.save_destination_states(
            [
                DestinationStatus("late.example", 5.0, None, None, "throttled: slow"),
                DestinationStatus("later.example", None, None, now + 600, "3 connection failures"),
            ]
        )
        text = (await metrics.exposition()).decode()
        assert metric(text, "postlane_destination_paused", destination="other") == 1
        assert metric(text, "postlane_destination_rate", destination="other") == 5.0
        assert metric(text, "postlane_destination_rate", destination="ok.example") == 10.0


async def test_attempt_lines_carry_the_reply_and_a_pause_is_logged_with_why(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator audit found each failed attempt logged as ``class=connection code=-`` with
    no reason, and no line ever saying the relay (all its mail) was paused, until when or why:
    only ``postlane stats`` knew."""
    handler = ScriptedHandler(rcpt={"ada@y.example": "550 5.1.1 <ada@y.example>: no such user"})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTPServer(handler, loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dead_port = free_port()  # nothing listens there
    try:
        config = make_config(
            tmp_path,
            delivery={"relay": f"smtp://127.0.0.1:{port}"},
            routes=[
                {"recipient_domain": ["down.example"], "relay": f"smtp://127.0.0.1:{dead_port}"}
            ],
            throttle={"pause_after": 2},
            destinations={"relay": {"rate": 100}},  # its own limit is no slow-down
        )
        caplog.set_level(logging.INFO)
        async with AsyncPostlane(config, clock=clock) as app:
            worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
            await app.send(sender="a@x.example", to=["ada@y.example"], text="x")
            for n in range(2):
                await app.send(sender="a@x.example", to=[f"u{n}@down.example"], text="x")
            await worker.run_until_idle()
            await worker.transport.close()
    finally:
        server.close()
        await server.wait_closed()
    attempts = [r for r in caplog.records if r.name == "postlane.attempts"]
    [refused] = [r.getMessage() for r in attempts if "code=550" in r.getMessage()]
    assert 'reply="<<recipient>>: no such user"' in refused  # the address not shown
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("postlane")]
    assert not any("ada@" in line for line in ours)
    failed = [r for r in attempts if "class=connection" in r.getMessage()]
    assert len(failed) == 2
    why = f"Error connecting to 127.0.0.1 on port {dead_port}"
    assert all(why in r.getMessage() for r in failed)
    assert "Error connecting" in json.loads(JSONFormatter().format(failed[0]))["reply"]
    [paused] = [r for r in caplog.records if "paused until" in r.getMessage()]
    assert paused.levelno == logging.WARNING
    text = paused.getMessage()
    assert f"relay:127.0.0.1:{dead_port} paused until " in text and " UTC " in text
    assert "2 connection failure(s)" in text and "Error connecting" in text
    assert not any("slowed down" in r.getMessage() for r in caplog.records)
