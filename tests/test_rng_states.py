"""The generators' states in checkpoints (``backdoor_lab.resume``), without a fit: what exact resume rests on."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.resume import (
    RngStateCheckpoint,
    SkippedValidationDraws,
    collect_rng_states,
    draw_base_seeds,
    restore_rng_states,
    torch_draws_between,
)


def _draws() -> tuple[list[float], list[float], list[float], float]:
    """One draw of each generator, and numpy's cached second gaussian."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_restoring_the_states_repeats_every_generators_draws() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # numpy now holds a cached gaussian: part of its state
    states = collect_rng_states()
    first = _draws()
    assert _draws() != first  # the generators moved on
    restore_rng_states(states)
    assert _draws() == first
    assert states["numpy"]["has_gauss"] == 1 and isinstance(states["numpy"]["cached_gaussian"], float)
    assert states["numpy"]["kind"] == "MT19937" and states["numpy"]["keys"].dtype == torch.int64
    assert isinstance(states["numpy"]["pos"], int) and "torch.cuda" not in states  # no CUDA here


def test_the_states_load_without_unpickling() -> None:
    """Only tensors, ints, floats, strings and tuples: a checkpoint holding them loads with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save({"rng_states": collect_rng_states()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng_states"]
    first = _draws()
    restore_rng_states(loaded)
    assert _draws() == first


def test_the_callback_saves_the_states_in_every_checkpoint_and_puts_them_back_on_load() -> None:
    callback = RngStateCheckpoint()
    assert callback.state_key == "RngStateCheckpoint"
    torch.manual_seed(4)
    checkpoint: dict = {}
    callback.on_save_checkpoint(None, None, checkpoint)
    first = _draws()
    callback.on_load_checkpoint(None, None, checkpoint)
    assert _draws() == first
    callback.on_load_checkpoint(None, None, {})  # a checkpoint without states (an older run) changes nothing
    assert _draws() != first


def test_cuda_states_travel_and_come_back_only_to_as_many_devices(monkeypatch) -> None:
    """The CUDA branch, with torch.cuda's state functions stood in for (no GPU here): states of every device are
    collected once CUDA is in use, and put back only where the checkpoint's device count matches this machine's."""
    put_back: list = []
    cuda_states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "torch.cuda" not in collect_rng_states()  # CUDA there but never used: nothing of it to keep
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put_back.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    states = collect_rng_states()
    assert states["torch.cuda"] is cuda_states
    restore_rng_states(states)
    assert put_back == [cuda_states]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # resumed on another machine: left as it is
    restore_rng_states(states)
    restore_rng_states({k: v for k, v in states.items() if k != "torch.cuda"})  # a CPU checkpoint
    assert put_back == [cuda_states]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    restore_rng_states(states)  # a GPU checkpoint resumed on a CPU
    assert put_back == [cuda_states]


def test_a_skipped_validation_draws_nothing_where_validation_is_off() -> None:
    """``SkippedValidationDraws`` makes the draws of a validation that would have run, and none where none would
    (``limit_val_batches=0``) or where the epoch validates anyway."""

    class Data(L.LightningDataModule):
        def val_dataloader(self) -> list[DataLoader]:
            return [DataLoader(TensorDataset(torch.zeros(4, 1))) for _ in range(2)]

    def after(limit: float, epoch: int) -> float:
        callback = SkippedValidationDraws()
        trainer = SimpleNamespace(
            callbacks=[callback],
            check_val_every_n_epoch=2,
            current_epoch=epoch,
            datamodule=Data(),
            limit_val_batches=limit,
        )
        torch.manual_seed(0)
        callback.on_train_epoch_end(trainer, None)
        return torch.rand(1).item()

    torch.manual_seed(0)
    untouched = torch.rand(1).item()
    assert after(1.0, epoch=0) != untouched  # epoch 1 of 2 skips its validation: its two loaders' draws are made
    assert after(0, epoch=0) == after(1.0, epoch=1) == untouched


def test_the_draws_of_starting_loaders_are_counted_and_replayed() -> None:
    """``torch_draws_between`` counts the base seeds that starting DataLoader iterators drew, and
    ``draw_base_seeds`` makes the same draws: what follows (a shuffle) is then the same. Anything else moved:
    no count, and the generators are left where they were moved to."""
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    before = collect_rng_states()
    for _ in range(3):
        iter(loader)
    after = collect_rng_states()
    shuffled = [b[0].tolist() for b in loader]
    assert torch_draws_between(before, after) == 3
    assert torch.equal(torch.get_rng_state(), after["torch"])  # left as after says
    restore_rng_states(before)
    draw_base_seeds(3)
    assert [b[0].tolist() for b in loader] == shuffled
    restore_rng_states(before)
    draw_base_seeds(2)
    assert [b[0].tolist() for b in loader] != shuffled
    assert torch_draws_between(before, before) == 0
    torch.rand(1)  # not a base seed's draw: never reached by whole draws within the bound
    assert torch_draws_between(before, collect_rng_states(), most=8) is None
    restore_rng_states(before)
    np.random.rand()
    numpy_moved = collect_rng_states()
    assert torch_draws_between(before, numpy_moved) is None
    assert np.random.get_state()[2] == numpy_moved["numpy"]["pos"]
    random.random()
    assert torch_draws_between(numpy_moved, collect_rng_states()) is None
