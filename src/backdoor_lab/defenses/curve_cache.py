"""The prune curve's per-sample state: each cached sample's answer under the current mask, one update per mask.

``FinePruner.rank`` keeps, for every sample of the clean and triggered passes, what crosses the cut (the values
the layers after the pruned conv read), which channels are non-zero there, and whether the sample is answered
right. Masking more channels moves only the samples in which they are non-zero; the others keep their answer
(same input, same answer).

Where the layers reading the cut are linear in it (``NetworkSplit.readers``), their outputs are kept as float64
running sums (``RunningSums``): a pruned channel subtracts its term, and only ``NetworkSplit.rest`` runs again.
The answers then equal the whole network's up to float32 rounding; a sample whose two best classes lie closer
than ``NEAR_TIE`` sends its batch through the exact tail (the cached layers, computed as the whole network
computes them), so the counts are those of full re-evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from backdoor_lab.defenses.network_split import LinearReader
from backdoor_lab.metrics import attack_counted

# The running sums must give the whole network's logits to this fraction of their largest |logit| (checked on
# the first batch; float32 rounding makes them differ by ~2e-7 of it on the built-in networks).
SUMS_TOLERANCE = 5e-6
# A sample whose top-2 logit margin is below this fraction of its largest |logit| could answer differently from
# the whole network: it is decided by the exact tail.
NEAR_TIE = 2 * SUMS_TOLERANCE


@dataclass
class CachedBatch:
    """One batch of a pass: what crosses the cut, labels, and its correct count (full re-evaluation)."""

    crossing: tuple | None
    targets: Tensor
    true_labels: Tensor | None
    correct: float
    total: float
    hits: Tensor | None = None  # per sample, until gathered into the cache
    active: Tensor | None = None  # (samples, channels): any non-zero value at the cut, until gathered
    outputs: list[Tensor] | None = None  # the linear readers' outputs (running sums only), until gathered
    buffer: Tensor | None = None  # the masked cut, for the exact tail


def near_ties(logits: Tensor, best: Tensor | None = None) -> Tensor:
    """Per sample: the two best classes closer than ``NEAR_TIE`` of the largest |logit| (``best``: each row's max)."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    best = logits.amax(dim=1, keepdim=True) if best is None else best.unsqueeze(1)
    tolerance = NEAR_TIE * torch.maximum(best, -logits.amin(dim=1, keepdim=True))
    return (logits >= best - tolerance).sum(dim=1) >= 2  # the best, and another within the tolerance of it


class RunningSums:
    """The outputs of the split's linear readers as float64 running sums (flattened per sample), current mask.

    ``cut``: the cut values (samples, channels, ...); ``others``: the other values crossing the cut; ``outputs``:
    each reader's output, unmasked, exactly as the network computed it (the sums start from it). ``readers`` keep
    the per-channel maps they build: give fresh ones for weights that may have changed.
    """

    def __init__(self, readers: list[LinearReader], cut: Tensor, others: list[Tensor], outputs: list[Tensor]):
        self.dtype = cut.dtype
        self.by_channel = cut.double().transpose(0, 1).contiguous()  # a channel's values, one block
        self.others = others
        self.readers = readers
        self.shapes = [o.shape[1:] for o in outputs]
        self.sums = [o.double().reshape(len(o), -1).contiguous() for o in outputs]
        # the rest's inputs for every sample: written in place each mask (a fresh ~MB tensor per mask costs more
        # on CPU than the copy into it)
        self.buffers = [torch.empty(s.shape, dtype=self.dtype, device=s.device) for s in self.sums]

    def subtract(self, channels: list[int], rows: Tensor | None = None) -> None:
        """Mask ``channels``: in every sample's sums, or only in ``rows``."""
        part = self.by_channel[channels[0] : channels[0] + 1] if len(channels) == 1 else self.by_channel[channels]
        if rows is not None:
            part = part[:, rows]
        for total, reader in zip(self.sums, self.readers, strict=True):
            reader.subtract(total, part.transpose(0, 1), channels, rows)

    def logits(self, rest: fx.GraphModule, rows: Tensor | None = None) -> Tensor:
        """The network's answers from the sums (every sample, or ``rows``), in the network's dtype."""
        others = [v.clone() if rows is None else v[rows] for v in self.others]  # the rest may work in place
        if rows is None:
            outputs = [buffer.copy_(s) for buffer, s in zip(self.buffers, self.sums, strict=True)]
        else:
            outputs = [s[rows].to(self.dtype) for s in self.sums]
        return rest(*others, *[out.view(-1, *shape) for out, shape in zip(outputs, self.shapes, strict=True)])


@dataclass
class CurveCache:
    """Per-sample state of every cached pass at once (clean, then triggered): one update per mask for all."""

    batches: list[tuple[CachedBatch, int]]  # each batch and the index of its first sample
    hits: Tensor  # per sample: counted and argmax == target, current mask
    active: Tensor  # (channels, samples): the channel is non-zero somewhere in the sample's cut
    targets: Tensor
    counted: Tensor
    sums: RunningSums | None = None

    @classmethod
    def gather(cls, batches: list[CachedBatch], readers: list[LinearReader] | None, cut_index: int) -> CurveCache:
        """One state over ``batches`` (their per-sample tensors move into it); running sums when ``readers``."""
        device = batches[0].hits.device
        starts = [0]
        for b in batches:
            starts.append(starts[-1] + len(b.targets))
        cache = cls(
            batches=list(zip(batches, starts, strict=False)),
            hits=torch.cat([b.hits for b in batches]),
            active=torch.cat([b.active for b in batches]).T.contiguous(),
            targets=torch.cat([b.targets.to(device) for b in batches]),
            counted=torch.cat([attack_counted(b.targets.to(device), b.true_labels) for b in batches]),
        )
        if readers is not None:
            values = range(len(batches[0].crossing))
            cache.sums = RunningSums(
                [LinearReader(r.module) for r in readers],  # maps of the weights as they are at this pass
                torch.cat([b.crossing[cut_index] for b in batches]),
                [torch.cat([b.crossing[i] for b in batches]) for i in values if i != cut_index],
                [torch.cat([b.outputs[i] for b in batches]) for i in range(len(readers))],
            )
        for b in batches:
            b.hits = b.active = b.outputs = None
        return cache

    def advance(
        self, newly: list[int], rest: fx.GraphModule | None, exact_tail: Callable[[CachedBatch], Tensor]
    ) -> int:
        """New answers of the samples whose input to the tail moved when ``newly`` were masked.

        ``exact_tail(batch)``: the batch's hits under the new mask, computed as the whole network computes them.
        Returns how many batches went through it.
        """
        # the other samples: same input, same answer
        moved = self.active[newly[0]] if len(newly) == 1 else self.active[newly].any(dim=0)
        count = int(moved.sum())
        if not count:
            return 0
        exact = moved
        if self.sums is not None:
            # Few moved samples: update those rows only; many: all rows (an unmoved row's sums subtract exact zeros).
            rows = None if 2 * count > len(moved) else moved.nonzero().squeeze(1)
            self.sums.subtract(newly, rows)
            logits = self.sums.logits(rest, rows)
            best, answers = logits.max(dim=1)
            if rows is None:
                torch.logical_and(self.counted, answers == self.targets, out=self.hits)
            else:
                self.hits[rows] = self.counted[rows] & (answers == self.targets[rows])
            ties = near_ties(logits, best)
            if not bool(ties.any()):
                return 0
            if rows is None:
                exact = ties
            else:
                exact = torch.zeros_like(moved)
                exact[rows] = ties
        runs = 0
        for b, start in self.batches:
            end = start + len(b.targets)
            if bool(exact[start:end].any()):
                self.hits[start:end] = exact_tail(b)
                runs += 1
        return runs
