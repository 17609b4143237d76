"""Clean data of one task, as the attack and the DataModule see it.

Every task (traffic signs, speech, faces; built-in or real) is a ``DataSource`` that returns three
disjoint ``RawSplit`` objects: ``train`` (the trainer's, later poisoned), ``val`` (the defender's clean
data) and ``test``. Samples stay in their raw domain (uint8 HWC images, float32 waveforms) so that a
trigger is applied where a real attacker would apply it, before any feature transform. The built-in
sources render their data and the real ones read it from disk; both are ``CachedSource`` subclasses, which
build the splits once and keep them in one ``.npz`` file named by a hash of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from backdoor_lab.reporting.files import atomic_path
from backdoor_lab.splits import SPLITS as SPLITS  # re-exported: the split names
from backdoor_lab.splits import RawSplit as RawSplit  # re-exported for callers of the old home

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/backdoor_lab"
CHECKSUM_KEY = "__sha256__"  # the cache file's checksum of its other arrays


@runtime_checkable
class DataSource(Protocol):
    """A task's clean data: class names, three disjoint splits, and the transform to model inputs."""

    name: str

    @property
    def class_names(self) -> list[str]: ...

    def load(self) -> dict[str, RawSplit]:
        """Return ``{"train", "val", "test"}`` splits, disjoint by ``sample_ids``."""
        ...

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        """Turn a batch of raw samples into model inputs (float32, N x C x H x W)."""
        ...


class CachedSource(ABC):
    """A ``DataSource`` whose splits are built once and kept in ``<cache_dir>/<name>-<digest>.npz``.

    A subclass says what its splits depend on (``cache_key``) and how to make them (``build``), besides the
    ``DataSource`` members; ``load`` reads the cache file of that key when it exists and otherwise builds and
    stores it. ``cache_dir=None`` builds on every call and writes nothing.
    """

    name: str
    cache_dir: str | os.PathLike | None

    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    @abstractmethod
    def cache_key(self) -> dict:
        """Every setting (and, for data on disk, the file listing) the splits depend on; names the cache file."""

    @abstractmethod
    def build(self) -> dict[str, RawSplit]:
        """Make the three splits without the cache."""

    @abstractmethod
    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor: ...

    def load(self) -> dict[str, RawSplit]:
        """The ``train``, ``val`` and ``test`` splits, from the cache when it holds them."""
        if self.cache_dir is None:
            return self.build()
        return cached_splits(self.cache_dir, self.name, self.cache_key(), self.build)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, holdout) with ``fraction`` of every class held out, chosen by ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_hold = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def config_digest(params: dict) -> str:
    """A short stable hash of generator parameters, used to name cache files."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_listing_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """Hash of every file's path (relative to ``root``) and size: the cache key of a real data set on disk.

    A file added, removed, renamed or replaced by one of another size changes the key, so a cache built
    from an earlier copy of the data set is never read back for a changed one.
    """
    root = Path(root)
    listing = hashlib.sha256()
    for path in paths:
        path = Path(path)
        listing.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return listing.hexdigest()


def cached_splits(
    cache_dir: str | os.PathLike, stem: str, params: dict, build: Callable[[], dict[str, RawSplit]]
) -> dict[str, RawSplit]:
    """Load splits from ``<cache_dir>/<stem>-<digest>.npz`` or build and store them atomically.

    The digest covers every generator parameter, so a changed setting never reads a stale cache. The file holds
    a SHA-256 of its arrays: a damaged, truncated or foreign file is named in one warning and rebuilt. It is
    written to a temporary file and renamed, so a reader (another run at the same time) never sees half a file;
    a cache folder that cannot be written (read-only, full disk) costs a warning, not the run.
    """
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"{stem}-{config_digest(params)}.npz"
    if path.exists():
        arrays = read_cache_file(path)
        if arrays is not None:
            return _unpack(arrays)
    splits = build()
    write_cache_file(path, _pack(splits))
    return splits


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes (the cache file's checksum)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.reshape(-1).view(np.uint8))  # the bytes, without a copy (an empty array too)
    return digest.hexdigest()


def read_cache_file(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file whose checksum holds; None (after one warning naming it) for any other file."""
    try:
        with np.load(path, allow_pickle=False) as blob:
            arrays = {key: blob[key] for key in blob.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        reason = f"unreadable: {type(err).__name__}: {err}"
    else:
        stored = arrays.pop(CHECKSUM_KEY, None)
        if stored is None:
            reason = "it holds no checksum (an older or foreign file)"
        elif str(stored) != arrays_digest(arrays):
            reason = "its checksum does not match its content"
        else:
            return arrays
    log.warning("Data cache %s is damaged (%s): rebuilding it", path, reason)
    return None


def write_cache_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays and their checksum atomically (with the user's umask); warn if the folder refuses."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays, **{CHECKSUM_KEY: np.array(arrays_digest(arrays))})
    except OSError as err:
        log.warning("Cannot write the data cache %s (%s): this run uses the data from memory", path, err)


def _pack(splits: dict[str, RawSplit]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for split, data in splits.items():
        for field in ("inputs", "labels", "sample_ids", "regions", "groups"):
            value = getattr(data, field)
            if value is not None:
                out[f"{split}/{field}"] = value
    return out


def _unpack(arrays: dict[str, np.ndarray]) -> dict[str, RawSplit]:
    splits: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        split, field = key.split("/")
        splits.setdefault(split, {})[field] = value
    return {split: RawSplit(**fields) for split, fields in splits.items()}


def images_to_tensor(images: np.ndarray, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> normalized float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean).div_(std)


def check_scale(scale: float) -> float:
    """A source's ``scale`` (shrinks or grows its sample counts), checked: a positive number."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"data.source.scale must be a positive number (1.0 = the documented size), got {scale!r}")
    return float(scale)


def scaled(count: int, scale: float) -> int:
    """``count`` times ``scale``, rounded, at least 1."""
    return max(1, int(round(count * scale)))
