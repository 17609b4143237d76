"""How ANP draws its clean batches (``defenses/anp.py``: ``anp_loader``, ``_cycle``, ``_seed_from``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset

from backdoor_lab.defenses.anp import _cycle, _seed_from, anp_loader


def collate(batch):
    return torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])


def test_batches_are_drawn_with_replacement_for_exactly_the_iterations() -> None:
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    given = DataLoader(data, batch_size=3, collate_fn=collate, num_workers=0, pin_memory=False)
    drawn = anp_loader(given, 4, 5, torch.Generator().manual_seed(0))
    assert isinstance(drawn, DataLoader) and drawn is not given and drawn.dataset is data
    assert isinstance(drawn.sampler, RandomSampler) and drawn.sampler.replacement and drawn.sampler.num_samples == 20
    assert drawn.batch_size == 4 and drawn.collate_fn is collate and drawn.num_workers == 0 and not drawn.pin_memory
    first = [b[1].tolist() for b in drawn]
    again = [b[1].tolist() for b in anp_loader(given, 4, 5, torch.Generator().manual_seed(0))]
    assert len(first) == 5 and first == again  # the generator decides the draw


def test_other_loaders_are_used_as_given() -> None:
    data = TensorDataset(torch.arange(4.0), torch.arange(4))
    given = DataLoader(data, batch_size=2)
    assert anp_loader(given, None, 5, torch.Generator()) is given  # batch_size None: the loader's own batches

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.arange(3.0), torch.arange(3), strict=True)

    stream = DataLoader(Stream(), batch_size=2)
    assert anp_loader(stream, 4, 5, torch.Generator()) is stream
    batches = [(torch.zeros(2), torch.zeros(2))]
    assert anp_loader(batches, 4, 5, torch.Generator()) is batches  # any iterable of batches


def test_the_batches_cycle_and_an_empty_loader_is_refused() -> None:
    cycled = _cycle([1, 2])
    assert [next(cycled) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match=r"^ANP: the clean loader yields no batch$"):
        next(_cycle([]))


def test_the_seed_is_the_generators_next_draw() -> None:
    expected = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    assert _seed_from(torch.Generator().manual_seed(5)) == expected and expected > 2**40
