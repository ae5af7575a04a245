"""Both halves of the alert rules say the same thing, within a minute: the same queue, minute
by minute, is evaluated by postlane (the recorded samples, as ``postlane alerts``, the
dashboard and serve's webhook see them) and by Prometheus (promtool, on the rules file shipped
in deploy/prometheus/), scraped from one process or from a fleet whose every process reports
the store's gauges. Wherever postlane's verdict is the same a minute before and a minute
after, Prometheus must give it too: the same alerts, firing, with the same labels."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from postlane.alerts import evaluate, load_rules
from tests.alert_history import LANES, T0, Minute, history, input_series
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None and not IN_CI, reason="promtool is not installed"
)


def outage() -> list[Minute]:
    """The relay is down for an hour: mail piles up in the high and low lanes, nothing is
    delivered, the relay's destination is paused from minute 2, for a moment lifted at 22."""
    return [
        Minute(
            ages={"high": 60.0 * m, "low": 60.0 * m},
            queued={"high": 3, "low": 10 + m},
            paused=("relay",) if m >= 2 and m != 22 else (),
        )
        for m in range(60)
    ]


def bounce_storm() -> list[Minute]:
    """A stale list: 8 hard bounces a minute for 10 minutes among steady deliveries."""
    return [
        Minute(
            ages={"normal": 30.0},
            queued={"normal": 5},
            delivered=20,
            hard_bounces=8 if 5 <= m < 15 else 0,
        )
        for m in range(60)
    ]


def draining() -> list[Minute]:
    """A deep backlog that drains: old, but getting younger; deliveries every minute."""
    return [
        Minute(
            ages={"normal": 7200.0 - 30 * m},
            queued={"normal": 5000 - 100 * m},
            delivered=100,
        )
        for m in range(40)
    ]


SCENARIOS = {"outage": outage, "bounce_storm": bounce_storm, "draining": draining}
#: rules these histories say something about (the complaint rules and the webhook rule read
#: what they do not record; their own tests are elsewhere)
RULES = [r for r in load_rules() if r.check not in ("complaint_rate", "webhook_failing")]


def built_in(minutes: Sequence[Minute]) -> list[dict[str, list[dict[str, Any]]]]:
    """At each minute, for each rule: the firing alerts as promtool writes them expected."""
    samples = history(minutes)
    timeline = []
    for m in range(len(minutes)):
        now = T0 + 60 * m
        seen = [s for s in samples if s.at <= now]
        firing: dict[str, list[dict[str, Any]]] = {rule.name: [] for rule in RULES}
        for alert in evaluate(seen, now, RULES):
            if alert.firing:
                body = alert.alertmanager(now, None)
                annotations = dict(body["annotations"])
                del annotations["value"]  # postlane's own; the rules file has none
                labels = {k: v for k, v in body["labels"].items() if k != "alertname"}
                firing[alert.rule.name].append(
                    {"exp_labels": labels, "exp_annotations": annotations}
                )
        timeline.append(firing)
    return timeline


def stable(timeline: Sequence[dict[str, list[dict[str, Any]]]], name: str) -> list[int]:
    """The minutes at which postlane's verdict on rule ``name`` is the same the minute before
    and the minute after (at a change, the two halves may differ by a minute)."""
    return [
        m
        for m in range(1, len(timeline) - 1)
        if timeline[m - 1][name] == timeline[m][name] == timeline[m + 1][name]
    ]


@pytest.mark.parametrize("instances", [("serve",), ("serve", "worker-1", "worker-2")])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_prometheus_and_postlane_agree_minute_by_minute(
    tmp_path: Path, scenario: str, instances: tuple[str, ...]
) -> None:
    minutes = SCENARIOS[scenario]()
    timeline = built_in(minutes)
    checks = [
        {"eval_time": f"{m}m", "alertname": rule.name, "exp_alerts": timeline[m][rule.name]}
        for rule in RULES
        for m in stable(timeline, rule.name)
    ]
    test = {
        "rule_files": [str(ROOT / "deploy/prometheus/postlane.rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": f"{scenario} scraped from {len(instances)} process(es)",
                "interval": "1m",
                "input_series": input_series(minutes, instances),
                "alert_rule_test": checks,
            }
        ],
    }
    path = tmp_path / "agreement.test.yml"
    path.write_text(json.dumps(test, indent=1))
    done = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_scenarios_fire_what_they_are_about() -> None:
    """The histories above are not quiet by accident: each fires its alerts (in postlane; the
    test above holds Prometheus to the same)."""
    fired = {
        name: {
            alert["exp_labels"].get("lane") or alert["exp_labels"].get("destination") or rule
            for minute in built_in(make())
            for rule, alerts in minute.items()
            for alert in alerts
        }
        for name, make in SCENARIOS.items()
    }
    assert fired["outage"] == {"high", "low", "relay", "PostlaneNoDeliveries"}
    assert fired["bounce_storm"] == {"PostlaneDeadLetterSpike", "PostlaneHardBounceRatio"}
    assert fired["draining"] == set()
    assert len(LANES) == 3
