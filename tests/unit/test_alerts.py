"""The built-in evaluation of the alert rules: each rule's ``for`` is honoured as Prometheus
honours it (pending while the condition has held for less, then firing), on recorded minute
samples read as of each moment; the monitor stores the transitions and notifies only firing
and resolved alerts. Pure logic on a fake clock: the history is built, not waited for."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from postlane.alerts import (
    LOOKBACK,
    Alert,
    AlertMonitor,
    AlertRule,
    evaluate,
    firing_first,
    history_needed,
    load_rules,
    rules_from_toml,
)
from postlane.clock import FakeClock
from postlane.errors import ConfigError
from postlane.records import Sample
from tests.alert_history import LANES, T0, Minute, history


def rule(name: str) -> AlertRule:
    [found] = [r for r in load_rules() if r.name == name]
    return found


def states(
    samples: Sequence[Sample], minutes: Iterable[int], rules: Sequence[AlertRule], key: str
) -> list[str]:
    """The state of alert ``key`` evaluated at each of ``minutes`` (after T0), on what was
    recorded by then."""
    found = []
    for m in minutes:
        now = T0 + 60 * m
        seen = [s for s in samples if s.at <= now]
        verdicts = {a.key: a for a in evaluate(seen, now, rules)}
        found.append(verdicts[key].state if key in verdicts else "absent")
    return found


# -- for: pending, then firing ------------------------------------------------------------------


def test_a_destination_paused_a_minute_ago_is_pending_not_firing() -> None:
    """The audit's case: a first pause is not 30 minutes of pause (Prometheus said firing)."""
    paused = rule("PostlaneDestinationPausedTooLong")
    samples = history([Minute(paused=("example.org",))] * 2)
    [alert] = evaluate(samples, T0 + 60, [paused])
    assert alert.key == "PostlaneDestinationPausedTooLong{destination=example.org}"
    assert (alert.firing, alert.pending, alert.state) == (False, True, "pending")


def test_a_pause_fires_once_it_has_lasted_30_minutes() -> None:
    paused = rule("PostlaneDestinationPausedTooLong")
    samples = history([Minute()] * 5 + [Minute(paused=("example.org",))] * 40)
    key = "PostlaneDestinationPausedTooLong{destination=example.org}"
    # paused from minute 5: pending from then, firing at minute 35 (as promtool's test says)
    assert states(samples, [4, 5, 6, 34, 35, 44], [paused], key) == [
        "absent",
        "pending",
        "pending",
        "pending",
        "firing",
        "firing",
    ]
    [alert] = evaluate(samples, T0 + 44 * 60, [paused])
    assert alert.detail == "paused throughout the last 39 min"


def test_the_probe_between_two_pauses_does_not_start_the_30_minutes_again() -> None:
    """While the probe after a pause is under way the destination is not counted paused (a
    relay that never answers: the connect timeout, every time): the alert could never fire
    for a relay that is down for hours (an operator audit). A gap under 5 minutes is none."""
    paused = rule("PostlaneDestinationPausedTooLong")
    on = Minute(paused=("example.org",))
    samples = history([on] * 21 + [Minute()] + [on] * 40)  # off at minute 21, on from 22
    key = "PostlaneDestinationPausedTooLong{destination=example.org}"
    assert states(samples, [20, 21, 22, 29, 30, 45], [paused], key) == [
        "pending",
        "pending",
        "pending",
        "pending",
        "firing",
        "firing",
    ]


def test_a_pause_that_ends_and_starts_again_counts_its_30_minutes_again() -> None:
    paused = rule("PostlaneDestinationPausedTooLong")
    on = Minute(paused=("example.org",))
    samples = history([on] * 21 + [Minute()] * 7 + [on] * 40)  # off 21-27, on from 28
    key = "PostlaneDestinationPausedTooLong{destination=example.org}"
    # paused within the last 5 minutes (PromQL's range leaves out its start): so at 24, not 25
    assert states(samples, [20, 24, 25, 28, 57, 58], [paused], key) == [
        "pending",
        "pending",
        "inactive",
        "pending",
        "pending",
        "firing",
    ]


def test_the_hard_bounce_ratio_is_pending_for_its_5_minutes_then_fires() -> None:
    """The audit saw postlane fire 5 minutes before Prometheus: the ratio fires once it has
    held at every minute of its `for`, and not a minute sooner."""
    ratio = rule("PostlaneHardBounceRatio")
    assert ratio.duration == "5m"
    samples = history([Minute()] * 10 + [Minute(delivered=20, hard_bounces=5)] * 20)
    found = states(samples, range(8, 18), [ratio], "PostlaneHardBounceRatio")
    # holding from minute 10 (5 hard of 25 finished): pending 10-14, firing from 15
    assert found == ["inactive"] * 2 + ["pending"] * 5 + ["firing"] * 3


def test_a_firing_alert_resolves_as_soon_as_its_condition_stops_holding() -> None:
    stale = rule("PostlaneHighLaneStale")
    samples = history([Minute(ages={"high": 400})] * 10 + [Minute(ages={"high": 100})])
    key = "PostlaneHighLaneStale{lane=high}"
    assert states(samples, [9, 10], [stale], key) == ["firing", "inactive"]


@pytest.mark.parametrize(
    "name",
    sorted(r.name for r in load_rules() if r.hold > 0 and r.check != "webhook_failing"),
)
def test_no_rule_with_a_for_fires_on_its_first_minute(name: str) -> None:
    """Whatever the history says, an alert with a `for` whose condition did not hold a minute
    ago is at most pending now (here: a history of one minute, everything wrong in it)."""
    bad = Minute(
        ages={lane: 86400.0 for lane in LANES},
        queued={lane: 100 for lane in LANES},
        paused=("example.org",),
        hard_bounces=100,
    )
    for alert in evaluate(history([bad]), T0, [rule(name)]):
        assert not alert.firing, alert.key


def test_a_gap_longer_than_the_lookback_starts_the_for_again() -> None:
    """No samples for more than the lookback (serve was down) and the condition cannot be said
    to have held: a Prometheus with no scrapes resolves too."""
    stale = rule("PostlaneHighLaneStale")
    high = Minute(ages={"high": 400})
    before = history([high] * 10)
    gap = 2 * LOOKBACK
    after = history([high] * 3, start=T0 + 9 * 60 + gap)
    now = after[-1].at
    [alert] = evaluate([*before, *after], now, [stale])
    assert alert.state == "pending"
    # a minute missed is no gap: the last sample stands for the present that long
    missed = [s for s in history([high] * 10) if s.at != T0 + 7 * 60]
    [alert] = evaluate(missed, T0 + 9 * 60, [stale])
    assert alert.state == "firing"


# -- windows: nothing before the window is recorded -------------------------------------------


def test_no_deliveries_waits_for_its_15_minutes_to_be_recorded_then_its_5() -> None:
    """Mail waits from the first recorded minute, nothing is delivered: quiet until 15 minutes
    are recorded (a sample tells of the minute before it), pending 5, then firing."""
    stalled = rule("PostlaneNoDeliveries")
    samples = history([Minute(queued={"normal": 5})] * 30)
    found = states(samples, [13, 14, 18, 19], [stalled], "PostlaneNoDeliveries")
    assert found == ["inactive", "pending", "pending", "firing"]


def test_no_deliveries_stays_quiet_while_a_worker_delivers() -> None:
    stalled = rule("PostlaneNoDeliveries")
    samples = history([Minute(queued={"normal": 500}, delivered=1)] * 30)
    assert states(samples, [29], [stalled], "PostlaneNoDeliveries") == ["inactive"]


def test_no_deliveries_needs_mail_waiting_throughout_the_window() -> None:
    stalled = rule("PostlaneNoDeliveries")
    waiting = Minute(queued={"low": 5})
    samples = history([waiting] * 10 + [Minute()] + [waiting] * 19)
    assert states(samples, [25, 26, 29], [stalled], "PostlaneNoDeliveries") == [
        "inactive",  # the empty minute 10 is in the window
        "pending",
        "pending",
    ]


def test_the_oldest_age_growing_needs_two_samples_like_deriv() -> None:
    growing = rule("PostlaneOldestMessageAgeGrowing")
    old = Minute(ages={"low": 3600.0})
    [low] = [a for a in evaluate(history([old]), T0, [growing]) if a.labels["lane"] == "low"]
    assert low.state == "inactive"  # one sample: no slope
    samples = history([Minute(ages={"low": 3600.0 + 60 * m}) for m in range(10)])
    key = "PostlaneOldestMessageAgeGrowing{lane=low}"
    assert states(samples, [1, 5, 6], [growing], key) == ["pending", "pending", "firing"]


# -- the rules file ----------------------------------------------------------------------------

RULE = """
[[alert]]
name = "X"
severity = "warning"
summary = "s"
description = "d"
runbook = "r"
expr = "vector(1)"
for = "{hold}"
check = "{check}"
{extra}
"""


def test_a_check_of_the_present_state_cannot_take_a_for() -> None:
    text = RULE.format(hold="5m", check="webhook_failing", extra="failures = 10")
    with pytest.raises(ConfigError, match="cannot wait `for`"):
        rules_from_toml(text)
    [ok] = rules_from_toml(RULE.format(hold="0m", check="webhook_failing", extra="failures = 1"))
    assert ok.hold == 0


def test_a_for_that_is_not_a_duration_is_refused() -> None:
    with pytest.raises(ConfigError, match="rule X: for"):
        rules_from_toml(RULE.format(hold="soon", check="dead_spike", extra="count = 1"))


def test_the_history_read_covers_each_window_and_its_for() -> None:
    complaint = rule("PostlaneComplaintRateHigh")
    assert history_needed([complaint]) >= 86400 + 15 * 60
    assert history_needed() >= max(r.window + r.hold for r in load_rules())


def test_pending_alerts_are_listed_after_firing_ones_and_say_their_state() -> None:
    ratio, stale = rule("PostlaneHardBounceRatio"), rule("PostlaneHighLaneStale")
    alerts = [
        Alert(ratio, {}, False, 0.0, "x"),
        Alert(stale, {"lane": "high"}, False, 400.0, "y", pending=True),
        Alert(ratio, {}, True, 0.1, "z"),
    ]
    assert [a.state for a in firing_first(alerts)] == ["firing", "pending", "inactive"]
    shown = alerts[1].as_json()
    assert (shown["state"], shown["firing"], shown["for"]) == ("pending", False, "5m")


# -- the monitor: transitions and notifications ------------------------------------------------


class FakeStore:
    """The store's history and alert-state operations, in memory."""

    def __init__(self, recorded: Sequence[Sample] = ()) -> None:
        self.recorded = list(recorded)
        self.firing: dict[str, float] = {}

    async def samples(self, since: float) -> list[Sample]:
        return [s for s in self.recorded if s.at >= since]

    async def webhook_endpoints(self) -> list[Any]:
        return []

    async def alerts_firing(self) -> list[tuple[str, float]]:
        return sorted(self.firing.items())

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        if firing == (name in self.firing):
            return False
        if firing:
            self.firing[name] = now
        else:
            del self.firing[name]
        return True

    async def purge_samples(self, before: float) -> int:
        return 0


class Monitor(AlertMonitor):
    """The monitor, recording from a scripted list of minutes instead of a live queue."""

    minutes: list[Minute]
    posted: list[list[dict[str, Any]]]

    async def record(self, now: float) -> list[Sample]:
        minute = math.floor(now / 60.0) * 60.0
        samples = self.minutes[int((minute - T0) // 60)].samples(minute)
        self.app.store.recorded.extend(samples)
        return samples

    async def _post(self, body: list[dict[str, Any]]) -> None:
        self.posted.append(body)


@dataclass
class FakeApp:
    store: FakeStore


def monitor(minutes: list[Minute], rules: Sequence[AlertRule]) -> Monitor:
    found = Monitor(FakeApp(FakeStore()), webhook="http://alertmanager.invalid", rules=rules)
    found.minutes, found.posted = minutes, []
    return found


async def test_the_monitor_notifies_firing_not_pending_alerts_and_records_when_they_fire(
    clock: FakeClock,
) -> None:
    assert clock.now() == T0
    stale = rule("PostlaneHighLaneStale")
    watcher = monitor([Minute(ages={"high": 400})] * 8 + [Minute()] * 2, [stale])
    for minute in range(10):
        verdicts = await watcher.run_once(clock.now())
        [alert] = verdicts
        sent = [a["labels"]["alertname"] for batch in watcher.posted for a in batch]
        if minute < 5:  # pending: recorded nowhere, sent to nobody
            assert alert.state == "pending" and sent == []
            assert await watcher.app.store.alerts_firing() == []
        elif minute < 8:
            assert alert.state == "firing"
            assert await watcher.app.store.alerts_firing() == [
                ("PostlaneHighLaneStale{lane=high}", T0 + 5 * 60)
            ]
            assert watcher.posted[-1][0]["startsAt"] == "2027-01-15T08:05:00.000Z"
        await clock.advance(60)
    # resolved at minute 8, once (with endsAt), then nothing more to say
    assert alert.state == "inactive" and await watcher.app.store.alerts_firing() == []
    resolved = [a for batch in watcher.posted for a in batch if "endsAt" in a]
    assert len(resolved) == 1 and resolved[0]["endsAt"] == "2027-01-15T08:08:00.000Z"
    assert len(watcher.posted) == 4  # firing at minutes 5, 6, 7; resolved at 8


async def test_an_alert_recorded_firing_that_no_verdict_speaks_of_is_resolved(
    clock: FakeClock,
) -> None:
    """A webhook endpoint taken out of the configuration: its alert does not stay firing in
    the store (and on the dashboard) for ever."""
    failing = rule("PostlaneWebhookEndpointFailing")
    watcher = monitor([Minute()], [failing])
    watcher.app.store.firing["PostlaneWebhookEndpointFailing{endpoint=gone}"] = T0 - 600
    watcher.app.store.firing["SomeoneElsesAlert"] = T0 - 600
    await watcher.run_once(clock.now())
    assert await watcher.app.store.alerts_firing() == [("SomeoneElsesAlert", T0 - 600)]
    [[resolved]] = watcher.posted
    assert resolved["labels"] == {
        "alertname": "PostlaneWebhookEndpointFailing",
        "severity": "warning",
        "endpoint": "gone",
    }
    assert "endsAt" in resolved
