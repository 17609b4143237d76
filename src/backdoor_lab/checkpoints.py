"""Finding and loading model checkpoints without unpickling them, with errors that say what is wrong.

A model handed over by someone else is untrusted by definition (the threat model of this field), so
checkpoints are read with ``torch.load(weights_only=True)`` or from safetensors files, never unpickled. A file
that cannot be used gets its own message (missing, a directory, empty, truncated, not a checkpoint, asking to
unpickle a named global, weights that do not fit the model, NaN/inf weights): never torch's advice to retry
with ``weights_only=False``, which would run whatever code the file carries.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from backdoor_lab.masks import fold_prune_masks

log = logging.getLogger(__name__)

RUN_DONE_MARKER = "metrics.json"  # a training run writes it last: its checkpoints are complete
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format
PICKLE_PROTO = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode
SHOWN = 5  # tensor / key names quoted in one message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as this model's weights; the message names the file and why."""


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


def check_checkpoint_file(path: Path) -> None:
    """Missing, a directory, or empty: each its own error, before anything reads the file."""
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a directory; give the model file (e.g. {path / 'model.safetensors'})"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write or copy; copy it again")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a Lightning ``.ckpt``, a ``.pt`` state dict or a ``.safetensors`` file, without pickle.

    The format is read from the file's first bytes (a torch archive named ``.safetensors`` still loads); the
    weights must all be finite.
    """
    path = Path(path)
    check_checkpoint_file(path)
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO):
        state = _read_torch(path, head)
    elif path.suffix == ".safetensors" or _looks_like_safetensors(head):
        state = _read_safetensors(path)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a torch.save file (.ckpt, .pt) nor safetensors "
            f"(it starts with {head[:8]!r})"
        )
    state = fold_prune_masks(dict(state))
    check_finite(path, state)
    return state


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}): truncated, damaged or not safetensors"
        ) from err


def _read_torch(path: Path, head: bytes) -> dict[str, Tensor]:
    size = path.stat().st_size
    if head.startswith(ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is truncated or damaged: a torch.save archive without its end ({size} bytes), as an "
            f"interrupted write or copy leaves it; copy it again or use another checkpoint"
        )
    try:
        # A file object, not the path: torch would pick its loader by the file name, not the content.
        with warnings.catch_warnings(), path.open("rb") as fh:
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the error below says more
            blob = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = refused_global(str(err))
        if wanted is not None:
            raise CheckpointError(
                f"{path} refused: loading it would import {wanted}, which plain weights never need "
                f"(backdoor_lab never unpickles a checkpoint); save the model's state_dict (torch.save("
                f"model.state_dict(), ...)) or save it as safetensors"
            ) from None
        raise CheckpointError(
            f"{path} is not a checkpoint or is damaged: its pickle stream holds what plain weights never do "
            f"({_torch_reason(str(err))})"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path} is truncated or damaged ({type(err).__name__}: {_torch_reason(str(err))}; {size} bytes); "
            f"copy it again or use another checkpoint"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        what = f"a {type(blob).__name__}" if not isinstance(blob, Mapping) else f"keys {_names(list(blob))}"
        raise CheckpointError(f"{path} holds no state_dict of tensors ({what})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} holds no state_dict of tensors: {_names(not_tensors)} are not tensors")
    return dict(state)


def refused_global(message: str) -> str | None:
    """The global (``module.name``) torch's weights-only unpickler refused to import, if that was the reason."""
    found = re.search(r"GLOBAL ([\w.]+?)\.?(?:\s|$)", message)
    return found.group(1) if found else None


def _torch_reason(message: str) -> str:
    """torch's error reduced to its reason: no advice to load with ``weights_only=False``, one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    for line in text.splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and "weights_only" not in line and not line.startswith(("Weights only load failed", "(")):
            return line.split(". This is an internal", 1)[0].rstrip(".")
    return "the file ends early"


def check_finite(path: str | Path, state: Mapping[str, Tensor]) -> None:
    """Refuse NaN/inf weights (a diverged or damaged model), naming the tensors: nothing is measured on them."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): {_names(bad)}; a diverged "
            f"or damaged model is neither measured nor defended"
        )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def load_weights(module: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load a checkpoint into ``module`` strictly; a mismatch names the missing, extra and misshapen keys."""
    state = read_state_dict(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        mismatch = architecture_mismatch(module, state)
        raise CheckpointError(
            f"{path} does not fit the configured model {type(module).__name__} ({mismatch}); "
            f"use the same model settings as its training run"
        ) from err


def architecture_mismatch(module: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Which keys the model lacks, which it does not know, and which differ in shape."""
    expected = fold_prune_masks(module.state_dict())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_names(unexpected)}")
    if misshapen:
        parts.append(f"shape in the checkpoint vs the model: {_names(misshapen)}")
    return "; ".join(parts) or "the model refused the weights"
