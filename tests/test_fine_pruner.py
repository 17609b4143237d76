"""``FinePruner``'s own arguments and edges, on ``KnownNet`` (answers known: order 0, 1, 2, 3; pruning 2 halves
accuracy): its defaults and checks, the ranking switches, the batch cap, processes and samplers, and the path that
re-evaluates the whole network at every step (``fast=False``)."""

from __future__ import annotations

import logging
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from backdoor_lab import FinePruningCallback
from backdoor_lab.defenses import cut_evaluation
from backdoor_lab.defenses.pruner import FinePruner

from .test_pruning import DataDependent, KnownNet, PlainModule, known_data
from .trainers import quiet_trainer


def loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    return DataLoader(known_data(n), batch_size=batch_size)


def answered(model: nn.Module, x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    """``x`` labelled with ``model``'s own answers: clean accuracy 1.0 before any pruning."""
    with torch.no_grad():
        y = model(x).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_a_fresh_pruner_has_the_documented_defaults_and_empty_records() -> None:
    pruner = FinePruner(KnownNet(), "features.0")
    assert (pruner.full_curve, pruner.progress, pruner.step, pruner.max_batches) == (False, False, None, None)
    assert (pruner.prune_ratio, pruner.max_accuracy_drop, pruner.rectify, pruner.fast) == (None, 0.04, True, True)
    assert pruner.channel_activation == [] and pruner.triggered_activation == []
    assert pruner.prune_curve == [] and pruner.pruned_channels == []
    assert pruner.keep_mask().tolist() == [True] * 4 and pruner.pruning_order() == []
    assert pruner.trigger_channel_ranks() == []


def test_the_stop_rule_curve_ends_at_the_first_failing_point_unless_full_curve() -> None:
    pruner = FinePruner(KnownNet(), "features.0")
    pruner.rank(loader())
    assert [p["pruned"] for p in pruner.measure_curve()] == [0, 1, 2, 3]  # 3 is the first point past the budget
    full = FinePruner(KnownNet(), "features.0", full_curve=True)
    full.rank(loader())
    assert [p["pruned"] for p in full.measure_curve()] == [0, 1, 2, 3]  # every count but "all": the same here
    stepped = FinePruner(KnownNet(), "features.0", step=2, full_curve=True)
    stepped.rank(loader())
    assert [p["pruned"] for p in stepped.measure_curve()] == [0, 2, 3]  # step 2, and the last count


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"step": 0}, "step"),
        ({"max_batches": 0}, "max_batches"),
        ({"world_size": 2, "process_index": 2}, r"^process_index must be in \[0, world_size=2\), got 2$"),
        ({"world_size": 2, "process_index": -1}, r"process_index must be in \[0, world_size=2\), got -1"),
        ({"activation_layer": "nope"}, r"^activation_layer 'nope' is not in KnownNet$"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FinePruner(KnownNet(), "features.0", **kwargs)


def test_the_last_process_index_is_accepted() -> None:
    assert FinePruner(KnownNet(), "features.0", world_size=2, process_index=1).process_index == 1


def test_rectify_false_ranks_on_the_raw_output() -> None:
    rectified = FinePruner(KnownNet(), "features.0")
    rectified.rank(loader())
    raw = FinePruner(KnownNet(), "features.0", rectify=False)
    raw.rank(loader())
    # channel 0's output is -1 everywhere: 0 after the ReLU, -1 before it; channel 2 is +-1 (mean 0 raw).
    assert rectified.channel_activation == pytest.approx([0.0, 0.1, 0.5, 3.0])
    assert raw.channel_activation == pytest.approx([-1.0, 0.1, 0.0, 3.0])
    assert raw.pruning_order() == [0, 2, 1, 3]


def test_the_activation_layer_ranks_and_is_named_in_its_errors() -> None:
    pruner = FinePruner(KnownNet(), "features.0", activation_layer="features.1")
    assert pruner.activation_layer == "features.1"
    pruner.rank(loader())
    assert pruner.channel_activation == pytest.approx([0.0, 0.1, 0.5, 3.0])  # the ReLU's output
    assert pruner.split is not None  # the observed ReLU does not stop the cut


def test_max_batches_caps_every_pass() -> None:
    pruner = FinePruner(KnownNet(), "features.0", max_batches=1)
    pruner.rank(loader(batch_size=16))
    assert pruner._clean.total == 16  # one batch of four
    # The first batch alternates +1/-1 as the whole set does: the same means from 16 samples.
    assert pruner.channel_activation == pytest.approx([0.0, 0.1, 0.5, 3.0])
    exactly = FinePruner(KnownNet(), "features.0", max_batches=4)
    exactly.rank(loader(batch_size=16))
    assert exactly._clean.total == 64  # the cap equal to the loader's length reads it all


def test_each_process_reads_its_own_batches_unless_the_sampler_already_shards() -> None:
    seen: list[int] = []

    def transfer(batch, _idx: int):
        seen.append(len(batch[1]))
        return batch

    data = known_data(64)
    plain = DataLoader(data, batch_size=16)
    second = FinePruner(KnownNet(), "features.0", world_size=2, process_index=1, transfer=transfer)
    second.rank(plain)
    assert second._clean.total == 32  # batches 1 and 3
    seen.clear()
    # A DistributedSampler has already split the data between processes: the loader is read whole.
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    sharded = FinePruner(KnownNet(), "features.0", world_size=2, process_index=1, transfer=transfer)
    sharded.rank(DataLoader(data, batch_size=8, sampler=sampler))
    assert sharded._clean.total == 32 and len(seen) == 4


def test_the_full_re_evaluation_path_gives_the_cached_curve_and_uses_each_loaders_index() -> None:
    indices: list[int] = []

    def transfer(batch, idx: int):
        indices.append(idx)
        return batch

    # Half the triggered samples are of the target class already: ASR must leave them out on both paths.
    true = torch.arange(32) % 2
    triggered = TensorDataset(torch.full((32, 1, 2, 2), 2.0), torch.ones(32, dtype=torch.long), true)
    cached = FinePruner(KnownNet(), "features.0", full_curve=True)
    cached.rank(loader(), DataLoader(triggered, batch_size=16))
    slow = FinePruner(KnownNet(), "features.0", full_curve=True, fast=False, step=1, transfer=transfer)
    slow.rank(loader(), DataLoader(triggered, batch_size=16), clean_idx=2, triggered_idx=7)
    assert slow.split is None and slow.measure_curve() == cached.measure_curve()
    assert indices.count(2) == 4 * 4 and indices.count(7) == 2 * 4  # the rank pass + 3 masked points, per loader
    assert not any(hasattr(m, "weight_mask") and not bool(m.weight_mask.all()) for m in slow.modules)  # reset


def test_an_empty_triggered_set_gives_nan_asr_not_a_number_of_the_clean_set() -> None:
    everyone_is_target = TensorDataset(torch.ones(16, 1, 2, 2), torch.ones(16).long(), torch.ones(16).long())
    pruner = FinePruner(KnownNet(), "features.0", step=4)
    pruner.rank(loader(), DataLoader(everyone_is_target, batch_size=16))  # every true label is the target
    curve = pruner.measure_curve()
    assert curve[0]["clean_acc"] == 1.0 and math.isnan(curve[0]["asr"])


def test_errors_name_the_loader_and_the_layer() -> None:
    no_targets = DataLoader(TensorDataset(torch.ones(8, 1, 2, 2)), batch_size=8)
    with pytest.raises(ValueError, match=r"^the clean batches carry no targets: FinePruner counts argmax == target$"):
        FinePruner(KnownNet(), "features.0").rank(no_targets)
    with pytest.raises(ValueError, match=r"^the triggered batches carry no targets"):
        FinePruner(KnownNet(), "features.0").rank(loader(), no_targets)
    unreached = FinePruner(KnownNet(), "features.0", activation_layer="head")
    with pytest.raises(ValueError, match=r"^the ranking statistic of head has 2 channels, the pruned layer 4$"):
        unreached.rank(loader())


def test_logits_of_the_wrong_shape_are_named_by_shape() -> None:
    class Flat(KnownNet):
        def forward(self, x):
            return super().forward(x).flatten()

    with pytest.raises(ValueError, match=r"returned shape \(32,\)\. Wrap the model"):
        FinePruner(Flat(), "features.0", fast=False).rank(loader())


def test_trigger_channel_ranks_default_to_the_top_ten() -> None:
    pruner = FinePruner(KnownNet(), "features.0")
    pruner.channel_activation = [float(i) for i in range(12)]
    pruner.triggered_activation = [float(2 * i) for i in range(12)]
    assert len(pruner.trigger_channel_ranks()) == 10


# ----------------------------------------------------------------- the evaluation through the cut (cut_evaluation)
class FlatNet(KnownNet):
    """``KnownNet`` with the mean folded into a linear layer over the flattened map: a reader the running sums
    can stand in for (same answers on 2x2 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        flat = nn.Linear(16, 2)
        with torch.no_grad():
            flat.weight.copy_(self.head.weight.repeat_interleave(4, dim=1) / 4)
            flat.bias.copy_(self.head.bias)
        self.head = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class SkipAddedInPlace(nn.Module):
    """A skip that crosses the cut and that the tail adds into in place: the cached skip must not change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 1)
        self.conv = nn.Conv2d(4, 6, 1)
        self.back = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        skip.add_(self.back(torch.relu(self.conv(skip))))
        return self.head(skip.mean(dim=(2, 3)))


def _labelled(model: nn.Module, n: int = 48) -> DataLoader:
    torch.manual_seed(1)
    x = torch.randn(n, 1, 3, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 3  # not every answer right, so that masks move the accuracy both ways
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_a_reader_that_runs_twice_turns_the_running_sums_off_and_says_so(caplog) -> None:
    """``network_split`` refuses a traced reader called twice; a tail that still calls it twice (here, the split's
    tail replaced) must not be taken for one reader's output: the sums are turned off, the logits kept."""
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.cut_evaluation")
    net = FlatNet()
    pruner = FinePruner(net, "features.0")
    pruner.rank(loader())
    assert pruner.incremental is True
    caplog.clear()
    pruner.split.tail = lambda cut: net.head(cut.flatten(1)) + 0.5 * net.head(torch.ones(len(cut), 16))
    cut = torch.rand(4, 4, 2, 2)
    logits, outputs = pruner._tail_and_readers((cut,))
    assert outputs is None and pruner.incremental is False
    assert torch.equal(logits, net.head(cut.flatten(1)) + 0.5 * net.head(torch.ones(4, 16)))
    assert caplog.messages == ["FinePruner: a layer reading features.1 runs more than once; re-running it"]


def test_running_sums_that_disagree_with_the_network_are_dropped_and_said_so(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.cut_evaluation")
    sums = FinePruner(FlatNet(), "features.0")
    sums.rank(loader())
    assert sums.incremental is True and sums._cache.sums is not None  # with the real tolerance
    caplog.clear()

    class OffByOne(cut_evaluation.RunningSums):  # running sums that are wrong by one
        def logits(self, rest):
            return super().logits(rest) + 1.0

    monkeypatch.setattr(cut_evaluation, "RunningSums", OffByOne)
    pruner = FinePruner(FlatNet(), "features.0", full_curve=True)
    pruner.rank(loader())
    assert pruner.split is not None and pruner.incremental is False and pruner._cache.sums is None
    assert caplog.messages == ["FinePruner: running sums disagree with the network; re-running features.1"]
    assert [p["clean_acc"] for p in pruner.measure_curve()] == [1.0, 1.0, 1.0, 0.5]


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut calls each function through a trampoline of its own package"
)
def test_the_fallback_warning_points_at_the_caller_of_rank_or_of_fit(tmp_path) -> None:
    pruner = FinePruner(DataDependent(), "features.0")
    with pytest.warns(RuntimeWarning, match="re-evaluates the whole network") as caught:
        pruner.rank(loader())
    assert len(caught) == 1 and caught[0].filename == __file__

    class Untraceable(PlainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DataDependent()

    callback = FinePruningCallback(layer="net.features.0", progress=False)
    with pytest.warns(RuntimeWarning, match="re-evaluates the whole network") as caught:
        quiet_trainer(tmp_path, [callback]).fit(Untraceable())  # through Lightning's loops: this line
    assert [w.filename for w in caught if "re-evaluates" in str(w.message)] == [__file__]


def test_a_skip_added_into_in_place_after_the_cut_keeps_the_cached_curve_exact() -> None:
    model = SkipAddedInPlace()
    data = _labelled(model)
    fast = FinePruner(model, "conv", full_curve=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        fast.rank(data)
    assert fast.split is not None
    slow = FinePruner(SkipAddedInPlace(), "conv", full_curve=True, fast=False, step=1)
    slow.rank(data)
    assert fast.measure_curve() == slow.measure_curve()


def test_what_may_stand_in_for_the_readers() -> None:
    pruner = FinePruner(FlatNet(), "features.0")
    pruner.rank(loader())
    cut = torch.ones(4, 4, 2, 2)
    assert pruner._exact_enough((cut,)) and pruner._exact_enough((cut, torch.zeros(4)))  # 1-D per-sample values
    assert pruner._exact_enough((cut.double(),))
    assert not pruner._exact_enough((cut, torch.zeros(3)))  # another batch size
    assert not pruner._exact_enough((cut, 3))  # not a tensor
    assert not pruner._exact_enough((cut, torch.tensor(1.0)))  # a scalar
    assert not pruner._exact_enough((cut.bfloat16(),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pruner._exact_enough((cut,))


# ----------------------------------------------------------------- the curve's per-sample state (curve_cache)
class SparseNet(nn.Module):
    """1x1 conv whose channels fire on nested, shrinking sets of inputs (thresholds 2/3 .. 7/3): pruned two at a
    time, the least active of a pair touches fewer samples than the pair does. ``pooled``: a mean before the head,
    so no running sums (the tail re-runs); else a linear layer over the flattened map (running sums)."""

    def __init__(self, pooled: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.pooled = pooled
        self.conv = nn.Conv2d(1, 6, 1)
        self.head = nn.Linear(6 if pooled else 24, 3)
        with torch.no_grad():
            self.conv.weight.fill_(3.0)
            self.conv.bias.copy_(-torch.arange(2.0, 8.0))
            self.head.weight.mul_(10.0)  # a channel's share decides answers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv(x))
        return self.head(maps.mean(dim=(2, 3)) if self.pooled else maps.flatten(1))


@pytest.mark.parametrize("pooled", [True, False])
def test_pruning_two_channels_at_a_time_updates_every_sample_either_channel_touches(pooled: bool) -> None:
    model = SparseNet(pooled)
    torch.manual_seed(3)
    x = torch.randn(96, 1, 2, 2)
    data = answered(model, x, batch_size=4)  # small batches: a batch re-runs only if it moved
    cached = FinePruner(model, "conv", step=2, full_curve=True)
    cached.rank(data)
    assert cached.incremental is not pooled
    slow = FinePruner(SparseNet(pooled), "conv", step=2, full_curve=True, fast=False)
    slow.rank(data)
    curve = cached.measure_curve()
    assert curve == slow.measure_curve()
    assert [p["pruned"] for p in curve] == [0, 2, 4, 5] and len({p["clean_acc"] for p in curve}) > 2
    if pooled:  # no sums: a batch re-runs its tail when a newly pruned channel fires on one of its samples
        with torch.no_grad():
            fires = torch.relu(model.conv(x)).flatten(2).ne(0).any(dim=2)  # (samples, channels)
        order, runs = cached.pruning_order(), 0
        for start, end in ((0, 2), (2, 4), (4, 5)):
            moved = fires[:, order[start:end]].any(dim=1)
            runs += int(moved.view(-1, 4).any(dim=1).sum())
        assert cached.exact_tail_runs == runs > 0


def test_near_ties_with_two_classes_one_class_and_exact_ties() -> None:
    from backdoor_lab.defenses.curve_cache import NEAR_TIE, near_ties

    two = torch.tensor([[3.0, 3.0 - 0.5 * NEAR_TIE * 3.0], [3.0, 1.0]], dtype=torch.float64)
    assert near_ties(two).tolist() == [True, False]
    single = near_ties(torch.ones(3, 1))
    assert single.dtype == torch.bool and single.shape == (3,) and not single.any()
    assert near_ties(torch.zeros(2, 4)).tolist() == [True, True]  # all-zero logits: an exact tie, tolerance 0


def test_running_sums_answer_in_the_networks_own_dtype() -> None:
    net = FlatNet().double()
    data = known_data()
    pruner = FinePruner(net, "features.0")
    pruner.rank(DataLoader(TensorDataset(data.tensors[0].double(), data.tensors[1]), batch_size=16))
    assert pruner.incremental is True
    assert pruner._cache.sums.logits(pruner.split.rest).dtype == torch.float64


class StridedReader(nn.Module):
    """The conv reading the cut has a stride, padding and dilation: its per-channel term must use all three."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.reader = nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.reader(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("make", [StridedReader, lambda: SparseNet(pooled=False)], ids=["conv", "linear"])
@pytest.mark.parametrize("matrix_limit", [None, 0], ids=["maps", "too-large-for-maps"])
def test_running_sums_equal_full_re_evaluation_with_and_without_per_channel_maps(
    make, matrix_limit, monkeypatch
) -> None:
    """Readers too large for per-channel maps subtract a channel's term with the layer's own conv or matmul."""
    from backdoor_lab.defenses import network_split

    if matrix_limit is not None:
        monkeypatch.setattr(network_split, "MATRIX_LIMIT", matrix_limit)
    model = make()
    torch.manual_seed(5)
    x = torch.randn(64, 1, 5, 5) if isinstance(model, StridedReader) else torch.randn(64, 1, 2, 2)
    data = answered(model, x, batch_size=4)
    cached = FinePruner(model, "conv", full_curve=True)
    cached.rank(data)
    assert cached.incremental is True
    assert (cached._cache.sums.readers[0]._maps == {}) is (matrix_limit == 0)
    slow = FinePruner(make(), "conv", full_curve=True, fast=False, step=1)
    slow.rank(data)
    curve = cached.measure_curve()
    assert curve == slow.measure_curve() and len({p["clean_acc"] for p in curve}) > 2


class FunctionalPool(nn.Module):
    """``F.max_pool2d(F.relu(conv(x)))``: the split pools before the ReLU (they commute), so the cut is smaller."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def test_a_functional_max_pool_after_the_relu_is_moved_before_it() -> None:
    model = FunctionalPool()
    torch.manual_seed(6)
    x = torch.randn(32, 1, 4, 4)
    data = answered(model, x)
    cached = FinePruner(model, "conv", full_curve=True)
    cached.rank(data)
    calls = [n.target for n in cached.split.head.graph.nodes if n.op == "call_function"]
    assert calls == [F.max_pool2d, F.relu]
    slow = FinePruner(FunctionalPool(), "conv", full_curve=True, fast=False, step=1)
    slow.rank(data)
    assert cached.measure_curve() == slow.measure_curve()


@pytest.mark.parametrize(("make", "size"), [(StridedReader, 6 * 25 * 36), (lambda: SparseNet(pooled=False), 3 * 24)])
def test_per_channel_maps_are_built_up_to_the_limit_exactly(make, size: int, monkeypatch) -> None:
    """Conv reader: in_channels x input positions x one channel's output size (4 x 3 x 3); linear: its weight."""
    from backdoor_lab.defenses import network_split

    x = torch.randn(8, 1, 5, 5) if make is StridedReader else torch.randn(8, 1, 2, 2)
    for limit, built in ((size, True), (size - 1, False)):
        monkeypatch.setattr(network_split, "MATRIX_LIMIT", limit)
        model = make()
        pruner = FinePruner(model, "conv")
        pruner.rank(answered(model, x))
        assert bool(pruner._cache.sums.readers[0]._maps) is built


class SummedAfterRelu(nn.Module):
    """``torch.sum(F.relu(conv(x)))`` over space: a function after the ReLU that is not a max pool must stay after
    it (a sum does not commute with the ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sum(F.relu(self.conv(x)), dim=(2, 3)))


def test_only_a_max_pool_is_moved_before_the_relu() -> None:
    model = SummedAfterRelu()
    x = torch.randn(32, 1, 3, 3)
    pruner = FinePruner(model, "conv", full_curve=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the split is right: no fallback
        pruner.rank(answered(model, x))
    calls = [n.target for n in pruner.split.head.graph.nodes if n.op == "call_function"]
    assert calls == [F.relu]


def test_an_activation_layer_the_forward_never_reaches_is_named() -> None:
    class Unused(KnownNet):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.ReLU()

    with pytest.raises(ValueError, match=r"^activation_layer 'spare' is not reached by Unused.forward$"):
        FinePruner(Unused(), "features.0", activation_layer="spare", fast=False).rank(loader())


def test_the_full_re_evaluation_leaves_the_target_class_out_of_the_asr() -> None:
    # The first half flips to the target (class 1); the second half does not, but its true class is the target,
    # so it is not counted: ASR 1.0 (0.5 if it were counted).
    x = torch.cat([torch.full((16, 1, 2, 2), 2.0), torch.full((16, 1, 2, 2), -1.0)])
    true = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    triggered = DataLoader(TensorDataset(x, torch.ones(32).long(), true), batch_size=8)
    slow = FinePruner(KnownNet(), "features.0", fast=False, step=1, full_curve=True)
    slow.rank(loader(), triggered)
    assert [p["asr"] for p in slow.measure_curve()] == [1.0, 1.0, 1.0, 0.0]


class Variant(nn.Module):
    """conv1 -> ReLU -> conv (pruned) -> ``act`` -> ``tail`` -> linear: the ways a network writes its ReLU, pooling
    and flatten, which the split must read as written (``network_split``)."""

    def __init__(self, act, tail, features: int) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.conv1 = nn.Conv2d(1, 3, 1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(features, 3)
        self.act, self.tail = act, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.act(self.conv(F.relu(self.conv1(x))))))


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2).flatten(1)


@pytest.mark.parametrize(
    ("act", "tail", "features", "head_calls", "running_sums"),
    [
        (lambda x: x.relu(), _pool, 16, ["max_pool2d", "relu"], True),  # a method's ReLU commutes with the pool
        (torch.relu, _pool, 16, ["max_pool2d", "relu"], True),
        (lambda x: F.relu(x, inplace=True), _pool, 16, ["relu", "max_pool2d"], True),  # in place: left as written
        (F.relu, lambda x: torch.flatten(x, 1), 64, ["relu"], True),
        (F.relu, lambda x: x.flatten(start_dim=1), 64, ["relu"], True),
        (F.relu, lambda x: x.flatten(1, -1), 64, ["relu"], True),
        (F.relu, lambda x: x.flatten(end_dim=-1, start_dim=1), 64, ["relu"], True),
        (F.relu, lambda x: x.flatten(1, 2).sum(dim=2), 16, ["relu"], False),  # not a whole flatten: no sums
    ],
    ids=["method-relu", "torch-relu", "inplace-relu", "torch-flatten", "start-kw", "both-args", "both-kw", "partial"],
)
def test_the_split_reads_each_way_of_writing_relu_pool_and_flatten(act, tail, features, head_calls, running_sums):
    model = Variant(act, tail, features)
    torch.manual_seed(9)
    x = torch.randn(32, 1, 4, 4)
    data = answered(model, x)
    pruner = FinePruner(model, "conv", full_curve=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the split is right: no fallback
        pruner.rank(data)
    after_conv = [n for n in pruner.split.head.graph.nodes if n.op != "placeholder"][3:]  # past conv1, relu, conv
    names = [getattr(n.target, "__name__", n.target) for n in after_conv if n.op != "output"]
    assert names == head_calls and pruner.incremental is running_sums
    slow = FinePruner(Variant(act, tail, features), "conv", full_curve=True, fast=False, step=1)
    slow.rank(data)
    assert pruner.measure_curve() == slow.measure_curve()


def test_an_untraceable_network_is_named_with_the_tracing_error() -> None:
    with pytest.warns(
        RuntimeWarning, match=r"\(torch.fx cannot trace DataDependent.forward \(TraceError: symbolically traced"
    ) as caught:
        FinePruner(DataDependent(), "features.0").rank(loader())
    assert len(caught) == 1
