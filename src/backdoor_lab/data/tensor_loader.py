"""DataLoaders over in-memory tensors that gather each batch in one indexing call per tensor.

``DataLoader(TensorDataset, batch_size=128)`` calls ``__getitem__`` once per sample and then ``torch.stack``s the
128 rows of every tensor: Python work per sample, per batch. On a CPU that is a few percent of a step; on a GPU,
where a step of these small networks takes about a millisecond, it would be most of it. Here the sampler and the
batch sampler stay PyTorch's own (so shuffling draws the same numbers, batches hold the same samples in the same
order, and Lightning can still swap in a ``DistributedSampler`` under DDP), but the fetcher hands the whole batch of
indices to ``__getitems__``, which indexes each tensor once. The batches are equal, value for value, to the
per-sample ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate


class GatheredBatch(list):
    """A batch already gathered by ``GatheredTensorDataset.__getitems__``: ``[inputs, labels, ...]``."""


class GatheredTensorDataset(TensorDataset):
    """The same tensors as a ``TensorDataset`` (shared, not copied), fetched a whole batch at a time.

    Pair it with ``collate_fn=collate_gathered`` (``tensor_loader`` does): PyTorch's default collate would take the
    gathered batch for a list of samples.
    """

    def __getitems__(self, indices: Sequence[int]) -> GatheredBatch:
        index = torch.as_tensor(indices, dtype=torch.long)
        # contiguous, as torch.stack makes it: indexing keeps a permuted tensor's strides (images converted from
        # HWC are channels-last in memory), and a convolution rounds differently on the other memory order
        return GatheredBatch(tensor[index].contiguous() for tensor in self.tensors)


def collate_gathered(batch: Any) -> Any:
    """A gathered batch as it is (a list of tensors, as ``default_collate`` returns for tuple samples); anything
    else through ``default_collate``."""
    if isinstance(batch, GatheredBatch):
        return list(batch)
    return default_collate(batch)


def tensor_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """``DataLoader(dataset, batch_size, shuffle=shuffle, ...)``, with a ``TensorDataset``'s batches gathered.

    It shuffles exactly as the plain DataLoader (the same sampler, the same draws from torch's generator) and yields
    equal batches; any other dataset gets the plain DataLoader.
    """
    gathered = isinstance(dataset, TensorDataset)
    if gathered and not isinstance(dataset, GatheredTensorDataset):
        dataset = GatheredTensorDataset(*dataset.tensors)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=False,
        pin_memory=pin_memory,
        collate_fn=collate_gathered if gathered else None,
    )
