"""What every defense is: a small object that defends a trained model in place, built from ``conf/defense/``.

Adding a defense is one class here or in a file of its own, plus one yaml with its ``_target_``; the
pipeline has no branch per defense. The defenses that fine-tune share one ``FineTuneBudget`` (the root
``fine_tune`` config), so fine-tuning alone and fine-pruning are compared on the same epochs, optimizer,
learning rate and schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from backdoor_lab.defenses.defender_data import DefenderData


@dataclass(frozen=True)
class FineTuneBudget:
    """How long and with what the defender fine-tunes on its clean data.

    Args:
        epochs: passes over the defender's clean split (>= 0).
        optimizer: a partial taking ``params`` (Hydra ``_partial_: true``).
        scheduler: optional partial taking ``optimizer`` (stepped per epoch), e.g. cosine over ``epochs``.
        val_every_n_epochs: the validation pass's period during the fine-tuning; 0 = never (``epochs``: once,
            after the last). It is monitoring only: the fit trains on that very clean split, nothing is selected
            on it, and the test pass right after the fit measures the defended model. Every epoch it cost about
            half the fine-tuning's time; once, after the last epoch, 3% of ``defend.py`` on signs.
    """

    epochs: int
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    val_every_n_epochs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"fine_tune.epochs must be an integer >= 0, got {self.epochs!r}")
        n = self.val_every_n_epochs
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"fine_tune.val_every_n_epochs must be an integer >= 0 (0: never), got {n!r}")

    def val_period(self) -> int:
        """``check_val_every_n_epoch`` for the fine-tuning's Trainer; never validating is a period past the last
        epoch, so that ``SkippedValidationDraws`` still makes every skipped pass's generator draws."""
        return self.val_every_n_epochs or self.epochs + 1


@dataclass(frozen=True)
class PruneSettings:
    """Which layer to prune, how to rank it, and when to stop (the root ``prune`` config).

    Args:
        layer: the ``nn.Conv2d`` to prune (None: the model's ``prune_layer``, else its last Conv2d).
        rank_layer: the module whose output ranks the channels (None: the model's ``rank_layer``).
        prune_ratio: prune exactly this fraction, in [0, 1); None = the stop rule.
        max_accuracy_drop: stop rule: keep the last mask whose clean val accuracy stays within this of the start.
        step: channels per measured point of the curve (None: every count; about 64 points without the cut).
        full_curve: measure the whole curve past the stop point (the kept mask is unchanged).
        max_batches: cap on batches per pass over the clean data (None: all).
    """

    layer: str | None = None
    rank_layer: str | None = None
    prune_ratio: float | None = None
    max_accuracy_drop: float = 0.04
    step: int | None = None
    full_curve: bool = True
    max_batches: int | None = None

    def callback(self, model: L.LightningModule) -> Any:
        """A ``FinePruningCallback`` for ``model``, which names its own pruned and ranking layers."""
        from backdoor_lab.defenses.callback import FinePruningCallback

        layer = self.layer or getattr(model, "prune_layer", None)
        rank_layer = self.rank_layer or getattr(model, "rank_layer", None)
        return FinePruningCallback(
            layer=layer,
            prune_ratio=self.prune_ratio,
            max_accuracy_drop=self.max_accuracy_drop,
            step=self.step,
            activation_layer=None if rank_layer == layer else rank_layer,
            full_curve=self.full_curve,
            max_batches=self.max_batches,
        )


# (callbacks, max_epochs) -> a Trainer configured like the run's (loggers, checkpoints, precision, ...)
TrainerFactory = Callable[[list[Callback], int], L.Trainer]


@dataclass
class DefenseContext:
    """What a defense gets: the model (weights of the checkpoint loaded), the defender's data, a Trainer factory.

    ``datamodule`` is a ``DefenderData``: its ``train_dataloader()`` yields the defender's clean split, its
    ``clean_val_dataloader()`` the same split in order (what pruning ranks and stops on), its
    ``triggered_val_dataloader()`` the triggered twin for curves only. It holds nothing else: the test split and
    the attacker's training set are out of a defense's reach by construction (``test_dataloader()`` raises).
    """

    model: L.LightningModule
    datamodule: DefenderData
    make_trainer: TrainerFactory
    record: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """Defends ``context.model`` in place; returns what its ``metrics.json`` should record."""

    name: str = "defense"
    # False only for a defense that leaves the model as it was (``none``): the job then reuses its test score
    changes_model: bool = True

    def check(self, model: L.LightningModule) -> None:
        """Fail before any work when the defense cannot apply to ``model`` (e.g. an unknown layer)."""
        return None

    @abstractmethod
    def apply(self, context: DefenseContext) -> dict[str, Any]: ...

    def export(self, model: L.LightningModule) -> None:
        """Make the defended model plain (e.g. fold pruning masks into the weights) before it is saved."""
        return None
