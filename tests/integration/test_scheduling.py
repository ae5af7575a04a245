"""Scheduling as applications and operators meet it: ``send_at`` and ``expires_at`` from the
Python API (datetimes, ISO 8601, Unix seconds) (the CLI's ``--at`` and ``--expires``: in
tests/integration/test_cli.py), a real
worker on a real store with the clock injected, and an operator's flush that leaves scheduled
mail alone unless told otherwise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from postlane.app import AsyncPostlane, Cancelled, QueueAction
from postlane.classify import ReplyClass
from postlane.clock import FakeClock, iso, parse_when, when
from postlane.errors import NotFound, ValidationError
from postlane.message import Lane, RecipientState
from postlane.records import Selector
from postlane.transports import transport_for
from postlane.worker import Worker
from tests.conftest import make_config

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_the_last_second_of_9999_is_a_time_and_one_stored_later_is_shown_as_it() -> None:
    assert parse_when(253402300799, "expires_at") == 253402300799.0
    assert iso(253402300799.0) == "9999-12-31T23:59:59.000Z"
    # a row stored before such times were refused: listings show it, not a 500
    assert iso(1e300) == "9999-12-31T23:59:59.000Z"
    assert when(1e300) == "9999-12-31 23:59:59"


def test_times_are_read_in_every_form_the_contract_gives() -> None:
    at = datetime.fromtimestamp(T0, UTC)
    assert parse_when(at, "send_at") == T0
    assert parse_when(at.astimezone(timezone(timedelta(hours=-5))), "send_at") == T0
    assert parse_when("2027-01-15T08:00:00Z", "send_at") == T0
    assert parse_when("2027-01-15T09:00:00+01:00", "send_at") == T0
    assert parse_when(T0, "send_at") == T0
    assert parse_when(str(int(T0)), "send_at") == T0
    assert parse_when(None, "send_at") is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (datetime(2027, 1, 15, 8, 0), "no time zone"),
        ("2027-01-15T08:00:00", "no time zone"),
        ("next tuesday", "ISO 8601"),
        (True, "must be a time"),
        (-5, "must be a time"),
        (float("nan"), "must be a time"),
        # said in the words of the text given, not of Python's objects
        ("0001-01-01T00:00:00Z", r"after 1970, got '0001-01-01T00:00:00Z'"),
        ("2027-01-15T08:00:00", r"add one, as in 2026-12-02T09:30:00Z"),
        # Unix seconds are digits: not float()'s other spellings
        ("1_800_000_000", "ISO 8601"),
        ("1e9", "ISO 8601"),
        ("inf", "ISO 8601"),
        # a blank template value is a mistake, not "at once"
        ("", "send_at is empty"),
        ("  ", "send_at is empty"),
        # past what a time can be written as: refused, not stored to break every listing
        (10**400, "before the year 10000"),
        (1e300, "before the year 10000"),
        (float("inf"), "before the year 10000"),
        ("9" * 900, r"before the year 10000, got '9{36}\.\.\.$"),
        (253402300800, "before the year 10000"),
    ],
)
def test_a_time_that_could_mean_two_things_is_refused_naming_the_field(
    value: object, says: str
) -> None:
    with pytest.raises(ValidationError, match=says) as caught:
        parse_when(value, "send_at")  # type: ignore[arg-type]
    assert caught.value.field == "send_at"
    if isinstance(value, str):  # HTTP and CLI users: no Python words
        assert "datetime" not in caught.value.message and "aware" not in caught.value.message


async def test_scheduled_mail_waits_for_its_time_and_expired_mail_never_goes(
    tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        later = await app.send(
            sender="a@example.com",
            to=["ada@example.net"],
            text="happy new year",
            send_at=datetime.fromtimestamp(T0 + 3600, UTC),
        )
        with pytest.raises(ValidationError, match="after send_at"):
            await app.send(
                sender="a@example.com",
                to=["bob@example.net"],
                text="x",
                send_at=T0 + 3600,
                expires_at=T0 + 1800,
            )
        with pytest.raises(ValidationError, match="already passed"):
            await app.send(sender="a@example.com", to=["bob@example.net"], text="x", expires_at=T0)
        code = await app.send(
            sender="a@example.com", to=["bob@example.net"], text="code 123456", expires_at=T0 + 600
        )
        view = await app.get(later.id)
        assert view.send_at == T0 + 3600
        assert view.recipients[0].state is RecipientState.QUEUED
        assert view.recipients[0].next_attempt_at == T0 + 3600

        # the relay is down past the code's expiry: the code must never go late
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        await app.act(QueueAction.HOLD, Selector(ids=(code.id,)))
        await clock.advance(601)
        await app.act(QueueAction.RELEASE, Selector(ids=(code.id,)))
        assert await worker.run_until_idle() == 0  # nothing due: the scheduled one waits
        assert (await app.get(code.id)).recipients[0].state is RecipientState.DEAD
        events = [e.type for e in await app.store.events_after(None, limit=100)]
        assert "expired" in events
        # an operator's grouped listing says why, though no reply ever came
        [group] = await app.dead_groups(Selector(all=True), limit=10)
        assert group.count == 1 and group.reply == "expired"
        # a sweep of temporary failures leaves it dead: an expired code is not resent unasked
        assert (
            await app.act(QueueAction.REQUEUE, Selector(all=True, classes=(ReplyClass.TEMPORARY,)))
            == 0
        )

        await clock.advance(3600)
        assert await worker.run_until_idle() == 1
        assert (await app.get(later.id)).recipients[0].state is RecipientState.SENT
        # an operator's requeue overrides the expiry: it is sent
        await app.requeue(Selector(ids=(code.id,)))
        assert await worker.run_until_idle() == 1
        assert (await app.get(code.id)).recipients[0].state is RecipientState.SENT
        await worker.transport.close()


async def test_a_flush_leaves_scheduled_mail_for_its_time_unless_asked(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with AsyncPostlane(make_config(tmp_path), clock=clock) as app:
        scheduled = await app.send(
            sender="a@example.com", to=["ada@example.net"], text="x", send_at=T0 + 86400
        )
        assert await app.act(QueueAction.FLUSH, Selector(all=True)) == 0
        view = await app.get(scheduled.id)
        assert view.recipients[0].next_attempt_at == T0 + 86400
        counts = await app.summarize(QueueAction.FLUSH, Selector(all=True))
        assert sum(c.count for c in counts) == 0
        assert await app.act(QueueAction.FLUSH, Selector(all=True, scheduled=True)) == 1
        assert (await app.get(scheduled.id)).recipients[0].next_attempt_at == T0


async def test_a_hold_and_release_leave_scheduled_mail_for_its_time(tmp_path: Path) -> None:
    """The runbooks hold and release by domain or lane, where campaigns wait for their time: a
    release made them due at once (an operator audit saw a day-early campaign go out)."""
    clock = FakeClock(T0)
    async with AsyncPostlane(make_config(tmp_path), clock=clock) as app:
        scheduled = await app.send(
            sender="a@example.com", to=["ada@example.net"], text="x", send_at=T0 + 86400
        )
        now = await app.send(sender="a@example.com", to=["bob@example.net"], text="x")
        await clock.advance(60)
        assert await app.act(QueueAction.HOLD, Selector(all=True)) == 2
        await clock.advance(60)
        assert await app.act(QueueAction.RELEASE, Selector(all=True)) == 2
        [waiting] = (await app.get(scheduled.id)).recipients
        assert waiting.state is RecipientState.QUEUED and waiting.next_attempt_at == T0 + 86400
        [due] = (await app.get(now.id)).recipients
        assert due.state is RecipientState.QUEUED and due.next_attempt_at == T0 + 120
        # once its time has come, a release makes it due now, as any other
        assert await app.act(QueueAction.HOLD, Selector(all=True)) == 2
        await clock.advance(86400)
        assert await app.act(QueueAction.RELEASE, Selector(all=True)) == 2
        assert (await app.get(scheduled.id)).recipients[0].next_attempt_at == T0 + 86520


async def test_scheduled_mail_is_young_until_its_time_and_max_age_counts_from_there(
    tmp_path: Path,
) -> None:
    """Mail scheduled three days ahead (past the default max_age of two) is tried at its time,
    not dead-lettered on arrival; until then it makes no lane look stale (the queue-age
    metrics and alerts), and once due its age counts from its send_at."""
    clock = FakeClock(T0)
    config = make_config(tmp_path, delivery={"relay": "smtp://127.0.0.1:9"})  # nobody there
    async with AsyncPostlane(config, clock=clock) as app:
        later = await app.send(
            sender="a@example.com", to=["ada@example.net"], text="x", send_at=T0 + 3 * 86400
        )
        await clock.advance(3600)
        stats = await app.stats()
        assert stats.lanes["normal"].oldest_age_seconds == 0.0
        await clock.advance(3 * 86400 - 3600 + 60)
        assert (await app.stats()).lanes["normal"].oldest_age_seconds == 60.0
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        try:
            await worker.run_until_idle()
        finally:
            await worker.transport.close()
        [recipient] = (await app.get(later.id)).recipients
        assert recipient.state is RecipientState.DEFERRED and recipient.attempts == 0
        assert recipient.last_response is not None  # tried: the relay did not answer


async def test_a_requeue_sweep_leaves_mail_that_expired_after_failing_dead(
    tmp_path: Path,
) -> None:
    """A code tried while the relay was down (class ``connection``), then expired: the usual
    clean-up after the outage (``dlq requeue --all --class connection``) must not send it;
    naming its message does."""
    clock = FakeClock(T0)
    config = make_config(tmp_path, delivery={"relay": "smtp://127.0.0.1:9"})  # nobody there
    async with AsyncPostlane(config, clock=clock) as app:
        code = await app.send(
            sender="a@example.com", to=["ada@example.net"], text="123456", expires_at=T0 + 60
        )
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        try:
            await worker.run_until_idle()
            await clock.advance(61)
            await worker.run_until_idle()
        finally:
            await worker.transport.close()
        [letter] = await app.dead_letters(Selector(all=True), limit=10)
        assert letter.id == code.id and letter.cls is ReplyClass.CONNECTION
        # its event says what the dead letter says: the last reply before it expired
        [expired] = (await app.events(types=["expired"])).events
        assert expired.as_json()["class"] == "connection"
        assert "(last reply: " in (expired.text or "")
        sweep = Selector(all=True, classes=(ReplyClass.CONNECTION,))
        counts = await app.summarize(QueueAction.REQUEUE, sweep)
        assert sum(c.count for c in counts) == 0
        assert (await app.requeue(sweep)).count == 0
        assert (await app.get(code.id)).recipients[0].state is RecipientState.DEAD
        assert (await app.requeue(Selector(ids=(code.id,)))).count == 1


async def test_scheduled_mail_is_counted_apart_and_pages_nobody(tmp_path: Path) -> None:
    """An operator audit scheduled one message a day ahead and nothing else: fifteen minutes
    later PostlaneNoDeliveries (critical) fired, and stats called the message "ready", pointing
    at the stuck-worker runbook. Scheduled mail is its own count (stats, /metrics), and only
    mail that is due, deferred or being sent counts as waiting."""
    from prometheus_client.parser import text_string_to_metric_families

    from postlane.alerts import AlertMonitor
    from postlane.metrics import Metrics

    clock = FakeClock(T0)
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        await app.send(sender="a@example.com", to=["ada@example.net"], text="x", send_at=T0 + 86400)
        await app.send(sender="a@example.com", to=["bob@example.net"], text="x")
        normal = (await app.stats()).lanes["normal"]
        assert (normal.ready, normal.scheduled) == (1, 1)
        assert normal.as_json()["scheduled"] == 1
        metrics = Metrics(app)
        await metrics.refresh()
        [depth] = [
            family
            for family in text_string_to_metric_families((await metrics.exposition()).decode())
            if family.name == "postlane_queue_depth"
        ]
        normal_depth = {
            s.labels["state"]: s.value for s in depth.samples if s.labels["lane"] == "normal"
        }
        assert normal_depth["queued"] == 1 and normal_depth["scheduled"] == 1
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        try:
            await worker.run_until_idle()  # bob's goes (capture); ada's waits for tomorrow
        finally:
            await worker.transport.close()
        monitor = AlertMonitor(app)
        for _ in range(25):  # 25 minutes of samples, nothing delivered after the first
            await clock.advance(60)
            verdicts = await monitor.run_once(clock.now())
        [stalled] = [a for a in verdicts if a.rule.name == "PostlaneNoDeliveries"]
        assert not stalled.firing, stalled.detail


async def test_delivery_latency_counts_from_the_send_at(tmp_path: Path) -> None:
    """An audit's message scheduled 40 s ahead moved postlane_delivery_latency_seconds' sum
    by 38.4 s: a campaign scheduled for tomorrow would push its p99 to a day."""
    from postlane.metrics import Metrics

    clock = FakeClock(T0)
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        metrics = Metrics(app)
        await app.send(sender="a@example.com", to=["ada@example.net"], text="x", send_at=T0 + 40)
        await clock.advance(41)
        worker = Worker.from_config(
            config, app.store, transport_for(config), clock=clock, observer=metrics
        )
        try:
            assert await worker.run_until_idle() == 1
        finally:
            await worker.transport.close()
        latency = metrics.registry.get_sample_value(
            "postlane_delivery_latency_seconds_sum", {"lane": "normal"}
        )
        assert latency is not None and latency <= 1.5


async def test_an_export_and_import_keep_a_messages_schedule_and_expiry(tmp_path: Path) -> None:
    """An audit exported and re-imported a campaign scheduled for the next day: the records
    had no send_at or expires_at, the import made every recipient due, and 33,181 went out
    within 25 s."""
    import io

    clock = FakeClock(T0)
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        sent = await app.send(
            sender="a@example.com",
            to=["ada@example.net"],
            text="x",
            send_at=T0 + 86400,
            expires_at=T0 + 90000,
        )
        exported = io.StringIO()
        selector = Selector(ids=(sent.id,))
        assert await app.act(QueueAction.DELETE, selector, export=exported) == 1
        assert await app.import_(exported.getvalue().splitlines()) == 1
        view = await app.get(sent.id)
        assert (view.send_at, view.expires_at) == (T0 + 86400, T0 + 90000)
        [recipient] = view.recipients
        assert recipient.state is RecipientState.QUEUED
        assert recipient.next_attempt_at == T0 + 86400
        assert (await app.stats()).lanes["normal"].scheduled == 1
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        try:
            assert await worker.run_until_idle() == 0  # not before its time
        finally:
            await worker.transport.close()


async def test_an_application_cancels_a_scheduled_reminder_and_hears_it(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    config = make_config(tmp_path)
    async with AsyncPostlane(config, clock=clock) as app:
        reminder = await app.send(
            sender="a@example.com",
            to=["ada@example.net", "bob@example.net"],
            text="your trial ends tomorrow",
            send_at=T0 + 3600,
        )
        other = await app.send(
            sender="a@example.com", to=["cy@example.net"], text="x", send_at=T0 + 3600
        )
        cancelled = await app.cancel(reminder.id)
        assert cancelled == Cancelled(reminder.id, 2, ())
        assert cancelled.as_json() == {"id": reminder.id, "cancelled": 2, "left": []}
        with pytest.raises(NotFound):  # nothing is left of it
            await app.get(reminder.id)
        with pytest.raises(NotFound):  # cancelling again: it is gone
            await app.cancel(reminder.id)
        page = await app.events(types=["deleted"])
        assert sorted((e.recipient, e.text) for e in page.events) == [
            ("ada@example.net", "cancelled by the application"),
            ("bob@example.net", "cancelled by the application"),
        ]
        worker = Worker.from_config(config, app.store, transport_for(config), clock=clock)
        await clock.advance(3600)
        assert await worker.run_until_idle() == 1  # only the other message's recipient
        assert (await app.get(other.id)).recipients[0].state is RecipientState.SENT
        # a message whose recipients are all final: nothing to cancel, all of it left
        done = await app.cancel(other.id)
        assert done == Cancelled(other.id, 0, (("cy@example.net", RecipientState.SENT),))
        await worker.transport.close()


async def test_a_cancel_leaves_a_recipient_being_sent_to_its_result(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with AsyncPostlane(make_config(tmp_path), clock=clock) as app:
        sent = await app.send(
            sender="a@example.com", to=["ada@example.net", "bob@example.net"], text="x"
        )
        # bob's is held by an operator; ada's is then claimed by a worker
        held = Selector(ids=(sent.id,), recipient="bob@example.net")
        assert await app.act(QueueAction.HOLD, held) == 1
        [claimed] = await app.store.claim_due(
            "w", [(lane, 10) for lane in Lane], limit=10, now=T0, lease_until=T0 + 60
        )
        assert [d.address for d in claimed.deliveries] == ["ada@example.net"]
        cancelled = await app.cancel(sent.id)
        assert cancelled.cancelled == 1  # the held one
        assert cancelled.left == (("ada@example.net", RecipientState.SENDING),)
        view = await app.get(sent.id)
        assert [(r.address, r.state) for r in view.recipients] == [
            ("ada@example.net", RecipientState.SENDING)
        ]
