"""The dashboard's charts as geometry: plain values in, shapes and labels out (no database, no Django).

A chart is an SVG drawn in a viewBox of COLUMN units per bucket by HEIGHT units, stretched to its container's width
(preserveAspectRatio="none": it resizes with the page, from a 390 px phone to a wide screen; lines keep their width
with vector-effect). Its text is HTML over it, placed in percent of its width, so it never scales with the drawing;
the last label is aligned to the chart's right edge rather than centred on its bucket, where it was clipped, and the
first to its left edge. No chart library, no CDN: docs/operations.md, "The usage dashboard".
"""

import math
from dataclasses import dataclass

COLUMN = 10
HEIGHT = 100
MAX_LABELS = 6  # along the bottom (three charts side by side at 1280 px); every other one hides on a phone


@dataclass(frozen=True)
class Label:
    text: str
    left_percent: float
    align: str  # "start", "middle" or "end": which of the label's edges is at left_percent
    minor: bool  # hidden on narrow screens


@dataclass(frozen=True)
class Column:
    """A bucket's full-height hover target, with its figures as a tooltip."""

    x: float
    title: str


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css_class: str


@dataclass(frozen=True)
class Line:
    """One series: `d` is an SVG path through its points, broken where a bucket has no value; `points` draws a dot at
    each (a sparse series, an hour here and there, is dots rather than nothing)."""

    name: str
    css_class: str
    d: str
    points: str


@dataclass(frozen=True)
class Chart:
    width: int  # of the viewBox
    height: int
    columns: list
    labels: list
    peak: float  # the top of the scale
    rects: tuple = ()
    lines: tuple = ()


def axis_labels(texts):
    """Labels for at most MAX_LABELS of the buckets: every step-th from the first (00:00, 04:00, …), and always the
    latest, right-aligned, with the one before it dropped when closer than a step (they would touch)."""
    count = len(texts)
    step = max(1, -(-count // MAX_LABELS))
    chosen = list(range(0, count, step))
    if chosen[-1] != count - 1:
        if len(chosen) > 1 and count - 1 - chosen[-1] < step:
            chosen.pop()
        chosen.append(count - 1)
    labels = []
    for n, i in enumerate(reversed(chosen)):
        centre = (i + 0.5) / count
        # At an edge a centred label would stick out of the chart: align it to its bucket's outer edge instead.
        if i == count - 1 or centre > 0.94:
            align, left = "end", (i + 1) / count
        elif i == 0 or centre < 0.06:
            align, left = "start", i / count
        else:
            align, left = "middle", centre
        labels.append(Label(texts[i], round(left * 100, 2), align, minor=n % 2 == 1))
    return labels[::-1]


def _columns(titles):
    return [Column(i * COLUMN, title) for i, title in enumerate(titles)]


def nice_peak(value):
    """The top of a scale: the value rounded up to 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten (0 for
    no data)."""
    if value <= 0:
        return 0
    exponent = math.floor(math.log10(value))
    for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        top = round(step * 10.0 ** exponent, 12)  # 0.30000000000000004 is 0.3
        if value <= top:
            return int(top) if top == int(top) else top
    return 10 ** (exponent + 1)  # unreachable: 10 × 10^exponent > value


def stacked_bars(stacks, classes, titles, texts):
    """One bar per bucket, its values stacked bottom up (`stacks[i]` is a sequence matching `classes`), scaled so that
    the tallest bar reaches the top of a nice scale."""
    peak = nice_peak(max((sum(stack) for stack in stacks), default=0))
    scale = HEIGHT / peak if peak else 0
    rects = []
    for i, stack in enumerate(stacks):
        y = HEIGHT
        for value, css_class in zip(stack, classes):
            height = value * scale
            y -= height
            if value:
                rects.append(Rect(i * COLUMN + 1, round(y, 2), COLUMN - 2, round(height, 2), css_class))
    return Chart(len(stacks) * COLUMN, HEIGHT, _columns(titles), axis_labels(texts), peak, rects=tuple(rects))


def line_chart(series, titles, texts):
    """Lines through each bucket's centre. `series` is [(name, css_class, values)], a value None where the bucket has
    none (the line breaks there); the scale is shared, from 0 to a nice top above the highest value."""
    peak = nice_peak(max((v for _, _, values in series for v in values if v is not None), default=0))
    scale = HEIGHT / peak if peak else 0
    lines = []
    for name, css_class, values in series:
        parts, points, pen_down = [], [], False
        for i, value in enumerate(values):
            if value is None:
                pen_down = False
                continue
            x, y = i * COLUMN + COLUMN / 2, round(HEIGHT - value * scale, 2)
            parts.append(f"{'L' if pen_down else 'M'}{x:g} {y:g}")
            points.append(f"M{x:g} {y:g}h0.01")  # drawn as a dot by the stroke's round cap
            pen_down = True
        lines.append(Line(name, css_class, " ".join(parts), " ".join(points)))
    return Chart(len(titles) * COLUMN, HEIGHT, _columns(titles), axis_labels(texts), peak, lines=tuple(lines))
