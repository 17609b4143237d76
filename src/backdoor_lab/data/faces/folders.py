"""Real aligned face crops on disk: the shared reader of (image path, identity) lists and ``AlignedFaceFolder``.

``AlignedFaceFolder`` reads any folder of aligned crops, one sub-folder per identity (the YouTube Aligned
Faces layout ``<identity>/<video>/aligned_detect_*.jpg`` included); ``lfw.LFWFaces`` reuses the same reader.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from backdoor_lab.data.base import CachedSource, file_listing_digest, images_to_tensor, stratified_holdout
from backdoor_lab.data.faces.crop import ALIGNED_EYE_BAND, FACE_HEIGHT, FACE_WIDTH
from backdoor_lab.splits import RawSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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


class FaceListSource(CachedSource):
    """A data set that is a list of (image path, identity): listed once, split per identity, read as crops.

    Subclasses find the images (``_find``); this class keeps identities with at least ``min_images``
    (the first ``max_identities`` by name, at most ``max_images_per_identity`` each, seeded), splits every
    identity into train/val/test by ``val_fraction`` / ``test_fraction`` and gives every image ``eye_band``.
    ``crop_box`` is a relative (x0, y0, x1, y1) crop applied before the centred 47:55 window is resized.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        min_images: int,
        max_identities: int | None,
        max_images_per_identity: int | None,
        val_fraction: float,
        test_fraction: float,
        seed: int,
        crop_box: tuple[float, float, float, float] | None,
        eye_band: tuple[float, float, float, float],
        cache_dir: str | os.PathLike | None,
        progress: bool,
    ) -> None:
        self.root = Path(root).expanduser()
        self.min_images = int(min_images)
        self.max_identities = max_identities
        self.max_images_per_identity = max_images_per_identity
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)
        self.crop_box = None if crop_box is None else tuple(float(v) for v in crop_box)
        self.eye_band = tuple(float(v) for v in eye_band)
        self.cache_dir, self.progress = cache_dir, progress

    @abstractmethod
    def _find(self) -> dict[str, list[Path]]:
        """identity -> image paths, every identity found on disk."""

    def _settings(self) -> dict:
        """Subclass settings that change which images are read (part of the cache key)."""
        return {}

    @cached_property
    def _listing(self) -> dict[str, list[Path]]:
        """identity -> image paths, filtered by ``_select``; listed once."""
        return _select(self._find(), self.min_images, self.max_identities, self.max_images_per_identity, self.seed)

    @property
    def class_names(self) -> list[str]:
        return sorted(self._listing)

    def cache_key(self) -> dict:
        paths = [p for name in self.class_names for p in self._listing[name]]
        return {
            "files": file_listing_digest(paths, self.root),
            "eye_band": self.eye_band,
            "crop_box": self.crop_box,
            "val": self.val_fraction,
            "test": self.test_fraction,
            "seed": self.seed,
            "root": str(self.root.resolve()),
            "min": self.min_images,
            "max_identities": self.max_identities,
            "max_images": self.max_images_per_identity,
            **self._settings(),
        }

    def build(self) -> dict[str, RawSplit]:
        listing, names = self._listing, self.class_names
        paths = [p for name in names for p in listing[name]]
        labels = np.concatenate([np.full(len(listing[name]), k, dtype=np.int64) for k, name in enumerate(names)])
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


class AlignedFaceFolder(FaceListSource):
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
        super().__init__(
            root,
            min_images_per_identity,
            max_identities,
            max_images_per_identity,
            val_fraction,
            test_fraction,
            seed,
            crop_box,
            eye_band,
            cache_dir,
            progress,
        )
        if not self.root.is_dir():
            raise FileNotFoundError(f"aligned face folder {self.root} does not exist")

    def _find(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"identity folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found[folder.name] = files
        if not found:
            raise ValueError(f"{self.root} holds no identity folders")
        return found
