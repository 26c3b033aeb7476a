"""Server-side SVG charts: a picture in the page, no script and no chart library."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 220
TOP, BOTTOM, LEFT, RIGHT = 16, 40, 8, 8


@dataclass(frozen=True)
class Bar:
    label: str  # under the bar (a period)
    value: Decimal
    shown: str  # the value as printed above the bar (formatted for the locale)
    current: bool = False


def bar_chart(bars: Sequence[Bar], title: str) -> Markup:
    """A bar per period, the current one highlighted; ``title`` is the accessible name."""
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max((b.value for b in bars), default=Decimal(0)) or Decimal(1)
    slot = inner_w / max(len(bars), 1)
    width = slot * 0.6
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + inner_h}" x2="{WIDTH - RIGHT}" y2="{TOP + inner_h}" stroke="#999"/>',
    ]
    for i, bar in enumerate(bars):
        h = float(bar.value / top) * inner_h if bar.value > 0 else 0.0
        x = LEFT + i * slot + (slot - width) / 2
        y = TOP + inner_h - h
        kind = "bar current" if bar.current else "bar"
        middle = x + width / 2
        parts.append(
            f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{h:.1f}">'
            f"<title>{escape(bar.label)}: {escape(bar.shown)}</title></rect>"
        )
        parts.append(f'<text x="{middle:.1f}" y="{max(y - 4, 11):.1f}" text-anchor="middle">{escape(bar.shown)}</text>')
        parts.append(
            f'<text x="{middle:.1f}" y="{HEIGHT - BOTTOM + 16:.1f}" text-anchor="middle">{escape(bar.label)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every value above is escaped)
