"""The built-in face-identification task: procedural people photographed under real-footage nuisances."""

from __future__ import annotations

import os

import numpy as np
import torch
from rich.progress import track

from backdoor_lab.data.base import DEFAULT_CACHE_DIR, CachedSource, check_scale, images_to_tensor, scaled
from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH
from backdoor_lab.data.faces.identity import FaceIdentity, ImageConditions, sample_conditions, sample_identity
from backdoor_lab.data.faces.render import FaceRenderer
from backdoor_lab.splits import RawSplit


class SyntheticFaces(CachedSource):
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
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        progress: bool = True,
        scale: float = 1.0,
    ) -> None:
        if num_identities < 2:  # checked before scaling, which never gives fewer than two
            raise ValueError(f"num_identities must be >= 2, got {num_identities}")
        num_identities = max(2, scaled(num_identities, check_scale(scale)))  # fewer people, as many photos each
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

    def cache_key(self) -> dict:
        return {
            "num_identities": self.num_identities,
            **self.per_identity,
            "nuisance": self.nuisance,
            "seed": self.seed,
            "identity_seed": self.identity_seed,
            "supersample": self.renderer.supersample,
            "version": 1,
        }

    def build(self) -> dict[str, RawSplit]:
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
