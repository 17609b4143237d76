"""Photographing a synthetic face: pose, background, lighting and camera, and where the eyes end up."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

from backdoor_lab.data.faces.canvas import Canvas
from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH, eye_band
from backdoor_lab.data.faces.identity import FaceIdentity, ImageConditions
from backdoor_lab.data.faces.parts import PARTS, FaceLayout, face_layout


class FaceRenderer:
    """Draws an identity under given conditions into an aligned 55x47 crop and reports its eye band.

    Shapes are drawn with PIL at ``supersample`` times the crop size and box-filtered down, the pose is an
    affine warp of the face layer, and lighting, camera noise and JPEG are applied to the small image.
    """

    def __init__(self, supersample: int = 4) -> None:
        self.supersample = int(supersample)

    def _draw_face(self, idt: FaceIdentity, cond: ImageConditions, at: FaceLayout) -> tuple[Image.Image, Image.Image]:
        """The upright face (supersampled RGB layer) and its coverage mask, every part in painting order."""
        s = self.supersample
        c = Canvas((FACE_WIDTH * s, FACE_HEIGHT * s), s)
        for draw_part in PARTS:
            draw_part(c, idt, cond, at)
        return c.layer, c.mask

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
        at = face_layout(idt, cond)
        layer, mask = self._draw_face(idt, cond, at)
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
        eyes = []
        for side in (-1, 1):
            p = np.array([at.fx + side * idt.eye_half_spacing, at.eye_y])
            eyes.append(tuple(fwd @ (p - centre) + centre + shift))
        return out, eye_band(eyes[0], eyes[1])
