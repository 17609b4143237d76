"""BadNets sticker trigger (Gu, Dolan-Gavitt, Garg 2017), as placed in the Fine-Pruning experiments.

The original traffic-sign backdoor is a yellow square whose side is 0.1 of the sign's width and height,
centred at (0.57, 0.82) of the sign's bounding box (PAPER.md). The sticker is any image patch; a solid
colour is the default.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from backdoor_lab.attacks.base import Trigger


class StickerTrigger(Trigger):
    """Paste ``patch`` (or a solid ``color`` square) over a fixed place of the sign box.

    Args:
        size: sticker (width, height) as fractions of the sign box (or of the image when no box is known).
        center: sticker centre (x, y) as fractions of the sign box.
        color: RGB of a solid sticker, used when ``patch`` is None.
        patch: path to an image file, or a uint8 (h, w, 3|4) array; an alpha channel blends the edges.
        min_pixels: smallest sticker side in pixels, so a tiny sign still carries a visible trigger.
    """

    def __init__(
        self,
        size: tuple[float, float] = (0.1, 0.1),
        center: tuple[float, float] = (0.57, 0.82),
        color: tuple[int, int, int] = (255, 215, 0),
        patch: str | np.ndarray | None = None,
        min_pixels: int = 2,
    ) -> None:
        self.size = tuple(float(s) for s in size)
        self.center = tuple(float(c) for c in center)
        if not all(0 < s <= 1 for s in self.size):
            raise ValueError(f"sticker size must be fractions in (0, 1], got {self.size}")
        if not all(0 <= c <= 1 for c in self.center):
            raise ValueError(f"sticker center must be fractions in [0, 1], got {self.center}")
        self.color = np.array(color, dtype=np.float32)
        self.min_pixels = int(min_pixels)
        if isinstance(patch, str):
            with Image.open(patch) as img:
                patch = np.asarray(img.convert("RGBA"))
        self.patch = None if patch is None else np.asarray(patch, dtype=np.uint8)

    def box(self, image_shape: tuple[int, ...], region: np.ndarray | None) -> tuple[int, int, int, int]:
        """The sticker's pixel box (x0, y0, x1, y1) in an image of ``image_shape`` given the sign box."""
        h, w = image_shape[:2]
        x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if region is None else (float(v) for v in region)
        sw = max(self.min_pixels, round(self.size[0] * (x1 - x0)))
        sh = max(self.min_pixels, round(self.size[1] * (y1 - y0)))
        cx = x0 + self.center[0] * (x1 - x0)
        cy = y0 + self.center[1] * (y1 - y0)
        left = int(np.clip(round(cx - sw / 2), 0, w - sw))
        top = int(np.clip(round(cy - sh / 2), 0, h - sh))
        return left, top, left + sw, top + sh

    def apply(self, sample: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        left, top, right, bottom = self.box(sample.shape, region)
        out = sample.copy()
        if self.patch is None:
            out[top:bottom, left:right] = self.color.astype(sample.dtype)
            return out
        patch = np.asarray(Image.fromarray(self.patch).resize((right - left, bottom - top), Image.BILINEAR))
        rgb = patch[..., :3].astype(np.float32)
        alpha = patch[..., 3:4].astype(np.float32) / 255 if patch.shape[-1] == 4 else 1.0
        under = out[top:bottom, left:right].astype(np.float32)
        out[top:bottom, left:right] = np.clip(alpha * rgb + (1 - alpha) * under + 0.5, 0, 255).astype(np.uint8)
        return out
