"""A queue's minutes, written once and read by both halves of the alert rules: as the samples
``postlane serve`` records (the built-in evaluation) and as the series Prometheus scrapes (a
promtool unit test), so a test can check that both say the same thing at each minute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from postlane.message import Lane
from postlane.records import Sample

#: a minute boundary (FakeClock's start): minute ``m`` of a history is recorded at T0 + 60 m
T0 = 1_800_000_000.0
LANES = [lane.value for lane in Lane]


@dataclass(frozen=True)
class Minute:
    """What one minute of a running queue shows: gauges as they are at the minute, events of
    the minute before it (as a recorded sample holds them)."""

    ages: dict[str, float] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    paused: tuple[str, ...] = ()
    delivered: int = 0
    hard_bounces: int = 0

    def samples(self, at: float) -> list[Sample]:
        lanes = [
            Sample(at, lane, ready=self.queued.get(lane, 0), oldest_age=self.ages.get(lane, 0.0))
            for lane in LANES
        ]
        wide = Sample(
            at,
            "*",
            sent=self.delivered,
            dead=self.hard_bounces,
            hard_bounces=self.hard_bounces,
            paused=self.paused,
        )
        return [*lanes, wide]


def history(minutes: Sequence[Minute], start: float = T0) -> list[Sample]:
    """The samples serve records over ``minutes``, the first at ``start``."""
    return [s for m, minute in enumerate(minutes) for s in minute.samples(start + 60 * m)]


def input_series(
    minutes: Sequence[Minute], instances: Sequence[str] = ("serve",)
) -> list[dict[str, str]]:
    """The same minutes as the series Prometheus scrapes from each of ``instances`` (a
    promtool ``input_series``, one value a minute): the store's gauges, the same from every
    process; the counters, all counted by the first (the others' stay at 0)."""

    def values(points: Sequence[float | None]) -> str:
        return " ".join("_" if v is None else f"{v:g}" for v in points)

    gauges: dict[str, list[float | None]] = {}
    for lane in LANES:
        gauges[f'postlane_oldest_message_age_seconds{{lane="{lane}"}}'] = [
            m.ages.get(lane, 0.0) for m in minutes
        ]
        gauges[f'postlane_queue_depth{{lane="{lane}",state="queued"}}'] = [
            float(m.queued.get(lane, 0)) for m in minutes
        ]
    for name in sorted({d for m in minutes for d in m.paused}):
        first = next(i for i, m in enumerate(minutes) if name in m.paused)
        # the gauge appears at a destination's first pause, then stays (0 once it ends)
        gauges[f'postlane_destination_paused{{destination="{name}"}}'] = [
            None if i < first else float(name in m.paused) for i, m in enumerate(minutes)
        ]

    def cumulative(counts: Sequence[int]) -> list[float | None]:
        total, out = 0, []
        for count in counts:
            total += count
            out.append(float(total))
        return out

    delivered = cumulative([m.delivered for m in minutes])
    hard = cumulative([m.hard_bounces for m in minutes])
    counters = {
        'postlane_delivery_attempts_total{lane="normal",destination="other",class="delivered"}': (
            delivered
        ),
        'postlane_delivery_attempts_total{lane="normal",destination="other",class="hard_bounce"}': (
            hard
        ),
        'postlane_bounces_total{type="hard"}': hard,
        'postlane_dead_letters_total{class="hard_bounce"}': hard,
    }
    zero: list[float | None] = [0.0] * len(minutes)
    found = []
    for number, instance in enumerate(instances):
        for series, points in gauges.items():
            found.append({"series": _with_instance(series, instance), "values": values(points)})
        for series, points in counters.items():
            own = points if number == 0 else zero
            found.append({"series": _with_instance(series, instance), "values": values(own)})
    return found


def _with_instance(series: str, instance: str) -> str:
    return series.replace("}", f',instance="{instance}"}}', 1)
