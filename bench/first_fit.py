"""A callback for ``bench/job_cost.py``: prints the seconds from the process's start to its first fit's setup, and
each training epoch's seconds and samples (the framework's training speed, measured where it runs).

Injected with ``+callbacks.first_fit._target_=first_fit.FirstFit`` (``bench/`` on ``PYTHONPATH``); the process
start is read from ``BENCH_T0`` (set by the benchmark just before it spawns the script).
"""

from __future__ import annotations

import os
import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class FirstFit(Callback):
    """Start-up, as a user waits for it: imports, config, data (from the cache), model and checkpoint loading."""

    printed = False

    def __init__(self) -> None:
        self._epoch_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not FirstFit.printed and stage == "fit":
            FirstFit.printed = True
            print(f"FIRST_FIT {time.time() - float(os.environ['BENCH_T0']):.2f}", flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_done(trainer)  # Lightning validates inside the epoch, before on_train_epoch_end

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_done(trainer)

    def _steps_done(self, trainer: L.Trainer) -> None:
        """The epoch's training steps only: from its start to its validation (or its end)."""
        if self._epoch_start is not None and not trainer.sanity_checking:
            samples = len(trainer.train_dataloader.dataset)
            print(f"TRAIN_EPOCH {time.perf_counter() - self._epoch_start:.3f} {samples}", flush=True)
            self._epoch_start = None
