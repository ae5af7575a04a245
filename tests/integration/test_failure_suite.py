"""The pre-production failure suite: a real postlane (SQLite store, worker, SMTP relay transport,
metrics, alert monitor) delivering to the provider simulator, through what providers put a queue
through: storms of temporary failures and rate limits, every kind of refusal, a relay outage, and
workers stopped in the middle of a run.

Everything but the restart tests runs on an injected clock (``FakeClock``, shared by postlane and
the simulator, with ``Worker.run_until_idle``): hours of retries take milliseconds and the retry
schedule is checked to the second. The restart tests use real processes and real time, and wait
with deadlines. ``docs/testing-your-queue.md`` shows how to run the same rehearsals by hand
against a staging configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import tomllib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from postlane.alerts import Alert, AlertMonitor, load_rules
from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.config import Config
from postlane.message import Message, RecipientState
from postlane.metrics import Metrics
from postlane.records import AttemptView, DeadLetter, MessageView, RecipientView, Selector
from postlane.simulate import Scenario, Simulator, find_message_id
from postlane.transports import transport_for
from postlane.webhooks.endpoints import WebhookEndpoint, new_secret
from postlane.webhooks.sender import SenderSettings, WebhookSender
from postlane.worker import Worker
from tests.conftest import make_config
from tests.processes import POSTLANE, run_postlane, start_postlane
from tests.webhook_receiver import Answer, WebhookReceiver, signed_ok

ROOT = Path(__file__).resolve().parents[2]
SENDER = "app@example.com"
#: what `postlane simulate` prints once it accepts connections
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

# -- provider replies, as providers word them ------------------------------------------------------

TRY_LATER_451 = "451 4.7.1 Service unavailable - try again later"
TRY_LATER_421 = "421 4.7.0 Try again later, closing connection."
GMAIL_UNUSUAL_RATE = """
421-4.7.28 [{ip}] Our system has detected an unusual rate of
421-4.7.28 unsolicited mail originating from your IP address. To protect our
421-4.7.28 users from spam, mail sent from your IP address has been temporarily
421-4.7.28 rate limited. Please visit
421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to
421 4.7.28 review our Bulk Email Senders Guidelines. {id} - gsmtp
"""
YAHOO_DEFERRED = (
    "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user "
    "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
)
MICROSOFT_BUSY = (
    "451 4.7.500 Server busy. Please try again later from [{ip}]. (S77714) "
    "[{id}.eop-nam12.prod.protection.outlook.com]"
)

FINISHED = frozenset({RecipientState.SENT, RecipientState.DEAD})


# -- the rehearsal: postlane on a fake clock, delivering to a simulator on the same clock ----------


@dataclass
class Rehearsal:
    """postlane (store, worker with the SMTP relay transport, metrics) relaying to a provider
    simulator; both on one :class:`FakeClock`."""

    config: Config
    app: AsyncPostlane
    worker: Worker
    metrics: Metrics
    clock: FakeClock
    simulator: Simulator
    #: the reports of simulators already replaced by :meth:`switch_to`
    earlier_reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def relay(self) -> str:
        return self.config.delivery.relay

    async def send_each(
        self, addresses: Iterable[str], *, lane: str = "normal", text: str = "Hello."
    ) -> list[str]:
        """One message per address, enqueued in one commit; their queue ids."""
        results = await self.app.send_many(
            [
                Message(sender=SENDER, to=[address], subject="rehearsal", text=text, lane=lane)
                for address in addresses
            ]
        )
        return [result.id for result in results]

    async def send(self, *addresses: str, lane: str = "normal", text: str = "Hello.") -> str:
        """One message to all ``addresses``; its queue id."""
        result = await self.app.send(
            sender=SENDER, to=list(addresses), subject="rehearsal", text=text, lane=lane
        )
        return result.id

    async def settle(self, *, until: float | None = None, rounds: int = 3000) -> None:
        """Deliver what is due, jump the clock to the next due time, again, until nothing waits
        (or the next due time is past ``until``)."""
        for _ in range(rounds):
            await self.worker.run_until_idle()
            due = await self.app.store.next_due_at()
            if due is None:
                return
            paused = self.worker.relay_paused_until()
            if paused is not None:
                due = max(due, paused)
            if until is not None and due > until:
                return
            await self.clock.advance(max(0.0, due - self.clock.now()))
        raise AssertionError(f"the queue did not settle in {rounds} rounds")

    async def minute(self, monitor: AlertMonitor) -> list[Alert]:
        """One minute of a running ``serve``: deliver what is due, record and evaluate the alert
        rules, then let the minute pass."""
        await self.worker.run_until_idle()
        verdicts = await monitor.run_once(self.clock.now())
        await self.clock.advance(60)
        return verdicts

    async def switch_to(self, scenario: Scenario) -> None:
        """The provider changes behaviour: a new simulator takes over the same port."""
        host, port = self.simulator.address
        await self.simulator.stop()
        self.earlier_reports.append(self.simulator.report())
        self.simulator = Simulator(scenario, host=host, port=port, clock=self.clock)
        await self.simulator.start()

    async def views(self, ids: Sequence[str]) -> list[MessageView]:
        return [await self.app.get(queue_id) for queue_id in ids]

    async def recipients(self, ids: Sequence[str]) -> list[RecipientView]:
        return [r for view in await self.views(ids) for r in view.recipients]

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.metrics.exposition()).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"{name}{labels} is not exposed")


@contextlib.asynccontextmanager
async def rehearsal(
    tmp_path: Path, clock: FakeClock, scenario: Scenario, **sections: dict[str, Any]
) -> AsyncIterator[Rehearsal]:
    simulator = Simulator(scenario, clock=clock)
    host, port = await simulator.start()
    delivery = {
        "relay": f"smtp://{host}:{port}",
        "connect_timeout": "5s",
        "command_timeout": "5s",
        **sections.pop("delivery", {}),
    }
    config = make_config(tmp_path, delivery=delivery, **sections)
    app = AsyncPostlane(config, clock=clock)
    await app.open()
    metrics = Metrics(app)
    worker = Worker.from_config(
        config, app.store, transport_for(config), clock=clock, observer=metrics
    )
    run = Rehearsal(config, app, worker, metrics, clock, simulator)
    try:
        yield run
    finally:
        await worker.transport.close()
        await run.simulator.stop()
        await app.close()


def scenario(name: str, data: dict[str, Any]) -> Scenario:
    return Scenario.from_dict(data, name=name)


def offsets(recipient: RecipientView, since: float) -> list[float]:
    return [attempt.at - since for attempt in recipient.history or ()]


def check_retry_spacing(
    recipient: RecipientView, delays: Sequence[float], cool_down: float, max_attempts: int
) -> None:
    """What the queue promises about one recipient's history, whatever the provider answered:
    a counted attempt is followed by the next try no earlier than the schedule says, a throttled
    or connection failure uses no attempt and a throttled one waits at least the cool-down, and no
    recipient is tried more than ``max_attempts`` times."""
    history = recipient.history or ()
    counted = 0
    for attempt, following in itertools.pairwise(history):
        gap = following.at - attempt.at
        if attempt.counted:
            counted += 1
            wanted = delays[min(counted, len(delays)) - 1]
            assert gap >= wanted, f"{recipient.address}: retried after {gap}s, not {wanted}s"
        elif attempt.cls is ReplyClass.THROTTLED:
            assert gap >= cool_down, f"{recipient.address}: retried {gap}s after a slow-down"
    for attempt in history:
        uncounted = attempt.cls in (ReplyClass.THROTTLED, ReplyClass.CONNECTION)
        assert attempt.counted is not uncounted, f"{recipient.address}: {attempt}"
    assert recipient.attempts == sum(a.counted for a in history) <= max_attempts


def no_duplicates(report: dict[str, Any]) -> None:
    duplicates = report["duplicates"]
    assert duplicates["message_ids"] == 0 and duplicates["deliveries"] == 0, duplicates["first"]
    assert report["without_message_id"] == 0


# -- 1. storms of temporary failures and rate limits -----------------------------------------------

#: every recipient is refused for a while, half with 451 4.7.1 at RCPT, half with 421 4.7.0
#: (which closes the connection); doomed* ones are refused whatever happens
DOOMED = {
    "name": "doomed",
    "class": "temporary",
    "local": "doomed*",
    "reply": TRY_LATER_451,
}
STORM = {
    "description": "every RCPT refused with 451 4.7.1 or 421 4.7.0",
    "seed": 42,
    "rules": [
        DOOMED,
        {"name": "storm", "class": "temporary", "reply": [TRY_LATER_451, TRY_LATER_421]},
    ],
}
AFTER_THE_STORM = {"description": "recovered, except for doomed* recipients", "rules": [DOOMED]}
STORM_RETRY = {"delays": ["1m", "5m", "15m"], "max_attempts": 6, "jitter": 0}
STORM_LANES = {"low": {"max_age": "20m"}}


@dataclass
class StormResult:
    started: float
    recovering: list[RecipientView]
    doomed: list[RecipientView]
    expiring: list[RecipientView]
    storm_report: dict[str, Any]
    after_report: dict[str, Any]
    dead_reasons: dict[str, str | None]
    stats_sent: int
    stats_dead: int


async def run_temporary_storm(tmp_path: Path, clock: FakeClock) -> StormResult:
    """A storm of 451/421 lasting three tries (0, +1m, +6m), then recovery: 40 recipients that
    recover, 10 that are refused for ever, 10 in the low lane whose max_age (20m) runs out."""
    async with rehearsal(
        tmp_path, clock, scenario("storm", STORM), retry=STORM_RETRY, lanes=STORM_LANES
    ) as run:
        started = clock.now()
        recovering = await run.send_each(f"user{i}@example.net" for i in range(40))
        doomed = await run.send_each(f"doomed{i}@example.net" for i in range(10))
        expiring = await run.send_each((f"late{i}@example.org" for i in range(10)), lane="low")
        await run.settle(until=started + 360)  # tries at 0, 60 and 360 s meet the storm
        await run.switch_to(scenario("after-the-storm", AFTER_THE_STORM))
        await run.settle()
        stats = await run.app.stats()
        letters = await run.app.dead_letters()
        return StormResult(
            started=started,
            recovering=await run.recipients(recovering),
            doomed=await run.recipients(doomed),
            expiring=await run.recipients(expiring),
            storm_report=run.earlier_reports[0],
            after_report=run.simulator.report(),
            dead_reasons={letter.address: letter.reason for letter in letters},
            stats_sent=stats.sent,
            stats_dead=stats.dead,
        )


async def test_a_temporary_storm_is_retried_exactly_on_the_schedule_then_recovers(
    tmp_path: Path, clock: FakeClock
) -> None:
    storm = await run_temporary_storm(tmp_path, clock)
    for recipient in storm.recovering:
        assert recipient.state is RecipientState.SENT
        # [retry] delays 1m, 5m, 15m with jitter 0: tries at 0, +1m, +6m, then +21m succeeds
        assert offsets(recipient, storm.started) == [0, 60, 360, 1260]
        history = recipient.history or ()
        assert [a.cls for a in history] == [ReplyClass.TEMPORARY] * 3 + [ReplyClass.DELIVERED]
        assert {a.code for a in history[:3]} <= {451, 421}
        assert all(a.counted for a in history)  # temporary failures use attempts
        assert recipient.attempts == 4
    # the storm used both wordings; nothing got through it; after it, each message arrived once
    assert {"451 4.7.1", "421 4.7.0"} <= set(storm.storm_report["replies"]["by_code"])
    assert storm.storm_report["messages"] == 0
    assert storm.after_report["messages"] == len(storm.recovering)
    no_duplicates(storm.after_report)
    # nothing lost: every recipient ended sent or dead
    assert storm.stats_sent + storm.stats_dead == 60


async def test_a_recipient_refused_max_attempts_times_is_dead_lettered_with_the_reason(
    tmp_path: Path, clock: FakeClock
) -> None:
    storm = await run_temporary_storm(tmp_path, clock)
    for recipient in storm.doomed:
        assert recipient.state is RecipientState.DEAD
        # 1m, 5m, 15m, then the last delay repeats; the 6th failure is the last
        assert offsets(recipient, storm.started) == [0, 60, 360, 1260, 2160, 3060]
        assert recipient.attempts == 6
        assert all(a.cls is ReplyClass.TEMPORARY for a in recipient.history or ())
        assert storm.dead_reasons[recipient.address] == "max_attempts 6 reached"


async def test_max_age_dead_letters_without_a_further_try(tmp_path: Path, clock: FakeClock) -> None:
    storm = await run_temporary_storm(tmp_path, clock)
    for recipient in storm.expiring:
        assert recipient.state is RecipientState.DEAD
        # the 4th try would come at +21m, past the low lane's max_age of 20m: none is made
        assert offsets(recipient, storm.started) == [0, 60, 360]
        reason = storm.dead_reasons[recipient.address] or ""
        assert reason.startswith("max_age 20m"), reason
    # ... and the provider never saw them again once the storm was over
    assert "example.org" not in storm.after_report["domains"]


async def test_a_rate_limit_storm_uses_no_attempt_and_waits_at_least_the_cool_down(
    tmp_path: Path, clock: FakeClock
) -> None:
    # above 10 messages in a burst, then 1 every 2 s, the end of DATA is refused with the
    # wordings Gmail, Yahoo and Microsoft use to say "slow down"
    limited = scenario(
        "rate-limited",
        {
            "seed": 7,
            "throttle": {
                "rate": 0.5,
                "burst": 10,
                "stage": "data",
                "reply": [GMAIL_UNUSUAL_RATE, YAHOO_DEFERRED, MICROSOFT_BUSY],
            },
        },
    )
    cool_down = 120.0
    async with rehearsal(
        tmp_path,
        clock,
        limited,
        retry={"delays": ["1m"], "max_attempts": 2},
        throttle={"cool_down": "2m"},
    ) as run:
        ids = await run.send_each(f"user{i}@gmail.com" for i in range(60))
        await run.settle()
        recipients = await run.recipients(ids)
        report = run.simulator.report()
        stats = await run.app.stats()

    throttled = [a for r in recipients for a in r.history or () if a.cls is ReplyClass.THROTTLED]
    assert throttled, "the provider never refused: the storm did not happen"
    assert {a.code for a in throttled} == {421, 451}
    for recipient in recipients:
        # max_attempts is 2, yet recipients refused more often than that were all delivered:
        # a slow-down uses no attempt
        assert recipient.state is RecipientState.SENT
        assert recipient.attempts == 1
        check_retry_spacing(recipient, [60.0], cool_down, max_attempts=1)
    assert max(len(r.history or ()) for r in recipients) > 2
    # what postlane recorded is what the provider answered, and nothing arrived twice
    assert report["replies"]["total"]["throttled"] == len(throttled)
    assert report["messages"] == 60
    no_duplicates(report)
    # the relay was slowed down: it now has a finite allowed rate
    [relay] = [d for d in stats.destinations if d.destination == "relay"]
    assert relay.rate is not None


MIXED_STORM = {
    "description": "451 4.7.1 and Yahoo's 421 4.7.0 at RCPT, 451 4.3.0 after DATA, at random",
    "seed": 20260301,
    "rules": [
        {"name": "deferred", "class": "temporary", "probability": 0.25, "reply": TRY_LATER_451},
        {"name": "slow-down", "class": "throttled", "probability": 0.1, "reply": YAHOO_DEFERRED},
        {
            "name": "deferred-after-data",
            "class": "temporary",
            "stage": "data",
            "probability": 0.1,
            "reply": "451 4.3.0 Mail server temporarily rejected message.",
        },
    ],
}


@pytest.mark.parametrize(
    "provider",
    [pytest.param(scenario("mixed-storm", MIXED_STORM), id="mixed-storm"), "flaky"],
)
async def test_a_random_storm_loses_nothing_and_delivers_nothing_twice(
    tmp_path: Path, clock: FakeClock, provider: Scenario | str
) -> None:
    loaded = Scenario.load(provider) if isinstance(provider, str) else provider
    delays, max_attempts, cool_down = [60.0, 300.0], 4, 60.0
    async with rehearsal(
        tmp_path,
        clock,
        loaded,
        retry={"delays": ["1m", "5m"], "max_attempts": max_attempts},
        throttle={"cool_down": "1m"},
    ) as run:
        ids = await run.send_each(f"user{i}@example.net" for i in range(80))
        for i in range(20):  # messages to several recipients: each is tracked on its own
            ids.append(
                await run.send(f"a{i}@example.net", f"b{i}@example.org", f"c{i}@example.com")
            )
        await run.settle()
        recipients = await run.recipients(ids)
        stats = await run.app.stats()
        letters = {d.address: d for d in await run.app.dead_letters()}
        report = run.simulator.report()

    assert len(recipients) == 140
    for recipient in recipients:
        assert recipient.state in FINISHED, recipient  # nothing lost, nothing stuck
        check_retry_spacing(recipient, delays, cool_down, max_attempts)
        history = recipient.history or ()
        delivered = [a for a in history if a.cls is ReplyClass.DELIVERED]
        if recipient.state is RecipientState.SENT:
            assert len(delivered) == 1 and history[-1] is delivered[0]
        else:
            assert not delivered
            assert letters[recipient.address].reason == f"max_attempts {max_attempts} reached"
    refused = sum(a.cls is not ReplyClass.DELIVERED for r in recipients for a in r.history or ())
    assert refused > 10, "the storm hardly refused anything"
    # every recipient postlane counts as sent arrived exactly once
    assert report["recipients"] == stats.sent
    no_duplicates(report)


# -- 2. workers stopped mid-run: real processes, real time -----------------------------------------

SLOW_ACCEPT = """\
# accepts everything, 20 ms after each message: slow enough to stop a worker mid-run
description = "accept after 20 ms at the end of DATA"

[delays]
data = "20ms"
"""
RESTART_MESSAGES = 200
RESTART_CONCURRENCY = 8


def write_config(tmp_path: Path, relay: str, **delivery: object) -> Path:
    lines = [
        "[store]",
        f'url = "sqlite:///{tmp_path / "queue.db"}"',
        "[delivery]",
        f'relay = "{relay}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in delivery.items()]
    lines += ["[log]", 'level = "warning"']
    path = tmp_path / "postlane.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def queue_config(tmp_path: Path) -> Config:
    return make_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'queue.db'}"})


async def fill_queue(tmp_path: Path, count: int) -> None:
    async with AsyncPostlane(queue_config(tmp_path)) as app:
        await app.send_many(
            [
                Message(sender=SENDER, to=[f"user{i}@example.net"], subject=str(i), text="x")
                for i in range(count)
            ]
        )


async def finish_with_a_burst_worker(config: Path, log: Path) -> None:
    """``postlane worker --burst``: what a restarted worker does, until nothing is due."""
    await run_postlane("worker", "--burst", config=config, log=log)


@pytest.mark.slow
async def test_sigterm_mid_run_and_a_restart_deliver_every_message_id_exactly_once(
    tmp_path: Path,
) -> None:
    scenario_file = tmp_path / "slow-accept.toml"
    scenario_file.write_text(SLOW_ACCEPT)
    report_file, received = tmp_path / "report.json", tmp_path / "received"
    simulate = start_postlane(
        "simulate",
        "--listen",
        "127.0.0.1:0",
        "--scenario",
        str(scenario_file),
        "--report",
        str(report_file),
        "--store-dir",
        str(received),
        log=tmp_path / "simulate.log",
    )
    async with simulate:
        await simulate.wait_until(
            lambda: LISTENING.search(simulate.output()) is not None, "the simulator to listen"
        )
        found = LISTENING.search(simulate.output())
        assert found is not None
        config = write_config(
            tmp_path,
            f"smtp://127.0.0.1:{found.group(1)}",
            concurrency=RESTART_CONCURRENCY,
            batch_size=RESTART_CONCURRENCY,
            shutdown_grace="10s",
        )
        await fill_queue(tmp_path, RESTART_MESSAGES)
        log = tmp_path / "worker.log"
        async with AsyncPostlane(queue_config(tmp_path)) as app:

            async def a_third_sent() -> bool:
                return (await app.stats()).sent >= RESTART_MESSAGES // 3

            async with start_postlane("worker", config=config, log=log) as worker:
                await worker.wait_until(
                    a_third_sent, "a third of the messages to be delivered", timeout=60
                )
                assert await worker.stop() == 0, worker.describe()
            stats = await app.stats()
            assert stats.sent < RESTART_MESSAGES, "the worker finished before SIGTERM"
            assert sum(lane.sending for lane in stats.lanes.values()) == 0  # all handed back

            await finish_with_a_burst_worker(config, log)
            assert (await app.stats()).sent == RESTART_MESSAGES
            sent = await app.messages(Selector(states=(RecipientState.SENT,)), limit=1000)
            expected = {view.message_id for view in sent}
        assert await simulate.stop() == 0, simulate.describe()

    report = json.loads(report_file.read_text())
    assert report["messages"] == RESTART_MESSAGES
    no_duplicates(report)
    ids = [find_message_id(path.read_bytes()) for path in sorted(received.glob("*.eml"))]
    assert sorted(i.decode() for i in ids if i) == sorted(expected)  # each one, once


@pytest.mark.slow
async def test_sigkill_mid_run_and_a_restart_lose_nothing_and_duplicate_at_most_the_in_flight(
    tmp_path: Path,
) -> None:
    slow = Scenario.from_toml(SLOW_ACCEPT, name="slow-accept", source="(test)")
    async with Simulator(slow) as simulator:
        host, port = simulator.address
        config = write_config(
            tmp_path,
            f"smtp://{host}:{port}",
            concurrency=RESTART_CONCURRENCY,
            batch_size=RESTART_CONCURRENCY,
        )
        await fill_queue(tmp_path, RESTART_MESSAGES)
        log = tmp_path / "worker.log"

        async def a_third_received() -> bool:
            return int(simulator.report()["messages"]) >= RESTART_MESSAGES // 3

        async with start_postlane("worker", config=config, log=log) as worker:
            await worker.wait_until(
                a_third_received, "a third of the messages to arrive", timeout=60
            )
            await worker.kill()  # no chance to finish or hand back anything
        assert simulator.report()["messages"] < RESTART_MESSAGES, "finished before SIGKILL"
        await finish_with_a_burst_worker(config, log)  # reclaims the dead worker's leases
        report = simulator.report()

    duplicates = report["duplicates"]["deliveries"]
    assert report["recipients"] - duplicates == RESTART_MESSAGES  # nothing lost
    assert duplicates <= RESTART_CONCURRENCY  # at most the deliveries in flight at the kill
    async with AsyncPostlane(queue_config(tmp_path)) as app:
        assert (await app.stats()).sent == RESTART_MESSAGES


# -- 3. every terminal class, routed to its dead letter --------------------------------------------

EVERY_CLASS = {
    "description": "one rule per terminal class, chosen by the recipient's local part",
    "seed": 5,
    "max_size": "64KB",  # a bigger message is refused at MAIL FROM with 552 5.3.4
    "rules": [
        {
            "name": "unknown-user",
            "class": "hard_bounce",
            "local": "bounce*",
            "reply": "550 5.1.1 <{address}>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
        },
        {
            "name": "blocklisted",
            "class": "policy_block",
            "local": "spam*",
            "reply": "554 5.7.1 Service unavailable; Client host [{ip}] blocked using "
            "zen.spamhaus.org; https://www.spamhaus.org/query/ip/{ip}",
        },
        {
            "name": "malformed",
            "class": "message_error",
            "local": "malformed*",
            "stage": "data",
            "reply": "554 5.6.0 Mail message is malformed. Not accepted. {id} - gsmtp",
        },
        {
            "name": "dmarc-for-now",
            "class": "policy_block",
            "local": "dmarc*",
            "stage": "data",
            "reply": "451 4.7.26 Unauthenticated email from {sender_domain} is not accepted "
            "due to domain's DMARC policy, please try again later",
        },
        {
            "name": "mailbox-full",
            "class": "soft_bounce",
            "local": "full*",
            "reply": "552 5.2.2 <{address}>: Quota exceeded (mailbox for user is full)",
        },
    ],
}
ROUTING_RETRY = {"delays": ["1m", "5m"], "max_attempts": 3}


@dataclass
class Routing:
    ids: dict[str, str]  # address -> queue id
    after_first_try: dict[str, RecipientView]
    final: dict[str, RecipientView]
    #: address -> its dead letter, with the attempt history (what dlq show shows)
    letters: dict[str, DeadLetter]
    suppressed: set[str]
    report: dict[str, Any]
    soft_bounces: float
    hard_bounces: float
    dead_by_class: dict[str, float]
    relay: str


async def run_every_class(tmp_path: Path, clock: FakeClock) -> Routing:
    async with rehearsal(
        tmp_path, clock, scenario("every-class", EVERY_CLASS), retry=ROUTING_RETRY
    ) as run:
        ids: dict[str, str] = {}
        singles = [
            f"{local}{n}@{domain}"
            for local in ("bounce", "spam", "malformed", "dmarc", "full", "ok")
            for n, domain in ((1, "example.net"), (2, "example.org"))
        ]
        for address, queue_id in zip(singles, await run.send_each(singles), strict=True):
            ids[address] = queue_id
        # one message, three fates: the accepted recipient is never sent twice
        mixed = ("ok3@example.net", "bounce3@example.net", "spam3@example.net")
        queue_id = await run.send(*mixed)
        ids |= dict.fromkeys(mixed, queue_id)
        big = await run.send("big@example.net", text="x" * 100_000)
        ids["big@example.net"] = big

        await run.worker.run_until_idle()
        after_first_try = {r.address: r for r in await run.recipients(sorted(set(ids.values())))}
        await run.settle()
        final = {r.address: r for r in await run.recipients(sorted(set(ids.values())))}
        letters: dict[str, DeadLetter] = {}
        for queue_id in sorted(
            {ids[a] for a, r in final.items() if r.state is RecipientState.DEAD}
        ):
            letters |= {letter.address: letter for letter in await run.app.dead_letter(queue_id)}
        return Routing(
            ids=ids,
            after_first_try=after_first_try,
            final=final,
            letters=letters,
            suppressed={s.address for s in await run.app.suppressions()},
            report=run.simulator.report(),
            soft_bounces=await run.metric("postlane_bounces_total", type="soft"),
            hard_bounces=await run.metric("postlane_bounces_total", type="hard"),
            dead_by_class={
                cls.value: await run.metric("postlane_dead_letters_total", **{"class": cls.value})
                for cls in ReplyClass
                if cls is not ReplyClass.DELIVERED
            },
            relay=run.relay,
        )


def enhanced(letter: DeadLetter) -> str | None:
    return letter.last_response.enhanced if letter.last_response else None


def check_full_context(history: Sequence[AttemptView], relay: str, domain: str) -> None:
    """Every attempt keeps what an operator needs: class, code, enhanced code, the reply's text,
    the relay it went through and the destination it was for."""
    assert history
    for attempt in history:
        assert attempt.code is not None and attempt.enhanced and attempt.text
        assert attempt.relay == relay and attempt.destination == domain


async def test_each_terminal_class_is_dead_lettered_and_only_hard_bounces_are_suppressed(
    tmp_path: Path, clock: FakeClock
) -> None:
    routing = await run_every_class(tmp_path, clock)
    first, final, letters = routing.after_first_try, routing.final, routing.letters

    def named(prefix: str) -> list[str]:
        return sorted(a for a in final if a.split("@")[0].rstrip("0123456789") == prefix)

    # refused for good at the first try: dead at once, with their class
    for prefix, cls in (
        ("bounce", ReplyClass.HARD_BOUNCE),
        ("spam", ReplyClass.POLICY_BLOCK),
        ("malformed", ReplyClass.MESSAGE_ERROR),
        ("big", ReplyClass.MESSAGE_ERROR),
    ):
        for address in named(prefix):
            assert first[address].state is RecipientState.DEAD, address
            assert final[address].attempts == 1
            assert letters[address].cls is cls, address
    assert enhanced(letters["big@example.net"]) == "5.3.4"  # too large
    assert {enhanced(letters[a]) for a in named("malformed")} == {"5.6.0"}

    # a 4xx DMARC refusal and a full mailbox are retried, not dead ...
    for address in named("dmarc") + named("full"):
        assert first[address].state is RecipientState.DEFERRED, address
        assert first[address].attempts == 1
    # ... until max_attempts, each try recorded with its class
    for prefix, cls in (("dmarc", ReplyClass.POLICY_BLOCK), ("full", ReplyClass.SOFT_BOUNCE)):
        for address in named(prefix):
            letter = letters[address]
            assert letter.cls is cls and letter.attempts == 3
            assert letter.reason == "max_attempts 3 reached"
            assert [a.cls for a in letter.history or ()] == [cls] * 3

    # dlq show keeps every attempt's full context
    for address, letter in letters.items():
        assert len(letter.history or ()) == letter.attempts
        check_full_context(letter.history or (), routing.relay, address.split("@")[1])

    # only the hard bounces are on the suppression list
    assert routing.suppressed == set(named("bounce"))
    # the accepted recipients arrived once, the one beside a bounce and a block too
    for address in named("ok"):
        assert final[address].state is RecipientState.SENT
    assert routing.report["recipients"] == len(named("ok"))
    no_duplicates(routing.report)
    # soft bounces are counted as such (3 tries each), hard ones too
    assert routing.soft_bounces == 3 * len(named("full"))
    assert routing.hard_bounces == len(named("bounce"))
    assert routing.dead_by_class["soft_bounce"] == len(named("full"))
    assert routing.dead_by_class["hard_bounce"] == len(named("bounce"))
    assert routing.dead_by_class["message_error"] == len(named("malformed")) + 1
    assert routing.dead_by_class["policy_block"] == len(named("spam")) + len(named("dmarc"))


def run_cli(config: Path, *args: str) -> Any:
    import subprocess

    result = subprocess.run(
        [*POSTLANE, "--config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
async def test_dlq_list_dlq_show_and_suppress_list_show_every_terminal_class(
    tmp_path: Path, clock: FakeClock
) -> None:
    routing = await run_every_class(tmp_path, clock)
    config = tmp_path / "postlane.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "postlane.db"}"\n')

    rows = await asyncio.to_thread(run_cli, config, "dlq", "list")
    assert {row["address"]: row["class"] for row in rows} == {
        address: letter.cls.value for address, letter in routing.letters.items()
    }
    for row in rows:
        assert set(row) >= {"id", "address", "domain", "lane", "attempts", "class", "dead_at"}
        assert row["relay"] == routing.relay
        assert row["last_response"]["code"] >= 400

    mixed = routing.ids["bounce3@example.net"]
    shown = await asyncio.to_thread(run_cli, config, "dlq", "show", mixed)
    assert {letter["address"]: letter["class"] for letter in shown} == {
        "bounce3@example.net": "hard_bounce",
        "spam3@example.net": "policy_block",
    }
    for letter in shown:
        for attempt in letter["history"]:
            assert attempt["class"] == letter["class"]
            assert attempt["code"] and attempt["enhanced"] and attempt["text"]
            assert attempt["relay"] == routing.relay and attempt["destination"] == "example.net"

    suppressed = await asyncio.to_thread(run_cli, config, "suppress", "list")
    assert {entry["address"] for entry in suppressed} == routing.suppressed


def providers_rules() -> list[dict[str, Any]]:
    """The built-in ``providers`` scenario's rules, as written (each declares its class)."""
    text = resources.files("postlane.data").joinpath("scenarios/providers.toml").read_text("utf-8")
    rules: list[dict[str, Any]] = tomllib.loads(text)["rules"]
    # a slow accept needs real seconds, and a dropped connection pauses the relay for everyone:
    # the drops rehearsal is in docs/testing-your-queue.md
    return [rule for rule in rules if "delay" not in rule and not rule.get("drop")]


def address_for(rule: dict[str, Any]) -> str:
    """An address the rule matches: its local-part glob filled in, at its first domain."""
    local, domain = rule["local"], rule.get("domain", "example.org")
    local = local[0] if isinstance(local, list) else local
    domain = domain[0] if isinstance(domain, list) else domain
    return f"{local.rstrip('*')}-{rule['name']}@{domain}"


async def test_every_provider_wording_ends_as_its_class_says(
    tmp_path: Path, clock: FakeClock
) -> None:
    rules = providers_rules()
    addresses = {address_for(rule): rule for rule in rules}
    accepted = ["ada@gmail.com", "ada@outlook.com", "ada@yahoo.com", "ada@example.org"]
    async with rehearsal(
        tmp_path,
        clock,
        Scenario.load("providers"),
        retry={"delays": ["1m"], "max_attempts": 3, "max_age": "30m"},
        throttle={"cool_down": "5m"},
    ) as run:
        ids = await run.send_each([*addresses, *accepted])
        await run.settle()
        recipients = {r.address: r for r in await run.recipients(ids)}
        letters = {d.address: d for d in await run.app.dead_letters()}
        suppressed = {s.address for s in await run.app.suppressions()}
        report = run.simulator.report()

    assert {cls for rule in rules if (cls := rule["class"]) != "delivered"} == {
        "hard_bounce",
        "soft_bounce",
        "policy_block",
        "throttled",
        "temporary",
    }
    for address, rule in addresses.items():
        recipient, letter = recipients[address], letters[address]
        cls = ReplyClass(rule["class"])
        code = int(rule["reply"].strip()[:3])
        assert recipient.state is RecipientState.DEAD, (address, recipient.state)
        assert letter.cls is cls, (address, letter.cls, rule["name"])
        assert all(a.cls is cls for a in letter.history or ()), address
        if cls is ReplyClass.THROTTLED:  # never an attempt: only max_age ends it
            assert letter.attempts == 0 and (letter.reason or "").startswith("max_age 30m")
        elif cls is ReplyClass.HARD_BOUNCE or (code >= 500 and cls is not ReplyClass.SOFT_BOUNCE):
            assert letter.attempts == 1, address
        else:  # temporary, soft bounces and 4xx blocks: retried until max_attempts
            assert letter.attempts == 3 and letter.reason == "max_attempts 3 reached", address
        assert (address in suppressed) is (cls is ReplyClass.HARD_BOUNCE), address
    for address in accepted:
        assert recipients[address].state is RecipientState.SENT
    assert report["recipients"] == len(accepted)
    no_duplicates(report)


# -- 4. an outage: alerts fire with their runbooks, and resolve after recovery ---------------------

OUTAGE_ALERTS = {
    "PostlaneNoDeliveries",
    "PostlaneOldestMessageAgeGrowing{lane=high}",
    "PostlaneOldestMessageAgeGrowing{lane=normal}",
    "PostlaneOldestMessageAgeGrowing{lane=low}",
    "PostlaneHighLaneStale{lane=high}",
    "PostlaneDestinationPausedTooLong{destination=relay}",
}
BOUNCE_ALERTS = {"PostlaneDeadLetterSpike", "PostlaneHardBounceRatio"}
REFUSED = {
    "description": "down: every connection is reset before the greeting",
    "connect": {"refuse": 1.0},
}


def check_runbook(alert: Alert) -> None:
    """The alert links to a runbook that exists in docs/runbooks/ and is about this alert."""
    for url in (
        alert.as_json()["runbook_url"],
        alert.alertmanager(0, None)["annotations"]["runbook_url"],
    ):
        prefix, _, name = url.rpartition("/blob/main/docs/runbooks/")
        assert prefix.startswith("https://") and name.endswith(".md"), url
        runbook = ROOT / "docs" / "runbooks" / name
        assert runbook.is_file(), f"{alert.rule.name}: {url} has no file"
        assert alert.rule.name in runbook.read_text(encoding="utf-8")


def firing_keys(verdicts: Iterable[Alert]) -> set[str]:
    return {alert.key for alert in verdicts if alert.firing}


def pending_keys(verdicts: Iterable[Alert]) -> set[str]:
    """Alerts whose condition holds, not yet for their rule's ``for``."""
    return {alert.key for alert in verdicts if alert.pending}


def outage_rehearsal(
    tmp_path: Path, clock: FakeClock
) -> contextlib.AbstractAsyncContextManager[Rehearsal]:
    return rehearsal(
        tmp_path,
        clock,
        scenario("refused", REFUSED),
        delivery={"connect_timeout": "2s"},
        retry={"delays": ["1m", "5m", "15m"]},
        # paused after 3 failed connections: for 5m, 10m, 20m, then 40m at most
        throttle={"pause_after": 3, "pause": "5m", "max_pause": "40m"},
    )


@dataclass
class Outage:
    ids: list[str]
    #: each alert that fired, and the minute (seconds since the start) it first did
    first_fired: dict[str, float]
    fired: dict[str, Alert]


async def fifty_minutes_of_outage(
    run: Rehearsal, monitor: AlertMonitor, lanes: Sequence[str]
) -> Outage:
    """The relay refuses every connection for 50 minutes while mail keeps coming in: a batch in
    each of ``lanes`` at the start, then one normal-lane message a minute."""
    started = run.clock.now()
    ids: list[str] = []
    for lane in lanes:
        ids += await run.send_each((f"{lane}{i}@example.net" for i in range(10)), lane=lane)
    first_fired: dict[str, float] = {}
    fired: dict[str, Alert] = {}
    for minute in range(50):
        ids += await run.send_each([f"later{minute}@example.net"])
        at = run.clock.now() - started
        for alert in await run.minute(monitor):
            if alert.firing:
                first_fired.setdefault(alert.key, at)
                fired.setdefault(alert.key, alert)
        assert (await run.app.stats()).sent == 0
    return Outage(ids, first_fired, fired)


async def test_a_relay_outage_fires_the_alerts_with_runbooks_and_recovery_resolves_them(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with outage_rehearsal(tmp_path, clock) as run:
        monitor = AlertMonitor.from_config(run.app, run.config)
        outage = await fifty_minutes_of_outage(run, monitor, ["high", "normal", "low"])
        [relay] = [d for d in (await run.app.stats()).destinations if d.destination == "relay"]
        assert relay.paused_until is not None and "connection failure" in (relay.reason or "")
        assert set(outage.first_fired) == OUTAGE_ALERTS
        # none before its window and its `for` (as Prometheus): 15 minutes recorded, then 5
        assert outage.first_fired["PostlaneNoDeliveries"] >= 19 * 60
        assert outage.first_fired["PostlaneDestinationPausedTooLong{destination=relay}"] >= 30 * 60
        # over 5 (10) minutes old, then 5 minutes (`for`)
        assert outage.first_fired["PostlaneHighLaneStale{lane=high}"] >= 10 * 60
        assert outage.first_fired["PostlaneOldestMessageAgeGrowing{lane=normal}"] >= 15 * 60
        for alert in outage.fired.values():
            check_runbook(alert)
        assert {key for key, _ in await run.app.store.alerts_firing()} == OUTAGE_ALERTS

        # the provider is back; the relay's next probe finds it and everything goes out
        await run.switch_to(Scenario.load("accept"))
        for _ in range(60):
            verdicts = await run.minute(monitor)
            if not firing_keys(verdicts) and (await run.app.stats()).sent == len(outage.ids):
                break
        assert firing_keys(verdicts) == set()
        assert await run.app.store.alerts_firing() == []
        recipients = await run.recipients(outage.ids)
        assert all(r.state is RecipientState.SENT for r in recipients)
        assert all(r.attempts == 1 for r in recipients)  # the outage used no attempt
        assert run.earlier_reports[0]["replies"]["by_stage"]["connect"]["connection"] > 0
        report = run.simulator.report()
        assert report["messages"] == len(outage.ids)
        no_duplicates(report)


async def test_no_deliveries_fires_while_normal_lane_mail_waits_through_an_outage(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with outage_rehearsal(tmp_path, clock) as run:
        monitor = AlertMonitor.from_config(run.app, run.config)
        outage = await fifty_minutes_of_outage(run, monitor, ["normal"])
        assert "PostlaneOldestMessageAgeGrowing{lane=normal}" in outage.first_fired
        assert "PostlaneNoDeliveries" in outage.first_fired


async def test_a_bounce_storm_fires_the_bounce_alerts_with_runbooks_then_they_resolve(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with rehearsal(tmp_path, clock, Scenario.load("bounces")) as run:
        monitor = AlertMonitor.from_config(run.app, run.config)
        # a stale list: 60 of 100 addresses no longer exist
        await run.send_each(
            [f"bounce{i}@gmail.com" for i in range(60)] + [f"ada{i}@gmail.com" for i in range(40)]
        )
        await run.minute(monitor)
        verdicts = await run.minute(monitor)
        # the dead letters at once (for 0m); the ratio once it has held 5 minutes (for 5m)
        assert firing_keys(verdicts) == {"PostlaneDeadLetterSpike"}
        assert pending_keys(verdicts) == {"PostlaneHardBounceRatio"}
        for _ in range(5):
            verdicts = await run.minute(monitor)
        assert firing_keys(verdicts) == BOUNCE_ALERTS
        for alert in verdicts:
            if alert.firing:
                check_runbook(alert)
        assert len(await run.app.suppressions()) == 60
        for minute in range(35):  # clean traffic afterwards
            await run.send_each(f"clean{minute}-{i}@gmail.com" for i in range(10))
            verdicts = await run.minute(monitor)
        assert firing_keys(verdicts) == set()
        assert await run.app.store.alerts_firing() == []
        no_duplicates(run.simulator.report())


# -- 5. a webhook endpoint down: its alert fires with its runbook, and resolves ------------------

WEBHOOK_ALERTS = {"PostlaneWebhookEndpointFailing{endpoint=app}"}


async def test_a_webhook_endpoint_outage_fires_its_alert_with_a_runbook_then_it_resolves(
    tmp_path: Path, clock: FakeClock
) -> None:
    secret = new_secret()

    async def waiting_for_its_next_try(run: Rehearsal) -> None:
        """Until the sender has tried whatever was due by the (fake) clock."""
        for _ in range(500):
            [state] = await run.app.store.webhook_endpoints()  # type: ignore[attr-defined]
            if state.paused_until is None or state.paused_until > run.clock.now():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the webhook sender did not try again")

    async with (
        rehearsal(tmp_path, clock, Scenario.load("accept")) as run,
        WebhookReceiver(secret) as receiver,
    ):
        receiver.answer = lambda request: Answer(503, body=b"maintenance")
        endpoint = WebhookEndpoint.from_table(
            {"url": receiver.url, "secret": secret, "allow_private": True, "name": "app"}
        )
        sender = WebhookSender(
            run.app.store,  # type: ignore[arg-type]
            [endpoint],
            clock=clock,
            settings=SenderSettings(poll=0.01, save_every=0.02),
        )
        monitor = AlertMonitor.from_config(run.app, run.config)
        await run.send_each(["ada@example.net"])
        stop = asyncio.Event()
        sending = asyncio.create_task(sender.run(stop))
        await receiver.wait_until(lambda: len(receiver.received) >= 1, "a first try")
        fired: dict[str, Alert] = {}
        for _ in range(120):
            await waiting_for_its_next_try(run)
            fired.update((a.key, a) for a in await run.minute(monitor) if a.firing)
            if fired:
                break
        assert set(fired) == WEBHOOK_ALERTS
        check_runbook(fired.popitem()[1])
        # the application is back: the next try finds it, the backlog follows, the alert resolves
        receiver.answer = signed_ok
        for _ in range(120):
            await waiting_for_its_next_try(run)
            verdicts = await run.minute(monitor)
            if not firing_keys(verdicts) and len(receiver.accepted) == 2:  # queued, sent
                break
        stop.set()
        await sending
        assert firing_keys(verdicts) == set()
        assert [r.data["type"] for r in receiver.accepted] == ["queued", "sent"]


# -- 6. a relay that can never take postlane's mail as configured ----------------------------------

MISCONFIGURED_ALERTS = {"PostlaneRelayMisconfigured{destination=relay}"}


async def test_issue_17_4_credentials_the_relay_cannot_take_fire_the_misconfiguration_alert_at_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The relay offers no TLS, and postlane never sends a password in clear: nothing can go
    until the configuration changes, the alert says so in the first minute, no attempt used."""
    async with rehearsal(
        tmp_path,
        clock,
        Scenario.load("accept"),
        delivery={"username": "app", "password": "correct-horse-battery"},
    ) as run:
        monitor = AlertMonitor.from_config(run.app, run.config)
        [queued] = await run.send_each(["ada@example.net"])
        verdicts = await run.minute(monitor)
        fired = {alert.key: alert for alert in verdicts if alert.firing}
        assert set(fired) == MISCONFIGURED_ALERTS
        check_runbook(fired.popitem()[1])
        [recipient] = await run.recipients([queued])
        assert recipient.state is not RecipientState.DEAD and recipient.attempts == 0


# -- 7. complaints: a feedback loop reports a newsletter as spam ----------------------------------

COMPLAINT_ALERTS = {"PostlaneComplaintRateHigh", "PostlaneComplaintRateCritical"}


async def test_complaints_over_the_providers_thresholds_fire_the_complaint_alerts(
    tmp_path: Path, clock: FakeClock
) -> None:
    from postlane.feedback import Feedback, FeedbackKind

    async with rehearsal(tmp_path, clock, Scenario.load("accept")) as run:
        monitor = AlertMonitor.from_config(run.app, run.config)
        ids = await run.send_each(f"reader{i}@gmail.com" for i in range(1000))
        await run.minute(monitor)
        assert (await run.app.stats()).sent == 1000
        # the next minute, Gmail's feedback loop reports four of them as spam (0.4%)
        refs = [
            ref
            for i in (7, 70, 700, 77)
            for ref in await run.app.store.find_deliveries(f"reader{i}@gmail.com", queue_id=ids[i])
        ]
        assert len(refs) == 4
        now = clock.now()
        await run.app.store.record_feedback(
            [Feedback(FeedbackKind.COMPLAINED, ref.delivery_id, now, "arf") for ref in refs], now
        )
        fired: dict[str, Alert] = {}
        for _ in range(2):  # the minute they came in is recorded once it has passed
            verdicts = await run.minute(monitor)
        assert pending_keys(verdicts) == COMPLAINT_ALERTS  # both rules wait 15 minutes (`for`)
        for _ in range(15):
            assert not firing_keys(verdicts)
            verdicts = await run.minute(monitor)
        fired.update((a.key, a) for a in verdicts if a.firing)
        assert set(fired) == COMPLAINT_ALERTS
        for alert in fired.values():
            check_runbook(alert)
        # a day later, with nothing more reported, both resolve
        await clock.advance(86400)
        verdicts = await run.minute(monitor)
        assert firing_keys(verdicts) == set()


def test_the_rehearsals_fire_every_alert_rule() -> None:
    """Each shipped alert rule is fired by one of the rehearsals above (so its runbook link is
    checked); a new rule needs a rehearsal here."""
    rehearsed = (
        OUTAGE_ALERTS | BOUNCE_ALERTS | WEBHOOK_ALERTS | MISCONFIGURED_ALERTS | COMPLAINT_ALERTS
    )
    fired = {key.split("{")[0] for key in rehearsed}
    assert fired == {rule.name for rule in load_rules()}


async def test_a_relay_that_greets_every_connection_with_421_dead_letters_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with rehearsal(
        tmp_path,
        clock,
        Scenario.load("outage"),
        retry={"delays": ["1m"], "max_attempts": 3},
        throttle={"pause": "1m", "max_pause": "5m"},
    ) as run:
        ids = await run.send_each(f"user{i}@example.net" for i in range(10))
        for _ in range(30):  # half an hour of outage
            await run.worker.run_until_idle()
            await clock.advance(60)
        recipients = await run.recipients(ids)
        assert (await run.app.stats()).dead == 0
        assert all(r.attempts == 0 for r in recipients)


async def test_an_outage_longer_than_max_age_dead_letters_as_connection_failures(
    tmp_path: Path, clock: FakeClock
) -> None:
    """No attempt is used while the relay is down, but max_age still ends the wait: the dead
    letters say it was the connection, and nobody is suppressed for it."""
    async with rehearsal(
        tmp_path,
        clock,
        Scenario.load("outage"),
        retry={"delays": ["1m"], "max_attempts": 3, "max_age": "20m"},
        throttle={"pause": "1m", "max_pause": "5m"},
    ) as run:
        ids = await run.send_each(f"user{i}@example.net" for i in range(5))
        for _ in range(30):  # half an hour of outage, past the 20 minutes mail may wait
            await run.worker.run_until_idle()
            await clock.advance(60)
        letters = [d for queue_id in ids for d in await run.app.dead_letter(queue_id)]
        assert len(letters) == 5
        for letter in letters:
            assert letter.cls is ReplyClass.CONNECTION, letter
            assert letter.attempts == 0  # the outage used up no attempt ...
            assert (letter.reason or "").startswith("max_age 20m"), letter.reason  # ... age did
            assert letter.history and all(a.cls is ReplyClass.CONNECTION for a in letter.history)
        assert (await run.app.stats()).suppression_list == 0
        assert await run.metric("postlane_dead_letters_total", **{"class": "connection"}) == 5
