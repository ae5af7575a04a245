"""Prometheus metrics: counters the worker feeds, gauges read from the store at scrape time.

Gauges that describe the queue (depth, oldest age, dead-letter depth) are read from the store
when ``/metrics`` is scraped, so several processes on one PostgreSQL report the same truth.
Counters and histograms are this process's own, except under ``serve --processes N``
(:mod:`postlane.supervisor`): there prometheus_client's multiprocess mode keeps them in files
shared by the processes (``PROMETHEUS_MULTIPROC_DIR``) and whichever process is scraped adds
them all up, while the store's gauges are read once, by that process.

``destination`` is a bounded label: a known provider, one of the first
:data:`MAX_DOMAIN_LABELS` other destinations seen, else ``other``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from postlane.classify import ReplyClass
from postlane.destinations import provider_names
from postlane.leases import clock_skew
from postlane.message import Lane
from postlane.policy import Action
from postlane.records import Stats
from postlane.throttle import MISCONFIGURED

if TYPE_CHECKING:
    from postlane.app import AsyncPostlane
    from postlane.feedback import Feedback
    from postlane.feedback.inbound import InboundResult
    from postlane.feedback.providers.recorder import RecordedEvents
    from postlane.worker import DecidedAttempt

MAX_DOMAIN_LABELS = 20
LATENCY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
RECOVERY_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400)
#: recoveries recorded longer ago than this, and never taken by a scrape, are dropped (a
#: process starting on an old store does not count its history)
RECOVERY_HORIZON = 600.0


class DestinationLabels:
    """Keeps the ``destination`` label's values bounded: a known provider, one of ``limit``
    other destinations (the busiest of the last day when the process starts, see
    :meth:`seed`, then the first seen), else ``other``. A label never changes once given, so
    each series stays continuous."""

    def __init__(self, limit: int = MAX_DOMAIN_LABELS) -> None:
        self._providers = frozenset(provider_names())
        self._known: set[str] = set(self._providers)
        self._seen: set[str] = set()
        self._limit = limit

    def seed(self, busiest: Sequence[str]) -> None:
        """Give labels first to these destinations (busiest first), as far as the limit goes:
        every process on one store seeds from the same attempts, so their labels agree."""
        for destination in busiest:
            self(destination)

    def name(self, names: Iterable[str]) -> None:
        """Always label these (the destinations the configuration names: they are few, and an
        operator looks for them)."""
        self._known = self._known | set(names)

    def given(self) -> list[str]:
        """The labels given so far and the configuration's names (not the providers': they
        are labelled when used)."""
        return sorted((self._known - self._providers) | self._seen)

    def __call__(self, destination: str) -> str:
        if destination in self._known or destination in self._seen:
            return destination
        if destination == "relay" or destination.startswith("relay:"):
            return destination  # a relay of the configuration (throttling.md names it so)
        if len(self._seen) < self._limit:
            self._seen.add(destination)
            return destination
        return "other"


class _StoreGauges(Collector):
    def __init__(self, label: DestinationLabels) -> None:
        self.stats: Stats | None = None
        #: when ``stats`` was read (the app's clock: a paused_until is compared with it)
        self.read_at = 0.0
        self.label = label
        #: the destination labels shown so far: one no longer slowed, paused or sending to
        #: stays, at its unlimited values (a flush lifting a slow-down made its series vanish,
        #: and a graph or alert on it went blank instead of showing the rate come back)
        self._shown: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "postlane_queue_depth",
            "Recipients waiting, by lane and state",
            labels=["lane", "state"],
        )
        oldest = GaugeMetricFamily(
            "postlane_oldest_message_age_seconds",
            "Age of the oldest message not yet delivered (queued, deferred or sending), by lane",
            labels=["lane"],
        )
        dead = GaugeMetricFamily("postlane_dead_letter_depth", "Dead-lettered recipients kept")
        finished = GaugeMetricFamily(
            "postlane_recipients", "Recipients kept in a final state", labels=["state"]
        )
        rate = GaugeMetricFamily(
            "postlane_destination_rate",
            "Messages per second a destination is allowed now (+Inf: no limit)",
            labels=["destination"],
        )
        paused = GaugeMetricFamily(
            "postlane_destination_paused",
            "1 while a destination is paused (repeated connection failures, shaping rules)",
            labels=["destination"],
        )
        misconfigured = GaugeMetricFamily(
            "postlane_destination_misconfigured",
            "1 while a relay or provider account is paused because its configuration cannot work"
            " (refused credentials, no TLS for AUTH, a rejected API key)",
            labels=["destination"],
        )
        in_flight = GaugeMetricFamily(
            "postlane_destination_in_flight",
            "Deliveries being sent, by destination",
            labels=["destination"],
        )
        stats = self.stats
        if stats is not None:
            now = self.read_at
            # by label: "other" stands for several, and says the worst of them (a pause
            # there must not hide behind a destination that is fine)
            rates: dict[str, float] = {}
            flags: dict[str, tuple[float, float]] = {}
            sending: dict[str, int] = defaultdict(int)
            for d in stats.destinations:
                is_paused = (d.paused_until or 0) > now
                name = self.label(d.destination)
                allowed = math.inf if d.rate is None else d.rate
                rates[name] = min(rates.get(name, math.inf), allowed)
                wrong = is_paused and (d.reason or "").startswith(MISCONFIGURED)
                was = flags.get(name, (0.0, 0.0))
                flags[name] = (max(was[0], float(is_paused)), max(was[1], float(wrong)))
                sending[name] += d.in_flight
            self._shown.update(rates)
            for name in sorted(self._shown):
                rate.add_metric([name], rates.get(name, math.inf))
                was_paused, was_wrong = flags.get(name, (0.0, 0.0))
                paused.add_metric([name], was_paused)
                misconfigured.add_metric([name], was_wrong)
                in_flight.add_metric([name], sending.get(name, 0))
            for lane in Lane:
                lane_stats = stats.lanes[lane]
                for state, value in (
                    ("queued", lane_stats.ready),
                    ("scheduled", lane_stats.scheduled),
                    ("deferred", lane_stats.deferred),
                    ("held", lane_stats.held),
                    ("sending", lane_stats.sending),
                ):
                    depth.add_metric([lane.value, state], value)
                oldest.add_metric([lane.value], lane_stats.oldest_age_seconds)
            dead.add_metric([], stats.dead)
            finished.add_metric(["sent"], stats.sent)
            finished.add_metric(["suppressed"], stats.suppressed)
        yield depth
        yield oldest
        yield dead
        yield finished
        yield rate
        yield paused
        yield misconfigured
        yield in_flight


class Metrics:
    """The metrics of one postlane process (a registry of its own, so tests can make many).

    ``across_processes`` (a child of ``serve --processes N``): /metrics shows the counters and
    histograms of all the processes, added up from the multiprocess directory (set in the
    environment before prometheus_client was imported), with the store's gauges once.
    ``observes_recoveries``: this process counts requeued dead letters delivered (one process
    of N, else each would count them)."""

    def __init__(
        self,
        app: AsyncPostlane | None = None,
        *,
        across_processes: bool = False,
        observes_recoveries: bool = True,
    ) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        self.destination_label = DestinationLabels()
        if app is not None:
            self.destination_label.name(n for n in app.config.destinations if n != "default")
        self._gauges = _StoreGauges(self.destination_label)
        self.registry.register(self._gauges)
        self.observes_recoveries = observes_recoveries
        #: what /metrics shows: this registry, or (across processes) the sums of all of them
        self.exposed = self.registry
        self.across_processes = across_processes
        #: collectors of this process's own tallies, copied into shared counters (across
        #: processes; see :meth:`add_tallies`)
        self._tallies: list[Collector] = []
        self._shared: dict[str, Counter] = {}
        self._copied: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        if across_processes:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]
            self.exposed.register(self._gauges)
        self.attempts = Counter(
            "postlane_delivery_attempts",
            "Delivery attempts by lane, destination and response class",
            ["lane", "destination", "class"],
            registry=self.registry,
        )
        self.bounces = Counter(
            "postlane_bounces", "Bounces by type (hard, soft)", ["type"], registry=self.registry
        )
        self.dead_letters = Counter(
            "postlane_dead_letters",
            "Recipients dead-lettered, by the class of their last reply",
            ["class"],
            registry=self.registry,
        )
        self.recovery = Histogram(
            "postlane_dead_letter_recovery_seconds",
            "Time from dead-lettered to delivered, for dead letters an operator requeued",
            buckets=RECOVERY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "postlane_delivery_latency_seconds",
            "Time from enqueue to delivered, by lane",
            ["lane"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.enqueued = Counter(
            "postlane_enqueued_messages",
            "Messages accepted, by ingest path",
            ["source"],
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "postlane_store_read_errors",
            "Scrapes whose store read failed (queue gauges then stale)",
            registry=self.registry,
        )
        self.clock_skew = Gauge(
            "postlane_clock_skew_seconds",
            "How far this host's clock is ahead of the database's (negative: behind; 0 on "
            "SQLite, a file of this host): leases are compared with hosts' clocks",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        for cls in ReplyClass:
            if cls is not ReplyClass.DELIVERED:
                self.dead_letters.labels(cls.value)
        for kind in ("hard", "soft"):
            self.bounces.labels(kind)
        #: destination labels whose attempt series are shown (at 0 until counted)
        self._labelled: set[str] = set()
        self._show_labelled()
        #: SMTP submission's own counters (SmtpMetrics, below)
        self.smtp = SmtpMetrics(self.registry)
        #: what is heard after the first hop (FeedbackMetrics, below)
        self.feedback = FeedbackMetrics(self.registry, self.bounces)
        #: outbound webhooks (WebhookMetrics, below)
        self.webhooks = WebhookMetrics(self.registry)

    def add_tallies(self, collector: Collector) -> None:
        """Show ``collector``'s counters, read at scrape time from this process's own tallies
        (the HTTP doors' refusals). Across processes each process copies them into shared
        counters (:meth:`share_tallies`), so every process's /metrics adds them all up.
        ValueError if its names are already registered."""
        self.registry.register(collector)
        if self.across_processes:
            self._tallies.append(collector)

    def share_tallies(self) -> None:
        """Copy what the tallies counted since the last copy into the shared counters (before
        each scrape, and every few seconds: ``serve`` does it)."""
        for collector in self._tallies:
            for family in collector.collect():
                if family.type != "counter":
                    continue
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    key = (family.name, tuple(sorted(sample.labels.items())))
                    copied = self._copied.get(key)
                    if copied is not None and sample.value <= copied:
                        continue
                    self._copied[key] = sample.value
                    counter = self._shared.get(family.name)
                    if counter is None:
                        counter = Counter(
                            family.name, family.documentation, list(sample.labels), registry=None
                        )
                        self._shared[family.name] = counter
                    child = counter.labels(**sample.labels) if sample.labels else counter
                    child.inc(sample.value - (copied or 0.0))  # (0 the first time: the series)

    def _attempt_series(self, lane: str, destination: str, cls: str) -> Counter:
        """The attempts counter of (lane, destination label, class); the first time a label is
        used, every lane and class of it is shown at 0 first, so the first try of each class
        after that counts in ``increase()`` and ``rate()`` (a series that appears with its first
        count already in it shows no increase: Prometheus's "initialise what you know")."""
        if destination not in self._labelled:
            self._labelled.add(destination)
            for each_lane in Lane:
                for each_class in ReplyClass:
                    self.attempts.labels(each_lane.value, destination, each_class.value)
        return self.attempts.labels(lane, destination, cls)

    def attempted(self, attempt: DecidedAttempt) -> None:
        """Count one decided try (the worker's :class:`~postlane.worker.DeliveryObserver`)."""
        verdict, lane = attempt.verdict, attempt.lane.value
        destination = self.destination_label(attempt.destination)
        self._attempt_series(lane, destination, verdict.cls.value).inc()
        if verdict.cls is ReplyClass.HARD_BOUNCE:
            self.bounces.labels("hard").inc()
        elif verdict.cls is ReplyClass.SOFT_BOUNCE:
            self.bounces.labels("soft").inc()
        if attempt.decision.action is Action.SEND:
            self.latency.labels(lane).observe(max(0.0, attempt.now - attempt.created_at))
        elif attempt.decision.action is Action.DEAD:
            self.dead_letters.labels(verdict.cls.value).inc()

    async def seed_destinations(self, window: float = 86400.0) -> None:
        """Label the busiest destinations of the last ``window`` seconds first (serve and
        worker call this once at start)."""
        if self.app is None:
            return
        totals: dict[str, int] = {}
        for destination, _cls, count in await self.app.store.destination_replies(
            self.app.clock.now() - window
        ):
            totals[destination] = totals.get(destination, 0) + count
        self.destination_label.seed(sorted(totals, key=lambda d: (-totals[d], d)))
        self._show_labelled()

    def _show_labelled(self) -> None:
        """Show the attempts of every destination that has a label of its own at 0 (the
        configuration's, the busiest of the last day), before their first try."""
        for destination in self.destination_label.given():
            self._attempt_series(Lane.NORMAL.value, destination, ReplyClass.DELIVERED.value)

    # the bounce listener's observer (postlane.ingest.bounces.BounceObserver)

    def report(self, result: InboundResult) -> None:
        self.feedback.report(result)

    def refused(self, reason: str) -> None:
        self.feedback.refusals.labels(reason).inc()

    # the webhook sender's observer (postlane.webhooks.sender.WebhookObserver)

    def webhook_attempted(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.webhooks.deliveries.labels(endpoint, outcome).inc()
        self.webhooks.duration.labels(endpoint).observe(max(0.0, seconds))

    def dead_without_try(self, cls: ReplyClass) -> None:
        self.dead_letters.labels(cls.value).inc()

    def recovered(self, dead_for_seconds: float) -> None:
        self.recovery.observe(max(0.0, dead_for_seconds))

    async def refresh(self) -> None:
        """Read the store-derived gauges, and the recoveries recorded since the last scrape
        (requeued dead letters delivered, whoever requeued them), before each scrape."""
        if self.app is None:
            return
        try:
            self._gauges.stats = await self.app.stats()
            self._gauges.read_at = self.app.clock.now()
            self.clock_skew.set(await clock_skew(self.app.store, self.app.clock) or 0.0)
        except Exception:
            self.scrape_errors.inc()
            return
        endpoints = self.app.config.webhooks_out
        if endpoints:
            from postlane.webhooks.operations import endpoint_gauges

            try:
                gauges = await endpoint_gauges(self.app.store, endpoints, now=self.app.clock.now())
            except Exception:
                self.scrape_errors.inc()
                gauges = []
            for gauge in gauges:
                self.webhooks.failures.labels(gauge.name).set(gauge.failures)
                self.webhooks.paused.labels(gauge.name).set(1 if gauge.paused else 0)
                self.webhooks.lag.labels(gauge.name).set(gauge.lag_seconds)
        await self.observe_recoveries()

    async def observe_recoveries(self) -> None:
        """Count the recoveries recorded since any process last looked (requeued dead letters
        delivered, whoever requeued them), if this process counts them: the store hands each
        to one process only, so a fleet's counts add up (a serve and a worker both counted
        every one: an audit)."""
        if self.app is None or not self.observes_recoveries:
            return
        try:
            since = self.app.clock.now() - RECOVERY_HORIZON
            recoveries = await self.app.store.claim_recoveries(since)
        except Exception:
            self.scrape_errors.inc()
            return
        for seconds in recoveries:
            self.recovered(seconds)

    async def exposition(self) -> bytes:
        await self.refresh()
        self.share_tallies()
        return generate_latest(self.exposed)


# -- SMTP submission -------------------------------------------------------------------------------


class SmtpMetrics:
    """What the SMTP submission listener refuses and why: AUTH failures and refusals, connection
    caps, timeouts, and the 4xx answers a failing store or an unexpected error causes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.auth_failures = Counter(
            "postlane_smtp_auth_failures",
            "Failed SMTP AUTH attempts: invalid (credentials checked and wrong) or refused "
            "(over a failure budget: address or total; the password was not checked)",
            ["result"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "postlane_smtp_connections_refused",
            "SMTP connections answered 421 at once: over max_connections (total), over "
            "max_connections_per_address (address), or from an address over its AUTH budget (auth)",
            ["cap"],
            registry=registry,
        )
        self.timeouts = Counter(
            "postlane_smtp_timeouts",
            "SMTP sessions closed with 421 for silence: waiting for a command or for the message",
            ["phase"],
            registry=registry,
        )
        self.temporary_failures = Counter(
            "postlane_smtp_temporary_failures",
            "Submissions answered 4xx for postlane's own failure: the store (store) or an "
            "unexpected error (internal)",
            ["reason"],
            registry=registry,
        )
        self.connections = Gauge(
            "postlane_smtp_connections",
            "SMTP submission connections open",
            registry=registry,
            multiprocess_mode="livesum",  # serve --processes N: the processes' connections
        )
        for result in ("invalid", "refused"):
            self.auth_failures.labels(result)
        for cap in ("total", "address", "auth"):
            self.connections_refused.labels(cap)
        for phase in ("command", "data"):
            self.timeouts.labels(phase)
        for reason in ("store", "internal"):
            self.temporary_failures.labels(reason)


# -- after the first hop ---------------------------------------------------------------------------


#: FeedbackKind values (a literal list: metrics must not import the feedback package at start)
FEEDBACK_TYPES = ("bounced", "soft_bounce", "delayed", "complained", "unsubscribed", "delivered")


class FeedbackMetrics:
    """Bounces, complaints and unsubscribes heard after the first hop (the bounce listener,
    provider webhooks, one-click unsubscribes), and the reports the listener read."""

    def __init__(self, registry: CollectorRegistry, bounces: Counter) -> None:
        #: postlane_bounces_total{type}: a bounce heard later counts as one refused at once does
        self.bounces = bounces
        self.recorded = Counter(
            "postlane_feedback",
            "Feedback recorded about sent mail, by type (bounced, soft_bounce, delayed, "
            "complained, unsubscribed, delivered) and source (dsn, arf, plain, webhook:ses, ...)",
            ["type", "source"],
            registry=registry,
        )
        self.reports = Counter(
            "postlane_feedback_reports",
            "Messages the bounce listener read, by kind (dsn, arf, plain, auto-reply, unknown, "
            "unreadable) and what became of them (recorded, duplicate, unmatched, pending)",
            ["kind", "disposition"],
            registry=registry,
        )
        self.refusals = Counter(
            "postlane_bounce_refusals",
            "What the bounce listener refused: recipient (no valid return-path token), size, "
            "connections (over the cap), store (could not record: 451)",
            ["reason"],
            registry=registry,
        )
        self.provider_requests = Counter(
            "postlane_provider_webhooks",
            "Requests to the provider webhook endpoints, by provider (ses, sendgrid, postmark, "
            "mailgun) and outcome (accepted, unverified: refused with 401, malformed: 400, "
            "retry: 503 while a delivery they name is being sent)",
            ["provider", "outcome"],
            registry=registry,
        )
        self.provider_event_outcomes = Counter(
            "postlane_provider_events",
            "Events the provider webhooks carried, by provider and what became of them "
            "(recorded, duplicate, unmatched: kept for review, ignored: a delivery of mail "
            "postlane did not send)",
            ["provider", "disposition"],
            registry=registry,
        )
        for kind in FEEDBACK_TYPES:
            self.recorded.labels(kind, "dsn")
        for reason in ("recipient", "size", "connections", "store"):
            self.refusals.labels(reason)

    def recorded_feedback(self, items: Sequence[Feedback]) -> None:
        for item in items:
            self.recorded.labels(item.kind.value, item.source).inc()
            # by the reply's class, as an attempt's bounce is counted
            if item.cls is ReplyClass.HARD_BOUNCE:
                self.bounces.labels("hard").inc()
            elif item.cls is ReplyClass.SOFT_BOUNCE:
                self.bounces.labels("soft").inc()

    def provider_events(self, provider: str, result: RecordedEvents) -> None:
        """What became of the events of one accepted provider webhook request."""
        counts = {
            "recorded": len(result.recorded),
            "duplicate": result.duplicates,
            "unmatched": result.unmatched,
            "ignored": result.ignored,
        }
        for disposition, count in counts.items():
            if count:
                self.provider_event_outcomes.labels(provider, disposition).inc(count)
        self.recorded_feedback(result.recorded)

    def report(self, result: InboundResult) -> None:
        self.reports.labels(result.kind.value, result.disposition.value).inc()
        self.recorded_feedback(result.recorded)


# -- outbound webhooks -----------------------------------------------------------------------------


class WebhookMetrics:
    """Requests to the application's webhook endpoints, and how each endpoint fares."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "postlane_webhook_deliveries",
            "Requests to webhook endpoints, by endpoint and outcome (delivered, rejected, "
            "timeout, connection, refused)",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "postlane_webhook_delivery_seconds",
            "Time a webhook request took, by endpoint",
            ["endpoint"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0),
            registry=registry,
        )
        self.failures = Gauge(
            "postlane_webhook_consecutive_failures",
            "Failed requests in a row to a webhook endpoint (0: its last request succeeded)",
            ["endpoint"],
            registry=registry,
            multiprocess_mode="mostrecent",  # read from the store by whichever is scraped
        )
        self.paused = Gauge(
            "postlane_webhook_endpoint_paused",
            "1 while a webhook endpoint is paused after failing (retried on its schedule)",
            ["endpoint"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.lag = Gauge(
            "postlane_webhook_lag_seconds",
            "Age of the oldest event a webhook endpoint has not acknowledged",
            ["endpoint"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
