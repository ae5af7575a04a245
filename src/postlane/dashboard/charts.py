"""Line charts as inline SVG, drawn on the server: no chart library, no script, nothing fetched.

A chart is a few time series over one window; each is a polyline scaled into a fixed viewBox
(the browser stretches it to the page's width). Presentation attributes only, never ``style``:
the dashboard's Content-Security-Policy forbids inline styles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

__all__ = ["Series", "line_chart"]

WIDTH, HEIGHT = 600, 160
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22
#: one colour per series, in order (distinguishable in colour-blind palettes: Okabe-Ito)
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (unix time, value), oldest first


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
        colour = COLOURS[index % len(COLOURS)]
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
        f'height="12" fill="{COLOURS[i % len(COLOURS)]}"/></svg> {escape(s.name)}</span>'
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
