"""Reading a rendered timeline (``reporting.timeline``) as pixels: its colours and areas."""

from __future__ import annotations

import io

import cairosvg
from PIL import Image

from pytest_poolaware.reporting.timeline import SERIAL_COLOUR, SERIAL_OPACITY, WORKER_COLOURS


def rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


def png(svg: str) -> Image.Image:
    data = cairosvg.svg2png(bytestring=svg.encode())
    assert data is not None
    return Image.open(io.BytesIO(data)).convert("RGB")


def pixel_counts(image: Image.Image) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for count, colour in image.getcolors(maxcolors=image.width * image.height) or []:
        assert isinstance(colour, tuple), colour  # an RGB image's colours are (r, g, b)
        red, green, blue = colour
        counts[(red, green, blue)] = count
    return counts


def shaded(colour: tuple[int, int, int], shade: tuple[int, int, int]) -> tuple[int, int, int]:
    """``colour`` under the serial lane's translucent shade."""
    red, green, blue = (
        round(c * (1 - SERIAL_OPACITY) + s * SERIAL_OPACITY)
        for c, s in zip(colour, shade, strict=True)
    )
    return (red, green, blue)


def area_pixels(image: Image.Image) -> int:
    """Pixels of the worker colours, plain or under the serial lane's shade."""
    targets = [rgb(c) for c in WORKER_COLOURS]
    shade = rgb(SERIAL_COLOUR)
    targets += [shaded(t, shade) for t in targets]
    counts = pixel_counts(image)
    return sum(
        n
        for colour, n in counts.items()
        if any(max(abs(a - b) for a, b in zip(colour, t, strict=True)) <= 3 for t in targets)
    )
