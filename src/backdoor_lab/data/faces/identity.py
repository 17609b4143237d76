"""Who a synthetic person is and how one photograph of them is taken: the sampled parameters of a face.

``FaceIdentity`` holds what stays fixed for a person (face shape, skin, eyes, brows, nose, mouth, hair,
moles), ``ImageConditions`` what changes from one photograph to the next (pose, expression, scene, light,
camera). Both are drawn from a numpy generator, so a seed fixes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backdoor_lab.data.faces.canvas import rgb
from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH

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
        skin=rgb(skin),
        eye_half_spacing=float(rng.uniform(8.3, 9.7)),
        eye_y=float(rng.uniform(20.2, 21.8)),
        eye_half_width=float(rng.uniform(2.5, 3.8)),
        eye_half_height=float(rng.uniform(1.1, 1.9)),
        iris=rgb(_IRIS_COLOURS[rng.choice(len(_IRIS_COLOURS), p=_IRIS_WEIGHTS)] + rng.normal(0, 6, 3)),
        brow_gap=float(rng.uniform(3.6, 6.0)),
        brow_thickness=float(rng.uniform(0.8, 2.1)),
        brow_arch=float(rng.uniform(0.0, 1.6)),
        brow_tilt=float(rng.uniform(-1.2, 1.2)),
        brow_colour=rgb(brow),
        nose_length=float(rng.uniform(9.0, 13.0)),
        nose_half_width=float(rng.uniform(2.2, 4.2)),
        mouth_gap=float(rng.uniform(4.5, 7.5)),
        mouth_half_width=float(rng.uniform(4.0, 7.5)),
        lip_thickness=float(rng.uniform(0.8, 2.2)),
        lip_colour=rgb(lip),
        ear_size=float(rng.uniform(2.5, 4.5)),
        hair_style=style,
        hair_colour=rgb(hair),
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
        return rgb(rng.uniform(25, 230) + rng.uniform(-1, 1, 3) * rng.uniform(0, 55))

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
        clothing=rgb(rng.uniform(15, 240, 3)),
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
