"""``FinePruner``'s evaluation through the cut: the cached pass, its check against the whole network, the tail.

``FinePruner`` (``pruner.py``) holds the protocol: rank, curve, stop rule, mask, export. This room holds how the
curve is evaluated cheaply: the network is split at the pruned layer (``network_split``), one pass caches what
crosses the cut, and each mask re-runs only the tail (or subtracts a channel's term from the running sums of the
layers that read the cut, ``curve_cache``). Before the curve the split is checked against the whole network; where
it differs, or cannot be made, the curve falls back to full re-evaluation with one warning.

``CutEvaluation`` is a mixin of ``FinePruner``: it reads the pruner's ``model``, ``modules``, ``num_channels``,
``forward_context``, ``pruning_order()`` and its passes, and sets ``split``, ``incremental`` and the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor, nn

from backdoor_lab.defenses.curve_cache import SUMS_TOLERANCE, CachedBatch, CurveCache, RunningSums
from backdoor_lab.defenses.network_split import NetworkSplit
from backdoor_lab.defenses.pruning import kept_channels, set_channel_mask

log = logging.getLogger(__name__)


def _package_dir(name: str) -> str | None:
    """Where an installed package lives, found without importing it (plain-PyTorch users need no Lightning)."""
    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).resolve().parent) if spec is not None and spec.origin else None


# Frames in these folders are not where a warning belongs (see ``outside_stacklevel``): this package, torch's
# decorators, and Lightning's loops between a user's ``trainer.fit(...)`` and the callback.
_INSIDE = tuple(
    d + os.sep
    for d in (str(Path(__file__).resolve().parents[1]), _package_dir("torch"), _package_dir("lightning"))
    if d
)

# The cut is checked against the whole network on this many samples of the first clean batch (three forwards).
CHECK_SAMPLES = 16


@dataclass
class LoaderPass:
    """One loader's pass. On the cached path its answers are ``hits``, a slice of the shared ``CurveCache``."""

    loader: Iterable
    dataloader_idx: int
    batches: list[CachedBatch] = field(default_factory=list)
    first_inputs: Tensor | None = None
    hits: Tensor | None = None  # per sample: counted and argmax == target, current mask

    @property
    def correct(self) -> float:
        if self.hits is not None:
            return float(self.hits.sum())
        return sum(b.correct for b in self.batches)

    @property
    def total(self) -> float:
        return sum(b.total for b in self.batches)


def outside_stacklevel(frame: FrameType) -> int:
    """The ``stacklevel`` that points a warning raised from ``frame`` at the first frame outside this package,
    torch's decorators (``rank`` runs under ``torch.no_grad()``) and Lightning: the user's call (``rank`` or
    ``trainer.fit``), whatever depth inside it warns."""
    level = 1  # ``frame`` itself, the one that calls ``warnings.warn``
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


class CutEvaluation:
    """The cached prune curve's machinery, mixed into ``FinePruner`` (its attributes are documented there)."""

    model: nn.Module
    modules: list[nn.Module]
    num_channels: int
    forward_context: Callable[[], AbstractContextManager]
    split: NetworkSplit | None
    incremental: bool
    _clean: LoaderPass | None
    _triggered: LoaderPass | None
    _cache: CurveCache | None
    pruning_order: Callable[[], list[int]]

    def _exact_enough(self, crossing: tuple) -> bool:
        """Running sums stand in for the readers only in full precision (not under autocast or in bf16/fp16),
        and when every value crossing the cut is a per-sample tensor."""
        cut = crossing[self.split.cut]
        per_sample = all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == cut.shape[0] for v in crossing)
        full = cut.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(cut.device.type)
        return per_sample and full

    def _tail_and_readers(self, crossing: tuple) -> tuple[Tensor, list[Tensor] | None]:
        """The tail's logits and, for the running sums, each linear reader's output as the tail computed it."""
        if not self.incremental:
            return self.split.tail(*crossing), None
        outputs: list[list[Tensor]] = [[] for _ in self.split.readers]
        hooks = [  # copies: the layers after a reader may work on its output in place (ReLU(inplace=True))
            reader.module.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.detach().clone()))
            for reader, seen in zip(self.split.readers, outputs, strict=True)
        ]
        try:
            logits = self.split.tail(*crossing)
        finally:
            for hook in hooks:
                hook.remove()
        if any(len(seen) != 1 for seen in outputs):  # a reader's module is also called elsewhere in the tail
            log.info("FinePruner: a layer reading %s runs more than once; re-running it", self.split.cut_name)
            self.incremental = False
            return logits, None
        return logits, [seen[0] for seen in outputs]

    def _gather(self, passes: list[LoaderPass]) -> CurveCache | None:
        """One per-sample state over ``passes``; each pass's ``hits`` a view of it."""
        batches = [b for data in passes for b in data.batches]
        if not batches:
            return None
        if self.incremental and any(b.outputs is None for b in batches):  # a later batch turned the sums off
            self.incremental = False
        readers = self.split.readers if self.incremental else None
        cache = CurveCache.gather(batches, readers, self.split.cut)
        offset = 0
        for data in passes:
            size = sum(len(b.targets) for b in data.batches)
            data.hits = cache.hits[offset : offset + size]
            offset += size
        return cache

    def _fall_back(self, reason: str) -> None:
        warnings.warn(
            f"FinePruner: the prune curve re-evaluates the whole network at every step ({reason})",
            RuntimeWarning,
            stacklevel=outside_stacklevel(sys._getframe()),
        )
        self.split = None

    def _verify_split(self) -> None:
        """The cut must give exactly the whole network's logits, unmasked and with half the channels masked.

        Checked on ``CHECK_SAMPLES`` of the first batch; the running sums must agree to ``SUMS_TOLERANCE``.
        """
        if not self._clean.batches:  # nothing to check here; the processes that hold batches vote
            return
        half = self.pruning_order()[: self.num_channels // 2]
        keep = kept_channels(self.num_channels, half)
        everything = torch.ones(self.num_channels, dtype=torch.bool)
        x = self._clean.first_inputs[:CHECK_SAMPLES]
        was_training = self.model.training
        self.model.eval()
        try:
            with self.forward_context():
                set_channel_mask(self.modules, keep)
                whole_masked = self.model(x)
                set_channel_mask(self.modules, everything)
                whole = self.model(x)
                crossing = self.split.head(x)
                cut_masked = self._masked_tail(crossing, keep)
                cut = self._masked_tail(crossing, everything)
                if self.incremental:
                    value = crossing[self.split.cut]
                    others = [v for i, v in enumerate(crossing) if i != self.split.cut]
                    readers = self._cache.sums.readers  # their channel maps, built once for this pass
                    sums = RunningSums(readers, value, others, [r.output(value) for r in readers])
                    sums.subtract(half)
                    summed = sums.logits(self.split.rest)
        finally:
            self.model.train(was_training)
        if not (torch.equal(whole, cut) and torch.equal(whole_masked, cut_masked)):
            self._drop_cache()
            self._fall_back(f"the split at {self.split.cut_name} does not give the whole network's logits")
        elif self.incremental:
            tolerance = SUMS_TOLERANCE * float(whole_masked.abs().max())
            if not torch.allclose(summed, whole_masked, rtol=0, atol=tolerance):
                log.info("FinePruner: running sums disagree with the network; re-running %s", self.split.cut_name)
                self.incremental = False
                if self._cache is not None:
                    self._cache.sums = None

    def _drop_cache(self) -> None:
        self._cache = None
        for data in (self._clean, self._triggered):
            for b in data.batches if data else []:
                b.crossing = b.buffer = b.hits = b.active = b.outputs = None
            if data is not None:
                data.hits = None

    def _masked_tail(self, crossing: tuple, keep: Tensor, out: Tensor | None = None) -> Tensor:
        # Other values crossing the cut (skip connections) are copied: the tail may work on them in place.
        values = [v.clone() if isinstance(v, Tensor) and i != self.split.cut else v for i, v in enumerate(crossing)]
        cut = crossing[self.split.cut]
        mask = keep.to(cut.device, cut.dtype).view(1, -1, *([1] * (cut.dim() - 2)))
        values[self.split.cut] = torch.mul(cut, mask, out=out)
        return self.split.tail(*values)

    def _tail(self, batch: CachedBatch, keep: Tensor) -> Tensor:
        # The masked map is written into a buffer kept per batch: fresh allocations dominate the tail's cost on CPU.
        if batch.buffer is None:
            batch.buffer = torch.empty_like(batch.crossing[self.split.cut])
        return self._masked_tail(batch.crossing, keep, out=batch.buffer)
