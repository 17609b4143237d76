"""The Hydra callback that keeps a multirun's results table current.

Hydra 1.3's BasicLauncher runs every job of a batch even when one raises (``run_job`` catches the exception
into the ``JobReturn``) and calls ``on_job_end`` for each; the BasicSweeper then re-raises the first failure,
so ``on_multirun_end`` is *not* called when any job failed. Summarizing in ``on_job_end`` is what keeps the
summary of a sweep with a failed job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from backdoor_lab.reporting.summary import summarize

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Rewrite the sweep folder's summary.csv / summary.md / plots after every job and at the end of a multirun."""

    def __init__(self) -> None:
        # Errors of jobs that died before writing their job.json; kept for the later summaries of this sweep.
        self.job_errors: dict[Path, str] = {}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the exception; ``return_value`` would re-raise it
            self.job_errors[Path(config.hydra.runtime.output_dir).resolve()] = f"{type(error).__name__}: {error}"
        self._summarize(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarize(config.hydra.sweep.dir)

    def _summarize(self, sweep_dir: str) -> None:
        path = summarize(sweep_dir, job_errors=self.job_errors)
        print(f"Sweep summary: {path}", flush=True)
