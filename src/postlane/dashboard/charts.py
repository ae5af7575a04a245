"""Line charts as inline SVG, drawn on the server: no chart library, no script, nothing fetched.

A chart is a few time series over one window; each is a polyline scaled into a fixed viewBox
(the browser stretches it to the page's width). Presentation attributes only, never ``style``:
the dashboard's Content-Security-Policy forbids inline styles.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

from markupsafe import Markup

from postlane.message import Lane
from postlane.records import Sample

__all__ = ["Series", "line_chart", "overview_charts"]

WIDTH, HEIGHT = 600, 160
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22
#: one colour per series, in order (distinguishable in colour-blind palettes: Okabe-Ito)
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9")
#: what failure is drawn in, whatever its place: the dashboard's red (never a green)
FAILURE = "#b3261e"


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (unix time, value), oldest first
    #: its own colour (else the next of COLOURS)
    colour: str | None = None

    def colour_at(self, index: int) -> str:
        return self.colour or COLOURS[index % len(COLOURS)]


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    start: float,
    end: float,
    unit: str = "",
) -> Markup:
    """An SVG chart of ``series`` between ``start`` and ``end`` (unix times)."""
    top = max((v for s in series for _, v in s.points), default=0.0)
    ceiling = _nice_ceiling(top)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return LEFT + (min(max(t, start), end) - start) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - (v / ceiling) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):  # grid lines with their values
        gy = y(ceiling * fraction)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}" '
            'stroke="#ddd" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{LEFT - 4}" y="{gy + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="#555">{escape(_value(ceiling * fraction, unit))}</text>'
        )
    for t, anchor in ((start, "start"), ((start + end) / 2, "middle"), (end, "end")):
        label = datetime.fromtimestamp(t, UTC).strftime("%H:%M")
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}" font-size="10" '
            f'fill="#555">{label}</text>'
        )
    for index, s in enumerate(series):
        colour = s.colour_at(index)
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        if len(s.points) == 1:
            [(t, v)] = s.points
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
        elif s.points:
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" '
                'stroke-width="1.8" stroke-linejoin="round"/>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><svg width="12" height="12" aria-hidden="true"><rect width="12" '
        f'height="12" fill="{s.colour_at(i)}"/></svg> {escape(s.name)}</span>'
        for i, s in enumerate(series)
    )
    empty = "" if any(s.points for s in series) else '<p class="muted">no history yet</p>'
    return Markup(
        f'<figure class="chart-box"><figcaption>{escape(title)}</figcaption>{"".join(parts)}'
        f'<div class="legend">{legend}</div>{empty}</figure>'
    )


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above ``value`` (1 when there is nothing)."""
    if value <= 0:
        return 1.0
    magnitude = 1.0
    while magnitude * 10 <= value:
        magnitude *= 10
    while magnitude > value:
        magnitude /= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _value(value: float, unit: str) -> str:
    if unit == "s":
        from postlane.config import format_duration

        return format_duration(value) if value else "0"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def overview_charts(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """The overview's charts of the recorded history (one sample per minute, per lane and for
    the whole queue, ``"*"``) between ``start`` and ``end``, and the window's totals."""
    by_lane: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_lane[s.lane].append(s)
    lanes = [lane.value for lane in Lane]
    wide = by_lane.get("*", [])
    per_minute = [
        Series("delivered", [(s.at, s.sent) for s in wide]),
        # tries, not recipients: one recipient retried five times in the window counts five
        Series("tries deferred", [(s.at, s.deferrals) for s in wide]),
        Series("dead", [(s.at, s.dead) for s in wide], colour=FAILURE),
    ]
    bounces = [
        Series("hard bounces", [(s.at, s.hard_bounces) for s in wide], colour=FAILURE),
        Series("soft bounces", [(s.at, s.soft_bounces) for s in wide]),
        # heard after the first hop: a DSN or a provider's event, and spam complaints
        Series("bounced later", [(s.at, s.bounced) for s in wide]),
        Series("complaints", [(s.at, s.complaints) for s in wide]),
    ]
    return {
        "depth": line_chart(
            "Waiting per lane (ready + deferred + sending)",
            [Series(lane, [(s.at, s.depth) for s in by_lane.get(lane, [])]) for lane in lanes],
            start=start,
            end=end,
        ),
        "age": line_chart(
            "Oldest waiting message per lane",
            [Series(lane, [(s.at, s.oldest_age) for s in by_lane.get(lane, [])]) for lane in lanes],
            start=start,
            end=end,
            unit="s",
        ),
        "flow": line_chart(
            "Per minute: recipients delivered and dead, tries deferred",
            per_minute,
            start=start,
            end=end,
        ),
        "bounces": line_chart("Bounces per minute", bounces, start=start, end=end),
        "totals": {
            "delivered": sum(s.sent for s in wide),
            "deferred": sum(s.deferrals for s in wide),
            "dead": sum(s.dead for s in wide),
            "hard": sum(s.hard_bounces for s in wide),
            "soft": sum(s.soft_bounces for s in wide),
            "bounced": sum(s.bounced for s in wide),
            "complaints": sum(s.complaints for s in wide),
        },
    }
