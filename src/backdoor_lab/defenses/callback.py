"""``FinePruningCallback``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018) as a Lightning callback.

A thin adapter over ``FinePruner`` (trainer-agnostic): at fit start it ranks the channels of one conv layer by
their mean activation on clean data, measures clean accuracy at every pruned-channel count, and keeps the last
mask whose accuracy drop stayed within ``max_accuracy_drop`` (or prunes exactly ``prune_ratio``). The fit that
follows is the fine-tuning, with the masks kept. It needs nothing of backdoor_lab from the project it is
dropped into: batches ``(inputs, targets)`` (or a ``batch_to_xy``) and a ``forward`` that returns logits.

Evaluation goes the way Lightning's own loops go: the precision plugin's ``convert_input``, the module's
``on_before_batch_transfer``, the strategy's ``batch_to_device`` (``transfer_batch_to_device``,
``on_after_batch_transfer``), and the forward under the precision plugin's ``val_step_context``.

Checkpoints hold plain weights (masked channels zero); the masked modules accept plain weights back (a
``load_state_dict`` pre-hook, ``backdoor_lab.masks``), so ``trainer.test(ckpt_path="best"|"last")`` works on the
live pruned model, a fresh model loads the file, and a resumed fit re-installs the recorded mask.

Under DDP each process evaluates 1/world of the clean and triggered batches; the activation sums and correct
counts are summed with ``strategy.reduce``, so every process ranks, measures and masks the same. Under the spawn
launcher (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) the fit runs in child processes: rank 0 hands the
callback's state back to the parent through the launcher's extra results, and the parent's model gets the mask
with the returned weights.

Unlike the peers (PAPER.md), it ranks and stops on clean *validation* data only, rolls back to the last
passing mask, prunes exactly the count it reports, and keeps running sums instead of activations.
"""

from __future__ import annotations

import logging
import sys
import uuid
import warnings
import weakref
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from backdoor_lab.defenses.fit_data import batch_transfer, find_clean_loader, find_triggered_loader
from backdoor_lab.defenses.pruner import BatchToXY, FinePruner
from backdoor_lab.defenses.pruning import (
    fold_prune_masks,
    make_permanent,
    mask_channels,
    masked_modules,
    resolve_layer,
    split_batch,
)
from backdoor_lab.defenses.ranking import check_prune_settings, pruning_order, trigger_channel_ranks

log = logging.getLogger(__name__)


class FinePruningCallback(Callback):
    """Prune the least-active channels of ``layer`` on clean data, then let the fit fine-tune.

    Args:
        layer: name of the ``nn.Conv2d`` to prune (as in ``named_modules``); None = the last Conv2d.
        prune_ratio: prune exactly this fraction of the layer's channels (in [0, 1)); None = stop rule.
        max_accuracy_drop: stop rule: prune while clean val accuracy stays >= baseline - this (absolute,
            e.g. 0.04 = 4 points); the last mask that passed is kept.
        step: channels masked between two accuracy measurements (None: 1, every count; about 64 measurements
            when the network cannot be cut and the curve re-evaluates it whole).
        clean_dataloader: the defender's clean data. None: ``fit(val_dataloaders=...)``, else the datamodule's
            ``clean_val_dataloader()`` or ``val_dataloader()``, else the module's ``val_dataloader()``.
        clean_dataloader_idx: which of several val dataloaders (list index or dict key) is the clean one;
            required when there are several.
        triggered_dataloader: optional triggered inputs with attack targets, only to draw ASR on the prune
            curve (never used to decide); None = ``datamodule.triggered_val_dataloader()`` if it exists.
        activation_layer: module whose output gives the ranking statistic (None: ``layer`` itself).
        rectify: take ReLU of the statistic's module output (the paper ranks post-activation values).
        full_curve: keep measuring past the stop point to draw the whole curve (the kept mask is unchanged).
        max_batches: cap on batches per pass over the clean data (None: all).
        progress: a rich progress bar on a terminal (quiet in logs and CI).
        batch_to_xy: ``batch -> (inputs, targets, true_labels or None)`` for batch layouts the default cannot read.
        fast_curve: cache at the layer and re-run only the later layers (False: re-run the whole network).
    """

    def __init__(
        self,
        layer: str | None = None,
        prune_ratio: float | None = None,
        max_accuracy_drop: float = 0.04,
        step: int | None = None,
        clean_dataloader: Any = None,
        triggered_dataloader: Any = None,
        activation_layer: str | None = None,
        rectify: bool = True,
        full_curve: bool = False,
        max_batches: int | None = None,
        progress: bool = True,
        clean_dataloader_idx: int | str | None = None,
        batch_to_xy: BatchToXY = split_batch,
        fast_curve: bool = True,
    ) -> None:
        check_prune_settings(prune_ratio, max_accuracy_drop, step, max_batches, error=MisconfigurationException)
        self.layer = layer
        self.prune_ratio = prune_ratio
        self.max_accuracy_drop = max_accuracy_drop
        self.step = step
        self.clean_dataloader = clean_dataloader
        self.triggered_dataloader = triggered_dataloader
        self.activation_layer = activation_layer
        self.rectify = rectify
        self.full_curve = full_curve
        self.max_batches = max_batches
        self.progress = progress
        self.clean_dataloader_idx = clean_dataloader_idx
        self.batch_to_xy = batch_to_xy
        self.fast_curve = fast_curve
        # State, saved in checkpoints so that a resumed fine-tuning keeps its masks and its record.
        self.layer_name: str | None = None
        self.num_channels: int = 0
        self.channel_activation: list[float] = []
        self.triggered_activation: list[float] = []
        self.pruned_channels: list[int] = []
        self.prune_curve: list[dict[str, float | None]] = []
        self.pruned = False
        # Names this callback across a spawn launcher's processes: rank 0's state comes back to this object.
        self._handoff_id = uuid.uuid4().hex
        _PARENT_CALLBACKS[self._handoff_id] = self

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, prune_ratio=self.prune_ratio)

    @property
    def pruned_fraction(self) -> float:
        return len(self.pruned_channels) / self.num_channels if self.num_channels else 0.0

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate/test/predict never prune: any model runs with the callback attached
            return
        self.layer_name, _ = resolve_layer(pl_module, self.layer_name or self.layer)  # fail early on a bad name
        if self.activation_layer is not None and self.activation_layer not in dict(pl_module.named_modules()):
            raise MisconfigurationException(f"activation_layer {self.activation_layer!r} is not in the model")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pruned:  # resumed from a checkpoint: re-install the recorded mask, do not prune again
            self._apply_mask(pl_module)
            log.info("FinePruning: resumed with %d channels of %s pruned", len(self.pruned_channels), self.layer_name)
            return
        # The prune passes iterate data loaders, which draw seeds from torch's global generator; fork it, so
        # the fine-tuning that follows shuffles the same whether the curve had 8 points or 256.
        with torch.random.fork_rng(devices=[]):
            self.prune(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Under a spawn launcher, send the mask and the record back to the parent process.

        The launcher returns rank 0's weights, which the parent loads non-strictly into its unmasked model: a
        masked conv's ``weight_orig`` would be dropped there (the parent keeping its pre-fit conv), so the masks
        are folded into plain weights first. The callback's state travels with the launcher's extra results.
        """
        launcher = trainer.strategy.launcher
        if stage != "fit" or not self.pruned or not isinstance(launcher, _MultiProcessingLauncher):
            return
        make_permanent(self._modules(pl_module))
        if trainer.local_rank != 0:  # the launcher returns local rank 0's results only
            return
        collect = launcher.get_extra_results
        state = _StateFromWorker(self._handoff_id, self.state_dict())

        def get_extra_results(trainer: L.Trainer) -> dict[str, Any]:
            return {**collect(trainer), f"fine_pruning/{self._handoff_id}": state}

        launcher.get_extra_results = get_extra_results

    def _take_over(self, state: dict[str, Any]) -> None:
        """In the parent of a spawn launcher: rank 0's state, and its mask on the parent's model.

        Runs while the launcher unpickles the workers' results, before it loads their weights into the parent's
        model: with the mask installed first, the plain weights that come back fill ``weight_orig`` (masks.py).
        """
        self.load_state_dict(state)
        trainer = _trainer_holding(self)
        if trainer is None or trainer.lightning_module is None:
            warnings.warn(
                "FinePruningCallback: the spawned fit's mask came back, but the parent's Trainer was not found; "
                "its model holds the pruned weights (masked channels zero) without a mask: call "
                "callback.apply_mask(model) before training it further",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.apply_mask(trainer.lightning_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Save plain weights (masked channels zero): any copy of the model loads them, pruned or not.

        The mask itself is ``pruned_channels`` in this callback's state, re-installed when a fit resumes.
        """
        if self.pruned and "state_dict" in checkpoint:
            prefixes = [f"{name}." for name, _ in masked_modules(pl_module, self.layer_name)]
            checkpoint["state_dict"] = fold_prune_masks(checkpoint["state_dict"], prefixes)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_name": self.layer_name,
            "num_channels": self.num_channels,
            "channel_activation": self.channel_activation,
            "triggered_activation": self.triggered_activation,
            "pruned_channels": self.pruned_channels,
            "prune_curve": self.prune_curve,
            "pruned": self.pruned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)

    # ----------------------------------------------------------------- pruning
    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank, measure the curve, keep the last passing mask; fills ``pruned_channels`` and ``prune_curve``."""
        clean, clean_idx = self._clean_loader(trainer, pl_module)
        triggered = find_triggered_loader(trainer, self.triggered_dataloader)
        strategy, precision = trainer.strategy, trainer.precision_plugin

        pruner = FinePruner(
            pl_module,
            self.layer_name or self.layer,
            activation_layer=self.activation_layer,
            rectify=self.rectify,
            prune_ratio=self.prune_ratio,
            max_accuracy_drop=self.max_accuracy_drop,
            step=self.step,
            full_curve=self.full_curve,
            max_batches=self.max_batches,
            batch_to_xy=self.batch_to_xy,
            transfer=batch_transfer(trainer, pl_module),
            forward_context=precision.val_step_context,
            reduce=lambda t: strategy.reduce(t, reduce_op="sum"),
            broadcast=lambda v: strategy.broadcast(v, src=0),
            world_size=trainer.world_size,
            process_index=trainer.global_rank,
            fast=self.fast_curve,
            progress=self.progress and trainer.is_global_zero,
        )
        self.layer_name, self.num_channels = pruner.layer_name, pruner.num_channels
        pruner.rank(clean, triggered, clean_idx=clean_idx, triggered_idx=0)
        self.channel_activation, self.triggered_activation = pruner.channel_activation, pruner.triggered_activation
        self.prune_curve = pruner.measure_curve()
        self.pruned_channels = pruner.apply(pruner.choose())
        self.pruned = True
        self._log_result(trainer, self.prune_curve[0]["clean_acc"] if self.prune_curve else None)

    def remove_reparametrization(self, pl_module: L.LightningModule) -> None:
        """Fold the masks into the weights, e.g. before exporting the defended model."""
        make_permanent(self._modules(pl_module))

    # ----------------------------------------------------------------- helpers
    def apply_mask(self, pl_module: L.LightningModule) -> None:
        """Install the recorded mask (``pruned_channels``) on ``pl_module``."""
        self._apply_mask(pl_module)

    def _apply_mask(self, pl_module: L.LightningModule) -> None:
        self._conv(pl_module)
        mask_channels(pl_module, self.layer_name, self.pruned_channels)

    def _conv(self, pl_module: L.LightningModule) -> torch.nn.Conv2d:
        self.layer_name, conv = resolve_layer(pl_module, self.layer_name or self.layer)
        return conv

    def _modules(self, pl_module: L.LightningModule) -> list[torch.nn.Module]:
        self._conv(pl_module)
        return [m for _, m in masked_modules(pl_module, self.layer_name)]

    def pruning_order(self) -> list[int]:
        """Channels by increasing mean clean activation; ties (e.g. dead channels) broken by index."""
        return pruning_order(self.channel_activation)

    def trigger_channel_ranks(self, top: int = 10) -> list[int]:
        """Pruning-order positions (0 = pruned first) of the ``top`` channels the trigger raises most.

        Fine-pruning can only work when these sit early in the order (dormant on clean data); PAPER.md.
        """
        return trigger_channel_ranks(self.channel_activation, self.triggered_activation, top)

    def _clean_loader(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, int]:
        """The defender's clean data, from what the user gave, and its dataloader index for the batch hooks."""
        return find_clean_loader(
            trainer, pl_module, self.clean_dataloader, self.clean_dataloader_idx, "FinePruningCallback"
        )

    def _log_result(self, trainer: L.Trainer, baseline: float | None) -> None:
        final = next((p for p in self.prune_curve if p["pruned"] == len(self.pruned_channels)), None)
        summary = {"prune/pruned_fraction": self.pruned_fraction, "prune/val_clean_acc_before": baseline}
        if final is not None:
            summary["prune/val_clean_acc_after"] = final["clean_acc"]
            if final["asr"] is not None:
                summary["prune/val_asr_before"] = self.prune_curve[0]["asr"]
                summary["prune/val_asr_after"] = final["asr"]
        log.info(
            "FinePruning: pruned %d/%d channels of %s (%.1f%%)",
            len(self.pruned_channels),
            self.num_channels,
            self.layer_name,
            100 * self.pruned_fraction,
        )
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in summary.items() if v is not None}, step=trainer.global_step)
            if hasattr(logger, "log_table"):  # W&B: the whole curve as a table, drawable as a line plot
                columns = ["pruned", "fraction", "clean_acc", "asr"]
                logger.log_table(
                    "prune_curve", columns=columns, data=[[p[c] for c in columns] for p in self.prune_curve]
                )


# Callbacks by handoff id, in the process that built them: where a spawn launcher's rank 0 sends their state.
_PARENT_CALLBACKS: weakref.WeakValueDictionary[str, FinePruningCallback] = weakref.WeakValueDictionary()


class _StateFromWorker:
    """A callback's state in the spawn launcher's extra results; unpickled in the parent, it hands it over.

    The launcher's parent side reads only the keys it knows (``update_main_process_results``); the handover
    happens when the parent unpickles the worker's output, which it always does.
    """

    def __init__(self, handoff_id: str, state: dict[str, Any]) -> None:
        self.handoff_id = handoff_id
        self.state = state

    def __reduce__(self) -> tuple:
        return _receive_in_parent, (self.handoff_id, self.state)


def _receive_in_parent(handoff_id: str, state: dict[str, Any]) -> None:
    callback = _PARENT_CALLBACKS.get(handoff_id)
    if callback is not None:
        callback._take_over(state)


def _trainer_holding(callback: FinePruningCallback) -> L.Trainer | None:
    """The Trainer whose ``fit`` is on this thread's stack with ``callback`` among its callbacks.

    The launcher unpickles the workers' results inside ``Trainer.fit``; no hook hands the parent's Trainer to a
    callback there, so it is read from the calling frames (``self`` or ``trainer``).
    """
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("trainer", "self"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, L.Trainer) and any(c is callback for c in candidate.callbacks):
                return candidate
        frame = frame.f_back
    return None
