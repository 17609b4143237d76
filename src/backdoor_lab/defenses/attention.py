"""Attention maps and feature capture: what NAD distils, read from named layers with forward hooks.

``attention_map`` is attention transfer's map (Zagoruyko & Komodakis): the mean over channels of ``|f|^p``,
flattened and L2-normalized per sample; ``attention_loss`` is NAD's beta-weighted sum of the maps' mean squared
distances. ``captured_features`` reads one output per named layer during a forward, and ``check_layers`` answers a
wrong layer name with the model's feature-map modules. Kept apart from ``nad.py`` (the callback and the plug-in)
so that any attention-based defense can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Modules that give feature maps: what an unknown layer name is answered with.
_FEATURE_MAP_KINDS = (
    "torch.nn.modules.conv",
    "torch.nn.modules.activation",
    "torch.nn.modules.pooling",
    "torch.nn.modules.batchnorm",
)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """NAD's attention map of a (N, C, ...) feature map: mean over channels of ``|f|^p``, flattened, L2-normalized.

    Normalizing per sample makes the map a spatial distribution of where the layer responds, independent of the
    layer's scale, which is what NAD aligns (low-precision features are promoted to float32 for the norm).
    """
    if features.dim() < 3:
        raise ValueError(
            f"attention_map needs a (N, C, H, W) feature map, got shape {tuple(features.shape)}: "
            "NAD distils spatial attention, so name a convolutional stage, not a linear layer"
        )
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], betas: Sequence[float], p: float = 2.0
) -> Tensor:
    """``sum_i beta_i * mean((A(s_i) - A(t_i))^2)``: NAD's distillation term (teacher features detached)."""
    if not len(student_feats) == len(teacher_feats) == len(betas):
        raise ValueError(
            f"attention_loss needs one student map, teacher map and beta per layer: "
            f"{len(student_feats)}, {len(teacher_feats)}, {len(betas)}"
        )
    terms = [beta * layer_distance(s, t, p) for s, t, beta in zip(student_feats, teacher_feats, betas, strict=True)]
    return torch.stack(terms).sum()


def layer_distance(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Unweighted attention distance of one layer: ``mean((A(student) - A(teacher))^2)``."""
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean()


def feature_map_modules(model: nn.Module) -> list[str]:
    """Names of the modules that give feature maps (convs, activations, pooling, BatchNorm): the candidates."""
    return [n for n, m in model.named_modules() if n and type(m).__module__ in _FEATURE_MAP_KINDS]


def check_layers(model: nn.Module, layers: Sequence[str], what: str = "layers", error: type = ValueError) -> None:
    """Every name in ``layers`` is a module of ``model``; else one line listing its feature-map modules."""
    names = dict(model.named_modules())
    missing = [name for name in layers if name not in names]
    if missing:
        raise error(
            f"{what} {missing} {'is' if len(missing) == 1 else 'are'} not in {type(model).__name__}; "
            f"its feature-map modules (conv, activation, pooling, BatchNorm) are: {feature_map_modules(model)}"
        )


@contextmanager
def captured_features(model: nn.Module, layers: Sequence[str]) -> Iterator[Callable[[], list[Tensor]]]:
    """Forward hooks on ``layers`` of ``model`` while the block runs; yields a getter of one output per layer.

    The getter refuses a layer that ran other than once (a module shared by several stages, or a forward that
    skipped it): its attention map would be ambiguous.
    """
    modules = dict(model.named_modules())
    outputs: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs[name].append(output)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]

    def get() -> list[Tensor]:
        for name, seen in outputs.items():
            if len(seen) != 1:
                raise RuntimeError(
                    f"NAD layer {name!r} ran {len(seen)} times in one forward of {type(model).__name__}; name a "
                    "module that runs exactly once per forward (a ReLU module shared by several stages cannot be "
                    "told apart: name the convs instead)"
                )
            if not isinstance(seen[0], Tensor):
                raise RuntimeError(f"NAD layer {name!r} returns a {type(seen[0]).__name__}, not a feature map tensor")
        return [outputs[name][0] for name in layers]

    try:
        yield get
    finally:
        for handle in handles:
            handle.remove()
