"""A teacher for distillation defenses: a frozen-able copy of the module, fine-tuned on the defender's clean data.

NAD's teacher is the backdoored model fine-tuned for a few epochs on the clean split with cross-entropy. It is
trained in a plain loop, not a nested ``Trainer.fit``: batches move as Lightning moves them (the caller's
``transfer``), the forward runs in the parameters' own precision, and the student's fit (its optimizer, its
schedulers, its loggers) is not touched. Kept apart from ``nad.py`` so that another distillation defense can
reuse it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from backdoor_lab.defenses.pruner import BatchToXY
from backdoor_lab.defenses.pruning import model_device

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def frozen_copy(pl_module: nn.Module, trainer: L.Trainer | None) -> nn.Module:
    """A deep copy of the module that shares (does not copy) the Trainer it is attached to."""
    memo = {} if trainer is None else {id(trainer): trainer}
    return copy.deepcopy(pl_module, memo)


def first_optimizer(config: Any) -> torch.optim.Optimizer:
    """The (first) optimizer of a ``configure_optimizers`` return value; its schedulers are not used."""
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, dict) and "optimizer" in config:
        return config["optimizer"]
    if isinstance(config, list | tuple) and config:
        return first_optimizer(config[0])
    raise MisconfigurationException(
        "NADCallback could not read an optimizer from the module's configure_optimizers(): pass teacher_optimizer"
    )


def rng_devices(module: nn.Module) -> list[int]:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must save for ``module`` (none on CPU)."""
    device = model_device(module)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def reshuffled(clean: Any, batch_size: int | None) -> Any:
    """The clean data shuffled each epoch (an evaluation loader is in order, often class by class)."""
    dataset = getattr(clean, "dataset", None)
    if not isinstance(clean, DataLoader) or dataset is None or not hasattr(dataset, "__len__"):
        return clean
    return DataLoader(
        dataset,
        batch_size=batch_size or clean.batch_size or 1,
        shuffle=True,
        num_workers=clean.num_workers,
        collate_fn=clean.collate_fn,
        pin_memory=clean.pin_memory,
    )


def fine_tuned_copy(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    loader: Iterable,
    *,
    epochs: int,
    transfer: Callable[[Any], Any],
    batch_to_xy: BatchToXY,
    optimizer: OptimizerFactory | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``pl_module`` fine-tuned ``epochs`` epochs on ``loader`` with cross-entropy, and its record.

    The optimizer is ``optimizer(params=...)`` or, if None, the module's own ``configure_optimizers()`` at its
    initial learning rate (no scheduler: its length is the student's, not the teacher's).
    """
    teacher = frozen_copy(pl_module, trainer)
    teacher.train()
    params = [p for p in teacher.parameters() if p.requires_grad]
    opt = optimizer(params=params) if optimizer is not None else first_optimizer(teacher.configure_optimizers())
    steps = samples = 0
    epoch_losses: list[float] = []
    for _ in range(epochs):
        total, count = None, 0
        for batch in loader:
            x, y, _ = batch_to_xy(transfer(batch))
            if y is None:
                raise MisconfigurationException("NADCallback fine-tunes its teacher on labelled clean batches")
            loss = F.cross_entropy(teacher(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            samples += len(y)
            total = loss.detach() * len(y) if total is None else total + loss.detach() * len(y)
            count += len(y)
        if count:
            epoch_losses.append(float(total) / count)
    opt.zero_grad(set_to_none=True)
    record = {
        "given": False,
        "epochs": epochs,
        "steps": steps,
        "samples": samples // max(epochs, 1),
        "loss_epoch_mean": epoch_losses,
    }
    return teacher, record
