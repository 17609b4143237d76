"""One split of raw samples: the unit of data that sources, attacks and the DataModule pass around.

The lowest layer of the package (numpy only), so that data sources and attacks both build on it without
one importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class RawSplit:
    """One split of raw samples.

    Attributes:
        inputs: raw samples, ``uint8`` (N, H, W, C) images or ``float32`` (N, T) waveforms.
        labels: ``int64`` (N,) class indices.
        regions: optional ``float32`` (N, 4) boxes ``(x0, y0, x1, y1)`` in pixels that anchor a trigger
            (the sign's box for a sticker, the eye band for sunglasses).
        groups: optional ``int64`` (N,) group ids (speaker, voice, identity session) for group-disjoint splits.
        sample_ids: ``int64`` (N,) ids unique across the splits of one source; they make disjointness testable.
    """

    inputs: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    regions: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.inputs)
        for name in ("labels", "sample_ids", "regions", "groups"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"RawSplit.{name} has {len(value)} rows but inputs has {n}")

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, index: np.ndarray) -> RawSplit:
        """The rows at ``index``, every field kept aligned."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return RawSplit(
            inputs=self.inputs[index],
            labels=self.labels[index],
            sample_ids=self.sample_ids[index],
            regions=pick(self.regions),
            groups=pick(self.groups),
        )
