"""Channel pruning primitives of Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018).

Channels of one convolutional layer are ranked by their mean activation on clean data and masked to zero
with ``torch.nn.utils.prune`` (the mask mechanics live in ``backdoor_lab.masks``, re-exported here). Masks
are created once; later steps rewrite the mask buffers in place, so a rollback to an earlier mask is exact and
cheap, and the masked weights get no gradient while fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backdoor_lab.masks import MASKED_PARAMS, fold_prune_masks, make_permanent, set_channel_mask
from backdoor_lab.metrics import attack_counted

__all__ = [
    "MASKED_PARAMS",
    "ChannelActivation",
    "EvalCounts",
    "count_correct",
    "hit_mask",
    "fold_prune_masks",
    "following_batchnorm",
    "make_permanent",
    "kept_channels",
    "mask_channels",
    "masked_modules",
    "move_to_device",
    "prune_schedule",
    "resolve_layer",
    "run_batches",
    "set_channel_mask",
    "split_batch",
]

INPUT_KEYS = ("inputs", "input", "x", "image", "images")
TARGET_KEYS = ("targets", "target", "y", "label", "labels")
TRUE_LABEL_KEYS = ("true_labels", "true_label")


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


def kept_channels(num_channels: int, pruned: Iterable[int]) -> Tensor:
    """The boolean keep-mask (True = kept) of a layer with ``num_channels`` outputs, ``pruned`` masked."""
    keep = torch.ones(num_channels, dtype=torch.bool)
    keep[list(pruned)] = False
    return keep


def mask_channels(model: nn.Module, conv_name: str, pruned: Iterable[int]) -> None:
    """Mask the ``pruned`` output channels of ``conv_name`` (and of the BatchNorm right after it)."""
    modules = [m for _, m in masked_modules(model, conv_name)]
    set_channel_mask(modules, kept_channels(modules[0].out_channels, pruned))


def mask_random_channels(model: nn.Module, conv_name: str, count: int, seed: int = 0) -> list[int]:
    """Mask ``count`` channels of ``conv_name`` drawn at random (seeded): a pruned model of a known shape for
    benchmarks and tests of what comes after pruning (slimming, export), independent of any ranking."""
    generator = torch.Generator().manual_seed(seed)
    channels = dict(model.named_modules())[conv_name].out_channels
    pruned = torch.randperm(channels, generator=generator)[:count].tolist()
    mask_channels(model, conv_name, pruned)
    return pruned


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


def _first_key(batch: dict, keys: Sequence[str]) -> Any:
    return next((batch[k] for k in keys if k in batch), None)


def split_batch(batch: Sequence | dict | Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(inputs, targets[, true_labels])`` from the batch shapes a plain Lightning project yields.

    Tuples and lists are read by position; dicts by key (see ``INPUT_KEYS``, ``TARGET_KEYS``,
    ``TRUE_LABEL_KEYS``). Any other layout needs a ``batch_to_xy`` function of the caller's own.
    """
    if isinstance(batch, dict):
        x, y = _first_key(batch, INPUT_KEYS), _first_key(batch, TARGET_KEYS)
        if x is None or y is None:
            raise ValueError(
                f"cannot read inputs and targets from a dict batch with keys {sorted(batch)}: inputs are read from "
                f"one of {list(INPUT_KEYS)}, targets from one of {list(TARGET_KEYS)} (true labels, optional, from "
                f"{list(TRUE_LABEL_KEYS)}). For other keys pass batch_to_xy=lambda b: (b['my_x'], b['my_y'], None)."
            )
        return x, y, _first_key(batch, TRUE_LABEL_KEYS)
    if isinstance(batch, Tensor):
        return batch, None, None
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    true = batch[2] if len(batch) > 2 else None
    return x, y, true


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on ``device``: the plain-PyTorch batch transfer."""
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def hit_mask(logits: Tensor, targets: Tensor, true_labels: Tensor | None = None) -> Tensor:
    """Per sample: counted (see ``attack_counted``) and argmax == target."""
    return _hits_and_counted(logits, targets, true_labels)[0]


def count_correct(logits: Tensor, targets: Tensor, true_labels: Tensor | None = None) -> tuple[float, float]:
    """(correct, counted) of argmax == target; samples already of the target class are not counted."""
    hits, counted = _hits_and_counted(logits, targets, true_labels)
    return float(hits.sum()), float(counted.sum())


def _hits_and_counted(logits: Tensor, targets: Tensor, true_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    targets = targets.to(logits.device)
    counted = attack_counted(targets, true_labels)
    return counted & (logits.argmax(dim=1) == targets), counted


@torch.no_grad()
def run_batches(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    count_hits: bool = True,
    batch_to_xy: Callable[[Any], tuple[Tensor, Tensor | None, Tensor | None]] = split_batch,
    transfer: Callable[[Any, int], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> EvalCounts:
    """Run ``model`` in eval mode over ``dataloader``; count argmax == target.

    With a third batch element (true labels), samples whose true label equals the target are skipped, so
    the same code gives clean accuracy and attack success rate. ``transfer(batch, dataloader_idx)`` moves a
    batch (default: every tensor to ``device``); ``forward_context`` wraps the forward (precision).
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts()
    transfer = transfer or (lambda batch, _: move_to_device(batch, device))
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x, y, true = batch_to_xy(transfer(batch, 0))
            with forward_context():
                logits = model(x)
            if not count_hits or y is None:
                continue
            correct, total = count_correct(logits, y, true)
            counts.correct += correct
            counts.total += total
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
