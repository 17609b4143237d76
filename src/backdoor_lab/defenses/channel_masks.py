"""Channel masks over several conv layers at once, and the Lightning callback base of the defenses that set them.

Fine-pruning masks one layer; its successors ANP (Wu & Wang, NeurIPS 2021) and CLP (Zheng et al., ECCV 2022)
mask channels anywhere in the network. A mask here is ``{conv name: [pruned output channels]}``; each layer is
masked with ``mask_channels`` (the conv and a BatchNorm right after it, through ``torch.nn.utils.prune``), so
checkpoints, plain-weight loading and export behave exactly as for fine-pruning.

``ChannelMaskCallback`` is the shared Lightning life cycle: find the masks once at fit start (a subclass's
``find_masks``), agree on them across processes (rank 0's are broadcast), install them, fold them into the
weights that checkpoints carry, keep them in the callback's state so that a resumed fit re-installs them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from backdoor_lab.defenses.pruning import conv_layer_names, following_batchnorm, mask_channels, masked_modules
from backdoor_lab.masks import fold_prune_masks, make_permanent

ChannelMasks = dict[str, list[int]]  # conv layer name -> pruned output channels


def conv_units(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every ``nn.Conv2d`` with the BatchNorm2d right after it (None where there is none): one unit per channel."""
    modules = dict(model.named_modules())
    for name in conv_layer_names(model):
        bn = following_batchnorm(model, name)
        yield name, modules[name], None if bn is None else bn[1]


def apply_channel_masks(model: nn.Module, masks: Mapping[str, Sequence[int]]) -> None:
    """Mask ``masks[layer]`` of every named conv layer (and of its BatchNorm); layers not named stay as they are."""
    for layer, channels in masks.items():
        mask_channels(model, layer, channels)


def fold_channel_masks(model: nn.Module, layers: Sequence[str]) -> None:
    """Fold the masks of ``layers`` into plain weights (export); masked channels stay zero."""
    for layer in layers:
        make_permanent([m for _, m in masked_modules(model, layer)])


def layer_channels(model: nn.Module, layers: Iterable[str]) -> dict[str, int]:
    """Each named conv layer's output-channel count: what a mask's pruned share is taken over."""
    modules = dict(model.named_modules())
    return {name: modules[name].out_channels for name in layers}


def masks_record(masks: Mapping[str, Sequence[int]], num_channels: Mapping[str, int]) -> dict[str, Any]:
    """What metrics.json records of a multi-layer mask: per layer, and the pruned share of all their channels."""
    total = sum(num_channels.values())
    pruned = sum(len(c) for c in masks.values())
    return {
        "masks": {layer: sorted(int(c) for c in channels) for layer, channels in masks.items()},
        "layer_channels": dict(num_channels),
        "pruned_count": pruned,
        "pruned_fraction": pruned / total if total else 0.0,
    }


class ChannelMaskCallback(Callback):
    """Finds channel masks once at fit start, installs them, and keeps them through checkpoints and resumes.

    A subclass implements ``find_masks(trainer, pl_module) -> {layer: [channels]}``; the fit that follows (if any
    epochs) fine-tunes with the masks kept. Every process ends on rank 0's masks (``strategy.broadcast``).
    """

    #: the callback's name in errors and logs
    display_name = "ChannelMaskCallback"

    def __init__(self) -> None:
        self.masks: ChannelMasks = {}
        self.num_channels: dict[str, int] = {}
        self.masked = False

    @abstractmethod
    def find_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ChannelMasks:
        """The channels to mask, per conv layer (the same answer on every process, or rank 0's is taken)."""

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not conv_layer_names(pl_module):
            raise MisconfigurationException(
                f"{self.display_name} masks conv channels, and {type(pl_module).__name__} has no nn.Conv2d layer"
            )
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            raise MisconfigurationException(
                f"{self.display_name} runs under strategy='ddp' (one process per device) but not under a spawn "
                f"launcher (ddp_spawn, ddp_fork, ddp_notebook), whose child processes cannot return the masks"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.masked:
            # The search draws from torch's generator (data order, noise); fork it, so that the fine-tuning
            # after it shuffles the same whatever the search did.
            with torch.random.fork_rng(devices=[]):
                masks = self.find_masks(trainer, pl_module)
            self.masks = {k: sorted(int(c) for c in v) for k, v in trainer.strategy.broadcast(masks, src=0).items()}
            self.num_channels = layer_channels(pl_module, self.masks)  # the layers the search scored
            self.masked = True
        self.apply_masks(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Save plain weights (masked channels zero); the masks themselves live in this callback's state."""
        if self.masked and "state_dict" in checkpoint:
            prefixes = [f"{name}." for layer in self.masks for name, _ in masked_modules(pl_module, layer)]
            checkpoint["state_dict"] = fold_prune_masks(checkpoint["state_dict"], prefixes)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "num_channels": self.num_channels, "masked": self.masked}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: list(v) for k, v in state_dict["masks"].items()}
        self.num_channels = dict(state_dict["num_channels"])
        self.masked = bool(state_dict["masked"])

    # ----------------------------------------------------------------- the masks
    def apply_masks(self, pl_module: nn.Module) -> None:
        """Install the recorded masks on ``pl_module`` (e.g. a fresh copy of the model)."""
        apply_channel_masks(pl_module, {k: v for k, v in self.masks.items() if v})

    def remove_reparametrization(self, pl_module: nn.Module) -> None:
        """Fold the masks into the weights, e.g. before exporting the defended model."""
        fold_channel_masks(pl_module, [k for k, v in self.masks.items() if v])

    @property
    def pruned_fraction(self) -> float:
        return masks_record(self.masks, self.num_channels)["pruned_fraction"]

    def record(self) -> dict[str, Any]:
        """What a defense's metrics.json records: the masks per layer and the pruned share."""
        return masks_record(self.masks, self.num_channels)
