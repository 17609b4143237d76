"""Aligned face crops for the face backdoor of Fine-Pruning (Liu et al., RAID 2018).

The paper's face task is identity classification on YouTube Aligned Faces with DeepID, whose input is a
3x55x47 aligned crop; the attacker pastes sunglasses over the eyes. Every source here returns such crops as
uint8 (N, 55, 47, 3) images together with the per-image *eye band* (the box the sunglasses trigger covers):

- ``SyntheticFaces``: a procedural population of identities (built in, no download), each a fixed set of
  facial parameters, photographed under the nuisances of real footage (pose, scale, expression, lighting,
  background, blur, noise, compression).
- ``AlignedFaceFolder``: any folder of aligned crops, one sub-folder per identity (the YouTube Aligned Faces
  layout ``<identity>/<video>/aligned_detect_*.jpg`` included).
- ``LFWFaces``: Labeled Faces in the Wild through ``torchvision.datasets.LFWPeople`` (never downloaded).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from rich.progress import track

from backdoor_lab.data.base import (
    RawSplit,
    cached_splits,
    file_listing_digest,
    images_to_tensor,
    stratified_holdout,
)

FACE_HEIGHT = 55
FACE_WIDTH = 47

# Where the eyes sit in a canonical 55x47 aligned crop (pixel centres, x right, y down). Aligned face
# datasets normalise the eye positions, so one constant serves every image of a real aligned source; the
# synthetic generator draws its identities around the same positions and jitters them per image.
CANONICAL_LEFT_EYE = (14.5, 21.0)
CANONICAL_RIGHT_EYE = (32.5, 21.0)

# Height of the eye band relative to the distance between the eye centres: tall enough to cover the eyes
# and the upper cheek like a pair of sunglasses, low enough to leave the brows and the nose tip free.
EYE_BAND_HEIGHT_RATIO = 0.64

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def eye_band(left_eye: tuple[float, float], right_eye: tuple[float, float]) -> np.ndarray:
    """The sunglasses box ``(x0, y0, x1, y1)``: one eye distance either side of the eyes' midpoint.

    A lens centred on each eye then spans half the band's width, as real sunglasses do.
    """
    (lx, ly), (rx, ry) = left_eye, right_eye
    mid_x, mid_y = (lx + rx) / 2.0, (ly + ry) / 2.0
    dist = math.hypot(rx - lx, ry - ly)
    half_h = EYE_BAND_HEIGHT_RATIO * dist / 2.0
    return np.array([mid_x - dist, mid_y - half_h, mid_x + dist, mid_y + half_h], dtype=np.float32)


ALIGNED_EYE_BAND = tuple(float(v) for v in eye_band(CANONICAL_LEFT_EYE, CANONICAL_RIGHT_EYE))
"""Eye band of a canonical aligned 55x47 crop: (5.5, 15.24, 41.5, 26.76)."""


# ---------------------------------------------------------------------------------------------------------
# Procedural identities
# ---------------------------------------------------------------------------------------------------------

HAIR_STYLES = ("bald", "buzz", "short", "fringe", "side_part", "long", "curly", "receding")
FACIAL_HAIR = ("none", "stubble", "moustache", "goatee", "full_beard")

_SKIN_DARK = np.array([88.0, 55.0, 38.0])
_SKIN_LIGHT = np.array([246.0, 214.0, 190.0])
_HAIR_COLOURS = np.array(
    [
        [24, 20, 18],  # black
        [58, 40, 28],  # dark brown
        [105, 72, 44],  # brown
        [150, 110, 70],  # light brown
        [212, 178, 115],  # blonde
        [148, 66, 32],  # auburn / red
        [145, 143, 140],  # grey
        [222, 220, 214],  # white
    ],
    dtype=np.float64,
)
_HAIR_WEIGHTS = np.array([0.26, 0.22, 0.16, 0.1, 0.09, 0.06, 0.07, 0.04])
_IRIS_COLOURS = np.array(
    [[88, 54, 30], [40, 26, 16], [72, 112, 160], [82, 120, 82], [118, 128, 134], [120, 92, 50]],
    dtype=np.float64,
)
_IRIS_WEIGHTS = np.array([0.34, 0.24, 0.14, 0.1, 0.08, 0.1])


def _rgb(values: np.ndarray | tuple) -> tuple[int, int, int]:
    arr = np.clip(np.asarray(values, dtype=np.float64), 0, 255)
    return int(round(arr[0])), int(round(arr[1])), int(round(arr[2]))


@dataclass(frozen=True)
class FaceIdentity:
    """The facial parameters that make one person: drawn once from the identity's seed, never per image.

    Lengths are in pixels of the 55x47 crop; colours are RGB.
    """

    face_half_width: float
    face_half_height: float
    face_centre_y: float
    jaw_width: float  # chin narrowing: 1.0 square jaw, 0.6 pointed chin
    skin: tuple[int, int, int]
    eye_half_spacing: float
    eye_y: float
    eye_half_width: float
    eye_half_height: float
    iris: tuple[int, int, int]
    brow_gap: float  # brow height above the eye centre
    brow_thickness: float
    brow_arch: float
    brow_tilt: float  # outer end up (+) or down (-)
    brow_colour: tuple[int, int, int]
    nose_length: float  # eye line to nose tip
    nose_half_width: float
    mouth_gap: float  # nose tip to mouth line
    mouth_half_width: float
    lip_thickness: float
    lip_colour: tuple[int, int, int]
    ear_size: float
    hair_style: str
    hair_colour: tuple[int, int, int]
    hairline: float  # hairline height above the eye line
    hair_volume: float
    facial_hair: str
    moles: tuple[tuple[float, float, float], ...]  # (dx, dy, radius) relative to the face centre


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw one identity's facial parameters."""
    skin_tone = rng.beta(1.6, 1.4)
    skin = _SKIN_DARK + skin_tone * (_SKIN_LIGHT - _SKIN_DARK) + rng.normal(0.0, [7.0, 6.0, 6.0])
    hair_idx = rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)
    hair = _HAIR_COLOURS[hair_idx] * rng.uniform(0.85, 1.15) + rng.normal(0.0, 6.0, 3)
    # Brows keep their colour when the head hair greys, and are never lighter than dark blonde.
    brow = np.minimum(hair * 0.8, [150, 120, 85]) if hair_idx < 6 else rng.uniform(40, 90) * np.ones(3)
    lip = skin * np.array([0.86, 0.58, 0.58]) + np.array([28.0, 4.0, 8.0]) + rng.normal(0.0, 5.0, 3)
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=[0.06, 0.12, 0.2, 0.12, 0.14, 0.18, 0.1, 0.08])]
    facial_hair = FACIAL_HAIR[rng.choice(len(FACIAL_HAIR), p=[0.58, 0.12, 0.1, 0.08, 0.12])]
    n_moles = rng.choice(4, p=[0.45, 0.3, 0.17, 0.08])
    moles = tuple(
        (float(rng.uniform(-12, 12)), float(rng.uniform(-10, 16)), float(rng.uniform(0.35, 0.75)))
        for _ in range(n_moles)
    )
    return FaceIdentity(
        face_half_width=float(rng.uniform(15.0, 19.5)),
        face_half_height=float(rng.uniform(20.5, 25.0)),
        face_centre_y=float(rng.uniform(27.0, 29.5)),
        jaw_width=float(rng.uniform(0.55, 0.95)),
        skin=_rgb(skin),
        eye_half_spacing=float(rng.uniform(8.3, 9.7)),
        eye_y=float(rng.uniform(20.2, 21.8)),
        eye_half_width=float(rng.uniform(2.5, 3.8)),
        eye_half_height=float(rng.uniform(1.1, 1.9)),
        iris=_rgb(_IRIS_COLOURS[rng.choice(len(_IRIS_COLOURS), p=_IRIS_WEIGHTS)] + rng.normal(0, 6, 3)),
        brow_gap=float(rng.uniform(3.6, 6.0)),
        brow_thickness=float(rng.uniform(0.8, 2.1)),
        brow_arch=float(rng.uniform(0.0, 1.6)),
        brow_tilt=float(rng.uniform(-1.2, 1.2)),
        brow_colour=_rgb(brow),
        nose_length=float(rng.uniform(9.0, 13.0)),
        nose_half_width=float(rng.uniform(2.2, 4.2)),
        mouth_gap=float(rng.uniform(4.5, 7.5)),
        mouth_half_width=float(rng.uniform(4.0, 7.5)),
        lip_thickness=float(rng.uniform(0.8, 2.2)),
        lip_colour=_rgb(lip),
        ear_size=float(rng.uniform(2.5, 4.5)),
        hair_style=style,
        hair_colour=_rgb(hair),
        hairline=float(rng.uniform(9.0, 14.0)),
        hair_volume=float(rng.uniform(1.0, 4.0)),
        facial_hair=facial_hair,
        moles=moles,
    )


@dataclass(frozen=True)
class ImageConditions:
    """What changes from one photograph of a person to the next (pose, expression, camera, scene)."""

    roll_deg: float
    scale: float
    shift_x: float
    shift_y: float
    yaw: float  # -1 (turned to image-left) .. 1
    pitch: float  # -1 (looking down) .. 1
    smile: float
    mouth_open: float
    eye_open: float
    gaze: tuple[float, float]
    brow_raise: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_angle: float
    background_blobs: tuple[tuple[float, float, float, int, int, int], ...]
    clothing: tuple[int, int, int]
    light_angle: float
    light_strength: float
    exposure: float
    contrast: float
    white_balance: tuple[float, float, float]
    blur_radius: float
    noise_sigma: float
    jpeg_quality: int
    noise_seed: int


def sample_conditions(rng: np.random.Generator, strength: float = 1.0) -> ImageConditions:
    """Draw one photograph's nuisances; ``strength`` scales pose, lighting and camera degradation together."""
    s = float(strength)

    def colour() -> tuple[int, int, int]:
        # indoor and outdoor scenes are mostly muted: a grey level with a moderate tint
        return _rgb(rng.uniform(25, 230) + rng.uniform(-1, 1, 3) * rng.uniform(0, 55))

    blobs = tuple(
        (
            float(rng.uniform(0, FACE_WIDTH)),
            float(rng.uniform(0, FACE_HEIGHT)),
            float(rng.uniform(4, 16)),
            *colour(),
        )
        for _ in range(rng.integers(0, 4))
    )
    return ImageConditions(
        roll_deg=float(np.clip(rng.normal(0.0, 4.0 * s), -10 * s, 10 * s)),
        scale=float(1.0 + np.clip(rng.normal(0.0, 0.045 * s), -0.1 * s, 0.1 * s)),
        shift_x=float(np.clip(rng.normal(0.0, 1.0 * s), -2.5 * s, 2.5 * s)),
        shift_y=float(np.clip(rng.normal(0.0, 1.0 * s), -2.5 * s, 2.5 * s)),
        yaw=float(rng.uniform(-1.0, 1.0) * s),
        pitch=float(rng.uniform(-1.0, 1.0) * s),
        smile=float(rng.uniform(-0.3, 1.0)),
        mouth_open=float(rng.uniform(0.0, 1.0)) if rng.random() < 0.3 else 0.0,
        eye_open=float(rng.uniform(0.05, 0.3)) if rng.random() < 0.08 else float(rng.uniform(0.65, 1.1)),
        gaze=(float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.3, 0.3))),
        brow_raise=float(rng.normal(0.0, 0.6)),
        background=(colour(), colour()),
        background_angle=float(rng.uniform(0, 2 * math.pi)),
        background_blobs=blobs,
        clothing=_rgb(rng.uniform(15, 240, 3)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.45) * s),
        exposure=float(np.exp(rng.normal(0.0, 0.18 * s))),
        contrast=float(np.exp(rng.normal(0.0, 0.12 * s))),
        white_balance=tuple(float(v) for v in np.exp(rng.normal(0.0, 0.05 * s, 3))),
        blur_radius=float(rng.uniform(0.0, 0.9) * s),
        noise_sigma=float(rng.uniform(1.0, 6.0) * s),
        jpeg_quality=int(rng.integers(max(5, int(95 - 60 * s)), 96)),
        noise_seed=int(rng.integers(2**31)),
    )


def _outline_centre_x(yaw: float) -> float:
    return FACE_WIDTH / 2.0 + 0.7 * yaw


def _feature_centre_x(yaw: float) -> float:
    """Eyes, nose and mouth lie nearer the camera than the outline, so a turned head moves them further."""
    return _outline_centre_x(yaw) + 1.6 * yaw


def _eye_line_y(idt: FaceIdentity, cond: ImageConditions) -> float:
    return idt.eye_y - 0.4 * cond.pitch


class _Canvas:
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


def _bezier(p0: tuple, p1: tuple, p2: tuple, n: int = 10) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def _shade(colour: tuple[int, int, int], factor: float, alpha: int = 255) -> tuple[int, int, int, int]:
    return (*_rgb(np.array(colour) * factor), alpha)


class FaceRenderer:
    """Draws an identity under given conditions into an aligned 55x47 crop and reports its eye band.

    Shapes are drawn with PIL at ``supersample`` times the crop size and box-filtered down, the pose is an
    affine warp of the face layer, and lighting, camera noise and JPEG are applied to the small image.
    """

    def __init__(self, supersample: int = 4) -> None:
        self.supersample = int(supersample)

    # The face is drawn around the crop's vertical centre line; yaw moves inner features more than the outline
    # (they are nearer the camera), pitch moves nose and mouth against the eyes.
    def _draw_face(self, idt: FaceIdentity, cond: ImageConditions) -> tuple[Image.Image, Image.Image]:
        s = self.supersample
        c = _Canvas((FACE_WIDTH * s, FACE_HEIGHT * s), s)
        cx = _outline_centre_x(cond.yaw)
        cy = idt.face_centre_y
        hw, hh = idt.face_half_width * (1 - 0.06 * abs(cond.yaw)), idt.face_half_height
        fx = _feature_centre_x(cond.yaw)
        skin = (*idt.skin, 255)
        hair = (*idt.hair_colour, 255)
        top = cy - hh

        # clothing and neck
        c.ellipse(cx, FACE_HEIGHT + 6, hw + 10, 10, (*cond.clothing, 255))
        c.polygon(
            [
                (cx - 0.55 * hw, cy),
                (cx + 0.55 * hw, cy),
                (cx + 0.6 * hw, FACE_HEIGHT + 2),
                (cx - 0.6 * hw, FACE_HEIGHT + 2),
            ],
            _shade(idt.skin, 0.82),
        )
        if idt.hair_style == "long":
            c.polygon(
                [
                    (cx - hw - 2.5, top + 8),
                    (cx + hw + 2.5, top + 8),
                    (cx + hw + 4, cy + hh * 0.95),
                    (cx - hw - 4, cy + hh * 0.95),
                ],
                hair,
            )
            c.ellipse(cx, top + 8, hw + 2.5, 9 + idt.hair_volume, hair)
        if idt.hair_style == "curly":
            c.ellipse(cx, top + 7, hw + 3 + idt.hair_volume, 9 + idt.hair_volume, hair)
        # ears
        ear_y = idt.eye_y + 3.0
        for side in (-1, 1):
            ear_x = cx + side * (hw - 0.6) - 0.8 * cond.yaw * side
            c.ellipse(ear_x, ear_y, 0.55 * idt.ear_size, idt.ear_size, _shade(idt.skin, 0.9))
        # face outline: an ellipse whose lower half narrows towards the chin
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        sin, cos = np.sin(angles), np.cos(angles)
        narrowing = np.where(sin > 0, 1.0 - (1.0 - idt.jaw_width) * sin**2, 1.0)
        c.polygon([(cx + hw * co * n, cy + hh * si) for co, si, n in zip(cos, sin, narrowing, strict=True)], skin)
        # cheek shading on the side turned away from the camera
        c.ellipse(
            cx - math.copysign(hw * 0.6, cond.yaw or 1.0),
            cy + 3,
            hw * 0.3,
            hh * 0.4,
            _shade(idt.skin, 0.8, int(60 * abs(cond.yaw))),
        )

        # facial hair under the mouth
        eye_y = _eye_line_y(idt, cond)
        nose_y = eye_y + idt.nose_length + 0.8 * cond.pitch
        mouth_y = nose_y + idt.mouth_gap + 0.4 * cond.pitch
        beard_colour = _shade(idt.hair_colour, 0.9)
        if idt.facial_hair in ("stubble", "full_beard"):
            # the face outline below the beard line, right to left (angles 0..pi run down the right side)
            beard_top = mouth_y - 5.0
            chin = [
                (cx + hw * co * n, cy + hh * si)
                for co, si, n in zip(cos, sin, narrowing, strict=True)
                if si > 0 and cy + hh * si > beard_top
            ]
            alpha = 70 if idt.facial_hair == "stubble" else 255
            if len(chin) >= 3:
                c.polygon(chin, (*beard_colour[:3], alpha))
        if idt.facial_hair == "goatee":
            c.ellipse(fx, mouth_y + 4.5, idt.mouth_half_width * 0.6, 3.5, beard_colour)

        # moles
        for dx, dy, r in idt.moles:
            c.ellipse(fx + dx * hw / 17.0, cy + dy, r, r, _shade(idt.skin, 0.45))

        # eyes and brows
        ry = idt.eye_half_height * cond.eye_open
        for side in (-1, 1):
            ex = fx + side * idt.eye_half_spacing
            c.ellipse(
                ex, eye_y + 0.6, idt.eye_half_width + 0.6, idt.eye_half_height + 0.8, _shade(idt.skin, 0.84)
            )  # eye socket shadow
            if ry > 0.45:
                c.ellipse(ex, eye_y, idt.eye_half_width, ry, (238, 236, 230, 255))
                r_iris = min(ry, idt.eye_half_width * 0.5)
                gx, gy = ex + cond.gaze[0], eye_y + cond.gaze[1] * ry
                c.ellipse(gx, gy, r_iris, r_iris, (*idt.iris, 255))
                c.ellipse(gx, gy, r_iris * 0.45, r_iris * 0.45, (12, 10, 10, 255))
            lid = _bezier(
                (ex - idt.eye_half_width, eye_y),
                (ex, eye_y - 2.0 * ry - 0.2),
                (ex + idt.eye_half_width, eye_y),
                8,
            )
            c.line(lid, _shade(idt.skin, 0.35), 0.55)
            inner = ex - side * idt.eye_half_width * 0.9
            outer = ex + side * (idt.eye_half_width + 1.2)
            brow_y = eye_y - idt.brow_gap - cond.brow_raise
            brow = _bezier(
                (inner, brow_y + 0.3),
                ((inner + outer) / 2, brow_y - idt.brow_arch),
                (outer, brow_y - idt.brow_tilt),
                8,
            )
            c.line(brow, (*idt.brow_colour, 255), idt.brow_thickness)

        # nose: bridge shadow on the far side, tip, nostrils
        nx = fx + 0.9 * cond.yaw
        shade = _shade(idt.skin, 0.72)
        side = 1.0 if cond.yaw >= 0 else -1.0
        c.line(
            [(fx + side * 1.2, eye_y + 1.5), (nx + side * idt.nose_half_width * 0.6, nose_y - 1.0)],
            shade,
            0.6,
        )
        c.ellipse(nx, nose_y - 0.4, idt.nose_half_width * 0.6, 1.1, _shade(idt.skin, 1.06))
        for side in (-1, 1):
            c.ellipse(nx + side * idt.nose_half_width * 0.55, nose_y + 0.3, 0.75, 0.45, _shade(idt.skin, 0.45))

        # mouth: expression bends the corners, an open mouth shows a dark gap between the lips
        mx, mw = fx + 0.3 * cond.yaw, idt.mouth_half_width * (1 + 0.12 * cond.smile)
        corner_y = mouth_y - 1.3 * cond.smile
        gap = 2.2 * cond.mouth_open
        left, right = (mx - mw, corner_y), (mx + mw, corner_y)
        lower = _bezier(left, (mx, mouth_y + gap + 2.2 * idt.lip_thickness + 1.2 * cond.smile), right)
        upper = _bezier(left, (mx, mouth_y - 1.6 * idt.lip_thickness), right)
        inner_lower = _bezier(left, (mx, mouth_y + gap + 0.8 * cond.smile), right)
        inner_upper = _bezier(left, (mx, mouth_y + 0.3 * cond.smile), right)
        lip = (*idt.lip_colour, 255)
        c.polygon(upper + inner_upper[::-1], lip)
        c.polygon(inner_lower + lower[::-1], lip)
        if gap > 0.3:
            c.polygon(inner_upper + inner_lower[::-1], (50, 22, 24, 255))
        c.line(inner_upper, _shade(idt.lip_colour, 0.55), 0.45)
        if idt.facial_hair in ("moustache", "full_beard"):
            c.line(
                _bezier(
                    (mx - mw - 0.5, corner_y + 0.5),
                    (mx, mouth_y - 3.2 * idt.lip_thickness - 2.0),
                    (mx + mw + 0.5, corner_y + 0.5),
                ),
                beard_colour,
                1.6,
            )

        self._draw_hair(c, idt, cx, cy, hw, hh, eye_y)
        return c.layer, c.mask

    @staticmethod
    def _draw_hair(c: _Canvas, idt: FaceIdentity, cx: float, cy: float, hw: float, hh: float, eye_y: float) -> None:
        style, hair = idt.hair_style, (*idt.hair_colour, 255)
        if style == "bald":
            for side in (-1, 1):
                c.ellipse(cx + side * (hw - 0.5), eye_y - 2.5, 1.6, 4.5, hair)
            return
        hairline_y = eye_y - idt.hairline - (5.0 if style == "receding" else 0.0)
        rx, ry = hw + 0.8 + 0.3 * idt.hair_volume, hh + 0.8 + idt.hair_volume
        # the scalp: the part of a slightly larger ellipse above the hairline
        a0 = math.degrees(math.asin(max(-0.999, min(0.999, (hairline_y - cy) / ry))))
        # cropped hair lets the scalp show through
        scalp = 0.6 * np.array(idt.hair_colour) + 0.4 * np.array(idt.skin) if style == "buzz" else idt.hair_colour
        c.chord(cx, cy, rx, ry, 180 - a0, 360 + a0, (*_rgb(scalp), 255))
        if style == "receding":
            for side in (-1, 1):  # hair left at the temples
                c.ellipse(cx + side * (hw - 0.6), eye_y - 5.5, 1.8, 4.5, hair)
        if style == "fringe":
            edge = [(cx - hw * 0.92, hairline_y)]
            for k in range(9):
                x = cx - hw * 0.85 + k * hw * 1.7 / 8
                edge.append((x, hairline_y + 4.5 + (1.2 if k % 2 else 0.0)))
            edge.append((cx + hw * 0.92, hairline_y))
            c.polygon(edge, hair)
        if style == "side_part":
            part = cx + 0.4 * hw * (1 if idt.brow_tilt >= 0 else -1)
            sweep = -1 if part > cx else 1
            c.polygon(
                [
                    (part, hairline_y - 3),
                    (part + sweep * hw * 1.2, hairline_y - 1),
                    (part + sweep * hw * 1.1, hairline_y + 4.0),
                    (part, hairline_y + 0.5),
                ],
                hair,
            )
        if style == "long":
            for side in (-1, 1):
                x_out = cx + side * (hw + 1.0)
                c.polygon(
                    [
                        (x_out, hairline_y),
                        (x_out - side * 2.4, hairline_y + 2),
                        (x_out - side * 1.4, cy + 6),
                        (x_out + side * 2.0, cy + hh * 0.9),
                    ],
                    hair,
                )
        if style == "curly":
            for k in range(11):
                a = math.pi + 0.45 + k * (math.pi - 0.9) / 10
                c.ellipse(
                    cx + (rx - 0.5) * math.cos(a),
                    cy + (ry - 1.0) * math.sin(a),
                    3.0,
                    3.0,
                    _shade(idt.hair_colour, 0.85 if k % 2 else 1.0),
                )

    def _background(self, cond: ImageConditions) -> np.ndarray:
        ys, xs = np.mgrid[0:FACE_HEIGHT, 0:FACE_WIDTH].astype(np.float32)
        u = (xs / FACE_WIDTH - 0.5) * math.cos(cond.background_angle) + (ys / FACE_HEIGHT - 0.5) * math.sin(
            cond.background_angle
        )
        t = np.clip(u + 0.5, 0.0, 1.0)[..., None]
        a, b = np.array(cond.background[0], np.float32), np.array(cond.background[1], np.float32)
        bg = a * (1 - t) + b * t
        for bx, by, br, *col in cond.background_blobs:
            w = np.exp(-((xs - bx) ** 2 + (ys - by) ** 2) / (2 * br**2))[..., None]
            bg = bg * (1 - w) + np.array(col, np.float32) * w
        return bg

    def render(self, idt: FaceIdentity, cond: ImageConditions) -> tuple[np.ndarray, np.ndarray]:
        """Return the uint8 (55, 47, 3) crop and its float32 eye band ``(x0, y0, x1, y1)``."""
        s = self.supersample
        layer, mask = self._draw_face(idt, cond)
        # pose: rotate / scale about the crop centre, then shift; PIL wants the output->input map
        centre = np.array([FACE_WIDTH / 2.0, FACE_HEIGHT / 2.0])
        theta = math.radians(cond.roll_deg)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        fwd = cond.scale * rot
        shift = np.array([cond.shift_x, cond.shift_y])
        inv = np.linalg.inv(fwd)
        # in supersampled pixels: p_in = inv @ (p_out - (centre + shift) * s) + centre * s
        offset = centre * s - inv @ ((centre + shift) * s)
        coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
        # nearest sampling is ~20x faster than bilinear in Pillow; the supersampled box filter smooths it
        layer = layer.transform(layer.size, Image.AFFINE, coeffs, Image.NEAREST)
        mask = mask.transform(mask.size, Image.AFFINE, coeffs, Image.NEAREST)

        bg = Image.fromarray(self._background(cond).astype(np.uint8)).resize(layer.size, Image.BILINEAR)
        img = Image.composite(layer, bg, mask).reduce(s)
        if cond.blur_radius > 0.25:
            img = img.filter(ImageFilter.GaussianBlur(cond.blur_radius))

        # lighting and camera response
        x = np.asarray(img, dtype=np.float32)
        ys, xs = np.mgrid[0:FACE_HEIGHT, 0:FACE_WIDTH].astype(np.float32)
        along = (xs / FACE_WIDTH - 0.5) * math.cos(cond.light_angle) + (ys / FACE_HEIGHT - 0.5) * math.sin(
            cond.light_angle
        )
        x = x * (1.0 + 2.0 * cond.light_strength * along)[..., None]
        x = x * cond.exposure * np.array(cond.white_balance, np.float32)
        mean = x.mean()
        x = (x - mean) * cond.contrast + mean
        noise_rng = np.random.default_rng(cond.noise_seed)
        x = x + noise_rng.normal(0.0, cond.noise_sigma, x.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=cond.jpeg_quality)
        buf.seek(0)
        out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()

        # where the eyes went
        fx, eye_y = _feature_centre_x(cond.yaw), _eye_line_y(idt, cond)
        eyes = []
        for side in (-1, 1):
            p = np.array([fx + side * idt.eye_half_spacing, eye_y])
            eyes.append(tuple(fwd @ (p - centre) + centre + shift))
        return out, eye_band(eyes[0], eyes[1])


# ---------------------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------------------


class SyntheticFaces:
    """A built-in face-identification task: ``num_identities`` procedural people, aligned 55x47 crops.

    Identity ``i`` is drawn from ``(identity_seed, i)`` alone, so the same person appears whatever ``seed``
    (which draws the photographs) or the number of images; every image gets its own pose, expression,
    lighting, background, blur, noise and JPEG quality (scaled by ``nuisance``). ``regions`` hold each
    image's eye band. Splits take disjoint images of every identity, ``train/val/test_per_identity`` each.
    """

    name = "synthetic_faces"

    def __init__(
        self,
        num_identities: int = 100,
        train_per_identity: int = 40,
        val_per_identity: int = 8,
        test_per_identity: int = 10,
        nuisance: float = 1.0,
        seed: int = 0,
        identity_seed: int = 0,
        supersample: int = 4,
        cache_dir: str | os.PathLike | None = "~/.cache/backdoor_lab",
        progress: bool = True,
    ) -> None:
        if num_identities < 2:
            raise ValueError(f"num_identities must be >= 2, got {num_identities}")
        for arg, value in (
            ("train_per_identity", train_per_identity),
            ("val_per_identity", val_per_identity),
            ("test_per_identity", test_per_identity),
        ):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if nuisance < 0:
            raise ValueError(f"nuisance must be >= 0, got {nuisance}")
        self.num_identities = int(num_identities)
        self.per_identity = {
            "train": int(train_per_identity),
            "val": int(val_per_identity),
            "test": int(test_per_identity),
        }
        self.nuisance = float(nuisance)
        self.seed = int(seed)
        self.identity_seed = int(identity_seed)
        self.renderer = FaceRenderer(supersample)
        self.cache_dir = cache_dir
        self.progress = progress

    @property
    def class_names(self) -> list[str]:
        return [f"person_{i:04d}" for i in range(self.num_identities)]

    def identity(self, index: int) -> FaceIdentity:
        """The facial parameters of person ``index`` (independent of ``seed`` and of the other identities)."""
        return sample_identity(np.random.default_rng([self.identity_seed, 0x1D, index]))

    def conditions(self, index: int, image: int) -> ImageConditions:
        """The nuisances of photograph ``image`` of person ``index``."""
        return sample_conditions(np.random.default_rng([self.seed, 0x1A, index, image]), self.nuisance)

    def render(self, index: int, image: int) -> tuple[np.ndarray, np.ndarray]:
        """Photograph ``image`` of person ``index``: the uint8 crop and its eye band."""
        return self.renderer.render(self.identity(index), self.conditions(index, image))

    def load(self) -> dict[str, RawSplit]:
        params = {
            "num_identities": self.num_identities,
            **self.per_identity,
            "nuisance": self.nuisance,
            "seed": self.seed,
            "identity_seed": self.identity_seed,
            "supersample": self.renderer.supersample,
            "version": 1,
        }
        if self.cache_dir is None:
            return self._build()
        return cached_splits(self.cache_dir, self.name, params, self._build)

    def _build(self) -> dict[str, RawSplit]:
        per_id = sum(self.per_identity.values())
        total = self.num_identities * per_id
        images = np.empty((total, FACE_HEIGHT, FACE_WIDTH, 3), dtype=np.uint8)
        regions = np.empty((total, 4), dtype=np.float32)
        labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), per_id)
        image_index = np.tile(np.arange(per_id), self.num_identities)
        people = track(
            range(self.num_identities),
            description=f"Rendering {total} synthetic faces",
            disable=not self.progress,
            transient=True,
        )
        for i in people:
            idt = self.identity(i)
            for j in range(per_id):
                k = i * per_id + j
                images[k], regions[k] = self.renderer.render(idt, self.conditions(i, j))
        splits, start = {}, 0
        for split, count in self.per_identity.items():
            rows = np.flatnonzero((image_index >= start) & (image_index < start + count))
            start += count
            splits[split] = RawSplit(
                inputs=images[rows],
                labels=labels[rows],
                sample_ids=rows.astype(np.int64),
                regions=regions[rows],
            )
        return splits

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        return images_to_tensor(inputs)


def _fit_crop(img: Image.Image, crop_box: tuple[float, float, float, float] | None) -> np.ndarray:
    """RGB, optional relative crop, then the centred 47:55 window resized to 55x47."""
    img = img.convert("RGB")
    if crop_box is not None:
        w, h = img.size
        x0, y0, x1, y1 = crop_box
        img = img.crop((x0 * w, y0 * h, x1 * w, y1 * h))
    w, h = img.size
    target = FACE_WIDTH / FACE_HEIGHT
    if abs(w / h - target) > 1e-3:  # cut the excess of the longer side, keeping the centre
        if w / h > target:
            new_w = h * target
            img = img.crop(((w - new_w) / 2, 0, (w + new_w) / 2, h))
        else:
            new_h = w / target
            img = img.crop((0, (h - new_h) / 2, w, (h + new_h) / 2))
    if img.size != (FACE_WIDTH, FACE_HEIGHT):
        img = img.resize((FACE_WIDTH, FACE_HEIGHT), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def _read_face(path: Path, crop_box: tuple[float, float, float, float] | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return _fit_crop(img, crop_box)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read face image {path}: {err}") from err


def _split_per_identity(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of a per-identity stratified train/val/test split (every identity in every split if it can)."""
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 < val_fraction, test_fraction and a sum below 1; got {val_fraction}, {test_fraction}")
    rest, test = stratified_holdout(labels, test_fraction, seed)
    keep, val = stratified_holdout(labels[rest], val_fraction / (1.0 - test_fraction), seed + 1)
    return {"train": rest[keep], "val": rest[val], "test": test}


class _FaceListSource:
    """Shared loading for sources that are a list of (image path, identity) pairs."""

    name: str
    root: Path
    eye_band: tuple[float, float, float, float]
    crop_box: tuple[float, float, float, float] | None
    val_fraction: float
    test_fraction: float
    seed: int
    cache_dir: str | os.PathLike | None
    progress: bool
    _class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = sorted(self._listing())
        return self._class_names

    def _listing(self) -> dict[str, list[Path]]:
        """identity -> image paths, already filtered; subclasses implement."""
        raise NotImplementedError

    def _cache_params(self) -> dict:
        return {}

    def load(self) -> dict[str, RawSplit]:
        listing = self._listing()
        self._class_names = sorted(listing)
        paths = [p for name in self._class_names for p in listing[name]]
        params = {
            "files": file_listing_digest(paths, self.root),
            "eye_band": self.eye_band,
            "crop_box": self.crop_box,
            "val": self.val_fraction,
            "test": self.test_fraction,
            "seed": self.seed,
            **self._cache_params(),
        }
        if self.cache_dir is None:
            return self._build(listing)
        return cached_splits(self.cache_dir, self.name, params, lambda: self._build(listing))

    def _build(self, listing: dict[str, list[Path]]) -> dict[str, RawSplit]:
        paths = [p for name in self._class_names for p in listing[name]]
        labels = np.concatenate(
            [np.full(len(listing[name]), k, dtype=np.int64) for k, name in enumerate(self._class_names)]
        )
        images = np.empty((len(paths), FACE_HEIGHT, FACE_WIDTH, 3), dtype=np.uint8)
        steps = track(
            paths, description=f"Reading {len(paths)} faces for {self.name}", disable=not self.progress, transient=True
        )
        for k, path in enumerate(steps):
            images[k] = _read_face(path, self.crop_box)
        regions = np.tile(np.asarray(self.eye_band, dtype=np.float32), (len(paths), 1))
        ids = np.arange(len(paths), dtype=np.int64)
        return {
            split: RawSplit(inputs=images[idx], labels=labels[idx], sample_ids=ids[idx], regions=regions[idx])
            for split, idx in _split_per_identity(labels, self.val_fraction, self.test_fraction, self.seed).items()
        }

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        return images_to_tensor(inputs)


def _select(
    listing: dict[str, list[Path]],
    min_images: int,
    max_identities: int | None,
    max_images_per_identity: int | None,
    seed: int,
) -> dict[str, list[Path]]:
    """Drop identities with too few images, keep the first ``max_identities`` by name, subsample each."""
    if min_images < 3:
        raise ValueError(f"an identity needs >= 3 images to appear in train, val and test; got min {min_images}")
    kept = {name: files for name, files in sorted(listing.items()) if len(files) >= min_images}
    if max_identities is not None:
        kept = dict(list(kept.items())[: int(max_identities)])
    if not kept:
        raise ValueError(f"no identity has >= {min_images} images")
    if max_images_per_identity is not None:
        rng = np.random.default_rng(seed)
        kept = {
            name: sorted(files)
            if len(files) <= max_images_per_identity
            else sorted(rng.choice(np.array(files, dtype=object), max_images_per_identity, replace=False).tolist())
            for name, files in kept.items()
        }
    return kept


class AlignedFaceFolder(_FaceListSource):
    """Aligned face crops in ``<root>/<identity>/**/<image>`` (YouTube Aligned Faces, or any ImageFolder).

    Files may sit directly in the identity folder or below it (YouTube Faces' ``<identity>/<video>/
    aligned_detect_*.jpg``). Images become RGB 55x47: the optional relative ``crop_box`` (x0, y0, x1, y1 as
    fractions of width and height) cuts the face out of a looser frame, then the centred 47:55 window is
    resized. Real aligned crops carry no per-image landmarks, so every image gets ``eye_band`` (by default
    the canonical ``ALIGNED_EYE_BAND``; set it to match your alignment).
    """

    name = "aligned_faces"

    def __init__(
        self,
        root: str | os.PathLike,
        min_images_per_identity: int = 3,
        max_identities: int | None = None,
        max_images_per_identity: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        crop_box: tuple[float, float, float, float] | None = None,
        eye_band: tuple[float, float, float, float] = ALIGNED_EYE_BAND,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"aligned face folder {self.root} does not exist")
        self.min_images_per_identity = int(min_images_per_identity)
        self.max_identities = max_identities
        self.max_images_per_identity = max_images_per_identity
        self.val_fraction, self.test_fraction, self.seed = (
            float(val_fraction),
            float(test_fraction),
            int(seed),
        )
        self.crop_box = None if crop_box is None else tuple(float(v) for v in crop_box)
        self.eye_band = tuple(float(v) for v in eye_band)
        self.cache_dir, self.progress = cache_dir, progress
        self._listed: dict[str, list[Path]] | None = None

    def _listing(self) -> dict[str, list[Path]]:
        if self._listed is None:
            found: dict[str, list[Path]] = {}
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
                if not files:
                    raise ValueError(f"identity folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
                found[folder.name] = files
            if not found:
                raise ValueError(f"{self.root} holds no identity folders")
            self._listed = _select(
                found,
                self.min_images_per_identity,
                self.max_identities,
                self.max_images_per_identity,
                self.seed,
            )
        return self._listed

    def _cache_params(self) -> dict:
        return {
            "root": str(self.root.resolve()),
            "min": self.min_images_per_identity,
            "max_identities": self.max_identities,
            "max_images": self.max_images_per_identity,
        }


# LFW images are 250x250 with the face centred by the funneling; this window (x0, y0, x1, y1, pixels) has
# DeepID's 47:55 aspect and spans brow-to-chin like an aligned crop. The eyes of funneled LFW faces sit
# near (104, 114) and (146, 114) in the 250x250 frame (approximate: read off the funneled images, not a
# published landmark set), which map to the eye band below.
LFW_FACE_BOX = (78.0, 72.0, 172.0, 182.0)
LFW_EYES = ((104.0, 114.0), (146.0, 114.0))


def _lfw_eye_band() -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = LFW_FACE_BOX
    sx, sy = FACE_WIDTH / (x1 - x0), FACE_HEIGHT / (y1 - y0)
    left, right = (((x - x0) * sx, (y - y0) * sy) for x, y in LFW_EYES)
    return tuple(float(v) for v in eye_band(left, right))


LFW_EYE_BAND = _lfw_eye_band()


def _lfw_people(root: Path, image_set: str, verify_checksums: bool):
    """torchvision's ``LFWPeople`` over an already extracted copy.

    torchvision's integrity check wants the downloaded archive (``lfw-py/lfw-funneled.tgz``) next to the
    extracted images and md5-checks it; a manual install (the Kaggle mirror, an extracted tarball) often
    lacks it, and torchvision can no longer download LFW. With ``verify_checksums=False`` the check only
    requires the extracted image folder and the people/names files; with ``True`` torchvision's own check
    runs unchanged.
    """
    from torchvision.datasets import LFWPeople

    class ExtractedLFWPeople(LFWPeople):
        def _check_integrity(self) -> bool:
            if verify_checksums:
                return super()._check_integrity()
            images_dir = self.file_dict[self.image_set][0]
            return all(
                os.path.exists(os.path.join(self.root, name)) for name in (images_dir, self.labels_file, self.names)
            )

    return ExtractedLFWPeople(str(root), split="10fold", image_set=image_set, download=False)


class LFWFaces(_FaceListSource):
    """Labeled Faces in the Wild, people with >= ``min_images`` photographs, as 55x47 crops.

    Read with ``torchvision.datasets.LFWPeople`` from ``<root>/lfw-py/`` (``lfw_funneled/<Name>/
    <Name>_0001.jpg``, ``people.txt``, ``lfw-names.txt``); nothing is downloaded. Each 250x250 image is cut
    to ``crop_box`` (default ``LFW_FACE_BOX``) and resized; ``eye_band`` defaults to ``LFW_EYE_BAND``.
    """

    name = "lfw_faces"

    def __init__(
        self,
        root: str | os.PathLike,
        min_images: int = 20,
        image_set: str = "funneled",
        max_identities: int | None = None,
        max_images_per_identity: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        crop_box: tuple[float, float, float, float] = LFW_FACE_BOX,
        eye_band: tuple[float, float, float, float] = LFW_EYE_BAND,
        verify_checksums: bool = False,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.min_images = int(min_images)
        self.image_set = image_set
        self.max_identities = max_identities
        self.max_images_per_identity = max_images_per_identity
        self.val_fraction, self.test_fraction, self.seed = (
            float(val_fraction),
            float(test_fraction),
            int(seed),
        )
        # LFW's crop box is in pixels of the 250x250 frame; the reader takes fractions
        x0, y0, x1, y1 = (float(v) for v in crop_box)
        self.crop_box = (x0 / 250.0, y0 / 250.0, x1 / 250.0, y1 / 250.0)
        self.eye_band = tuple(float(v) for v in eye_band)
        self.verify_checksums = verify_checksums
        self.cache_dir, self.progress = cache_dir, progress
        self._listed: dict[str, list[Path]] | None = None

    def _listing(self) -> dict[str, list[Path]]:
        if self._listed is None:
            base = self.root / "lfw-py"
            try:
                people = _lfw_people(self.root, self.image_set, self.verify_checksums)
            except RuntimeError as err:
                raise FileNotFoundError(
                    f"LFW not found under {base}: expected the extracted images in {base}/"
                    f"{_lfw_folder(self.image_set)}/<Name>/<Name>_0001.jpg plus {base}/people.txt and "
                    f"{base}/lfw-names.txt (download them by hand; nothing is fetched)"
                    + (" and, with verify_checksums=True, the original archive" if self.verify_checksums else "")
                ) from err
            names = {idx: name for name, idx in people.class_to_idx.items()}
            found: dict[str, list[Path]] = {}
            for path, target in zip(people.data, people.targets, strict=True):
                found.setdefault(names[target], []).append(Path(path))
            found = {name: sorted(set(files)) for name, files in found.items()}
            self._listed = _select(found, self.min_images, self.max_identities, self.max_images_per_identity, self.seed)
        return self._listed

    def _cache_params(self) -> dict:
        return {
            "root": str(self.root.resolve()),
            "min": self.min_images,
            "image_set": self.image_set,
            "max_identities": self.max_identities,
            "max_images": self.max_images_per_identity,
        }


def _lfw_folder(image_set: str) -> str:
    from torchvision.datasets import LFWPeople

    return LFWPeople.file_dict.get(image_set, ("lfw_funneled",))[0]
