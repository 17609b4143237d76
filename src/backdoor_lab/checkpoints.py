"""Finding and loading model checkpoints without unpickling them.

A model handed over by someone else is untrusted by definition (the threat model of this field), so
checkpoints are read with ``torch.load(weights_only=True)`` or from safetensors files, never unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from backdoor_lab.masks import fold_prune_masks

log = logging.getLogger(__name__)

RUN_DONE_MARKER = "metrics.json"  # a training run writes it last: its checkpoints are complete


def newest_checkpoint(train_dir: str | Path, name: str = "last.ckpt") -> Path:
    """The newest ``checkpoints/<name>`` of a finished run under ``train_dir`` (searched recursively)."""
    train_dir = Path(train_dir)
    found = [p for p in train_dir.glob(f"**/checkpoints/{name}") if (p.parent.parent / RUN_DONE_MARKER).exists()]
    if not found:
        raise FileNotFoundError(
            f"no finished training run with checkpoints/{name} under {train_dir}; run train.py with the same "
            f"data and attack first, or pass ckpt_path=/path/to/model.ckpt"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a Lightning ``.ckpt``, a ``.pt`` state dict or a ``.safetensors`` file, without pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is the same user error
        raise ValueError(
            f"{path} cannot be read as plain weights (weights_only=True refused it: {err}). backdoor_lab never "
            f"unpickles a checkpoint; export its state_dict or save it as safetensors."
        ) from err
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors")
    return fold_prune_masks(dict(state))


def load_weights(module: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load a checkpoint into ``module`` strictly; a shape or key mismatch names the checkpoint."""
    state = read_state_dict(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not fit the configured model {type(module).__name__}: use the same model settings "
            f"as the training run.\n{err}"
        ) from err
