"""CLP, Channel Lipschitzness-based Pruning (Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on Channel
Lipschitzness", ECCV 2022): a data-free defense that prunes the conv channels most sensitive to their input.

A backdoor channel must turn a small trigger into a large response, so the paper bounds each channel's Lipschitz
constant from its weights alone (the UCLC, the upper bound of the channel Lipschitz constant): the largest singular
value of the channel's kernel ``W_k`` reshaped ``(in_channels, kh * kw)``, after folding in the BatchNorm that
follows (``W_k * |gamma_k| / sqrt(running_var_k + eps)``). Per layer, channels whose UCLC exceeds
``mean + u * std`` of that layer are outliers, and are pruned. No data is read at all.

Where it follows the reference code (``rkteddy/channel-Lipschitzness-based-pruning``, ``defense.py``) and
BackdoorBench (``defense/clp.py``, a copy of it): the default ``u = 3``; the BatchNorm's scale taken by its absolute
value (the norm makes its sign irrelevant); ``std`` as torch's ``Tensor.std()``, the unbiased (n - 1) estimate, so
a layer of n channels can only lose a channel when ``(n - 1) / sqrt(n) > u`` (n >= 11 for u = 3); a pruned channel
silenced whole (they zero the BatchNorm's weight and bias; here the conv and its BatchNorm are masked, output 0).

Where it differs, and why: every ``nn.Conv2d`` is scored, with its BatchNorm where one follows and from the kernel
alone where none does (the reference scores only convs followed by a BatchNorm, so on this project's BatchNorm-free
networks it would prune nothing; the paper's bound is stated for any conv); the BatchNorm's ``eps`` is inside the
square root, as BatchNorm computes (the reference omits it, which only matters for a channel of near-zero variance,
where it divides by ~0); channels are masked through ``torch.nn.utils.prune`` like fine-pruning's, so checkpoints,
plain-weight loading and export behave the same; and ``layers`` can restrict the pruning to named layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from backdoor_lab.defenses.base import Defense, DefenseContext
from backdoor_lab.defenses.channel_masks import (
    ChannelMaskCallback,
    ChannelMasks,
    apply_channel_masks,
    conv_units,
    fold_channel_masks,
    layer_channels,
    masks_record,
)
from backdoor_lab.defenses.methods import NO_FINE_TUNING
from backdoor_lab.defenses.successor_settings import CLPSettings

log = logging.getLogger(__name__)


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> Tensor:
    """The UCLC of every output channel of ``conv`` (float64, shape ``(out_channels,)``), BatchNorm ``bn`` folded in.

    The spectral norm of each channel's kernel reshaped ``(in_channels / groups, kh * kw)``, times the BatchNorm's
    per-channel gain ``|gamma| / sqrt(running_var + eps)``. Computed in float64 on the CPU: a few small matrices,
    and the threshold compares them exactly whatever the model's device and precision.
    """
    weight = conv.weight.detach().to("cpu", torch.float64)
    uclc = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1), ord=2)
    if bn is not None:
        gain = torch.ones_like(uclc)
        if bn.weight is not None:
            gain = gain * bn.weight.detach().to("cpu", torch.float64).abs()
        # Without running statistics a BatchNorm normalises by the batch's: unknown without data, so only gamma.
        if bn.running_var is not None:
            gain = gain / (bn.running_var.detach().to("cpu", torch.float64) + bn.eps).sqrt()
        uclc = uclc * gain
    return uclc


def outlier_channels(uclc: Tensor, u: float) -> list[int]:
    """Channels whose UCLC exceeds ``mean + u * std`` (unbiased std, as the reference); none in a 1-channel layer."""
    if uclc.numel() < 2:
        return []
    return torch.nonzero(uclc > uclc.mean() + u * uclc.std()).flatten().tolist()


def clp_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The conv layers CLP scores: ``layers`` checked against the model, or every ``nn.Conv2d`` (None)."""
    convs = [name for name, _, _ in conv_units(model)]
    if not convs:
        raise ValueError(f"clp: CLP prunes conv channels and {type(model).__name__} has none")
    if layers is None:
        return convs
    unknown = [name for name in layers if name not in convs]
    if unknown:
        raise ValueError(f"clp.layers {unknown} are not nn.Conv2d layers of {type(model).__name__}; its convs: {convs}")
    return list(layers)


def clp_masks(model: nn.Module, settings: CLPSettings) -> tuple[ChannelMasks, dict[str, list[float]]]:
    """CLP's masks ``{conv: [pruned channels]}`` (every scored layer, empty where none is pruned) and the UCLC
    of every channel of every scored layer ``{conv: [floats]}``. Reads the weights only, never data."""
    selected = set(clp_layers(model, settings.layers))
    masks: ChannelMasks = {}
    uclc: dict[str, list[float]] = {}
    for name, conv, bn in conv_units(model):
        if name not in selected:
            continue
        scores = channel_lipschitz(conv, bn)
        masks[name] = outlier_channels(scores, settings.u)
        uclc[name] = scores.tolist()
    return masks, uclc


def thresholds(uclc: dict[str, list[float]], u: float) -> dict[str, float | None]:
    """Each layer's ``mean + u * std`` (None for a 1-channel layer, which CLP never prunes), for the record."""
    out: dict[str, float | None] = {}
    for name, values in uclc.items():
        scores = torch.tensor(values, dtype=torch.float64)
        out[name] = float(scores.mean() + u * scores.std()) if len(values) > 1 else None
    return out


class CLPCallback(ChannelMaskCallback):
    """CLP in any Lightning fit: prunes at fit start from the weights alone; the epochs after it (if any) fine-tune
    with the masks kept. The masks and every channel's UCLC are kept in the callback's state (resume, records).

    Args:
        u: prune channels whose UCLC exceeds ``mean + u * std`` of their layer.
        layers: conv layer names to prune (None: every ``nn.Conv2d``).
    """

    display_name = "CLPCallback"

    def __init__(self, u: float = 3.0, layers: Sequence[str] | None = None) -> None:
        super().__init__()
        self.settings = CLPSettings(u=u, layers=layers)
        self.uclc: dict[str, list[float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            try:  # an unknown layer name fails here, before any epoch
                clp_layers(pl_module, self.settings.layers)
            except ValueError as err:
                raise MisconfigurationException(f"{self.display_name}: {err}") from None

    def find_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ChannelMasks:
        masks, self.uclc = clp_masks(pl_module, self.settings)
        log.info("CLP (u=%g): pruned %s", self.settings.u, {k: v for k, v in masks.items() if v} or "no channel")
        return masks

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "uclc": self.uclc}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.uclc = {k: list(v) for k, v in state_dict.get("uclc", {}).items()}

    def record(self) -> dict[str, Any]:
        """The masks per layer, the pruned share, every channel's UCLC and each layer's threshold."""
        return {
            **super().record(),
            "uclc": self.uclc,
            "thresholds": thresholds(self.uclc, self.settings.u),
            "u": self.settings.u,
        }


class CLP(Defense):
    """CLP as a plug-in defense: data-free pruning, no fine-tuning (the paper's defense is the pruning alone).

    The masks are computed from ``context.model``'s weights and installed on it directly: no Trainer and no data
    are needed (``context.datamodule`` is never touched).
    """

    name = "clp"

    def __init__(self, settings: CLPSettings) -> None:
        self.settings = settings
        self.masks: ChannelMasks = {}

    def check(self, model: L.LightningModule) -> None:
        clp_layers(model, self.settings.layers)

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        model = context.model
        self.masks, uclc = clp_masks(model, self.settings)
        pruned = {k: v for k, v in self.masks.items() if v}
        apply_channel_masks(model, pruned)
        log.info("CLP (u=%g): pruned %s", self.settings.u, pruned or "no channel")
        return {
            **masks_record(self.masks, layer_channels(model, self.masks)),
            "uclc": uclc,
            "thresholds": thresholds(uclc, self.settings.u),
            "u": self.settings.u,
            "fine_tune": NO_FINE_TUNING,
        }

    def export(self, model: L.LightningModule) -> None:
        fold_channel_masks(model, [k for k, v in self.masks.items() if v])
