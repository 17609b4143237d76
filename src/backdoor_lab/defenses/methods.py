"""The paper's three defenses and the baseline: none, fine-tuning, pruning, fine-pruning (Liu et al., RAID 2018).

Each is built from ``conf/defense/<name>.yaml``. Pruning ranks and stops on the defender's clean validation
split; fine-tuning trains on that same split; neither ever sees test data or the attacker's training set.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from backdoor_lab.defenses.base import Defense, DefenseContext, FineTuneBudget, PruneSettings
from backdoor_lab.defenses.pruning import resolve_layer
from backdoor_lab.resume import SkippedValidationDraws

log = logging.getLogger(__name__)

NO_FINE_TUNING = {"epochs": 0, "steps": 0, "fit_on": None, "samples": 0}


def fine_tune(context: DefenseContext, budget: FineTuneBudget, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``context.model`` on the defender's clean split with ``budget``'s optimizer, schedule and epochs."""
    model = context.model
    model.optimizer_factory = budget.optimizer
    model.scheduler_factory = budget.scheduler
    log.info("Fine-tuning for %d epochs (fine_tune.epochs) on the defender's clean split", budget.epochs)
    trainer = context.make_trainer([*(callbacks or []), SkippedValidationDraws()], budget.epochs)
    # Validation is monitoring only here: its period comes from the budget, and no sanity pass runs before the
    # fit (both are read by the fit loop when it runs, so any Trainer factory's Trainer takes them).
    trainer.check_val_every_n_epoch = budget.val_period()
    trainer.num_sanity_val_steps = 0
    trainer.fit(model, datamodule=context.datamodule, weights_only=True)
    # What the fit really read, for the record (and for tests): the defender's clean split and its size.
    loader = trainer.train_dataloader
    seen = len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else 0
    return {
        "epochs": budget.epochs,
        "steps": int(trainer.global_step),
        "fit_on": context.datamodule.fit_on,
        "samples": seen,
    }


def pruning_record(callback: Any, model: L.LightningModule) -> dict[str, Any]:
    """What a pruning defense records: the mask, the whole curve, where the trigger's channels sat."""
    return {
        "layer": callback.layer_name,
        "rank_layer": callback.activation_layer or callback.layer_name,
        "num_channels": callback.num_channels,
        "pruned_channels": list(callback.pruned_channels),
        "pruned_fraction": callback.pruned_fraction,
        "pruning_order": callback.pruning_order(),
        "channel_activation": list(callback.channel_activation),
        "trigger_channel_ranks": callback.trigger_channel_ranks(),
        "prune_curve": list(callback.prune_curve),
    }


class NoDefense(Defense):
    """Measure the checkpoint only: the "Initial" row of the paper's table."""

    name = "none"
    changes_model = False

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        return {"pruned_channels": [], "pruned_fraction": 0.0, "fine_tune": NO_FINE_TUNING}


class FineTuning(Defense):
    """Fine-tuning alone on the defender's clean data (weak: dormant backdoor channels get little gradient)."""

    name = "fine_tuning"

    def __init__(self, fine_tune: FineTuneBudget) -> None:
        self.budget = fine_tune

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        record = fine_tune(context, self.budget)
        return {"pruned_channels": [], "pruned_fraction": 0.0, "fine_tune": record}


class Pruning(Defense):
    """Pruning alone: mask the least-active channels on clean data while clean accuracy holds; no fine-tuning."""

    name = "pruning"

    def __init__(self, prune: PruneSettings) -> None:
        self.settings = prune
        self.callback: Any = None

    def check(self, model: L.LightningModule) -> None:
        callback = self.settings.callback(model)
        resolve_layer(model, callback.layer)
        if callback.activation_layer is not None and callback.activation_layer not in dict(model.named_modules()):
            raise ValueError(f"prune.rank_layer {callback.activation_layer!r} is not a module of the model")

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        self.callback = self.settings.callback(context.model)
        # A fit of zero epochs runs the callback's pruning (at fit start) and nothing else.
        context.make_trainer([self.callback], 0).fit(context.model, datamodule=context.datamodule, weights_only=True)
        return {**pruning_record(self.callback, context.model), "fine_tune": NO_FINE_TUNING}

    def export(self, model: L.LightningModule) -> None:
        if self.callback is not None:
            self.callback.remove_reparametrization(model)


class FinePruning(Pruning):
    """Fine-pruning: prune as ``Pruning``, then fine-tune the pruned network on clean data with the masks kept."""

    name = "fine_pruning"

    def __init__(self, prune: PruneSettings, fine_tune: FineTuneBudget) -> None:
        super().__init__(prune)
        self.budget = fine_tune

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        self.callback = self.settings.callback(context.model)
        record = fine_tune(context, self.budget, callbacks=[self.callback])
        return {**pruning_record(self.callback, context.model), "fine_tune": record}
