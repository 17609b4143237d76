"""``DefenderData``: the only data a defense is handed, so that no defense can read the test split.

The threat model gives the defender the model and a small clean split of its own, never the trigger and never
the data the numbers are reported on. The pipeline's ``BackdoorDataModule`` holds every split (the attacker's
training set, the test split and its triggered twin); handing it to a defense would make "never reads the test
split" a promise. ``DefenderData`` makes it structural: it is built from two tensor datasets (the defender's
clean split and, for drawing curves only, its triggered twin) and holds no reference to the module, the source
or any other split. ``test_dataloader`` and ``predict_dataloader`` raise.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from backdoor_lab.data.tensor_loader import tensor_loader


class SplitOutOfReach(RuntimeError):
    """A defense asked for data the defender does not have (the test split, the attacker's training set)."""


class DefenderData(L.LightningDataModule):
    """The defender's clean split (fit, rank, stop, distil) and the triggered val inputs (curves only).

    Args:
        clean: the defender's clean validation split, ``(inputs, labels)``.
        triggered: the same split with the trigger applied, ``(inputs, attack targets, true labels)``; only to
            draw ASR on curves and dashboards, never to decide anything.
        class_names: the label names, index = label.
        batch_size: batches of the fine-tuning fits (shuffled).
        eval_batch_size: batches of every evaluation pass.
        num_workers: DataLoader workers.
        pin_memory: page-locked batches for a GPU's non-blocking copies.
    """

    fit_on = "defender_clean"  # what ``train_dataloader`` yields, as the records name it

    def __init__(
        self,
        clean: Dataset,
        triggered: Dataset,
        class_names: list[str],
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self._clean = clean
        self._triggered = triggered
        self.class_names = list(class_names)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    @classmethod
    def of(cls, datamodule: Any) -> DefenderData:
        """The defender's part of a set-up ``BackdoorDataModule``: its clean val split and the triggered twin."""
        return cls(
            clean=datamodule.dataset("defender_clean"),
            triggered=datamodule.dataset("val_triggered"),
            class_names=datamodule.class_names,
            batch_size=datamodule.batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            pin_memory=datamodule.pin_memory,
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        return tensor_loader(dataset, batch_size, train, self.num_workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        """The defender's clean split, shuffled: what every fine-tuning fit trains on."""
        return self._loader(self._clean, train=True)

    def clean_val_dataloader(self) -> DataLoader:
        """The defender's clean split in order: what channels are ranked on and stop rules are measured on."""
        return self._loader(self._clean, train=False)

    def triggered_val_dataloader(self) -> DataLoader:
        """Triggered val inputs with (attack target, true label): only for drawing curves."""
        return self._loader(self._triggered, train=False)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.clean_val_dataloader(), self.triggered_val_dataloader()]

    def test_dataloader(self) -> Any:
        raise SplitOutOfReach(
            "a defense has no test split: it decides on the defender's clean split (clean_val_dataloader) only; "
            "the pipeline measures the defended model on the test split after the defense returns"
        )

    def predict_dataloader(self) -> Any:
        raise SplitOutOfReach("a defense has no predict split: use clean_val_dataloader()")
