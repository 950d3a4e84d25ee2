"""SVG picture of a run: open connections over time per worker, stacked, under the budget line."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

WIDTH: Final = 960
HEIGHT: Final = 420
#: Plot area margins: left for the y axis, right for the legend.
LEFT: Final = 56
RIGHT: Final = 220
TOP: Final = 40
BOTTOM: Final = 48
#: Colours: the budget line's red appears nowhere else, so it can be found in a rendering;
#: no worker is grey, the colour of the axes and of anti-aliased text.
BUDGET_COLOUR: Final = "#d62728"
SERVER_COLOUR: Final = "#111111"
SERIAL_COLOUR: Final = "#9467bd"
SERIAL_OPACITY: Final = 0.15
#: Height of the band above the plot that marks when a serial_only test was running.
SERIAL_BAND: Final = 8
WORKER_COLOURS: Final = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#637939",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#c49c94",
)
#: About this many ticks on each axis.
X_TICKS: Final = 8
Y_TICKS: Final = 6
#: Headroom above the highest of the budget, the stacked total and the server's count.
HEADROOM: Final = 1.1


@dataclass(frozen=True)
class Span:
    """A serial_only test: when it ran, and its node id (shown as a tooltip)."""

    start: float
    end: float
    label: str


def nice_step(span: float, ticks: int) -> float:
    """A 1, 2 or 5 times a power of ten step giving about ``ticks`` ticks over ``span``."""
    raw = max(span, 1e-9) / ticks
    magnitude: float = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def worker_order(worker: str) -> tuple[str, int]:
    """gw2 before gw10."""
    match = re.fullmatch(r"(.*?)(\d+)", worker)
    return (match.group(1), int(match.group(2))) if match else (worker, -1)


def stacked_steps(
    timeline: Sequence[tuple[float, str, int]], workers: Sequence[str], start: float
) -> list[tuple[float, tuple[int, ...]]]:
    """Each worker's open connections after every change, as (time, counts in ``workers``
    order); the first row is all zeros at ``start``. Changes at the same time keep the last."""
    index = {worker: i for i, worker in enumerate(workers)}
    counts = [0] * len(workers)
    rows: list[tuple[float, tuple[int, ...]]] = [(start, tuple(counts))]
    for when, worker, open_ in sorted(timeline, key=lambda e: e[0]):
        counts[index[worker]] = open_
        when = max(when, start)
        if rows[-1][0] == when:
            rows[-1] = (when, tuple(counts))
        else:
            rows.append((when, tuple(counts)))
    return rows


def render(
    *,
    timeline: Sequence[tuple[float, str, int]],
    budget: int,
    serial: Sequence[Span] = (),
    server: Sequence[tuple[float, int]] = (),
    start: float | None = None,
    end: float | None = None,
    title: str = "pytest-poolaware: open connections per worker",
) -> str:
    """The SVG document. ``timeline`` is ``RunRecord.timeline`` ((time, worker, open) per
    change), ``server`` the monitor's (time, count) samples; times are ``time.time()``."""
    times = [t for t, _, _ in timeline] + [t for t, _ in server]
    times += [s.start for s in serial] + [s.end for s in serial]
    t0 = start if start is not None else min(times, default=0.0)
    t1 = end if end is not None else max(times, default=t0)
    workers = sorted({w for _, w, _ in timeline}, key=worker_order)
    rows = stacked_steps(timeline, workers, t0)
    frame = Frame.fitting(
        t0, t1, max([budget, *(sum(c) for _, c in rows), *(n for _, n in server)])
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="18" font-size="14">{escape(title)}</text>',
    ]
    out += _axes(frame.t0, frame.t1, frame.y_max, frame.y_step, frame.x, frame.y)
    out += _areas(workers, rows, frame)
    # over the areas: a light shade, and a solid band above the plot
    out += [_serial_span(span, frame) for span in serial]
    out += _budget_line(budget, frame)
    if server:
        out.append(_server_line(server, frame))
    out += _legend(workers, budget, bool(server), bool(serial))
    out.append("</svg>")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Frame:
    """The plot's scales: ``t0`` to ``t1`` seconds across, 0 to ``y_max`` connections up
    (ticks every ``y_step``)."""

    t0: float
    t1: float
    y_max: int
    y_step: int
    width: int = WIDTH - LEFT - RIGHT
    height: int = HEIGHT - TOP - BOTTOM

    @classmethod
    def fitting(cls, t0: float, t1: float, highest: int) -> Frame:
        """Room for ``highest`` connections with ``HEADROOM``, on round ticks."""
        y_step = max(1, round(nice_step(highest * HEADROOM, Y_TICKS)))
        y_max = math.ceil(highest * HEADROOM / y_step) * y_step
        return cls(t0, max(t1, t0 + 1e-3), y_max, y_step)

    def x(self, t: float) -> float:
        return LEFT + (min(max(t, self.t0), self.t1) - self.t0) / (self.t1 - self.t0) * self.width

    def y(self, n: float) -> float:
        return TOP + self.height - n / self.y_max * self.height


def _areas(
    workers: Sequence[str], rows: list[tuple[float, tuple[int, ...]]], frame: Frame
) -> list[str]:
    """Each worker's open connections, stacked on those of the workers before it."""
    out = []
    for k, worker in enumerate(workers):
        colour = WORKER_COLOURS[k % len(WORKER_COLOURS)]
        top = [(t, sum(c[: k + 1])) for t, c in rows]
        bottom = [(t, sum(c[:k])) for t, c in rows]
        out.append(
            f'<path d="{_area(top, bottom, frame.t1, frame.x, frame.y)}" fill="{colour}" '
            f'stroke="none"><title>{escape(worker)}</title></path>'
        )
    return out


def _serial_span(span: Span, frame: Frame) -> str:
    x0, x1 = frame.x(span.start), max(frame.x(span.end), frame.x(span.start) + 1)
    label = escape(f"serial_only: {span.label}")
    return (
        f'<g><title>{label}</title><rect x="{x0:.2f}" y="{TOP}" width="{x1 - x0:.2f}" '
        f'height="{frame.height}" fill="{SERIAL_COLOUR}" fill-opacity="{SERIAL_OPACITY}"/>'
        f'<rect x="{x0:.2f}" y="{TOP - SERIAL_BAND - 2}" width="{x1 - x0:.2f}" '
        f'height="{SERIAL_BAND}" fill="{SERIAL_COLOUR}"/></g>'
    )


def _budget_line(budget: int, frame: Frame) -> list[str]:
    level = frame.y(budget)
    return [
        f'<line x1="{LEFT}" y1="{level:.2f}" x2="{LEFT + frame.width}" y2="{level:.2f}" '
        f'stroke="{BUDGET_COLOUR}" stroke-width="2"/>',
        f'<text x="{LEFT + frame.width - 4}" y="{level - 5:.2f}" text-anchor="end" '
        f'fill="{BUDGET_COLOUR}">budget {budget}</text>',
    ]


def _server_line(server: Sequence[tuple[float, int]], frame: Frame) -> str:
    """The server's samples as steps: each count holds until the next sample."""
    points = []
    for (t, n), after in zip(server, [*server[1:], None], strict=True):
        points.append(f"{frame.x(t):.2f},{frame.y(n):.2f}")
        if after is not None:
            points.append(f"{frame.x(after[0]):.2f},{frame.y(n):.2f}")
    return (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="{SERVER_COLOUR}" '
        'stroke-width="1.5"/>'
    )


def _area(
    top: list[tuple[float, int]],
    bottom: list[tuple[float, int]],
    t1: float,
    x: Callable[[float], float],
    y: Callable[[float], float],
) -> str:
    """A closed step-shaped path between two step functions of time."""
    ends = [t for t, _ in top[1:]] + [t1]
    path = [f"M{x(top[0][0]):.2f},{y(bottom[0][1]):.2f}"]
    for (t, n), after in zip(top, ends, strict=True):
        path.append(f"L{x(t):.2f},{y(n):.2f}L{x(after):.2f},{y(n):.2f}")
    for (t, n), after in reversed(list(zip(bottom, ends, strict=True))):
        path.append(f"L{x(after):.2f},{y(n):.2f}L{x(t):.2f},{y(n):.2f}")
    return "".join(path) + "Z"


def _axes(
    t0: float,
    t1: float,
    y_max: int,
    y_step: int,
    x: Callable[[float], float],
    y: Callable[[float], float],
) -> list[str]:
    plot_right, plot_bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    out = [
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_right - LEFT}" height="{plot_bottom - TOP}" '
        'fill="none" stroke="#999999"/>'
    ]
    for n in range(0, y_max + 1, y_step):
        out.append(
            f'<line x1="{LEFT - 4}" y1="{y(n):.2f}" x2="{LEFT}" y2="{y(n):.2f}" stroke="#999999"/>'
            f'<text x="{LEFT - 7}" y="{y(n) + 4:.2f}" text-anchor="end">{n}</text>'
        )
    step = nice_step(t1 - t0, X_TICKS)
    digits = max(0, -math.floor(math.log10(step)))
    for i in range(int((t1 - t0) / step + 1e-9) + 1):
        s = i * step
        out.append(
            f'<line x1="{x(t0 + s):.2f}" y1="{plot_bottom}" x2="{x(t0 + s):.2f}" '
            f'y2="{plot_bottom + 4}" stroke="#999999"/>'
            f'<text x="{x(t0 + s):.2f}" y="{plot_bottom + 17}" text-anchor="middle">'
            f"{s:.{digits}f}</text>"
        )
    out.append(
        f'<text x="{(LEFT + plot_right) / 2:.0f}" y="{HEIGHT - 10}" text-anchor="middle">'
        "seconds since the run started</text>"
    )
    out.append(
        f'<text transform="translate(16 {(TOP + plot_bottom) / 2:.0f}) rotate(-90)" '
        'text-anchor="middle">open connections</text>'
    )
    return out


def _legend(workers: Sequence[str], budget: int, server: bool, serial: bool) -> list[str]:
    left = WIDTH - RIGHT + 16
    entries: list[tuple[str, str]] = [
        (f'<rect width="14" height="10" fill="{WORKER_COLOURS[k % len(WORKER_COLOURS)]}"/>', w)
        for k, w in enumerate(workers)
    ]
    entries.append(
        (f'<rect y="4" width="14" height="2" fill="{BUDGET_COLOUR}"/>', f"budget ({budget})")
    )
    if server:
        entries.append(
            (
                f'<rect y="4" width="14" height="2" fill="{SERVER_COLOUR}"/>',
                "server (pg_stat_activity)",
            )
        )
    if serial:
        entries.append(
            (
                f'<rect width="14" height="10" fill="{SERIAL_COLOUR}"/>',
                "serial_only test running",
            )
        )
    return [
        f'<g transform="translate({left} {TOP + 18 * i})">{mark}'
        f'<text x="20" y="10">{escape(text)}</text></g>'
        for i, (mark, text) in enumerate(entries)
    ]
