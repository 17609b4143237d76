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

from backdoor_lab.attacks.base import Attack
from backdoor_lab.attacks.poisoning import poison_train, triggered_split
from backdoor_lab.data.base import DataSource
from backdoor_lab.data.tensor_loader import tensor_loader
from backdoor_lab.splits import SPLITS, RawSplit

FIT_ON = ("poisoned", "clean", "defender_clean")


class BackdoorDataModule(L.LightningDataModule):
    """Poisoned/clean/triggered splits of one task, built from ``conf/data/*.yaml`` with ``_target_``.

    Args:
        source: the task's clean data.
        attack: trigger, label mapping, poison rate and mode (class names are resolved here, once).
        name: the data set's short name (``signs``, ``speech``, ``face``), used in run folders and tables.
        fit_on: what ``train_dataloader`` yields: ``"poisoned"`` (the attacker's training set),
            ``"clean"`` (the attacker's clean training set, the first stage of the pruning-aware attack) or
            ``"defender_clean"`` (the defender's clean validation split, for fine-tuning).
        seed: chooses the poisoned samples and the per-epoch shuffling.
        pin_memory: page-locked batches, so that a GPU copies them without blocking (None: when CUDA is there).
    """

    def __init__(
        self,
        source: DataSource,
        attack: Attack,
        name: str = "data",
        fit_on: str = "poisoned",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if fit_on not in FIT_ON:
            raise ValueError(f"fit_on must be one of {FIT_ON}, got {fit_on!r}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
        self.source = source
        self.attack = attack
        self.name = name
        self.fit_on = fit_on
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.datasets: dict[str, TensorDataset] = {}
        self._raw: dict[str, tuple[RawSplit, np.ndarray | None]] = {}
        self.summary: dict[str, Any] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self._raw:
            return
        splits = self.source.load()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"{type(self.source).__name__}.load() returned no {missing} split(s)")
        _check_disjoint(splits)
        attack = self.attack.for_classes(self.class_names)
        poisoned, is_poisoned = poison_train(
            splits["train"], attack.trigger, attack.mapping, attack.poison_rate, self.seed, attack.poison_mode
        )
        trig_val, val_true = triggered_split(splits["val"], attack.trigger, attack.mapping)
        trig_test, test_true = triggered_split(splits["test"], attack.trigger, attack.mapping)
        # Raw splits by role; tensors are made on first use, so a run only holds the sets it reads.
        self._raw = {
            "poisoned": (poisoned, None),
            "clean": (splits["train"], None),
            "defender_clean": (splits["val"], None),
            "val_clean": (splits["val"], None),
            "val_triggered": (trig_val, val_true),
            "test_clean": (splits["test"], None),
            "test_triggered": (trig_test, test_true),
        }
        self.summary = {
            "name": self.name,
            "source": self.source.name,
            "classes": self.num_classes,
            "train_clean": len(splits["train"]),
            "train_poisoned": int(is_poisoned.sum()),
            "poisoned_share": float(is_poisoned.mean()),
            "fit_on": self.fit_on,
            "fit_samples": len(self._raw[self.fit_on][0]),
            "val": len(splits["val"]),
            "test": len(splits["test"]),
            "test_triggered": len(trig_test),
        }

    def dataset(self, role: str) -> TensorDataset:
        """The tensors of one role (``poisoned``, ``clean``, ``defender_clean``, ``val_clean``, ...)."""
        if not self._raw:
            raise RuntimeError("BackdoorDataModule.setup() must run before its data is asked for")
        if role not in self.datasets:
            split, true_labels = self._raw[role]
            self.datasets[role] = self._tensors(split, true_labels)
        return self.datasets[role]

    def _tensors(self, split: RawSplit, true_labels: np.ndarray | None = None) -> TensorDataset:
        chunks = [self.source.to_tensor(split.inputs[i : i + 2048]) for i in range(0, len(split), 2048)]
        # contiguous once (an image source's HWC -> CHW permute leaves them channels-last in memory), so a batch
        # is a plain gather of rows instead of a transposing copy every time
        tensors = [torch.cat(chunks).contiguous(), torch.from_numpy(split.labels).long()]
        if true_labels is not None:
            tensors.append(torch.from_numpy(true_labels).long())
        return TensorDataset(*tensors)

    def _loader(self, role: str, train: bool = False) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        return tensor_loader(self.dataset(role), batch_size, train, self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        """What the fit trains on: see ``fit_on`` (the attribute may be switched between fits)."""
        if self.fit_on not in FIT_ON:
            raise ValueError(f"fit_on must be one of {FIT_ON}, got {self.fit_on!r}")
        return self._loader(self.fit_on, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.clean_val_dataloader(), self.triggered_val_dataloader()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader("test_clean"), self._loader("test_triggered")]

    def clean_val_dataloader(self) -> DataLoader:
        """The defender's clean data: what pruning ranks channels on and stops on."""
        return self._loader("val_clean")

    def attacker_clean_dataloader(self) -> DataLoader:
        """The attacker's clean training data (no trigger): what the pruning-aware attack ranks channels on."""
        return self._loader("clean")

    def triggered_val_dataloader(self) -> DataLoader:
        """Triggered val inputs with (attack target, true label): only for drawing the prune curve."""
        return self._loader("val_triggered")


def _check_disjoint(splits: dict[str, RawSplit]) -> None:
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = np.intersect1d(splits[a].sample_ids, splits[b].sample_ids)
            if len(shared):
                raise ValueError(f"{a} and {b} splits share {len(shared)} samples (e.g. id {shared[0]}): leakage")
