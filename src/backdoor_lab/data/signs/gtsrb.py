"""The real German Traffic Sign Recognition Benchmark (GTSRB), read through torchvision."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from backdoor_lab.data.base import (
    DEFAULT_CACHE_DIR,
    CachedSource,
    file_listing_digest,
    images_to_tensor,
    stratified_holdout,
)
from backdoor_lab.splits import RawSplit

# GTSRB's class ids (torchvision.datasets.GTSRB labels), in order.
GTSRB_CLASSES = [
    "speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60", "speed_limit_70",
    "speed_limit_80", "end_of_speed_limit_80", "speed_limit_100", "speed_limit_120", "no_passing",
    "no_passing_heavy_vehicles", "right_of_way_next_intersection", "priority_road", "yield", "stop",
    "no_vehicles", "no_heavy_vehicles", "no_entry", "general_caution", "dangerous_curve_left",
    "dangerous_curve_right", "double_curve", "bumpy_road", "slippery_road", "road_narrows_right",
    "road_work", "traffic_signals", "pedestrians", "children_crossing", "bicycles_crossing",
    "beware_ice_snow", "wild_animals_crossing", "end_of_limits", "turn_right_ahead", "turn_left_ahead",
    "ahead_only", "go_straight_or_right", "go_straight_or_left", "keep_right", "keep_left",
    "roundabout", "end_of_no_passing", "end_of_no_passing_heavy_vehicles",
]  # fmt: skip


class GTSRBSigns(CachedSource):
    """The real German Traffic Sign Recognition Benchmark through ``torchvision.datasets.GTSRB``.

    Never downloads unless ``download=True``. The defender's val split is a stratified holdout of the
    official training set (chosen by ``seed``); the official test set is the test split. GTSRB crops keep a
    10% margin around the sign (at least 5 pixels), which gives the sign box used to place a sticker.
    """

    name = "gtsrb"

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        download: bool = False,
        cache_dir: str | None = DEFAULT_CACHE_DIR,
        progress: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.download = download
        self.cache_dir = cache_dir
        self.progress = progress

    @property
    def class_names(self) -> list[str]:
        return GTSRB_CLASSES

    @cached_property
    def _samples(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(path, GTSRB class id) of the official train and test images, as torchvision lists them."""
        from torchvision.datasets import GTSRB

        expected = self.root / "gtsrb" / "GTSRB"
        try:
            train = GTSRB(str(self.root), split="train", download=self.download)
            test = GTSRB(str(self.root), split="test", download=self.download)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"GTSRB not found under {expected} (expected {expected}/Training/<class>/*.ppm and "
                f"{expected}/Final_Test/Images/*.ppm with {self.root / 'gtsrb'}/GT-final_test.csv). "
                f"Point data.source.root at the folder that contains 'gtsrb/', or pass download=true once."
            ) from err
        # torchvision numbers training folders by sorted position; the folder name is GTSRB's class id.
        return [(path, int(Path(path).parent.name)) for path, _ in train._samples], test._samples

    def cache_key(self) -> dict:
        train_samples, test_samples = self._samples
        return {
            "root": str(self.root.resolve()),
            "size": self.image_size,
            "val": self.val_fraction,
            "seed": self.seed,
            "files": file_listing_digest((path for path, _ in train_samples + test_samples), self.root),
            "version": 1,
        }

    def build(self) -> dict[str, RawSplit]:
        train_samples, test_samples = self._samples
        full_train = self._read(train_samples, 0, "train")
        keep, hold = stratified_holdout(full_train.labels, self.val_fraction, self.seed)
        return {
            "train": full_train.subset(keep),
            "val": full_train.subset(hold),
            "test": self._read(test_samples, len(train_samples), "test"),
        }

    def _read(self, samples: list[tuple[str, int]], offset: int, what: str) -> RawSplit:
        """The images of ``samples`` with ids from ``offset``; every sign box is the crop's 10% margin."""
        images = np.empty((len(samples), self.image_size, self.image_size, 3), dtype=np.uint8)
        labels = np.empty(len(samples), dtype=np.int64)
        for i, (path, label) in enumerate(
            track(samples, description=f"Reading GTSRB {what}", disable=not self.progress, transient=True)
        ):
            with Image.open(path) as img:
                images[i] = np.asarray(img.convert("RGB").resize((self.image_size, self.image_size)))
            labels[i] = label
        margin = 0.1 * self.image_size  # 10% of the crop (5 px of GTSRB's ~50 px crops)
        boxes = np.tile(
            np.array([margin, margin, self.image_size - margin, self.image_size - margin], dtype=np.float32),
            (len(samples), 1),
        )
        ids = np.arange(offset, offset + len(samples), dtype=np.int64)
        return RawSplit(inputs=images, labels=labels, sample_ids=ids, regions=boxes)

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        return images_to_tensor(inputs)
