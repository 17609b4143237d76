"""``FinePruningCallback``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018) as a Lightning callback.

At fit start the callback ranks the channels of one conv layer by their mean activation on clean data,
masks them in increasing order with ``torch.nn.utils.prune`` while measuring clean accuracy, and keeps the
last mask whose accuracy drop stayed within ``max_accuracy_drop`` (or prunes exactly ``prune_ratio``). The
fit that follows is the fine-tuning, with the masks kept. It needs nothing of backdoor_lab from the
project it is dropped into: batches ``(inputs, targets)`` and a ``forward`` that returns logits.

Unlike the peers (PAPER.md), it ranks and stops on clean *validation* data only, rolls back to the last
passing mask, prunes exactly the count it reports, and keeps running sums instead of activations.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tqdm.auto import tqdm

from backdoor_lab.defenses.pruning import (
    ChannelActivation,
    EvalCounts,
    fold_prune_masks,
    make_permanent,
    masked_modules,
    prune_schedule,
    resolve_layer,
    run_batches,
    set_channel_mask,
)

log = logging.getLogger(__name__)


class FinePruningCallback(Callback):
    """Prune the least-active channels of ``layer`` on clean data, then let the fit fine-tune.

    Args:
        layer: name of the ``nn.Conv2d`` to prune (as in ``named_modules``); None = the last Conv2d.
        prune_ratio: prune exactly this fraction of the layer's channels (in [0, 1)); None = stop rule.
        max_accuracy_drop: stop rule: prune while clean val accuracy stays >= baseline - this (absolute,
            e.g. 0.04 = 4 points); the last mask that passed is kept.
        step: channels masked between two accuracy measurements (None: about 64 measurements per layer).
        clean_dataloader: the defender's clean data; None = ``datamodule.clean_val_dataloader()`` if it
            exists, else the first of ``val_dataloader()``.
        triggered_dataloader: optional triggered inputs with attack targets, only to draw ASR on the prune
            curve (never used to decide); None = ``datamodule.triggered_val_dataloader()`` if it exists.
        activation_layer: module whose output gives the ranking statistic (None: ``layer`` itself).
        rectify: take ReLU of the statistic's module output (the paper ranks post-activation values).
        full_curve: keep measuring past the stop point to draw the whole curve (the kept mask is unchanged).
        max_batches: cap on batches per pass over the clean data (None: all).
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
    ) -> None:
        if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
            raise MisconfigurationException(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if max_accuracy_drop is None or not 0.0 <= max_accuracy_drop <= 1.0:
            raise MisconfigurationException(
                f"max_accuracy_drop must be a fraction in [0, 1] (0.04 = 4 points), got {max_accuracy_drop}"
            )
        if step is not None and step < 1:
            raise MisconfigurationException(f"step must be a positive channel count, got {step}")
        if max_batches is not None and max_batches < 1:
            raise MisconfigurationException(f"max_batches must be positive, got {max_batches}")
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
        # State, saved in checkpoints so that a resumed fine-tuning keeps its masks and its record.
        self.layer_name: str | None = None
        self.num_channels: int = 0
        self.channel_activation: list[float] = []
        self.triggered_activation: list[float] = []
        self.pruned_channels: list[int] = []
        self.prune_curve: list[dict[str, float | None]] = []
        self.pruned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, prune_ratio=self.prune_ratio)

    @property
    def pruned_fraction(self) -> float:
        return len(self.pruned_channels) / self.num_channels if self.num_channels else 0.0

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.layer_name, _ = resolve_layer(pl_module, self.layer)  # fail early on a bad name
        if self.activation_layer is not None and self.activation_layer not in dict(pl_module.named_modules()):
            raise MisconfigurationException(f"activation_layer {self.activation_layer!r} is not in the model")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pruned:  # resumed from a checkpoint: re-install the recorded mask, do not prune again
            self._apply_mask(pl_module)
            log.info("FinePruning: resumed with %d channels of %s pruned", len(self.pruned_channels), self.layer_name)
            return
        self.prune(trainer, pl_module)

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
        """Rank, mask step by step, keep the last passing mask; fills ``pruned_channels`` and ``prune_curve``."""
        strategy = trainer.strategy
        device = pl_module.device
        clean = self._clean_loader(trainer, pl_module)
        triggered = self._triggered_loader(trainer)
        conv = self._conv(pl_module)
        modules = self._modules(pl_module)
        n = conv.out_channels
        self.num_channels = n

        stat_module = dict(pl_module.named_modules())[self.activation_layer] if self.activation_layer else conv
        recorder = ChannelActivation(stat_module, rectify=self.rectify)
        try:
            run_batches(pl_module, clean, device, self.max_batches, count_hits=False)
        finally:
            recorder.close()
        if recorder.sum is None or recorder.sum.numel() != n:
            raise RuntimeError(
                f"the ranking statistic of {self.activation_layer or self.layer_name} has "
                f"{None if recorder.sum is None else recorder.sum.numel()} channels, the pruned layer {n}"
            )
        mean_activation = self._mean(strategy, recorder, device)
        if triggered is not None:  # for the report only: where does the trigger drive the layer?
            trig_recorder = ChannelActivation(stat_module, rectify=self.rectify)
            try:
                run_batches(pl_module, triggered, device, self.max_batches, count_hits=False)
            finally:
                trig_recorder.close()
            self.triggered_activation = [float(v) for v in self._mean(strategy, trig_recorder, device)]
        self.channel_activation = [float(v) for v in mean_activation]
        order = self.pruning_order()

        step = self.step or max(1, n // 64)
        limit = None if self.prune_ratio is None else int(round(self.prune_ratio * n))
        schedule = prune_schedule(n, step, None if (self.full_curve or limit is None) else limit)
        if limit is not None and limit not in schedule:
            schedule = sorted({*schedule, limit})

        self.prune_curve = []
        keep_count = 0 if limit is None else limit
        baseline = None
        stopped = False
        bar = tqdm(
            schedule,
            desc=f"Pruning {self.layer_name}",
            # None: tqdm shows the bar on a terminal and stays quiet in logs and CI
            disable=None if (self.progress and trainer.is_global_zero) else True,
            leave=False,
        )
        for k in bar:
            keep = torch.ones(n, dtype=torch.bool)
            keep[order[:k]] = False
            set_channel_mask(modules, keep)
            acc = self._reduce(strategy, run_batches(pl_module, clean, device, self.max_batches), device)
            asr = None
            if triggered is not None:
                asr = self._reduce(strategy, run_batches(pl_module, triggered, device, self.max_batches), device)
            if baseline is None:
                baseline = acc
            self.prune_curve.append({"pruned": k, "fraction": k / n, "clean_acc": acc, "asr": asr})
            bar.set_postfix(acc=f"{acc:.3f}", asr="-" if asr is None else f"{asr:.3f}")
            if limit is None and not stopped:
                if acc >= baseline - self.max_accuracy_drop:
                    keep_count = k
                else:
                    stopped = True
                    if not self.full_curve:
                        break
        bar.close()

        # All processes must end on the same mask, whatever rounding they saw.
        keep_count = int(strategy.broadcast(keep_count, src=0))
        self.pruned_channels = [int(c) for c in order[:keep_count]]
        self._apply_mask(pl_module)
        self.pruned = True
        self._log_result(trainer, baseline)

    def remove_reparametrization(self, pl_module: L.LightningModule) -> None:
        """Fold the masks into the weights, e.g. before exporting the defended model."""
        make_permanent(self._modules(pl_module))

    # ----------------------------------------------------------------- helpers
    def _apply_mask(self, pl_module: L.LightningModule) -> None:
        keep = torch.ones(self._conv(pl_module).out_channels, dtype=torch.bool)
        keep[self.pruned_channels] = False
        set_channel_mask(self._modules(pl_module), keep)

    def _conv(self, pl_module: L.LightningModule) -> torch.nn.Conv2d:
        self.layer_name, conv = resolve_layer(pl_module, self.layer_name or self.layer)
        return conv

    def _modules(self, pl_module: L.LightningModule) -> list[torch.nn.Module]:
        self._conv(pl_module)
        return [m for _, m in masked_modules(pl_module, self.layer_name)]

    @staticmethod
    def _mean(strategy: Any, recorder: ChannelActivation, device: torch.device) -> torch.Tensor:
        total = strategy.reduce(recorder.sum.to(device), reduce_op="sum")
        count = strategy.reduce(torch.tensor(float(recorder.count), device=device), reduce_op="sum")
        return (total / count).cpu()

    def pruning_order(self) -> list[int]:
        """Channels by increasing mean clean activation; ties (e.g. dead channels) broken by index."""
        return sorted(range(len(self.channel_activation)), key=lambda c: (self.channel_activation[c], c))

    def trigger_channel_ranks(self, top: int = 10) -> list[int]:
        """Pruning-order positions (0 = pruned first) of the ``top`` channels the trigger raises most.

        Fine-pruning can only work when these sit early in the order (dormant on clean data); PAPER.md.
        """
        if not self.triggered_activation or not self.channel_activation:
            return []
        n = len(self.channel_activation)
        position = {c: i for i, c in enumerate(self.pruning_order())}
        lift = [self.triggered_activation[c] - self.channel_activation[c] for c in range(n)]
        most = sorted(range(n), key=lambda c: -lift[c])[:top]
        return sorted(position[c] for c in most)

    @staticmethod
    def _reduce(strategy: Any, counts: EvalCounts, device: torch.device) -> float:
        both = strategy.reduce(torch.tensor([counts.correct, counts.total], device=device), reduce_op="sum")
        return float(both[0] / both[1]) if float(both[1]) else float("nan")

    def _clean_loader(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.clean_dataloader is not None:
            return self.clean_dataloader
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "clean_val_dataloader"):
            return dm.clean_val_dataloader()
        for owner in (dm, pl_module):
            if owner is None:
                continue
            try:
                loaders = owner.val_dataloader()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(loaders, dict):
                return next(iter(loaders.values()))
            return loaders[0] if isinstance(loaders, list | tuple) else loaders
        raise MisconfigurationException(
            "FinePruningCallback needs clean validation data: pass clean_dataloader=..., or give the "
            "datamodule or LightningModule a val_dataloader()"
        )

    def _triggered_loader(self, trainer: L.Trainer) -> Any:
        if self.triggered_dataloader is not None:
            return self.triggered_dataloader
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "triggered_val_dataloader"):
            return dm.triggered_val_dataloader()
        return None

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
