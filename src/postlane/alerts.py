"""Alerts: the same rules for Prometheus and for teams without it.

The rules live once, in ``data/alerts.toml``. Each has a PromQL half (rendered by
:func:`prometheus_rules` into the rules file shipped in ``deploy/prometheus/``) and a ``check``
half that :func:`evaluate` runs on postlane's own recorded history: one :class:`Sample` per
lane per minute (depth, oldest age) and one queue-wide (the minute's deliveries, dead letters,
hard bounces, paused destinations), kept in the store by :class:`AlertMonitor`.

``postlane serve`` runs the monitor every ``[alerts] interval``: it records the minute's
samples, evaluates the rules, and, when ``[alerts] webhook`` is set, POSTs firing alerts (again
on every evaluation, as Prometheus does) and resolved ones (once) to it as Alertmanager-
compatible JSON (``POST /api/v2/alerts``: a list of ``{labels, annotations, startsAt,
endsAt}``). ``postlane alerts`` evaluates on demand.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from postlane.clock import iso
from postlane.config import Config, parse_duration
from postlane.errors import ConfigError
from postlane.events import WebhookEndpointState
from postlane.message import Lane
from postlane.records import Sample, Stats
from postlane.throttle import MISCONFIGURED

log = logging.getLogger("postlane.alerts")

#: where the runbooks are published (the repository's docs/runbooks/)
RUNBOOK_BASE = "https://github.com/postlane/postlane/blob/main/docs/runbooks/"
_CHECKS = (
    "growing",
    "above",
    "dead_spike",
    "hard_bounce_ratio",
    "complaint_rate",
    "paused",
    "misconfigured",
    "stalled",
    "webhook_failing",
)
_LANES = tuple(lane.value for lane in Lane)


@dataclass(frozen=True)
class AlertRule:
    name: str
    severity: str
    summary: str
    description: str
    runbook: str
    expr: str
    duration: str  # PromQL `for`
    check: str
    params: Mapping[str, Any]
    per_lane: bool = False
    per_destination: bool = False

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}{self.runbook}.md"

    def seconds(self, key: str) -> float:
        value = self.params[key]
        return parse_duration(value) if isinstance(value, str) else float(value)


@dataclass(frozen=True)
class Alert:
    """One rule's verdict for one lane or destination (or the whole queue)."""

    rule: AlertRule
    labels: Mapping[str, str]
    firing: bool
    value: float
    detail: str

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"{self.rule.name}{{{extra}}}" if extra else self.rule.name

    def _text(self, template: str) -> str:
        return template.format(
            lane=self.labels.get("lane", ""),
            destination=self.labels.get("destination", ""),
            endpoint=self.labels.get("endpoint", ""),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "alert": self.rule.name,
            "labels": dict(self.labels),
            "severity": self.rule.severity,
            "firing": self.firing,
            "value": None if math.isnan(self.value) else round(self.value, 4),
            "detail": self.detail,
            "summary": self._text(self.rule.summary),
            "runbook_url": self.rule.runbook_url,
        }

    def alertmanager(self, now: float, started: float | None) -> dict[str, Any]:
        """Alertmanager's API v2 shape; a resolved alert ends now."""
        body: dict[str, Any] = {
            "labels": {"alertname": self.rule.name, "severity": self.rule.severity, **self.labels},
            "annotations": {
                "summary": self._text(self.rule.summary),
                "description": self._text(self.rule.description),
                "runbook_url": self.rule.runbook_url,
                "value": f"{self.value:g}",
            },
            "startsAt": iso(started if started is not None else now),
            "generatorURL": "postlane://alerts",
        }
        if not self.firing:
            body["endsAt"] = iso(now)
        return body


@cache
def load_rules() -> tuple[AlertRule, ...]:
    text = resources.files("postlane.data").joinpath("alerts.toml").read_text("utf-8")
    return rules_from_toml(text)


def rules_from_toml(text: str) -> tuple[AlertRule, ...]:
    data = tomllib.loads(text)
    rules = []
    fixed = {"name", "severity", "summary", "description", "runbook", "expr", "for", "check"}
    for number, entry in enumerate(data.get("alert", []), 1):
        missing = fixed - set(entry)
        if missing:
            raise ConfigError(f"alerts: rule {number} lacks {', '.join(sorted(missing))}")
        if entry["check"] not in _CHECKS:
            raise ConfigError(f"alerts: rule {entry['name']}: unknown check {entry['check']!r}")
        params = {
            k: v for k, v in entry.items() if k not in fixed | {"per_lane", "per_destination"}
        }
        rules.append(
            AlertRule(
                name=entry["name"],
                severity=entry["severity"],
                summary=entry["summary"],
                description=entry["description"],
                runbook=entry["runbook"],
                expr=entry["expr"],
                duration=entry["for"],
                check=entry["check"],
                params=params,
                per_lane=bool(entry.get("per_lane", False)),
                per_destination=bool(entry.get("per_destination", False)),
            )
        )
    return tuple(rules)


# -- the Prometheus half -------------------------------------------------------------------------


def history_needed(rules: Sequence[AlertRule] | None = None) -> float:
    """How far back evaluation reads the recorded history: the longest window of any rule
    (the complaint rate's day), at least an hour."""
    return max([3600.0, *(rule.seconds("window") for rule in rules or load_rules())])


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def prometheus_rules(rules: Sequence[AlertRule] | None = None) -> str:
    """The rules as a Prometheus rules file (YAML)."""
    lines = [
        "# Generated by `postlane alerts --prometheus-rules` from postlane/data/alerts.toml.",
        "# Do not edit: change the data file and regenerate (a test checks they agree).",
        "groups:",
        "  - name: postlane",
        "    rules:",
    ]
    for rule in rules or load_rules():
        placeholders = {
            "lane": "{{ $labels.lane }}",
            "destination": "{{ $labels.destination }}",
            "endpoint": "{{ $labels.endpoint }}",
        }
        lines += [
            f"      - alert: {rule.name}",
            f"        expr: {_quoted(rule.expr)}",
            f"        for: {rule.duration}",
            "        labels:",
            f"          severity: {rule.severity}",
            "        annotations:",
            f"          summary: {_quoted(rule.summary.format(**placeholders))}",
            f"          description: {_quoted(rule.description.format(**placeholders))}",
            f"          runbook_url: {_quoted(rule.runbook_url)}",
        ]
    return "\n".join(lines) + "\n"


# -- the postlane half ---------------------------------------------------------------------------


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope (per second), as PromQL's deriv()."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def _covers(samples: Sequence[Sample], now: float, window: float) -> bool:
    """The samples span most of the window (a rule needs history before it can fire)."""
    return bool(samples) and samples[0].at <= now - window * 0.8


def evaluate(
    samples: Sequence[Sample],
    now: float,
    rules: Sequence[AlertRule] | None = None,
    webhooks: Sequence[WebhookEndpointState] = (),
) -> list[Alert]:
    """Every rule's verdict on the recorded history (``samples``, oldest first) and on the
    outbound webhook endpoints' state (``webhooks``, as the store keeps it)."""
    by_lane: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_lane[sample.lane].append(sample)
    wide = by_lane.get("*", [])
    alerts: list[Alert] = []
    for rule in rules or load_rules():
        window = rule.seconds("window")
        recent_wide = [s for s in wide if s.at >= now - window]
        if rule.check == "growing":
            for lane in Lane:
                recent = [s for s in by_lane.get(lane.value, []) if s.at >= now - window]
                slope = _slope([(s.at, s.oldest_age) for s in recent])
                last = recent[-1].oldest_age if recent else 0.0
                firing = (
                    _covers(recent, now, window)
                    and slope > float(rule.params["slope"])
                    and last > rule.seconds("floor")
                )
                detail = f"oldest {last:.0f}s, growing {slope:.2f}s/s over {len(recent)} samples"
                alerts.append(Alert(rule, {"lane": lane.value}, firing, slope, detail))
        elif rule.check == "above":
            lane_name = str(rule.params["lane"])
            recent = [s for s in by_lane.get(lane_name, []) if s.at >= now - window]
            threshold = rule.seconds("threshold")
            firing = _covers(recent, now, window) and all(s.oldest_age > threshold for s in recent)
            value = recent[-1].oldest_age if recent else 0.0
            alerts.append(Alert(rule, {"lane": lane_name}, firing, value, f"oldest {value:.0f}s"))
        elif rule.check == "dead_spike":
            dead = sum(s.dead for s in recent_wide)
            firing = dead > int(rule.params["count"])
            alerts.append(Alert(rule, {}, firing, dead, f"{dead} dead-lettered"))
        elif rule.check == "hard_bounce_ratio":
            # refused at once, or bounced after it was sent (a DSN, a provider's event)
            hard = sum(s.hard_bounces + s.bounced for s in recent_wide)
            finished = sum(s.sent + s.dead for s in recent_wide)
            ratio = hard / finished if finished else 0.0
            firing = finished >= int(rule.params["minimum"]) and ratio > float(rule.params["ratio"])
            alerts.append(Alert(rule, {}, firing, ratio, f"{hard} hard of {finished} finished"))
        elif rule.check == "complaint_rate":
            complaints = sum(s.complaints for s in recent_wide)
            sent = sum(s.sent for s in recent_wide)
            rate = complaints / sent if sent else 0.0
            firing = sent >= int(rule.params["minimum"]) and rate > float(rule.params["rate"])
            detail = f"{complaints} complaint(s) for {sent} delivered ({rate:.2%})"
            alerts.append(Alert(rule, {}, firing, rate, detail))
        elif rule.check == "paused":
            names = set().union(*(set(s.paused) for s in recent_wide)) if recent_wide else set()
            for name in sorted(names):
                firing = _covers(recent_wide, now, window) and all(
                    name in s.paused for s in recent_wide
                )
                alerts.append(Alert(rule, {"destination": name}, firing, 1.0, "paused throughout"))
        elif rule.check == "misconfigured":
            # at once: nothing gets through until someone fixes the configuration
            latest = recent_wide[-1].misconfigured if recent_wide else ()
            names = (
                set().union(*(set(s.misconfigured) for s in recent_wide)) if recent_wide else set()
            )
            for name in sorted(names):
                firing = name in latest
                alerts.append(Alert(rule, {"destination": name}, firing, 1.0, "misconfigured"))
        elif rule.check == "stalled":
            sent = sum(s.sent for s in recent_wide)
            times = sorted({s.at for s in samples if s.at >= now - window and s.lane != "*"})
            depths = [
                sum(s.depth for name in _LANES for s in by_lane.get(name, []) if s.at == at)
                for at in times
            ]
            firing = (
                _covers(recent_wide, now, window) and sent == 0 and bool(depths) and min(depths) > 0
            )
            waiting = depths[-1] if depths else 0
            alerts.append(Alert(rule, {}, firing, waiting, f"{sent} delivered, {waiting} waiting"))
        elif rule.check == "webhook_failing":
            threshold = int(rule.params["failures"])
            for state in webhooks:
                detail = f"{state.failures} failure(s) in a row"
                if state.failures and state.last_error:
                    detail += f"; last: {state.last_error}"
                firing = state.failures >= threshold
                alerts.append(
                    Alert(rule, {"endpoint": state.name}, firing, float(state.failures), detail)
                )
    return alerts


#: attempt classes that leave a delivery waiting for its next try
DEFERRING_CLASSES = ("temporary", "throttled", "connection")


def current_samples(
    stats: Stats,
    at: float,
    finished: tuple[int, int, int],
    attempts: Mapping[str, int] | None = None,
    heard: Mapping[str, int] | None = None,
) -> list[Sample]:
    """The samples of one minute: each lane's depth and age, and the queue-wide events
    (``finished``: delivered, dead, hard bounces; ``attempts``: the minute's attempts by class;
    ``heard``: events heard after the first hop by type, ``bounced`` and ``complained``)."""
    samples = [
        Sample(
            at=at,
            lane=lane.value,
            ready=s.ready,
            deferred=s.deferred,
            held=s.held,
            sending=s.sending,
            oldest_age=s.oldest_age_seconds,
        )
        for lane, s in stats.lanes.items()
    ]
    sent, dead, hard = finished
    if attempts is not None and "delivered" in attempts:
        # the minute's delivered attempts: a recipient that bounced or complained since (its
        # state no longer ``sent``) was delivered all the same
        sent = max(sent, attempts["delivered"])
    paused = tuple(d.destination for d in stats.destinations if (d.paused_until or 0) > at)
    misconfigured = tuple(
        d.destination
        for d in stats.destinations
        if (d.paused_until or 0) > at and (d.reason or "").startswith(MISCONFIGURED)
    )
    attempts = attempts or {}
    heard = heard or {}
    samples.append(
        Sample(
            at=at,
            lane="*",
            sent=sent,
            dead=dead,
            hard_bounces=hard,
            paused=paused,
            deferrals=sum(attempts.get(cls, 0) for cls in DEFERRING_CLASSES),
            soft_bounces=attempts.get("soft_bounce", 0),
            misconfigured=misconfigured,
            bounced=heard.get("bounced", 0),
            complaints=heard.get("complained", 0),
        )
    )
    return samples


# -- the monitor ---------------------------------------------------------------------------------


@dataclass
class AlertMonitor:
    """Records the minute's samples, evaluates the rules, notifies a webhook (``serve`` runs one
    every ``[alerts] interval``; tests call :meth:`run_once` with an injected clock)."""

    app: Any  # AsyncPostlane (not imported: app imports this module's users)
    webhook: str | None = None
    history: float = 7 * 86400.0
    rules: Sequence[AlertRule] = field(default_factory=load_rules)
    sent_webhooks: int = 0

    @classmethod
    def from_config(cls, app: Any, config: Config) -> AlertMonitor:
        return cls(app, webhook=config.alerts.webhook, history=config.alerts.history)

    async def sample(self, now: float) -> list[Sample]:
        """The samples of the minute ``now`` falls in, read from the store, not recorded."""
        minute = math.floor(now / 60.0) * 60.0
        stats = await self.app.stats()
        finished = await self.app.store.finished_between(minute - 60.0, minute)
        attempts = await self.app.store.attempt_classes_between(minute - 60.0, minute)
        heard = await self.app.store.event_types_between(
            minute - 60.0, minute, ("bounced", "complained")
        )
        return current_samples(stats, minute, finished, attempts, heard)

    async def record(self, now: float) -> list[Sample]:
        """Record the samples of the minute ``now`` falls in (once, whoever comes first)."""
        samples = await self.sample(now)
        await self.app.store.record_samples(samples)
        return samples

    async def evaluate(self, now: float) -> list[Alert]:
        samples = await self.app.store.samples(now - history_needed(self.rules))
        webhooks = await self.app.store.webhook_endpoints()
        return evaluate(samples, now, self.rules, webhooks)

    async def run_once(self, now: float) -> list[Alert]:
        """Record, evaluate, remember transitions, notify. Returns every verdict."""
        await self.record(now)
        alerts = await self.evaluate(now)
        firing_before = dict(await self.app.store.alerts_firing())
        to_send = []
        for alert in alerts:
            changed = await self.app.store.alert_transition(alert.key, alert.firing, now)
            if changed:
                level = logging.WARNING if alert.firing else logging.INFO
                state = "firing" if alert.firing else "resolved"
                log.log(level, "alert %s %s: %s", alert.key, state, alert.detail)
            if alert.firing:
                to_send.append(alert.alertmanager(now, firing_before.get(alert.key, now)))
            elif changed:
                to_send.append(alert.alertmanager(now, firing_before.get(alert.key)))
        if self.webhook and to_send:
            await self._post(to_send)
        await self.app.store.purge_samples(now - self.history)
        return alerts

    async def _post(self, body: list[dict[str, Any]]) -> None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(str(self.webhook), json=body)
                response.raise_for_status()
            self.sent_webhooks += 1
        except httpx.HTTPError as exc:
            log.warning("alert webhook %s failed: %s", _masked(str(self.webhook)), exc)


def _masked(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def firing_first(alerts: Iterable[Alert]) -> list[Alert]:
    return sorted(alerts, key=lambda a: (not a.firing, a.rule.name, a.key))
