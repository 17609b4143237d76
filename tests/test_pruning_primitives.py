"""The pruning primitives every defense is built on (``defenses/pruning.py``), each against an answer known by hand."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.defenses.pruning import (
    ChannelActivation,
    EvalCounts,
    following_batchnorm,
    kept_channels,
    mask_random_channels,
    masked_modules,
    model_device,
    move_to_device,
    prune_schedule,
    resolve_layer,
    run_batches,
    split_batch,
)

from .nets import LinearOnly


class Stack(nn.Module):
    """conv_a -> [bn_a] ; block(conv_b -> bn_b) ; conv_c -> ReLU -> bn_wrong (other width) ; head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.conv_c = nn.Conv2d(4, 5, 1)
        self.relu = nn.ReLU()
        self.bn_wrong = nn.BatchNorm2d(5)
        self.conv_d = nn.Conv2d(5, 2, 1)
        self.bn_d = nn.BatchNorm2d(3)  # the width of conv_a, not of conv_d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.bn_a(self.conv_a(x)))
        return self.conv_d(self.bn_wrong(self.relu(self.conv_c(x)))).mean(dim=(2, 3))


def test_resolve_layer_finds_the_named_or_last_conv_and_names_the_choices() -> None:
    model = Stack()
    assert resolve_layer(model, None) == ("conv_d", model.conv_d)
    assert resolve_layer(model, "block.0") == ("block.0", model.block[0])
    convs = "['conv_a', 'block.0', 'conv_c', 'conv_d']"
    with pytest.raises(
        ValueError, match=r"^layer 'nope' is not in Stack; its conv layers are: " + convs.replace("[", r"\[")
    ):
        resolve_layer(model, "nope")
    with pytest.raises(ValueError, match=r"^layer 'bn_a' is a BatchNorm2d, not a Conv2d; conv layers: \['conv_a'"):
        resolve_layer(model, "bn_a")
    with pytest.raises(ValueError, match=r"^LinearOnly has no nn.Conv2d layer to prune$"):
        resolve_layer(LinearOnly(), None)


def test_only_a_batchnorm_right_after_the_conv_and_as_wide_is_masked_with_it() -> None:
    model = Stack()
    assert following_batchnorm(model, "conv_a") == ("bn_a", model.bn_a)
    assert following_batchnorm(model, "block.0") == ("block.1", model.block[1])  # inside a container
    assert following_batchnorm(model, "conv_c") is None  # a ReLU comes first
    assert following_batchnorm(model, "conv_d") is None  # the next BatchNorm has another width
    assert [name for name, _ in masked_modules(model, "conv_a")] == ["conv_a", "bn_a"]
    assert [name for name, _ in masked_modules(model, "conv_c")] == ["conv_c"]
    last = nn.Sequential(nn.Conv2d(1, 2, 1))
    assert following_batchnorm(last, "0") is None  # nothing after it
    wrapped = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.BatchNorm2d(2)))  # the norm inside a container
    assert following_batchnorm(wrapped, "0") == ("1.0", wrapped[1][0])


def test_kept_channels_and_random_masks_are_exact_and_seeded() -> None:
    assert kept_channels(5, [4, 1]).tolist() == [True, False, True, True, False]
    assert kept_channels(3, []).dtype == torch.bool
    model = Stack()
    pruned = mask_random_channels(model, "conv_a", 2, seed=3)
    assert len(set(pruned)) == 2 and pruned == mask_random_channels(Stack(), "conv_a", 2, seed=3)
    assert pruned == torch.randperm(3, generator=torch.Generator().manual_seed(3))[:2].tolist()
    default_seed = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:3].tolist()
    assert mask_random_channels(Stack(), "conv_c", 3) == default_seed
    assert model.conv_a.weight_mask.flatten().tolist() == kept_channels(3, pruned).float().tolist()
    assert model.bn_a.weight_mask.tolist() == kept_channels(3, pruned).float().tolist()


def test_channel_activation_sums_per_channel_counts_positions_and_unhooks() -> None:
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    x = torch.tensor([1.0, -2.0, 3.0, 0.0]).view(1, 1, 2, 2)
    rectified, raw = ChannelActivation(conv), ChannelActivation(conv, rectify=False)
    conv(x)
    conv(x)
    assert rectified.sum.tolist() == [8.0, 4.0] and raw.sum.tolist() == [4.0, -4.0]
    assert rectified.sum.dtype == torch.float64 and rectified.count == raw.count == 8  # positions x batches
    assert isinstance(rectified.count, int)
    rectified.close()
    raw.close()
    conv(x)
    assert rectified.sum.tolist() == [8.0, 4.0] and not conv._forward_hooks


def test_eval_counts_rate_is_nan_without_samples() -> None:
    assert EvalCounts(3.0, 4.0).rate == 0.75 and math.isnan(EvalCounts().rate)


def test_split_batch_reads_positions_and_every_documented_key() -> None:
    x, y, t = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    assert split_batch((x, y, t)) == (x, y, t) and split_batch([x, y]) == (x, y, None)
    assert split_batch((x,)) == (x, None, None) and split_batch(x) == (x, None, None)
    assert split_batch({"images": x, "labels": y, "true_label": t}) == (x, y, t)
    assert split_batch({"x": x, "y": y}) == (x, y, None)
    with pytest.raises(ValueError, match=r"keys \['pixels', 'y'\]: inputs are read from one of \['inputs'") as err:
        split_batch({"pixels": x, "y": y})
    assert "batch_to_xy=lambda b:" in str(err.value)
    with pytest.raises(ValueError, match="cannot read inputs and targets"):
        split_batch({"x": x})


def test_devices_and_transfers() -> None:
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.Linear(1, 1).double()) == torch.device("cpu")
    batch = {"a": [torch.zeros(1)], "b": 3}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["b"] == 3 and torch.equal(moved["a"][0], batch["a"][0])


def test_run_batches_counts_caps_and_restores_the_mode() -> None:
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.bias.zero_()
    x = torch.tensor([[1.0], [-1.0], [2.0], [3.0]])
    y = torch.tensor([1, 1, 1, 0])  # right, wrong, right, wrong
    data = DataLoader(TensorDataset(x, y), batch_size=2)
    model.train()
    counts = run_batches(model, data, torch.device("cpu"))
    assert (counts.correct, counts.total) == (2.0, 4.0) and model.training
    assert (run_batches(model, data, torch.device("cpu"), max_batches=1).total) == 2.0
    assert run_batches(model, data, torch.device("cpu"), count_hits=False).total == 0.0
    # A third element: samples whose true label is the target are left out (ASR).
    true = torch.tensor([0, 1, 0, 1])
    asr = run_batches(model, DataLoader(TensorDataset(x, y, true), batch_size=4), torch.device("cpu"))
    assert (asr.correct, asr.total) == (2.0, 3.0)
    seen, entered = [], []

    @contextmanager
    def context():
        entered.append(not model.training)  # the forward runs in eval mode
        yield

    def transfer(batch, idx: int):
        seen.append(idx)
        return batch

    run_batches(model, data, torch.device("cpu"), transfer=transfer, forward_context=context)
    assert seen == [0, 0] and entered == [True, True]
    no_targets = DataLoader(TensorDataset(x), batch_size=2)
    assert run_batches(model, no_targets, torch.device("cpu")).total == 0.0


@pytest.mark.parametrize(
    ("n", "step", "limit", "schedule"),
    [(4, 1, None, [0, 1, 2, 3]), (10, 4, None, [0, 4, 8, 9]), (10, 3, 6, [0, 3, 6]), (10, 4, 6, [0, 4, 6])],
)
def test_prune_schedule_ends_exactly_at_the_limit(n: int, step: int, limit: int | None, schedule: list[int]) -> None:
    assert prune_schedule(n, step, limit) == schedule
