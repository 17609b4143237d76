"""Procedural GTSRB-like traffic signs: the sign templates and the camera that photographs them.

European-style signs (shapes, colours, pictograms and speed-limit numerals) are drawn as clean templates,
then warped onto street-like backgrounds with the nuisances of GTSRB crops: rotation and perspective, scale,
blur, lighting and sensor noise. Each image comes with its sign's bounding box, where a BadNets sticker is
placed (PAPER.md: 0.1 x the sign's width and height, centred at (0.57, 0.82) of the box).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 128  # templates are drawn at this size and warped down, for anti-aliasing

RED = (200, 20, 30)
BLUE = (20, 70, 170)
WHITE = (245, 245, 240)
BLACK = (20, 20, 20)
YELLOW = (250, 200, 20)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _circle(draw: ImageDraw.ImageDraw, fill, ring=None, ring_width: int = 14) -> None:
    draw.ellipse((4, 4, CANVAS - 5, CANVAS - 5), fill=ring or fill)
    if ring is not None:
        draw.ellipse((4 + ring_width, 4 + ring_width, CANVAS - 5 - ring_width, CANVAS - 5 - ring_width), fill=fill)


def _text(draw: ImageDraw.ImageDraw, text: str, size: int, fill, dy: int = 0) -> None:
    font = _font(size)
    box = draw.textbbox((0, 0), text, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    draw.text(((CANVAS - w) / 2 - box[0], (CANVAS - h) / 2 - box[1] + dy), text, font=font, fill=fill)


def _speed_limit(value: str) -> Callable[[ImageDraw.ImageDraw], None]:
    def draw(d: ImageDraw.ImageDraw) -> None:
        _circle(d, WHITE, RED)
        _text(d, value, 56 if len(value) < 3 else 42, BLACK)

    return draw


def _stop(d: ImageDraw.ImageDraw) -> None:
    r = CANVAS / 2 - 4
    pts = [
        (
            CANVAS / 2 + r * math.cos(math.pi / 8 + k * math.pi / 4),
            CANVAS / 2 + r * math.sin(math.pi / 8 + k * math.pi / 4),
        )
        for k in range(8)
    ]
    d.polygon(pts, fill=WHITE)
    inner = [(CANVAS / 2 + 0.9 * (x - CANVAS / 2), CANVAS / 2 + 0.9 * (y - CANVAS / 2)) for x, y in pts]
    d.polygon(inner, fill=RED)
    _text(d, "STOP", 34, WHITE)


def _triangle(d: ImageDraw.ImageDraw, pictogram: Callable[[ImageDraw.ImageDraw], None], inverted: bool = False):
    top, bottom = (10, CANVAS - 14) if not inverted else (CANVAS - 10, 14)
    outer = [(CANVAS / 2, top), (4, bottom), (CANVAS - 5, bottom)]
    d.polygon(outer, fill=RED)
    cx, cy = CANVAS / 2, (top + 2 * bottom) / 3
    inner = [(cx + 0.72 * (x - cx), cy + 0.72 * (y - cy)) for x, y in outer]
    d.polygon(inner, fill=WHITE)
    pictogram(d)


def _exclamation(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((58, 50, 70, 86), fill=BLACK)
    d.ellipse((57, 92, 71, 104), fill=BLACK)


def _curve(d: ImageDraw.ImageDraw) -> None:
    d.arc((44, 56, 92, 120), start=180, end=270, fill=BLACK, width=9)
    d.line((68, 56, 68, 100), fill=WHITE, width=1)
    d.polygon([(68, 46), (82, 58), (68, 70)], fill=BLACK)
    d.line((48, 88, 48, 104), fill=BLACK, width=9)


def _pedestrian(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((58, 48, 70, 60), fill=BLACK)
    d.line((64, 60, 62, 84), fill=BLACK, width=7)
    d.line((62, 84, 52, 104), fill=BLACK, width=6)
    d.line((62, 84, 74, 104), fill=BLACK, width=6)
    d.line((50, 72, 76, 70), fill=BLACK, width=5)


def _slippery(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((50, 60, 78, 74), fill=BLACK)
    d.line((46, 90, 60, 84, 70, 96, 84, 88), fill=BLACK, width=4)
    d.line((44, 102, 58, 96, 68, 106, 84, 100), fill=BLACK, width=4)


def _arrow(angle_deg: float) -> Callable[[ImageDraw.ImageDraw], None]:
    def draw(d: ImageDraw.ImageDraw) -> None:
        _circle(d, BLUE)
        shaft = [(-26, -7), (10, -7), (10, -20), (34, 0), (10, 20), (10, 7), (-26, 7)]
        a = math.radians(angle_deg)
        pts = [
            (CANVAS / 2 + x * math.cos(a) - y * math.sin(a), CANVAS / 2 + x * math.sin(a) + y * math.cos(a))
            for x, y in shaft
        ]
        d.polygon(pts, fill=WHITE)

    return draw


def _no_entry(d: ImageDraw.ImageDraw) -> None:
    _circle(d, RED)
    d.rectangle((26, 54, CANVAS - 27, 74), fill=WHITE)


def _no_vehicles(d: ImageDraw.ImageDraw) -> None:
    _circle(d, WHITE, RED, ring_width=16)


def _end_of_limits(d: ImageDraw.ImageDraw) -> None:
    _circle(d, WHITE, (60, 60, 60), ring_width=3)
    for off in (-14, 0, 14):
        d.line((34 + off, 94 + off, 94 + off, 34 + off), fill=(60, 60, 60), width=5)


def _priority_road(d: ImageDraw.ImageDraw) -> None:
    c = CANVAS / 2
    d.polygon([(c, 4), (CANVAS - 5, c), (c, CANVAS - 5), (4, c)], fill=WHITE)
    d.polygon([(c, 26), (CANVAS - 27, c), (c, CANVAS - 27), (26, c)], fill=YELLOW)


def _yield(d: ImageDraw.ImageDraw) -> None:
    _triangle(d, lambda _: None, inverted=True)


SIGN_CLASSES: dict[str, Callable[[ImageDraw.ImageDraw], None]] = {
    "speed_limit_30": _speed_limit("30"),
    "speed_limit_50": _speed_limit("50"),
    "speed_limit_70": _speed_limit("70"),
    "speed_limit_100": _speed_limit("100"),
    "stop": _stop,
    "yield": _yield,
    "no_entry": _no_entry,
    "no_vehicles": _no_vehicles,
    "priority_road": _priority_road,
    "general_caution": lambda d: _triangle(d, _exclamation),
    "dangerous_curve": lambda d: _triangle(d, _curve),
    "pedestrians": lambda d: _triangle(d, _pedestrian),
    "slippery_road": lambda d: _triangle(d, _slippery),
    "turn_right_ahead": _arrow(0),
    "turn_left_ahead": _arrow(180),
    "ahead_only": _arrow(-90),
    "keep_right": _arrow(45),
    "end_of_limits": _end_of_limits,
}


def render_template(name: str) -> Image.Image:
    """The clean RGBA template of one sign class, CANVAS x CANVAS, transparent outside the sign."""
    img = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    SIGN_CLASSES[name](ImageDraw.Draw(img))
    return img


class SignRenderer:
    """Renders GTSRB-like crops of one sign each, with the sign's bounding box.

    Every image is a pure function of ``(class, seed)``: rendering is reproducible and order-free.
    """

    def __init__(self, image_size: int = 32, class_names: list[str] | None = None, supersample: int = 2) -> None:
        self.class_names = list(class_names or SIGN_CLASSES)
        unknown = [c for c in self.class_names if c not in SIGN_CLASSES]
        if unknown:
            raise ValueError(f"unknown sign classes {unknown}; available: {list(SIGN_CLASSES)}")
        self.image_size = image_size
        self.work_size = image_size * supersample
        self._templates = {name: render_template(name) for name in self.class_names}

    def render(self, label: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One uint8 (S, S, 3) image of class ``label`` and its sign box (x0, y0, x1, y1) in pixels."""
        rng = np.random.default_rng(seed)
        size = self.work_size
        template = self._templates[self.class_names[label]]
        template = self._weather(template, rng)
        background = self._background(rng, size)

        # Sign scale and placement as in GTSRB crops: the sign fills 60-90% of the frame, ~10% margins.
        scale = rng.uniform(0.6, 0.9) * size
        cx = size / 2 + rng.uniform(-0.08, 0.08) * size
        cy = size / 2 + rng.uniform(-0.08, 0.08) * size
        angle = math.radians(rng.normal(0, 6))
        # Perspective: each template corner moves independently by a few percent of the sign size.
        half = scale / 2
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        corners *= 1 + rng.uniform(-0.1, 0.1, size=(1, 2))  # aspect change (viewing angle)
        corners += rng.normal(0, 0.035 * scale, size=corners.shape)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        dst = corners @ rot.T + np.array([cx, cy])
        src = np.array([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]], dtype=float)
        coeffs = _perspective_coeffs(dst, src)
        warped = template.transform((size, size), Image.PERSPECTIVE, coeffs, resample=Image.BILINEAR)
        background.alpha_composite(warped)
        img = background.convert("RGB")

        alpha = np.asarray(warped)[:, :, 3]
        ys, xs = np.nonzero(alpha > 127)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)

        blur = rng.uniform(0.0, 1.2) * size / 64
        if blur > 0.2:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        box *= self.image_size / size

        arr = np.asarray(img, dtype=np.float32) / 255.0
        # Lighting: global gain and gamma, a linear illumination gradient, colour cast, sensor noise.
        gain = rng.uniform(0.45, 1.25)
        gamma = rng.uniform(0.7, 1.4)
        yy, xx = np.mgrid[0 : self.image_size, 0 : self.image_size] / self.image_size
        gradient = 1 + rng.uniform(-0.25, 0.25) * (xx - 0.5) + rng.uniform(-0.25, 0.25) * (yy - 0.5)
        cast = 1 + rng.normal(0, 0.05, size=3)
        arr = np.clip(arr, 0, 1) ** gamma * gain * gradient[..., None] * cast
        arr += rng.normal(0, rng.uniform(0.005, 0.04), size=arr.shape)
        out = np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
        return out, box

    def _weather(self, template: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Faded paint and dirt: signs of one class are not pixel-identical in the wild."""
        arr = np.asarray(template).astype(np.float32)
        fade = rng.uniform(0.75, 1.0)
        arr[..., :3] = arr[..., :3] * fade + (1 - fade) * 180
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGBA")

    @staticmethod
    def _background(rng: np.random.Generator, size: int) -> Image.Image:
        """Street-like clutter: a sky/foliage/building gradient with random blocks and lines."""
        top, bottom = rng.uniform(30, 220, size=(2, 3))
        t = np.linspace(0, 1, size)[:, None, None]
        arr = (top * (1 - t) + bottom * t).repeat(size, axis=1)
        img = Image.fromarray(arr.astype(np.uint8), "RGB").convert("RGBA")
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 8)):
            x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
            w, h = rng.uniform(0.1, 0.6, size=2) * size
            colour = tuple(int(c) for c in rng.uniform(20, 230, size=3)) + (255,)
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
            else:
                draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(1, 4)))
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL's PERSPECTIVE coefficients mapping output points ``dst`` back to template points ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, dtype=float)
    b = src.reshape(-1)
    return np.linalg.solve(a, b).tolist()
