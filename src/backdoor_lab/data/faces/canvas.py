"""Anti-aliased drawing in crop pixel units: PIL shapes on a supersampled layer plus a coverage mask."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def rgb(values: np.ndarray | tuple) -> tuple[int, int, int]:
    """A colour as PIL wants it: three ints clipped to 0..255."""
    arr = np.clip(np.asarray(values, dtype=np.float64), 0, 255)
    return int(round(arr[0])), int(round(arr[1])), int(round(arr[2]))


class Canvas:
    """ImageDraw in crop pixel units on a supersampled layer, so shapes come out anti-aliased.

    Colours go to an RGB layer (translucent fills blend there); every opaque shape also marks the coverage
    mask, which later composites the warped face onto the background.
    """

    def __init__(self, size: tuple[int, int], supersample: int) -> None:
        self.layer = Image.new("RGB", size, (0, 0, 0))
        self.mask = Image.new("L", size, 0)
        self.draw = ImageDraw.Draw(self.layer, "RGBA")
        self.draw_mask = ImageDraw.Draw(self.mask)
        self.s = supersample

    def _p(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.s, y * self.s) for x, y in points]

    def _box(self, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        s = self.s
        return [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple) -> None:
        box = self._box(cx, cy, rx, ry)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return
        self.draw.ellipse(box, fill=fill)
        if fill[3] == 255:
            self.draw_mask.ellipse(box, fill=255)

    def chord(self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, fill: tuple) -> None:
        box = self._box(cx, cy, rx, ry)
        self.draw.chord(box, start, end, fill=fill)
        if fill[3] == 255:
            self.draw_mask.chord(box, start, end, fill=255)

    def polygon(self, points: list[tuple[float, float]], fill: tuple) -> None:
        self.draw.polygon(self._p(points), fill=fill)
        if fill[3] == 255:
            self.draw_mask.polygon(self._p(points), fill=255)

    def line(self, points: list[tuple[float, float]], fill: tuple, width: float) -> None:
        w = max(1, int(round(width * self.s)))
        self.draw.line(self._p(points), fill=fill, width=w, joint="curve")
        if fill[3] == 255:
            self.draw_mask.line(self._p(points), fill=255, width=w, joint="curve")


def bezier(p0: tuple, p1: tuple, p2: tuple, n: int = 10) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def shade(colour: tuple[int, int, int], factor: float, alpha: int = 255) -> tuple[int, int, int, int]:
    return (*rgb(np.array(colour) * factor), alpha)
