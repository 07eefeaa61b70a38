"""Charts drawn on the server as SVG for the auditors' dashboard: bars per day (stacked by a
series) and a histogram of durations. Presentation attributes only, no style attributes and no
script, so they pass the Content-Security-Policy and need no library. Every chart carries a
title and a text summary for screen readers. Draws; decides and reads nothing."""

from __future__ import annotations

from markupsafe import Markup, escape

from ..durations import format_duration

COLOURS = ("#1f3a8a", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 360, 180, 34, 28, 10


def _frame(chart_id: str, title: str, summary: str, body: list[str], top: int) -> Markup:
    plot = HEIGHT - BOTTOM - TOP
    grey, label = 'stroke="#8a94a6"', 'text-anchor="end" font-size="10" fill="#4a5568"'
    axis = [
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot}" {grey}/>',
        f'<line x1="{LEFT}" y1="{TOP + plot}" x2="{WIDTH - 4}" y2="{TOP + plot}" {grey}/>',
        f'<text x="{LEFT - 4}" y="{TOP + 8}" {label}>{top}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + plot}" {label}>0</text>',
    ]
    ident = escape(chart_id)
    svg = (
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{ident}-t {ident}-d"'
        ' xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{ident}-t">{escape(title)}</title>'
        f'<desc id="{ident}-d">{escape(summary)}</desc>' + "".join(axis + body) + "</svg>"
    )
    # Every text in it went through escape() above; the rest is numbers and fixed markup.
    return Markup(svg)  # noqa: S704


def _nice(top: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000):
        if top <= step:
            return step
    return top


def bars_per_day(
    chart_id: str, title: str, days: list[str], series: dict[str, list[int]]
) -> Markup:
    """Stacked bars, one per day, one colour per series (in the order given)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    top = _nice(max(totals, default=0) or 1)
    plot, span = HEIGHT - BOTTOM - TOP, (WIDTH - LEFT - 8) / max(len(days), 1)
    body = []
    for i, day in enumerate(days):
        base: float = TOP + plot
        for n, (name, values) in enumerate(series.items()):
            if not values[i]:
                continue
            high = values[i] * plot / top
            base -= high
            body.append(
                f'<rect x="{LEFT + 4 + i * span:.1f}" y="{base:.1f}" width="{span * 0.7:.1f}"'
                f' height="{high:.1f}" fill="{COLOURS[n % len(COLOURS)]}">'
                f"<title>{escape(day)}: {values[i]} {escape(name)}</title></rect>"
            )
        if i % max(1, len(days) // 5) == 0:  # every few days: labels never overlap
            body.append(
                f'<text x="{LEFT + 4 + i * span:.1f}" y="{HEIGHT - 10}" font-size="10"'
                f' fill="#4a5568">{escape(day[5:])}</text>'
            )
    summary = f"{sum(totals)} in {len(days)} days"
    if series:
        summary += ": " + ", ".join(f"{name} {sum(values)}" for name, values in series.items())
    return _frame(chart_id, title, summary, body, top)


def histogram(chart_id: str, title: str, seconds: list[int]) -> Markup:
    """How many took how long: buckets from under a minute to over a day."""
    edges = [(60, "<1m"), (300, "<5m"), (900, "<15m"), (3600, "<1h"), (14400, "<4h"),
             (86400, "<1d"), (None, "1d+")]  # fmt: skip
    counts = [0] * len(edges)
    for value in seconds:
        for i, (edge, _) in enumerate(edges):
            if edge is None or value < edge:
                counts[i] += 1
                break
    top = _nice(max(counts, default=0) or 1)
    plot, span = HEIGHT - BOTTOM - TOP, (WIDTH - LEFT - 8) / len(edges)
    body = []
    for i, ((_, label), count) in enumerate(zip(edges, counts, strict=True)):
        high = count * plot / top
        body.append(
            f'<rect x="{LEFT + 4 + i * span:.1f}" y="{TOP + plot - high:.1f}"'
            f' width="{span * 0.75:.1f}" height="{high:.1f}" fill="{COLOURS[0]}">'
            f"<title>{escape(label)}: {count}</title></rect>"
            f'<text x="{LEFT + 4 + i * span:.1f}" y="{HEIGHT - 10}" font-size="10"'
            f' fill="#4a5568">{escape(label)}</text>'
        )
    if seconds:
        ordered = sorted(seconds)
        median = ordered[len(ordered) // 2]
        summary = f"{len(seconds)} measured; median {format_duration(median) if median else '0s'}"
    else:
        summary = "nothing measured yet"
    return _frame(chart_id, title, summary, body, top)
