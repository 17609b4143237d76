"""A callback for ``bench/job_cost.py``: prints the seconds from the process's start to its first fit's setup.

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not FirstFit.printed and stage == "fit":
            FirstFit.printed = True
            print(f"FIRST_FIT {time.time() - float(os.environ['BENCH_T0']):.2f}", flush=True)
