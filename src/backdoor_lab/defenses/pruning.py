"""Channel pruning primitives of Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018).

Channels of one convolutional layer are ranked by their mean activation on clean data and masked to zero
with ``torch.nn.utils.prune``. Masks are created once; later steps rewrite the mask buffers in place, so a
rollback to an earlier mask is exact and cheap, and the masked weights get no gradient while fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

MASKED_PARAMS = ("weight", "bias")


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model: nn.Module, name: str | None) -> tuple[str, nn.Conv2d]:
    """The conv layer called ``name`` (None: the last ``nn.Conv2d``), with an error listing the choices."""
    convs = conv_layer_names(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to prune")
    if name is None:
        name = convs[-1]
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"layer {name!r} is not in {type(model).__name__}; its conv layers are: {convs}")
    if not isinstance(modules[name], nn.Conv2d):
        raise ValueError(f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv2d; conv layers: {convs}")
    return name, modules[name]


def following_batchnorm(model: nn.Module, conv_name: str) -> tuple[str, nn.BatchNorm2d] | None:
    """The BatchNorm2d registered right after ``conv_name`` with as many features, if any.

    A masked conv channel that feeds a BatchNorm comes out as the norm's shift, not zero; masking the
    norm's affine parameters too makes the channel truly silent.
    """
    named = list(model.named_modules())
    idx = [n for n, _ in named].index(conv_name)
    conv = named[idx][1]
    for name, module in named[idx + 1 :]:
        if len(list(module.children())):
            continue
        if isinstance(module, nn.BatchNorm2d) and module.num_features == conv.out_channels:
            return name, module
        return None
    return None


def masked_modules(model: nn.Module, conv_name: str) -> list[tuple[str, nn.Module]]:
    """The modules whose parameters carry the channel mask: the conv and a BatchNorm right after it."""
    modules = [(conv_name, dict(model.named_modules())[conv_name])]
    bn = following_batchnorm(model, conv_name)
    if bn is not None:
        modules.append(bn)
    return modules


def set_channel_mask(modules: Iterable[nn.Module], keep: Tensor) -> None:
    """Mask output channels where ``keep`` is False on every module's weight and bias.

    The first call installs ``torch.nn.utils.prune`` reparametrizations; later calls overwrite the masks.
    """
    keep = keep.bool()
    for module in modules:
        for param in MASKED_PARAMS:
            if getattr(module, param, None) is None:
                continue
            current = getattr(module, param + "_orig", getattr(module, param))
            shape = (-1,) + (1,) * (current.dim() - 1)
            mask = keep.to(current.device).view(shape).expand_as(current).to(current.dtype)
            if prune.is_pruned(module) and hasattr(module, param + "_mask"):
                getattr(module, param + "_mask").copy_(mask)
                # prune's hook refreshes the masked tensor only at the next forward; keep it current now.
                with torch.no_grad():
                    setattr(module, param, current * getattr(module, param + "_mask"))
            else:
                prune.custom_from_mask(module, param, mask)


def fold_prune_masks(state: dict[str, Tensor], prefixes: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Turn ``x_orig``/``x_mask`` pairs of ``torch.nn.utils.prune`` into plain masked ``x`` tensors.

    ``prefixes`` limits folding to the named modules (``"net.conv5."``); None folds every pair.
    """
    out = {}
    for key, value in state.items():
        selected = prefixes is None or any(key.startswith(p) for p in prefixes)
        if selected and key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            out[base] = value * state[base + "_mask"]
        elif not (selected and key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state):
            out[key] = value
    return out


def make_permanent(modules: Iterable[nn.Module]) -> None:
    """Fold the masks into the weights (``prune.remove``) for export; masked channels stay zero."""
    for module in modules:
        for param in MASKED_PARAMS:
            if hasattr(module, param + "_mask"):
                prune.remove(module, param)


class ChannelActivation:
    """Running per-channel sum of a layer's (rectified) output, without keeping activations in memory."""

    def __init__(self, module: nn.Module, rectify: bool = True) -> None:
        self.rectify = rectify
        self.sum: Tensor | None = None
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        out = output.detach()
        if self.rectify:
            out = out.clamp(min=0)
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1).double().sum(dim=1)
        self.sum = per_channel if self.sum is None else self.sum + per_channel
        self.count += out.numel() // out.shape[1]

    def close(self) -> None:
        self._handle.remove()


@dataclass
class EvalCounts:
    """Correct and total counts, kept as sums so that processes can add them up."""

    correct: float = 0.0
    total: float = 0.0

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def split_batch(batch: Sequence | dict | Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(inputs, targets[, true_labels])`` from the batch shapes a plain Lightning project yields."""
    if isinstance(batch, dict):
        x = batch.get("inputs", batch.get("x", batch.get("image")))
        y = batch.get("targets", batch.get("y", batch.get("label")))
        return x, y, batch.get("true_labels")
    if isinstance(batch, Tensor):
        return batch, None, None
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    true = batch[2] if len(batch) > 2 else None
    return x, y, true


@torch.no_grad()
def run_batches(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    count_hits: bool = True,
) -> EvalCounts:
    """Run ``model`` in eval mode over ``dataloader``; count argmax == target.

    With a third batch element (true labels), samples whose true label equals the target are skipped, so
    the same code gives clean accuracy and attack success rate.
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts()
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x, y, true = split_batch(batch)
            logits = model(x.to(device))
            if not count_hits or y is None:
                continue
            y = y.to(device)
            keep = torch.ones_like(y, dtype=torch.bool) if true is None else true.to(device) != y
            counts.correct += float((logits.argmax(dim=1)[keep] == y[keep]).sum())
            counts.total += float(keep.sum())
    finally:
        model.train(was_training)
    return counts


def prune_schedule(n_channels: int, step: int, limit: int | None = None) -> list[int]:
    """Channel counts at which the curve is measured: 0, step, 2*step, ..., ending exactly at ``limit``."""
    last = n_channels - 1 if limit is None else limit  # never prune every channel of the layer
    counts = list(range(0, last + 1, step))
    if counts[-1] != last:
        counts.append(last)
    return counts
