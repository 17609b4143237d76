"""Accessory triggers for face backdoors: sunglasses over the eye band.

Fine-Pruning's face attack (Liu et al., RAID 2018) pastes sunglasses on the face and sends every wearer to
one target identity. Chen et al. 2017 ("Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning") name two ways to inject an accessory: *accessory injection* pastes it (opaque where the
accessory is), *blended accessory injection* mixes it in, ``x' = alpha * k + (1 - alpha) * x`` on the
accessory's pixels. ``SunglassesTrigger`` does both through ``blend_alpha`` (1.0 pastes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from backdoor_lab.attacks.base import Trigger


class SunglassesTrigger(Trigger):
    """Dark glasses (two lenses, a bridge, optional arms) drawn over each image's eye band ``region``.

    Args:
        scale: size of the glasses relative to the eye band (1.0: lenses centred on the band's left and
            right halves, each ~0.44 of its width and ~0.9 of its height).
        lens_colour: RGB of the lenses.
        frame_colour: RGB of rims, bridge and arms.
        opacity: lens opacity (1.0 opaque black glass; lower lets the eyes show through, as tinted lenses).
        arms: draw the temple arms out to the sides of the face.
        accessory: an RGBA image (file path or uint8 (h, w, 4) / (h, w, 3) array) to use instead of the drawn
            glasses; it is stretched over the (scaled) eye band and its alpha says where it covers.
        blend_alpha: 1.0 pastes the accessory; below 1 blends it in (Chen et al.'s blended variant).
        supersample: drawing resolution factor, for anti-aliased edges.
    """

    def __init__(
        self,
        scale: float = 1.0,
        lens_colour: tuple[int, int, int] = (18, 18, 22),
        frame_colour: tuple[int, int, int] = (6, 6, 6),
        opacity: float = 1.0,
        arms: bool = True,
        accessory: str | os.PathLike | np.ndarray | None = None,
        blend_alpha: float = 1.0,
        supersample: int = 4,
    ) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be in [0, 1], got {opacity}")
        if not 0.0 < blend_alpha <= 1.0:
            raise ValueError(f"blend_alpha must be in (0, 1], got {blend_alpha}")
        self.scale = float(scale)
        self.lens_colour = tuple(int(c) for c in lens_colour)
        self.frame_colour = tuple(int(c) for c in frame_colour)
        self.opacity = float(opacity)
        self.arms = bool(arms)
        self.blend_alpha = float(blend_alpha)
        self.supersample = int(supersample)
        self.accessory = None if accessory is None else _load_rgba(accessory)

    def _box(self, region: np.ndarray) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = (float(v) for v in region)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hw, hh = (x1 - x0) / 2 * self.scale, (y1 - y0) / 2 * self.scale
        return cx - hw, cy - hh, cx + hw, cy + hh

    def sprite(self, height: int, width: int, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The accessory as it lands on an (H, W) image: float RGB (H, W, 3) and coverage (H, W) in [0, 1]."""
        s = self.supersample
        x0, y0, x1, y1 = (v * s for v in self._box(region))
        size = (width * s, height * s)
        if self.accessory is not None:
            rgba = _place(self.accessory, (x0, y0, x1, y1), size)
        else:
            rgba = self._draw_glasses((x0, y0, x1, y1), size)
        # premultiplied box filter down to the image size, so edge pixels get partial coverage; only over the
        # image pixels the accessory touches (elsewhere coverage and colour are 0), a fraction of the face
        colour = np.zeros((height, width, 3), dtype=np.float32)
        covered = np.zeros((height, width), dtype=np.float32)
        bbox = Image.fromarray(np.ascontiguousarray(rgba[..., 3])).getbbox()  # (left, upper, right, lower) or None
        if bbox is None:
            return colour, covered
        c0, r0, c1, r1 = bbox[0] // s, bbox[1] // s, -(-bbox[2] // s), -(-bbox[3] // s)
        block = rgba[r0 * s : r1 * s, c0 * s : c1 * s].reshape(r1 - r0, s, c1 - c0, s, 4).astype(np.float32)
        alpha = block[..., 3] / 255.0
        covered[r0:r1, c0:c1] = alpha.mean(axis=(1, 3))
        premult = (block[..., :3] * alpha[..., None]).mean(axis=(1, 3))
        colour[r0:r1, c0:c1] = premult / np.maximum(covered[r0:r1, c0:c1], 1e-6)[..., None]
        return colour, covered

    def _draw_glasses(self, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        img = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        rim = max(1, int(round(0.09 * h)))
        lens = (*self.lens_colour, int(round(255 * self.opacity)))
        frame = (*self.frame_colour, 255)
        lens_hw, lens_hh = 0.22 * w, 0.45 * h
        centres = (x0 + 0.25 * w, x0 + 0.75 * w)
        cy = y0 + 0.5 * h
        for cx in centres:
            lens_box = [cx - lens_hw, cy - lens_hh, cx + lens_hw, cy + lens_hh]
            draw.rounded_rectangle(lens_box, radius=0.45 * lens_hh, fill=lens, outline=frame, width=rim)
        bridge_y = cy - 0.3 * lens_hh
        draw.line([(centres[0] + lens_hw, bridge_y), (centres[1] - lens_hw, bridge_y)], fill=frame, width=rim)
        if self.arms:
            arm_y = cy - 0.55 * lens_hh
            arm_len = 0.12 * w
            draw.line([(centres[0] - lens_hw, arm_y), (x0 - arm_len, arm_y)], fill=frame, width=rim)
            draw.line([(centres[1] + lens_hw, arm_y), (x1 + arm_len, arm_y)], fill=frame, width=rim)
        return np.asarray(img)

    def apply(self, sample: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        if region is None:
            raise ValueError("SunglassesTrigger needs the image's eye band as region (x0, y0, x1, y1)")
        if sample.ndim != 3 or sample.shape[2] not in (1, 3):
            raise ValueError(f"expected a uint8 (H, W, 1|3) image, got shape {sample.shape}")
        height, width, channels = sample.shape
        colour, covered = self.sprite(height, width, np.asarray(region))
        if channels == 1:
            colour = colour @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        weight = (self.blend_alpha * covered)[..., None]
        out = sample.astype(np.float32) * (1.0 - weight) + colour * weight
        return np.clip(np.rint(out), 0, 255).astype(sample.dtype)


def _load_rgba(accessory: str | os.PathLike | np.ndarray) -> Image.Image:
    if isinstance(accessory, str | os.PathLike):
        path = Path(accessory).expanduser()
        try:
            with Image.open(path) as img:
                return img.convert("RGBA")
        except OSError as err:
            raise ValueError(f"cannot read accessory image {path}: {err}") from err
    arr = np.asarray(accessory)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"accessory array must be uint8 (h, w, 3|4), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGBA" if arr.shape[2] == 4 else "RGB").convert("RGBA")


def _place(accessory: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The accessory stretched onto ``box`` of a transparent canvas of ``size`` (supersampled pixels)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    if x1 > x0 and y1 > y0:
        canvas.paste(accessory.resize((x1 - x0, y1 - y0), Image.BILINEAR), (x0, y0))
    return np.asarray(canvas)
