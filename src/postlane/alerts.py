"""Alerts: the same rules for Prometheus and for teams without it.

The rules live once, in ``data/alerts.toml``. Each has a PromQL half (rendered by
:func:`prometheus_rules` into the rules file shipped in ``deploy/prometheus/``) and a ``check``
half that :func:`evaluate` runs on postlane's own recorded history: one :class:`Sample` per
lane per minute (depth, oldest age) and one queue-wide (the minute's deliveries, dead letters,
hard bounces, paused destinations), kept in the store by :class:`AlertMonitor`.

A check says whether the rule's ``expr`` holds at one moment; :func:`evaluate` honours the rule's
``for`` as Prometheus does: an alert whose condition holds is *pending* until it has held at
every minute of the last ``for``, then *firing*. It asks the check again at each of those
earlier minutes on the recorded history, so serve's monitor, ``postlane alerts`` and the
dashboard agree with each other and, within a minute, with Prometheus.

``postlane serve`` runs the monitor every ``[alerts] interval``: it records the minute's
samples, evaluates the rules, and, when ``[alerts] webhook`` is set, POSTs firing alerts (again
on every evaluation, as Prometheus does) and resolved ones (once) to it as Alertmanager-
compatible JSON (``POST /api/v2/alerts``: a list of ``{labels, annotations, startsAt,
endsAt}``); pending alerts are not sent, as Prometheus sends none. ``postlane alerts``
evaluates on demand.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from bisect import bisect_left, bisect_right
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
#: checks that read the present state from the store, not the recorded history: they cannot
#: be asked about earlier minutes, so their rules take no ``for``
_PRESENT_ONLY = frozenset({"webhook_failing"})
_LANES = tuple(lane.value for lane in Lane)
#: the recorded history's step: one sample per lane per minute
STEP = 60.0
#: how long the latest sample stands for the present, as a Prometheus series does for the
#: default lookback delta (5m): a minute the monitor missed does not interrupt a ``for``
LOOKBACK = 300.0


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

    @property
    def hold(self) -> float:
        """The rule's ``for`` in seconds: how long its condition must hold before it fires."""
        return parse_duration(self.duration)

    @property
    def window(self) -> float:
        """How far back the check reads the history at one moment (0: the latest sample)."""
        return self.seconds("window") if "window" in self.params else 0.0


@dataclass(frozen=True)
class Alert:
    """One rule's verdict for one lane or destination (or the whole queue): ``firing`` once
    its condition has held for the rule's ``for``, ``pending`` while it holds but not yet that
    long (as Prometheus says of an alert)."""

    rule: AlertRule
    labels: Mapping[str, str]
    firing: bool
    value: float
    detail: str
    pending: bool = False

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"{self.rule.name}{{{extra}}}" if extra else self.rule.name

    @property
    def state(self) -> str:
        """``firing``, ``pending`` or ``inactive``: Prometheus's words for an alert's state."""
        return "firing" if self.firing else "pending" if self.pending else "inactive"

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
            "state": self.state,
            "for": self.rule.duration,
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
        try:
            hold = parse_duration(entry["for"])
        except ValueError as exc:
            raise ConfigError(f"alerts: rule {entry['name']}: for: {exc}") from exc
        if hold and entry["check"] in _PRESENT_ONLY:
            raise ConfigError(
                f"alerts: rule {entry['name']}: check {entry['check']!r} reads the present "
                "state, not the recorded history, so it cannot wait `for` (use 0m)"
            )
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
    (the complaint rate's day) plus its ``for`` (the check is asked again at each minute of
    it) and the lookback, at least an hour."""
    return max([3600.0, *(r.window + r.hold + LOOKBACK for r in rules or load_rules())])


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


class _History:
    """The recorded samples by lane (``"*"``: queue-wide), oldest first, read as of a moment:
    an evaluation at ``t`` sees only what was recorded by then."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        by_lane: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            by_lane[sample.lane].append(sample)
        self._lanes = {lane: sorted(found, key=lambda s: s.at) for lane, found in by_lane.items()}
        self._times = {lane: [s.at for s in found] for lane, found in self._lanes.items()}

    def between(self, lane: str, start: float, end: float) -> list[Sample]:
        """The samples recorded at ``start`` to ``end`` (both included)."""
        times = self._times.get(lane, [])
        return self._lanes.get(lane, [])[bisect_left(times, start) : bisect_right(times, end)]

    def events(self, at: float, window: float) -> list[Sample]:
        """The queue-wide samples telling of the events of the window before ``at``: a sample
        tells of the minute before it, so one recorded at the window's start does not (as a
        counter's ``increase`` over the window does not count what came before it)."""
        times = self._times.get("*", [])
        start = bisect_right(times, at - window)
        return self._lanes.get("*", [])[start : bisect_right(times, at)]

    def latest(self, lane: str, at: float) -> Sample | None:
        """The last sample up to ``at``, unless it is older than the lookback (the history
        stopped: serve was not running)."""
        found = self.between(lane, at - LOOKBACK, at)
        return found[-1] if found else None

    def covers(self, lane: str, at: float, window: float) -> bool:
        """Whether the history reaches back over the whole window: a sample tells of the minute
        before it, so one recorded within a minute after the window's start (and not more than
        the lookback before it), as Prometheus asks with ``offset``."""
        start = at - window
        return bool(self.between(lane, start - LOOKBACK, start + STEP))

    def named_within(self, at: float, attr: str, name: str) -> float | None:
        """The last queue-wide sample naming ``name`` in ``attr`` (say, among the paused
        destinations) within the lookback before ``at`` (PromQL's ``max_over_time(...[5m])``),
        None without one."""
        for sample in reversed(self.between("*", at - LOOKBACK, at)):
            if sample.at > at - LOOKBACK and name in getattr(sample, attr):
                return sample.at
        return None

    def named_since(self, at: float, attr: str, name: str) -> float:
        """When the run of queue-wide samples up to ``at`` naming ``name`` in ``attr`` began:
        samples not naming it between two that do, up to the lookback apart, do not end it (a
        probe between two pauses), a longer gap does."""
        since = at
        for sample in reversed(self.between("*", -math.inf, at)):
            if since - sample.at > LOOKBACK:
                break
            if name in getattr(sample, attr):
                since = sample.at
        return since


@dataclass(frozen=True)
class _Condition:
    """What a check says at one moment: whether the rule's expr holds for these labels."""

    labels: Mapping[str, str]
    holds: bool
    value: float
    detail: str

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))


def _named(history: _History, at: float, horizon: float, attr: str) -> list[str]:
    """The destinations named in the queue-wide samples' ``attr`` over the horizon (those no
    longer named stay listed a while, not holding, so a firing alert resolves)."""
    names: set[str] = set()
    for sample in history.between("*", at - horizon, at):
        names.update(getattr(sample, attr))
    return sorted(names)


def _conditions(
    rule: AlertRule, history: _History, at: float, webhooks: Sequence[WebhookEndpointState]
) -> list[_Condition]:
    """The rule's ``expr`` as of ``at``, read from the recorded history, per label set."""
    window = rule.window
    wide = history.events(at, window)
    found: list[_Condition] = []
    if rule.check == "growing":  # deriv(age[window]) > slope and age > floor
        for lane in _LANES:
            recent = history.between(lane, at - window, at)
            slope = _slope([(s.at, s.oldest_age) for s in recent])
            latest = history.latest(lane, at)
            last = latest.oldest_age if latest else 0.0
            holds = (
                len(recent) >= 2  # deriv() needs two points
                and slope > float(rule.params["slope"])
                and last > rule.seconds("floor")
            )
            detail = f"oldest {last:.0f}s, growing {slope:.2f}s/s over {len(recent)} samples"
            found.append(_Condition({"lane": lane}, holds, slope, detail))
    elif rule.check == "above":  # age > threshold, now
        lane_name = str(rule.params["lane"])
        latest = history.latest(lane_name, at)
        value = latest.oldest_age if latest else 0.0
        holds = value > rule.seconds("threshold")
        found.append(_Condition({"lane": lane_name}, holds, value, f"oldest {value:.0f}s"))
    elif rule.check == "dead_spike":
        dead = sum(s.dead for s in wide)
        holds = dead > int(rule.params["count"])
        found.append(_Condition({}, holds, dead, f"{dead} dead-lettered"))
    elif rule.check == "hard_bounce_ratio":
        # refused at once, or bounced after it was sent (a DSN, a provider's event)
        hard = sum(s.hard_bounces + s.bounced for s in wide)
        finished = sum(s.sent + s.dead for s in wide)
        ratio = hard / finished if finished else 0.0
        holds = finished >= int(rule.params["minimum"]) and ratio > float(rule.params["ratio"])
        found.append(_Condition({}, holds, ratio, f"{hard} hard of {finished} finished"))
    elif rule.check == "complaint_rate":
        complaints = sum(s.complaints for s in wide)
        sent = sum(s.sent for s in wide)
        rate = complaints / sent if sent else 0.0
        holds = sent >= int(rule.params["minimum"]) and rate > float(rule.params["rate"])
        detail = f"{complaints} complaint(s) for {sent} delivered ({rate:.2%})"
        found.append(_Condition({}, holds, rate, detail))
    elif rule.check == "paused":  # paused within the last 5 minutes (a probe's gap is none)
        for name in _named(history, at, rule.hold + LOOKBACK, "paused"):
            seen = history.named_within(at, "paused", name)
            if seen is not None:
                since = history.named_since(seen, "paused", name)
                minutes = (at - since) // 60
                holds, detail = True, f"paused throughout the last {minutes:.0f} min"
            else:
                holds, detail = False, "not paused"
            found.append(_Condition({"destination": name}, holds, float(holds), detail))
    elif rule.check == "misconfigured":
        # at once: nothing gets through until someone fixes the configuration
        latest_names = wide[-1].misconfigured if wide else ()
        for name in _named(history, at, window, "misconfigured"):
            holds = name in latest_names
            found.append(_Condition({"destination": name}, holds, 1.0, "misconfigured"))
    elif rule.check == "stalled":
        # mail waiting throughout the window (recorded over all of it), none delivered
        sent = sum(s.sent for s in wide)
        depth_at: dict[float, int] = defaultdict(int)
        for lane in _LANES:
            for sample in history.between(lane, at - window, at):
                depth_at[sample.at] += sample.depth
        depths = [depth_at[t] for t in sorted(depth_at)]
        holds = history.covers("*", at, window) and sent == 0 and bool(depths) and min(depths) > 0
        waiting = depths[-1] if depths else 0
        found.append(_Condition({}, holds, waiting, f"{sent} delivered, {waiting} waiting"))
    elif rule.check == "webhook_failing":  # the endpoints' state now (a rule without `for`)
        threshold = int(rule.params["failures"])
        for state in webhooks:
            detail = f"{state.failures} failure(s) in a row"
            if state.failures and state.last_error:
                detail += f"; last: {state.last_error}"
            holds = state.failures >= threshold
            found.append(_Condition({"endpoint": state.name}, holds, float(state.failures), detail))
    return found


def evaluate(
    samples: Sequence[Sample],
    now: float,
    rules: Sequence[AlertRule] | None = None,
    webhooks: Sequence[WebhookEndpointState] = (),
) -> list[Alert]:
    """Every rule's verdict on the recorded history (``samples``) and on the outbound webhook
    endpoints' state (``webhooks``, as the store keeps it).

    A rule with a ``for`` fires once its condition has held at every minute of it, as
    Prometheus's ``for`` (evaluated each minute) does: the check is asked again on the history
    as it stood 1, 2, ... ``for`` minutes ago. Until then a holding condition is pending."""
    history = _History(samples)
    alerts: list[Alert] = []
    for rule in rules or load_rules():
        current = _conditions(rule, history, now, webhooks)
        steps = math.ceil(rule.hold / STEP)
        # the label sets that have held at every minute so far, going back a minute at a time
        holding = {c.key for c in current if c.holds}
        for step in range(1, steps + 1):
            if not holding:
                break
            earlier = _conditions(rule, history, now - step * STEP, webhooks)
            holding &= {c.key for c in earlier if c.holds}
        for condition in current:
            firing = condition.holds and condition.key in holding
            pending = condition.holds and not firing
            detail = condition.detail
            if pending:
                detail += f"; pending until it has held for {rule.duration}"
            alerts.append(
                Alert(rule, condition.labels, firing, condition.value, detail, pending=pending)
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
        for gone in self._no_longer_evaluated(firing_before, alerts):
            if await self.app.store.alert_transition(gone.key, False, now):
                log.info("alert %s resolved: %s", gone.key, gone.detail)
                to_send.append(gone.alertmanager(now, firing_before.get(gone.key)))
        if self.webhook and to_send:
            await self._post(to_send)
        await self.app.store.purge_samples(now - self.history)
        return alerts

    def _no_longer_evaluated(
        self, firing: Mapping[str, float], alerts: Sequence[Alert]
    ) -> list[Alert]:
        """Alerts recorded as firing that no verdict speaks of any more (a webhook endpoint
        taken out of the configuration, a destination long forgotten): resolved, or the store
        would keep them firing for ever."""
        rules = {rule.name: rule for rule in self.rules}
        evaluated = {alert.key for alert in alerts}
        gone = []
        for key in firing:
            name, _, inside = key.partition("{")
            if key in evaluated or name not in rules:
                continue
            labels = dict(item.split("=", 1) for item in inside.rstrip("}").split(",") if item)
            gone.append(Alert(rules[name], labels, False, math.nan, "no longer evaluated"))
        return gone

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
    """Firing alerts first, then pending ones, then the rest; by name within each."""
    return sorted(alerts, key=lambda a: (not a.firing, not a.pending, a.rule.name, a.key))
