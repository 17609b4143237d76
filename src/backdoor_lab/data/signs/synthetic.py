"""The built-in traffic-sign task: GTSRB-like signs rendered by ``SignRenderer``, no download."""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import track

from backdoor_lab.data.base import DEFAULT_CACHE_DIR, CachedSource, check_scale, images_to_tensor, scaled
from backdoor_lab.data.signs.render import SIGN_CLASSES, SignRenderer
from backdoor_lab.splits import RawSplit


class SyntheticTrafficSigns(CachedSource):
    """Built-in GTSRB-like data: ``per_class`` counts of train, val (defender's) and test images per class.

    ``scale`` multiplies the three counts (``debug=tiny`` runs any command at a tiny size); 1.0 is the
    documented size. Splits are rendered from disjoint seed ranges, so no image appears in two splits; rendered once and
    cached under ``cache_dir`` (the cache name hashes every parameter).
    """

    name = "signs"

    def __init__(
        self,
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        seed: int = 0,
        image_size: int = 32,
        train_per_class: int = 500,
        val_per_class: int = 80,
        test_per_class: int = 150,
        classes: list[str] | None = None,
        progress: bool = True,
        scale: float = 1.0,
    ) -> None:
        scale = check_scale(scale)
        counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        for split, n in counts.items():  # before scaling, which never gives fewer than one
            if n < 1:
                raise ValueError(f"{split}_per_class must be >= 1, got {n}")
        self.cache_dir = cache_dir
        self.seed = seed
        self.image_size = image_size
        self.counts = {split: scaled(n, scale) for split, n in counts.items()}
        self._class_names = list(classes or SIGN_CLASSES)
        self.progress = progress

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def cache_key(self) -> dict:
        return {
            "seed": self.seed,
            "size": self.image_size,
            "counts": self.counts,
            "classes": self._class_names,
            "version": 1,
        }

    def build(self) -> dict[str, RawSplit]:
        renderer = SignRenderer(self.image_size, self._class_names)
        n_cls = len(self._class_names)
        jobs: list[tuple[str, int, int]] = []  # (split, label, sample_id)
        next_id = 0
        for split in ("train", "val", "test"):
            for label in range(n_cls):
                for _ in range(self.counts[split]):
                    jobs.append((split, label, next_id))
                    next_id += 1
        images = np.empty((len(jobs), self.image_size, self.image_size, 3), dtype=np.uint8)
        boxes = np.empty((len(jobs), 4), dtype=np.float32)
        seed_base = np.random.SeedSequence(self.seed).generate_state(1)[0]
        for i, (_, label, sid) in enumerate(
            track(jobs, description="Rendering traffic signs", disable=not self.progress, transient=True)
        ):
            images[i], boxes[i] = renderer.render(label, int(seed_base) * 1_000_003 + sid)
        splits = {}
        split_of = np.array([j[0] for j in jobs])
        labels = np.array([j[1] for j in jobs], dtype=np.int64)
        ids = np.array([j[2] for j in jobs], dtype=np.int64)
        for split in ("train", "val", "test"):
            m = split_of == split
            splits[split] = RawSplit(inputs=images[m], labels=labels[m], sample_ids=ids[m], regions=boxes[m])
        return splits

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        return images_to_tensor(inputs)
