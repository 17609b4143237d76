"""The pruning-aware attack of Liu, Dolan-Gavitt and Garg (RAID 2018, section on adaptive attackers).

An attacker who knows the defender will prune dormant channels first:

1. trains the network on clean data;
2. prunes the channels of the defended layer that are dormant on its clean data;
3. trains the pruned network on poisoned data, so the backdoor must live in channels clean inputs also use;
4. re-instates the pruned channels with their weights but a strongly decreased bias, so they stay dormant:
   decoys that the defender prunes first, spending its accuracy budget on channels that carry nothing.
   (The original face artifact sets 50 of 60 conv3 biases to -1e20.)

The attacker ranks on its own clean training data, never on the defender's split. The result is plain
weights that load into the stock model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.nn.utils import prune

from backdoor_lab.defenses.callback import FinePruningCallback
from backdoor_lab.defenses.pruning import MASKED_PARAMS, masked_modules, resolve_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruningAwareAttack:
    """Stages 1-4 above around the normal poisoned training (stage 3 is that training).

    Args:
        prune_fraction: share of the layer's channels pruned (the most dormant on clean data), in (0, 1).
        clean_epochs: epochs of stage 1 (clean training).
        decoy_bias: bias given to the re-instated channels (and to a following BatchNorm's shift).
        layer: the defended conv layer (None: the model's ``prune_layer``).
        rank_layer: the module whose output ranks its channels (None: the model's ``rank_layer``).
    """

    prune_fraction: float = 0.8
    clean_epochs: int = 10
    decoy_bias: float = -1.0e20
    layer: str | None = None
    rank_layer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prune_fraction, int | float) or not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"pruning_aware.prune_fraction must be in (0, 1), got {self.prune_fraction!r}")
        if isinstance(self.clean_epochs, bool) or not isinstance(self.clean_epochs, int) or self.clean_epochs < 1:
            raise ValueError(f"pruning_aware.clean_epochs must be an integer >= 1, got {self.clean_epochs!r}")
        if not self.decoy_bias < 0:
            raise ValueError(f"pruning_aware.decoy_bias must be negative (decoys stay dormant), got {self.decoy_bias}")

    def train(
        self,
        model: L.LightningModule,
        datamodule: Any,
        make_trainer: Callable[[list, int, str], L.Trainer],
        poison_epochs: int,
        evaluate: Callable[[L.LightningModule], dict[str, float]],
    ) -> dict[str, Any]:
        """Run the four stages on ``model`` in place; returns each stage's test metrics and the decoy channels.

        ``make_trainer(callbacks, max_epochs, stage)`` builds a Trainer; ``evaluate`` gives clean accuracy and ASR.
        """
        layer = self.layer or getattr(model, "prune_layer", None)
        rank_layer = self.rank_layer or getattr(model, "rank_layer", None)
        layer, conv = resolve_layer(model, layer)
        stages: dict[str, dict[str, float]] = {}

        datamodule.fit_on = "clean"
        make_trainer([], self.clean_epochs, "clean").fit(model, datamodule=datamodule, weights_only=True)
        stages["clean"] = evaluate(model)
        log.info("Pruning-aware attack, stage 1 (clean training): %s", stages["clean"])

        pruner = FinePruningCallback(
            layer=layer,
            prune_ratio=self.prune_fraction,
            step=conv.out_channels,  # a fixed ratio: measure only the start and the end
            clean_dataloader=datamodule.attacker_clean_dataloader(),
            activation_layer=None if rank_layer in (None, layer) else rank_layer,
            full_curve=False,
        )
        make_trainer([pruner], 0, "prune").fit(model, datamodule=datamodule, weights_only=True)
        stages["pruned"] = evaluate(model)
        log.info(
            "Stage 2: pruned %d/%d dormant channels: %s",
            len(pruner.pruned_channels),
            conv.out_channels,
            stages["pruned"],
        )

        datamodule.fit_on = "poisoned"
        make_trainer([pruner], poison_epochs, "poisoned").fit(model, datamodule=datamodule, weights_only=True)
        stages["poisoned_pruned"] = evaluate(model)
        log.info("Stage 3 (poisoned training of the pruned network): %s", stages["poisoned_pruned"])

        reinstate_channels(model, layer, pruner.pruned_channels, self.decoy_bias)
        stages["decoys_reinstated"] = evaluate(model)
        log.info("Stage 4 (decoys re-instated, bias %g): %s", self.decoy_bias, stages["decoys_reinstated"])
        return {"stages": stages, "decoy_channels": list(pruner.pruned_channels), "layer": layer}


@torch.no_grad()
def reinstate_channels(model: torch.nn.Module, layer: str, channels: list[int], bias: float) -> None:
    """Remove the pruning masks of ``layer`` (and its BatchNorm), restoring the pruned channels' own weights,
    and give those channels the bias ``bias`` so they stay dormant."""
    for _, module in masked_modules(model, layer):
        for param in MASKED_PARAMS:
            if hasattr(module, param + "_orig"):
                original = getattr(module, param + "_orig").detach().clone()
                prune.remove(module, param)
                getattr(module, param).copy_(original)
        # The decoy: the conv's bias, and a following BatchNorm's shift (else the norm would undo it).
        if getattr(module, "bias", None) is not None and channels:
            module.bias[channels] = bias
