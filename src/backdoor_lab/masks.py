"""Channel masks on top of ``torch.nn.utils.prune``, and the plain-weight form that checkpoints carry.

A low layer with no knowledge of any defense: ``checkpoints`` (reading weights) and ``defenses`` (pruning) both
use it. A masked module holds ``weight_orig`` and ``weight_mask``; everything written to disk holds the plain
product ``weight`` instead, so any copy of the network, pruned or not, loads it. A masked module also accepts
such plain weights (a ``load_state_dict`` pre-hook maps them back), so ``trainer.test(ckpt_path=...)`` works on
the live pruned model as well as on a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

MASKED_PARAMS = ("weight", "bias")
_HOOK_ATTR = "_plain_weight_load_hook"


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


def _accept_plain_weights(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a plain ``weight`` fills ``weight_orig``; the module's mask stays.

    The live model stays pruned when a checkpoint (which holds plain weights, masked channels zero) is loaded
    into it: loading changes the weights, never which channels are pruned.
    """
    for param in MASKED_PARAMS:
        mask = getattr(module, param + "_mask", None)
        plain, orig = prefix + param, prefix + param + "_orig"
        if mask is None or plain not in state or orig in state:
            continue
        state[orig] = state.pop(plain)
        state.setdefault(prefix + param + "_mask", mask.detach().clone())


def set_channel_mask(modules: Iterable[nn.Module], keep: Tensor) -> None:
    """Mask output channels where ``keep`` is False on every module's weight and bias.

    The first call installs ``torch.nn.utils.prune`` reparametrizations (and the plain-weight load hook); later
    calls overwrite the masks in place, so a rollback to an earlier mask is exact and cheap.
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
        if not hasattr(module, _HOOK_ATTR):
            setattr(module, _HOOK_ATTR, module.register_load_state_dict_pre_hook(_accept_plain_weights))


def make_permanent(modules: Iterable[nn.Module]) -> None:
    """Fold the masks into the weights (``prune.remove``) for export; masked channels stay zero."""
    for module in modules:
        for param in MASKED_PARAMS:
            if hasattr(module, param + "_mask"):
                prune.remove(module, param)
        handle = getattr(module, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTR)
