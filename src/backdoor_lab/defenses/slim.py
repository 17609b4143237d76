"""Slim export of a fine-pruned model: the pruned channels physically removed, not just zeroed.

Fine-Pruning (Liu et al., RAID 2018) masks output channels of one conv layer to zero; the dense model still
stores and computes them. Here those channels leave the conv, the BatchNorm that follows it and every layer
that reads them (the next conv's input channels, or the input features a Linear reads after a flatten). The
surgery is torch-pruning's ``DependencyGraph`` (Fang et al., CVPR 2023): it traces the forward pass, so it
follows pools, flattens and a map read by two layers (DeepID's pool3 feeds conv4 and ``fc_pool3``) without
model-specific code.

A masked channel is exactly zero, and ReLU and max-pooling keep it zero, so removing it and the weights that
read it leaves the logits unchanged (up to float summation order). Two cases where that fails are refused,
never exported wrong: a channel that is not zero at the layer's output, and a channel coupled to other
layers' outputs (a residual add), which torch-pruning would remove from those layers too.

A slim model no longer fits the stock architecture, so it is saved as ``slim.safetensors`` (its state dict)
beside ``slim.json`` (the layer, the kept channels, the input shape); ``load_slim`` repeats the surgery on a
freshly built stock model and loads the weights strictly. Nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from safetensors.torch import save, save_file
from torch import Tensor, nn

from backdoor_lab.checkpoints import load_weights
from backdoor_lab.defenses.pruning import MASKED_PARAMS, make_permanent, masked_modules, resolve_layer
from backdoor_lab.reporting.files import atomic_path, write_json

__all__ = ["SLIM_META", "SLIM_WEIGHTS", "export_slim", "load_slim", "slim_model"]

SLIM_WEIGHTS = "slim.safetensors"
SLIM_META = "slim.json"
SLIM_FORMAT = "backdoor_lab.slim/1"
LATENCY_WARMUP = 2
LATENCY_REPEATS = 7
# Removing zero terms changes only the order of float sums: differences of ~1e-7 of the logits' scale.
MATCH_RTOL = 1e-5
MATCH_ATOL = 1e-5


def slim_model(model: nn.Module, layer: str, pruned_channels: Sequence[int], example_input: Tensor) -> nn.Module:
    """A copy of ``model`` without ``layer``'s pruned output channels; its logits equal ``model``'s.

    ``model`` may still carry its ``torch.nn.utils.prune`` masks (they are folded in the copy) and is left
    unchanged. ``example_input`` is one batch: it drives the trace and the check that the logits agree.
    Raises ``ValueError`` for a layer that is not a conv of the model or not reached by the forward pass,
    channel indices out of range, repeated or covering the whole layer, channels that are not zero at the
    layer's output, and channels coupled to other layers' outputs (a residual add).
    """
    name, pruned = _checked_request(model, layer, pruned_channels)
    slim = _plain_copy(model)
    was_training = model.training
    slim.eval()
    with torch.no_grad():
        dense_logits = _logits_with_silence_check(slim, name, pruned, example_input)
    _remove_channels(slim, name, pruned, example_input)
    with torch.no_grad():
        slim_logits = slim(example_input)
    scale = max(1.0, float(dense_logits.abs().max()))
    if not torch.allclose(slim_logits, dense_logits, rtol=MATCH_RTOL, atol=MATCH_ATOL * scale):
        diff = float((slim_logits - dense_logits).abs().max())
        raise ValueError(
            f"removing {len(pruned)} channels of {name!r} changed the logits (max difference {diff:.3g}): an "
            f"operation between {name!r} and the layers reading it maps a zero channel to a non-zero value "
            f"(a bias or a norm after it, a sigmoid); only channels that stay zero can be removed"
        )
    return slim.train(was_training)


def export_slim(
    model: nn.Module, layer: str, pruned_channels: Sequence[int], example_input: Tensor, out_dir: str | Path
) -> dict[str, float]:
    """Write ``slim.safetensors`` and ``slim.json`` to ``out_dir``; return size and CPU speed, dense vs slim.

    Latency is the median of a few forward passes of ``example_input`` (one batch) on the CPU, in
    milliseconds; bytes are those of the safetensors file of each model's state dict. ``model`` may sit on any
    device and is left unchanged: the work is done on CPU copies.
    """
    name, pruned = _checked_request(model, layer, pruned_channels)
    dense = _plain_copy(model).cpu()
    example_input = example_input.cpu()
    slim = slim_model(dense, name, pruned, example_input)
    channels = _conv(dense, name).out_channels
    out_dir = Path(out_dir)
    weights_path = out_dir / SLIM_WEIGHTS
    slim_state = _plain_state(slim)
    with atomic_path(weights_path, overwrite=False) as tmp:
        save_file(slim_state, str(tmp))
    report = {
        "params_dense": _count_params(dense),
        "params_slim": _count_params(slim),
        "bytes_dense": len(save(_plain_state(dense))),
        "bytes_slim": weights_path.stat().st_size,
        "latency_ms_dense": cpu_latency_ms(dense, example_input),
        "latency_ms_slim": cpu_latency_ms(slim, example_input),
    }
    meta = {
        "format": SLIM_FORMAT,
        "model": type(model).__name__,
        "layer": name,
        "channels": channels,
        "kept_channels": sorted(set(range(channels)) - set(pruned)),
        "pruned_channels": pruned,
        "input_shape": list(example_input.shape[1:]),
        "input_dtype": str(example_input.dtype).removeprefix("torch."),
        "params_dense": report["params_dense"],
        "params_slim": report["params_slim"],
    }
    write_json(out_dir / SLIM_META, meta)
    return report


def load_slim(dense_model: nn.Module, path: str | Path) -> nn.Module:
    """Turn a freshly built stock model into the slim model saved at ``path`` (its folder or its weights file).

    The surgery recorded in ``slim.json`` is repeated on ``dense_model`` (in place, and returned), then the
    weights are loaded strictly from ``slim.safetensors``: a model of another architecture fails with the
    keys and shapes that differ.
    """
    path = Path(path)
    weights_path = path / SLIM_WEIGHTS if path.is_dir() else path
    meta_path = weights_path.with_name(SLIM_META)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: a slim model is {SLIM_WEIGHTS} with {SLIM_META} beside it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != SLIM_FORMAT:
        raise ValueError(f"{meta_path} is not a slim-model description of format {SLIM_FORMAT!r}")
    name, conv = resolve_layer(dense_model, meta["layer"])
    if conv.out_channels != meta["channels"]:
        raise ValueError(
            f"{name!r} of {type(dense_model).__name__} has {conv.out_channels} output channels, the slim model "
            f"was cut from one with {meta['channels']}: build the model with the settings it was trained with"
        )
    kept = set(meta["kept_channels"])
    pruned = [c for c in range(meta["channels"]) if c not in kept]
    _fold_masks(dense_model)
    was_training = dense_model.training
    device = next(dense_model.parameters()).device
    example = torch.zeros((1, *meta["input_shape"]), dtype=getattr(torch, meta["input_dtype"]), device=device)
    _remove_channels(dense_model, name, pruned, example)
    load_weights(dense_model, weights_path)
    return dense_model.train(was_training)


def cpu_latency_ms(model: nn.Module, batch: Tensor) -> float:
    """Median wall time of a forward pass of ``batch`` on the CPU, in milliseconds (``model`` is left there, in
    eval mode)."""
    model = model.cpu().eval()
    batch = batch.cpu()
    times = []
    with torch.inference_mode():
        for i in range(LATENCY_WARMUP + LATENCY_REPEATS):
            start = time.perf_counter()
            model(batch)
            if i >= LATENCY_WARMUP:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- the surgery
def _checked_request(model: nn.Module, layer: str, pruned_channels: Sequence[int]) -> tuple[str, list[int]]:
    """The conv's name and the channel indices as sorted ints; a clear error for anything unusable."""
    name, conv = resolve_layer(model, layer)
    channels = [int(c) for c in pruned_channels]
    outside = [c for c in channels if not 0 <= c < conv.out_channels]
    if outside:
        raise ValueError(
            f"pruned channel indices {outside} are out of range for {name!r}, which has {conv.out_channels} "
            f"output channels (valid: 0..{conv.out_channels - 1})"
        )
    if len(set(channels)) != len(channels):
        repeated = sorted({c for c in channels if channels.count(c) > 1})
        raise ValueError(f"pruned channel indices {repeated} of {name!r} are given more than once")
    if len(channels) == conv.out_channels:
        raise ValueError(f"all {conv.out_channels} channels of {name!r} are pruned: nothing would be left")
    return name, sorted(channels)


def _conv(model: nn.Module, name: str) -> nn.Conv2d:
    return dict(model.named_modules())[name]


def _fold_masks(model: nn.Module) -> None:
    """Fold every ``torch.nn.utils.prune`` mask into plain weights: torch-pruning replaces ``weight`` itself."""
    make_permanent([m for m in model.modules() if any(hasattr(m, p + "_mask") for p in MASKED_PARAMS)])


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with the masks folded; ``model`` itself keeps its masks."""
    # A masked ``weight`` computed under autograd is a non-leaf tensor, which deepcopy refuses; the copy gets
    # a detached clone (prune.remove recomputes it from ``weight_orig`` and the mask anyway).
    memo: dict[int, Any] = {}
    for module in model.modules():
        for param in MASKED_PARAMS:
            masked = getattr(module, param, None) if hasattr(module, param + "_mask") else None
            if isinstance(masked, Tensor) and not masked.is_leaf:
                memo[id(masked)] = masked.detach().clone()
    plain = copy.deepcopy(model, memo)
    _fold_masks(plain)
    return plain


def _logits_with_silence_check(model: nn.Module, name: str, pruned: list[int], x: Tensor) -> Tensor:
    """``model(x)``, checking that the pruned channels are zero where the masked modules end (conv or its BN)."""
    last_name, last = masked_modules(model, name)[-1]
    seen: list[Tensor] = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()[:, pruned]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"layer {name!r} is not reached by the forward pass of {type(model).__name__}")
    alive = [c for c, nonzero in zip(pruned, seen[0].flatten(2).abs().amax(dim=(0, 2)) > 0, strict=True) if nonzero]
    if alive:
        raise ValueError(
            f"channels {alive} of {name!r} are listed as pruned but are not zero at the output of {last_name!r}: "
            f"mask them first (set_channel_mask on masked_modules(model, {name!r})) or list only the masked channels"
        )
    return logits


def _remove_channels(model: nn.Module, name: str, pruned: list[int], example_input: Tensor) -> None:
    """Remove ``pruned`` output channels of conv ``name`` and their readers, in place (torch-pruning)."""
    if not pruned:
        return
    conv = _conv(model, name)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # Traced through autograd, on one sample: the same trace as ``load_slim``'s, and cheap for a big batch.
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input[:1], verbose=False)
    if conv not in graph.module2node:
        raise ValueError(f"layer {name!r} is not reached by the forward pass of {type(model).__name__}")
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=pruned)
    allowed = {id(m) for _, m in masked_modules(model, name)}
    names = {id(m): n for n, m in model.named_modules()}
    coupled = [
        names.get(id(dep.target.module), str(dep.target))
        for dep, _ in group.items
        if graph.is_out_channel_pruning_fn(dep.handler)
        and _has_weights(dep.target.module)
        and id(dep.target.module) not in allowed
    ]
    if coupled:
        raise ValueError(
            f"the channels of {name!r} are coupled to the outputs of {sorted(set(coupled))} (a residual add or a "
            f"concatenation): removing them would remove live channels of those layers too"
        )
    group.prune()
    for param_name, param in model.named_parameters():  # torch-pruning makes new Parameters
        param.requires_grad_(requires_grad[param_name])


def _has_weights(module: Any) -> bool:
    if isinstance(module, nn.Parameter):
        return True
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
