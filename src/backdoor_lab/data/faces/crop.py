"""The aligned face crop of DeepID (3x55x47) and its eye band, where the sunglasses trigger goes.

Aligned face datasets normalise the eye positions, so one eye band serves every image of a real aligned
source; the synthetic generator places its eyes around the same positions and reports each image's band.
"""

from __future__ import annotations

import math

import numpy as np

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
