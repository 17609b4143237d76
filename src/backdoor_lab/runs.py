"""Run folders and what produced them: the training config key, pairing defenses with training runs, job.json.

A training run is matched on its full training config (data, attack, model, training settings, seed,
pruning-aware stages), never on file times; ``defend.py`` given a checkpoint refuses one whose training
config differs from its own in the keys that define the model, and names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import backdoor_lab.resolvers  # noqa: F401  (registers the resolvers the configs use)
from backdoor_lab.nested import flatten
from backdoor_lab.reporting.files import write_replace

log = logging.getLogger(__name__)

# The config nodes that decide what a training run produces ...
TRAINING_NODES = ("data", "attack", "model", "trainer", "seed", "pruning_aware")
# ... less the keys that change where or how visibly it runs, not what it learns.
NOT_TRAINING = (
    "data.num_workers",
    "data.eval_batch_size",
    "data.source.cache_dir",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.enable_progress_bar",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "model.attention_layers",  # read by NAD only, after training
    "model.channels_last",  # memory order: the same arithmetic up to float rounding, like the device
)
# The keys a checkpoint handed to defend.py must agree on (its trainer settings may differ: warned, not refused).
MODEL_DEFINING = ("data", "attack", "model", "seed", "pruning_aware")
TRAIN_METRICS = "metrics.json"
MODEL_FILE = "model.safetensors"


def training_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved, flattened training config: what decides the trained weights."""
    whole = OmegaConf.to_container(cfg, resolve=True)  # resolved once: each resolution walks the whole config
    nodes = {name: whole.get(name) for name in TRAINING_NODES}
    flat = flatten(nodes)
    ignored = (*NOT_TRAINING, *(VALIDATION_PERIOD if keeps_validation_draws(cfg) else ()))
    return {k: v for k, v in sorted(flat.items()) if not any(k == n or k.startswith(n + ".") for n in ignored)}


# How often training validates: it changes the weights (each pass draws from torch's generator) unless skipped
# passes still make their draws (SkippedValidationDraws, speed=exact), where a run trains what one that validates
# every epoch trains, and the two share a key.
VALIDATION_PERIOD = ("trainer.check_val_every_n_epoch",)


def keeps_validation_draws(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s callbacks include ``SkippedValidationDraws``."""
    callbacks = cfg.get("callbacks") or {}
    return any(
        c is not None and str(c.get("_target_", "")).endswith(".SkippedValidationDraws") for c in callbacks.values()
    )


def train_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a flattened training config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefixes: Iterable[str]) -> list[str]:
    """``key: theirs -> ours`` for every key under ``prefixes`` whose value differs (or exists on one side only)."""
    prefixes = tuple(prefixes)

    def selected(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    keys = sorted({k for k in (*ours, *theirs) if selected(k)})
    missing = "<absent>"
    return [
        f"{k}: {theirs.get(k, missing)!r} (checkpoint) vs {ours.get(k, missing)!r} (this run)"
        for k in keys
        if ours.get(k, missing) != theirs.get(k, missing)
    ]


@dataclass
class TrainRun:
    """A finished training run: its folder, metrics (with its config) and the plain-weights model file."""

    run_dir: Path | None
    checkpoint: Path
    metrics: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.metrics.get("training_config", {})


def read_train_run(run_dir: Path) -> TrainRun | None:
    """The finished training run in ``run_dir`` (metrics.json of kind "train" and its model), else None."""
    path = run_dir / TRAIN_METRICS
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("Skipping %s: not readable JSON", path)
        return None
    if not isinstance(metrics, dict) or metrics.get("kind") != "train" or not (run_dir / MODEL_FILE).is_file():
        return None
    return TrainRun(run_dir, run_dir / MODEL_FILE, metrics)


def matching_train_runs(search_root: Path, key: str) -> list[TrainRun]:
    """Finished training runs under ``search_root`` trained with config key ``key``, newest first."""
    runs = []
    for path in Path(search_root).glob(f"**/{TRAIN_METRICS}"):
        run = read_train_run(path.parent)
        if run is not None and run.metrics.get("train_key") == key:
            runs.append(run)
    return sorted(runs, key=lambda r: r.metrics.get("finished", ""), reverse=True)


def train_run_of_checkpoint(path: Path) -> TrainRun | None:
    """The training run a checkpoint file belongs to (``R/model.safetensors`` or ``R/checkpoints/*.ckpt``)."""
    for folder in (path.parent, path.parent.parent):
        run = read_train_run(folder)
        if run is not None:
            return TrainRun(run.run_dir, path, run.metrics)
    return None


class JobRecord:
    """``job.json`` of one job: which defenses it was asked for, whether it finished or failed (and why), and
    when it started and ended (``wall_s``: its own wall time, what the results table adds up).

    The results table lists a job that failed or lacks a defense it expected, instead of dropping it.
    """

    def __init__(self, job_dir: Path, defenses: list[str], overrides: list[str], train_run: Path | None = None):
        self.path = Path(job_dir) / "job.json"
        self.data: dict[str, Any] = {
            "status": "running",
            "error": None,
            "defenses": list(defenses),
            "overrides": list(overrides),
            "train_run": None if train_run is None else str(train_run),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._clock = time.monotonic()
        self._write()

    def __enter__(self) -> JobRecord:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        """``done`` when the job's work ended normally, else ``failed`` with the error (which propagates)."""
        ended = {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - self._clock, 1),
        }
        if error is None:
            self.update(status="done", **ended)
        else:
            self.update(status="failed", error=f"{type(error).__name__}: {error}", **ended)

    def update(self, **fields: Any) -> None:
        self.data.update({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})
        self._write()

    def _write(self) -> None:
        write_replace(self.path, json.dumps(self.data, indent=2) + "\n")
