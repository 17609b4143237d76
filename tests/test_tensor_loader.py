"""``tensor_loader``: batches gathered in one indexing call per tensor, equal to ``DataLoader(TensorDataset)``'s,
shuffled with the same draws, and still re-made correctly where Lightning swaps the sampler (DDP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from backdoor_lab.data.tensor_loader import GatheredTensorDataset, collate_gathered, tensor_loader
from backdoor_lab.defenses.anp import anp_loader
from backdoor_lab.defenses.defender_data import DefenderData
from backdoor_lab.defenses.teacher import reshuffled


def three_tensors(n: int = 23) -> TensorDataset:
    # HWC images permuted to CHW, as the sources' to_tensor makes them: channels-last in memory
    x = torch.arange(n * 12, dtype=torch.float32).reshape(n, 2, 2, 3).permute(0, 3, 1, 2)
    return TensorDataset(x, torch.arange(n) % 5, torch.arange(n) * 7)


class CountingGather(GatheredTensorDataset):
    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.single, self.batched = 0, 0

    def __getitem__(self, index):
        self.single += 1
        return super().__getitem__(index)

    def __getitems__(self, indices):
        self.batched += 1
        return super().__getitems__(indices)


def batches(loader) -> list[list[torch.Tensor]]:
    return [list(batch) for batch in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_and_generator_draws_equal_the_plain_dataloaders(shuffle: bool) -> None:
    data = three_tensors()
    torch.manual_seed(3)
    plain = batches(DataLoader(data, batch_size=5, shuffle=shuffle)) + batches(
        DataLoader(data, batch_size=5, shuffle=shuffle)
    )
    after_plain = torch.rand(1)
    torch.manual_seed(3)
    loader = tensor_loader(data, 5, shuffle)
    gathered = batches(loader) + batches(loader)  # two epochs: the second shuffle differs from the first
    assert torch.rand(1) == after_plain  # the same number of draws from torch's generator
    assert [len(b[0]) for b in gathered] == [5, 5, 5, 5, 3] * 2
    assert len(gathered) == len(plain)
    for ours, theirs in zip(gathered, plain, strict=True):
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            assert a.stride() == b.stride()  # the memory order too: a convolution rounds differently on another
    if shuffle:
        assert not torch.equal(gathered[0][2], gathered[5][2])


def test_a_batch_is_one_fetch_not_one_per_sample() -> None:
    data = three_tensors()
    counting = CountingGather(*data.tensors)
    assert batches(tensor_loader(counting, 5, shuffle=True))
    assert (counting.single, counting.batched) == (0, 5)


def test_worker_processes_hand_back_the_same_batches() -> None:
    data = three_tensors()
    torch.manual_seed(5)
    in_process = batches(tensor_loader(data, 5, shuffle=True))
    torch.manual_seed(5)
    in_worker = batches(tensor_loader(data, 5, shuffle=True, num_workers=1))
    assert len(in_worker) == len(in_process) == 5
    assert all(torch.equal(a, b) for x, y in zip(in_worker, in_process, strict=True) for a, b in zip(x, y, strict=True))


def test_another_dataset_is_collated_as_pytorch_does() -> None:
    class Pairs(Dataset):
        def __len__(self) -> int:
            return 7

        def __getitem__(self, i: int):
            return torch.tensor([float(i)]), i

    loader = tensor_loader(Pairs(), 3)
    assert loader.collate_fn is not collate_gathered
    first = next(iter(loader))
    assert torch.equal(first[0], torch.tensor([[0.0], [1.0], [2.0]])) and first[1].tolist() == [0, 1, 2]


def test_a_sampler_swapped_in_as_lightning_does_under_ddp_keeps_the_gather() -> None:
    data = three_tensors(20)
    loader = tensor_loader(data, 4, shuffle=False)
    shards = []
    for rank in (0, 1):
        sharded = _update_dataloader(loader, DistributedSampler(loader.dataset, 2, rank, shuffle=False))
        assert isinstance(sharded.dataset, GatheredTensorDataset) and sharded.collate_fn is collate_gathered
        shards.append(torch.cat([batch[2] for batch in sharded]))
    assert shards[0].tolist() == [7 * i for i in range(0, 20, 2)]
    assert shards[1].tolist() == [7 * i for i in range(1, 20, 2)]


def test_the_defenses_reloaders_keep_the_gather() -> None:
    """NAD's teacher reshuffles the clean loader and ANP resamples it: both keep its collate, so batches stay
    gathered and equal to the samples they name."""
    data = three_tensors()
    loader = tensor_loader(data, 5)
    shuffled, resampled = reshuffled(loader, 4), anp_loader(loader, 4, 3, torch.Generator().manual_seed(0))
    for remade in (shuffled, resampled):
        assert remade.collate_fn is collate_gathered
        for x, y, ids in remade:
            rows = (ids // 7).tolist()
            assert torch.equal(x, data.tensors[0][rows]) and torch.equal(y, data.tensors[1][rows])
    assert [len(b[0]) for b in shuffled] == [4] * 5 + [3]
    assert sorted(torch.cat([b[2] for b in shuffled]).tolist()) == data.tensors[2].tolist()
    assert [len(b[0]) for b in resampled] == [4, 4, 4]  # ANP's iterations x batch size, with replacement


def test_the_pipelines_loaders_are_gathered() -> None:
    data = three_tensors()
    defender = DefenderData(data, data, list("abcde"), batch_size=4, eval_batch_size=8)
    for loader in (defender.train_dataloader(), *defender.val_dataloader()):
        assert isinstance(loader.dataset, GatheredTensorDataset) and loader.collate_fn is collate_gathered
        assert np.array_equal(torch.cat([b[2] for b in loader]).sort().values.numpy(), data.tensors[2].numpy())
