"""Exact resume: the random number generators' states travel with every checkpoint.

Lightning's checkpoints restore the weights, the optimizer, the LR scheduler and the loop counters, but not the
global torch / numpy / python generators. The training DataLoader draws each epoch's shuffle order from the
global torch generator (and dropout draws from it every step), so a run resumed from ``last.ckpt`` would shuffle
differently from the run it continues and end on other numbers. ``RngStateCheckpoint`` stores the states when a
checkpoint is written and puts them back when a fit resumes from it, before the next epoch draws anything: the
resumed run then makes exactly the draws the uninterrupted run made, and every existing number stays as it was
(nothing changes for a run that is not resumed).

States are kept as tensors, ints and tuples only, so the checkpoint still loads with ``weights_only=True``.

``SkippedValidationDraws`` keeps the same draws when a fit validates less often than every epoch (the defenses'
fine-tuning always; training under ``speed=exact``): its weights are then those of a fit that validates every epoch.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

_NUMPY_STATE_FIELDS = ("keys", "pos", "has_gauss", "cached_gaussian")


def collect_rng_states() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and python generator states, in pickle-free types."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        cuda_states = states["torch.cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def torch_draws_between(before: dict[str, Any], after: dict[str, Any], most: int = 64) -> int | None:
    """How many base-seed draws (one int64 each, what starting a DataLoader iterator draws) lead from ``before``'s
    torch generator to ``after``'s, with every other generator unmoved; None if no such count up to ``most``.

    Leaves the generators as ``after`` says. What makes it: a test pass, whose draws a job may replay instead of
    testing the same weights again (``build.TestPasses``).
    """
    others = ("numpy", "python", "torch.cuda")
    if any(not _same_state(before.get(key), after.get(key)) for key in others):
        restore_rng_states(after)
        return None
    torch.set_rng_state(before["torch"])
    count = None
    for draws in range(most + 1):
        if torch.equal(torch.get_rng_state(), after["torch"]):
            count = draws
            break
        draw_base_seeds(1)
    restore_rng_states(after)
    return count


def draw_base_seeds(count: int) -> None:
    """Draw from torch's global generator what starting ``count`` DataLoader iterators draws (a base seed each)."""
    for _ in range(count):
        torch.empty((), dtype=torch.int64).random_()


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class RngStateCheckpoint(Callback):
    """Saves the generators' states in every checkpoint and restores them when a fit resumes from one."""

    @property
    def state_key(self) -> str:
        return "RngStateCheckpoint"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is not None:
            restore_rng_states(states)


class SkippedValidationDraws(Callback):
    """Where an epoch skips its validation, draw from torch's generator what that validation would have drawn.

    Starting a DataLoader's iterator draws its base seed from torch's global generator, and the next epoch's
    shuffle draws after it: without these draws, validating less often would reshuffle every later epoch, and
    a fit would end on other weights than with validation every epoch (``tests/test_speed.py``). So a
    skipped validation starts (and drops) an iterator of each validation loader: the numbers stay as they were.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if next(cb for cb in trainer.callbacks if isinstance(cb, SkippedValidationDraws)) is not self:
            return  # one Trainer may be handed two (speed=exact's and the fine-tuning's own): draw once
        every = trainer.check_val_every_n_epoch
        if every is None or (trainer.current_epoch + 1) % every == 0 or trainer.datamodule is None:
            return
        if not is_overridden("val_dataloader", trainer.datamodule) or trainer.limit_val_batches == 0:
            return
        loaders = trainer.datamodule.val_dataloader()
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            iter(loader)
