"""The generators' states in checkpoints (``backdoor_lab.resume``), without a fit: what exact resume rests on."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from backdoor_lab.resume import RngStateCheckpoint, collect_rng_states, restore_rng_states


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
