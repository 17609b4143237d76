"""One Lightning DataModule for every backdoor task.

It turns a task's clean ``DataSource`` plus an attack (trigger, label mapping, poison rate) into the
four datasets of the Fine-Pruning protocol:

* ``train``: the attacker's poisoned training set (or, with ``fit_on="defender_clean"``, the defender's
  clean data, for fine-tuning);
* ``val``: the defender's clean validation split, disjoint from train and test; with its triggered twin
  for curves (the defender never uses it to decide anything);
* ``test``: the clean test split, and the triggered test split (samples already of the target class
  excluded) that gives the attack success rate.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.attacks.base import LabelMapping, Trigger
from backdoor_lab.attacks.poisoning import poison_train, triggered_split
from backdoor_lab.data.base import DataSource
from backdoor_lab.splits import SPLITS, RawSplit

FIT_ON = ("poisoned", "defender_clean")


class BackdoorDataModule(L.LightningDataModule):
    """Poisoned/clean/triggered splits of one task.

    Args:
        source: the task's clean data.
        trigger: the attack's trigger.
        mapping: which labels flip to what (all-to-one or all-to-all); class names are resolved here.
        poison_rate: fraction of the eligible training samples that get a poisoned copy.
        poison_mode: ``"add"`` triggered copies (as in the original attacks) or ``"replace"`` them.
        fit_on: ``"poisoned"`` for the attacker's training, ``"defender_clean"`` to fine-tune on the
            defender's clean split.
        seed: chooses the poisoned samples.
    """

    def __init__(
        self,
        source: DataSource,
        trigger: Trigger,
        mapping: LabelMapping,
        poison_rate: float = 0.1,
        poison_mode: str = "add",
        fit_on: str = "poisoned",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if fit_on not in FIT_ON:
            raise ValueError(f"fit_on must be one of {FIT_ON}, got {fit_on!r}")
        if not 0.0 < poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1], got {poison_rate}")
        self.source = source
        self.trigger = trigger
        self.mapping = mapping
        self.poison_rate = poison_rate
        self.poison_mode = poison_mode
        self.fit_on = fit_on
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, TensorDataset] = {}
        self.summary: dict[str, Any] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self.source.load()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"{type(self.source).__name__}.load() returned no {missing} split(s)")
        _check_disjoint(splits)
        self.mapping.bind(self.class_names)
        poisoned, is_poisoned = poison_train(
            splits["train"], self.trigger, self.mapping, self.poison_rate, self.seed, self.poison_mode
        )
        trig_val, val_true = triggered_split(splits["val"], self.trigger, self.mapping)
        trig_test, test_true = triggered_split(splits["test"], self.trigger, self.mapping)
        fit_split = poisoned if self.fit_on == "poisoned" else splits["val"]
        self.datasets = {
            "train": self._tensors(fit_split),
            "val_clean": self._tensors(splits["val"]),
            "val_triggered": self._tensors(trig_val, val_true),
            "test_clean": self._tensors(splits["test"]),
            "test_triggered": self._tensors(trig_test, test_true),
        }
        self.summary = {
            "source": self.source.name,
            "classes": self.num_classes,
            "train_clean": len(splits["train"]),
            "train_poisoned": int(is_poisoned.sum()),
            "poisoned_share": float(is_poisoned.mean()),
            "fit_on": self.fit_on,
            "fit_samples": len(fit_split),
            "val": len(splits["val"]),
            "test": len(splits["test"]),
            "test_triggered": len(trig_test),
        }

    def _tensors(self, split: RawSplit, true_labels: np.ndarray | None = None) -> TensorDataset:
        chunks = [self.source.to_tensor(split.inputs[i : i + 2048]) for i in range(0, len(split), 2048)]
        tensors = [torch.cat(chunks), torch.from_numpy(split.labels).long()]
        if true_labels is not None:
            tensors.append(torch.from_numpy(true_labels).long())
        return TensorDataset(*tensors)

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("BackdoorDataModule.setup() must run before its dataloaders are asked for")
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.clean_val_dataloader(), self.triggered_val_dataloader()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader("test_clean"), self._loader("test_triggered")]

    def clean_val_dataloader(self) -> DataLoader:
        """The defender's clean data: what pruning ranks channels on and stops on."""
        return self._loader("val_clean")

    def triggered_val_dataloader(self) -> DataLoader:
        """Triggered val inputs with (attack target, true label): only for drawing the prune curve."""
        return self._loader("val_triggered")


def _check_disjoint(splits: dict[str, RawSplit]) -> None:
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = np.intersect1d(splits[a].sample_ids, splits[b].sample_ids)
            if len(shared):
                raise ValueError(f"{a} and {b} splits share {len(shared)} samples (e.g. id {shared[0]}): leakage")
