"""The SVG timeline (``reporting.timeline``): workers stacked under the budget line, read
back as pixels. Pure."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pixels import pixel_counts, png, rgb

from pytest_poolaware.reporting.timeline import (
    BOTTOM,
    BUDGET_COLOUR,
    HEIGHT,
    TOP,
    WORKER_COLOURS,
    Span,
    render,
    stacked_steps,
)


def test_stacked_steps() -> None:
    timeline = [(2.0, "gw1", 3), (1.0, "gw0", 2), (2.0, "gw0", 1), (4.0, "gw1", 0)]
    assert stacked_steps(timeline, ["gw0", "gw1"], 0.0) == [
        (0.0, (0, 0)),
        (1.0, (2, 0)),
        (2.0, (1, 3)),
        (4.0, (1, 0)),
    ]


def test_timeline_picture_stacks_workers_under_the_budget_line() -> None:
    timeline = [(10.0 + i / 10, f"gw{i % 3}", 1 + i % 4) for i in range(60)]
    svg = render(
        timeline=timeline,
        budget=12,
        serial=[Span(11.0, 12.0, "t.py::test_<odd>&name")],
        server=[(10.0 + i / 5, 6) for i in range(30)],
        start=9.5,
        end=16.5,
    )
    ET.fromstring(svg)
    assert "t.py::test_&lt;odd&gt;&amp;name" in svg
    image = png(svg)
    colours = pixel_counts(image)
    red = rgb(BUDGET_COLOUR)
    for worker in range(3):
        assert colours.get(rgb(WORKER_COLOURS[worker]), 0) > 500
    # The budget line: a full-width horizontal run of red where 12 is on the y axis,
    # which goes up to 15 (ticks 0, 5, 10, 15).
    assert ">15</text>" in svg
    assert ">20</text>" not in svg
    rows = [
        y for y in range(HEIGHT) if sum(image.getpixel((x, y)) == red for x in range(60, 700)) > 600
    ]
    expected = TOP + (HEIGHT - TOP - BOTTOM) * (1 - 12 / 15)
    assert rows
    assert all(abs(row - expected) <= 1.5 for row in rows)


def test_timeline_picture_of_a_run_without_connections() -> None:
    svg = render(timeline=[], budget=5, start=0.0, end=0.0)
    colours = pixel_counts(png(svg))
    assert colours[rgb(BUDGET_COLOUR)] > 300
    assert not any(rgb(c) in colours for c in WORKER_COLOURS)
