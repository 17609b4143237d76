"""Ranking, masking, stop rule and rollback of FinePruningCallback on a network whose answer is known."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab import FinePruningCallback
from backdoor_lab.defenses.pruner import FinePruner
from backdoor_lab.defenses.pruning import (
    ChannelActivation,
    fold_prune_masks,
    following_batchnorm,
    kept_channels,
    prune_schedule,
    resolve_layer,
    set_channel_mask,
)

from .nets import Residual, SigmoidNet
from .trainers import quiet_trainer


class KnownNet(nn.Module):
    """conv (1x1, 4 channels) -> ReLU -> mean -> linear, with hand-set weights.

    Channel 0 is dead (activation 0), channel 1 weakly on (0.1) but unused, channel 2 (mean 0.5) carries the
    class, channel 3 is strongly on (3.0) but unused. Pruning order must be 0, 1, 2, 3, and pruning channel 2
    drops accuracy from 100% to 50%.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU())
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]).view(4, 1, 1, 1))
            self.features[0].bias.copy_(torch.tensor([-1.0, 0.1, 0.0, 3.0]))
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def known_data(n: int = 64) -> TensorDataset:
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x = sign.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    y = (sign > 0).long()
    return TensorDataset(x, y)


class PlainModule(L.LightningModule):
    """A LightningModule that knows nothing of backdoor_lab: (inputs, targets) batches, logits out."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.net = KnownNet()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        return DataLoader(known_data(), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(known_data(), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(tmp_path, callback, epochs: int = 0, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, [callback], epochs, **kw)


def test_stop_rule_prunes_dormant_channels_and_rolls_back(tmp_path) -> None:
    module = PlainModule()
    cb = FinePruningCallback(layer="net.features.0", max_accuracy_drop=0.04, step=1, full_curve=False)
    _trainer(tmp_path, cb).fit(module)
    assert cb.pruned_channels == [0, 1]  # channel 2 failed the threshold: rolled back to the mask before it
    assert [p["pruned"] for p in cb.prune_curve] == [0, 1, 2, 3]  # stopped at the first failure
    assert cb.prune_curve[3]["clean_acc"] == pytest.approx(0.5)
    assert cb.channel_activation == pytest.approx([0.0, 0.1, 0.5, 3.0])
    conv = module.net.features[0]
    assert conv.weight_mask[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert conv.bias_mask.tolist() == [0.0, 0.0, 1.0, 1.0]
    module.eval()
    x = known_data().tensors[0]
    with torch.no_grad():
        acts = module.net.features(x)
    assert acts[:, :2].abs().max() == 0 and acts[:, 3].min().item() == pytest.approx(3.0)
    assert (module(x).argmax(1) == known_data().tensors[1]).float().mean() == 1.0


def test_full_curve_measures_past_the_stop_but_keeps_the_passing_mask(tmp_path) -> None:
    cb = FinePruningCallback(layer="net.features.0", step=1, full_curve=True)
    _trainer(tmp_path, cb).fit(PlainModule())
    assert [p["pruned"] for p in cb.prune_curve] == [0, 1, 2, 3]
    assert cb.pruned_channels == [0, 1]


def test_prune_ratio_prunes_exactly_that_fraction_of_least_active_channels(tmp_path) -> None:
    module = PlainModule()
    cb = FinePruningCallback(prune_ratio=0.75, step=1)  # layer=None: the last (only) Conv2d
    _trainer(tmp_path, cb).fit(module)
    assert cb.layer_name == "net.features.0"
    assert cb.pruned_channels == [0, 1, 2] and cb.pruned_fraction == 0.75
    assert int((module.net.features[0].bias_mask == 0).sum()) == 3


def test_fine_tuning_keeps_masked_channels_at_zero(tmp_path) -> None:
    module = PlainModule(lr=0.5)
    cb = FinePruningCallback(prune_ratio=0.5, step=1)
    _trainer(tmp_path, cb, epochs=3).fit(module)
    conv = module.net.features[0]
    assert conv.weight[:2].abs().max() == 0 and conv.bias[:2].abs().max() == 0
    assert conv.weight_orig.grad is None or conv.weight_orig.grad[:2].abs().max() == 0
    cb.remove_reparametrization(module)
    assert not hasattr(conv, "weight_mask") and conv.bias[:2].abs().max() == 0


def test_explicit_dataloader_and_no_validation_loop(tmp_path) -> None:
    class NoVal(PlainModule):
        val_dataloader = None

    cb = FinePruningCallback(step=1, clean_dataloader=DataLoader(known_data(), batch_size=8))
    _trainer(tmp_path, cb).fit(NoVal())
    assert cb.pruned_channels == [0, 1]


def test_resumed_fit_restores_masks_and_record(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = PlainModule(lr=0.1)
    cb = FinePruningCallback(prune_ratio=0.5, step=1)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    L.Trainer(
        max_epochs=1, callbacks=[cb, ckpt_cb], logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    ).fit(module)
    last = tmp_path / "ck" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert "net.features.0.weight_mask" not in state, "checkpoints hold plain weights"
    assert state["net.features.0.bias"][:2].abs().max() == 0 and state["net.features.0.bias"][3] != 0

    resumed_module = PlainModule(lr=0.1)
    resumed_cb = FinePruningCallback(prune_ratio=0.5, step=1)
    resumed_cb.prune = lambda *a, **k: pytest.fail("a resumed fine-tuning must not prune again")
    L.Trainer(
        max_epochs=2,
        callbacks=[resumed_cb, ModelCheckpoint(dirpath=tmp_path / "ck2")],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(resumed_module, ckpt_path=last)
    assert resumed_cb.pruned_channels == cb.pruned_channels
    assert resumed_cb.prune_curve == cb.prune_curve
    assert resumed_module.net.features[0].bias_mask.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_unknown_layer_lists_conv_layers(tmp_path) -> None:
    cb = FinePruningCallback(layer="net.nope")
    with pytest.raises(ValueError, match=r"conv layers are: \['net.features.0'\]"):
        _trainer(tmp_path, cb).fit(PlainModule())
    with pytest.raises(ValueError, match="not a Conv2d"):
        resolve_layer(PlainModule(), "net.head")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"prune_ratio": -0.1}, "prune_ratio"),
        ({"max_accuracy_drop": -0.01}, "max_accuracy_drop"),
        ({"step": 0}, "step"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, match) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        FinePruningCallback(**kwargs)


def test_batchnorm_after_the_conv_is_masked_too() -> None:
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        net[1].running_mean.fill_(-2.0)  # a zero conv output would come out of BN as a positive shift
        net[1].bias.fill_(1.0)
    net.eval()
    assert following_batchnorm(net, "0")[0] == "1"
    keep = torch.tensor([True, False, True, False, True, True])
    set_channel_mask([net[0], net[1]], keep)
    out = net(torch.randn(4, 3, 8, 8))
    assert out[:, [1, 3]].abs().max() == 0 and out[:, [0, 2]].abs().max() > 0


def test_mask_rewrite_is_exact_rollback() -> None:
    conv = nn.Conv2d(2, 4, 3)
    original = conv.weight.detach().clone()
    set_channel_mask([conv], torch.tensor([False, False, True, True]))
    set_channel_mask([conv], torch.tensor([True, True, True, False]))
    assert torch.equal(conv.weight[:3], original[:3]) and conv.weight[3].abs().max() == 0
    folded = fold_prune_masks(conv.state_dict())
    assert set(folded) == {"weight", "bias"} and folded["weight"][3].abs().max() == 0


def test_channel_activation_is_a_running_mean_of_rectified_output() -> None:
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    rec = ChannelActivation(conv)
    conv(torch.ones(3, 1, 2, 2))
    conv(-torch.ones(1, 1, 2, 2))
    rec.close()
    assert (rec.sum / rec.count).tolist() == pytest.approx([0.75, 0.25])


def test_schedule_ends_exactly_at_the_limit_and_never_prunes_every_channel() -> None:
    assert prune_schedule(10, 3) == [0, 3, 6, 9]
    assert prune_schedule(10, 4, limit=5) == [0, 4, 5]
    assert prune_schedule(256, 4)[-1] == 255


def test_trigger_channel_ranks_locate_the_channel_a_trigger_drives(tmp_path) -> None:
    # The "trigger" is a strong positive input: it lifts channel 2 (mean 0.5 on clean data) to 2.0 and is
    # classified as class 1, the attack target.
    triggered = TensorDataset(torch.full((32, 1, 2, 2), 2.0), torch.ones(32, dtype=torch.long))
    cb = FinePruningCallback(step=1, triggered_dataloader=DataLoader(triggered, batch_size=16))
    _trainer(tmp_path, cb).fit(PlainModule())
    assert cb.triggered_activation == pytest.approx([0.0, 0.1, 2.0, 3.0])
    assert cb.trigger_channel_ranks(top=1) == [2]  # channel 2 is third in the pruning order
    assert cb.prune_curve[0]["asr"] == 1.0 and cb.prune_curve[3]["asr"] == 0.0


# ----------------------------------------------------------------- FinePruner: plain PyTorch, fast curve, bad input
def _example_code() -> str:
    """The example lines of FinePruner's docstring, as a user would paste them."""

    doc = FinePruner.__doc__
    block = doc[doc.index("::") + 2 : doc.index("Args:")]
    return "\n".join(line[8:] for line in block.splitlines() if line.strip())


def test_the_docstring_example_prunes_and_exports_plain_weights(tmp_path, monkeypatch) -> None:
    from backdoor_lab.models.traffic_cnn import TrafficSignCNN

    torch.manual_seed(0)
    model = TrafficSignCNN(4, channels=(4, 4, 4, 4, 16), hidden=16).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    clean_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    triggered_loader = DataLoader(TensorDataset(x + 1.0, torch.zeros(64, dtype=torch.long)), batch_size=16)
    code = _example_code()
    assert len(code.splitlines()) == 6
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "clean_loader": clean_loader, "triggered_loader": triggered_loader, "torch": torch}
    exec(code, scope)  # noqa: S102 - the documented example, verbatim
    pruner = scope["pruner"]
    assert pruner.split is not None, "the built-in network must take the cached path"
    assert [p["pruned"] for p in pruner.prune_curve][:3] == [0, 1, 2]
    passed = [p["pruned"] for p in pruner.prune_curve if p["clean_acc"] >= 1.0 - 0.04]
    assert len(pruner.pruned_channels) == max(passed) > 0
    state = torch.load(tmp_path / "defended.pt", weights_only=True)
    fresh = TrafficSignCNN(4, channels=(4, 4, 4, 4, 16), hidden=16).eval()
    fresh.load_state_dict(state, strict=True)
    assert fresh.conv5.weight[pruner.pruned_channels].abs().max() == 0
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _built_in(name: str) -> tuple[nn.Module, tuple[int, ...], str, str | None]:
    from backdoor_lab.models.deepid import DeepID
    from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet
    from backdoor_lab.models.traffic_cnn import TrafficSignCNN

    return {
        "signs": (TrafficSignCNN(18), (3, 32, 32), "conv5", None),
        "speech": (SpectrogramAlexNet(10), (1, 40, 63), "conv5", None),
        "faces": (DeepID(20), (3, 55, 47), "conv3", "pool3"),
        "residual": (Residual(), (3, 8, 8), "conv_a", None),
    }[name]


@pytest.mark.parametrize("name", ["signs", "speech", "faces", "residual"])
def test_cached_curve_equals_full_re_evaluation_at_every_channel_count(name, monkeypatch) -> None:
    from backdoor_lab.defenses import curve_cache

    torch.manual_seed(0)
    model, shape, layer, stat = _built_in(name)
    model.eval()
    # Inputs of spread scales and offsets: a fresh network's answers differ between them (plain noise gets one
    # class for all), so masking channels changes answers and the comparison means something.
    spread = torch.logspace(-1, 1, 24).view(-1, *[1] * len(shape))
    x = torch.randn(24, *shape) * spread + torch.linspace(-3, 3, 24).view(-1, *[1] * len(shape))
    x_trig = x.flip(0) + 0.5
    with torch.no_grad():  # labels = the network's own answers: the curve starts at 100% and falls
        clean = DataLoader(TensorDataset(x, model(x).argmax(1)), batch_size=8)
        triggered = DataLoader(TensorDataset(x_trig, torch.zeros(24, dtype=torch.long)), batch_size=8)
    fast = FinePruner(model, layer, activation_layer=stat, step=1, full_curve=True)
    fast.rank(clean, triggered)
    assert fast.split is not None, "the built-in network must take the cached path"
    assert fast.incremental, "the layers reading the cut are linear: the curve must keep running sums"
    fast_curve = fast.measure_curve()
    assert [p["pruned"] for p in fast_curve] == list(range(fast.num_channels))  # every count but all
    # The running sums alone, no near-tie sample sent to the exact tail: the same curve here too.
    monkeypatch.setattr(curve_cache, "NEAR_TIE", 0.0)
    sums_only = FinePruner(model, layer, activation_layer=stat, step=1, full_curve=True)
    sums_only.rank(clean, triggered)
    assert sums_only.measure_curve() == fast_curve and sums_only.exact_tail_runs == 0
    # Every moved sample sent to the exact tail: the same curve again (the two paths agree with each other).
    monkeypatch.setattr(curve_cache, "NEAR_TIE", float("inf"))
    exact_only = FinePruner(model, layer, activation_layer=stat, step=1, full_curve=True)
    exact_only.rank(clean, triggered)
    assert exact_only.measure_curve() == fast_curve and exact_only.exact_tail_runs > 0
    # The whole network re-run at every count (every 8th for the 256-channel signs net, to keep the suite fast).
    full = FinePruner(model, layer, activation_layer=stat, step=1 if fast.num_channels <= 64 else 8, fast=False)
    full.full_curve = True
    full.rank(clean, triggered)
    full_curve = full.measure_curve()
    by_count = {p["pruned"]: p for p in fast_curve}
    assert full_curve == [by_count[p["pruned"]] for p in full_curve]
    assert full.channel_activation == fast.channel_activation
    accuracies = {p["clean_acc"] for p in fast_curve}
    assert max(accuracies) == 1.0 and min(accuracies) < 0.9  # the masks did change the answers


def test_near_ties_flag_the_two_best_classes_within_the_tolerance_of_the_largest_logit() -> None:
    from backdoor_lab.defenses.curve_cache import NEAR_TIE, near_ties

    logits = torch.tensor(
        [
            [4.0, 4.0 - 0.5 * NEAR_TIE * 4.0, 0.0],  # the runner-up within the tolerance: a tie
            [4.0, 4.0 - 2.0 * NEAR_TIE * 4.0, 0.0],  # just outside it
            [1.0, 1.0, -3.0],  # equal best; the largest |logit| is the negative one
            [-8.0, -8.0 + 0.5 * NEAR_TIE * 8.0, -9.0],  # all negative: the scale is |-9|, so within
            [2.0, -1.0, 0.5],
        ],
        dtype=torch.float64,
    )
    assert near_ties(logits).tolist() == [True, False, True, True, False]
    assert near_ties(logits, logits.amax(dim=1)).tolist() == [True, False, True, True, False]
    assert not near_ties(torch.ones(3, 1)).any()  # one class: nothing to tie with


def test_residual_cut_carries_the_skip_and_the_masked_batchnorm() -> None:
    from backdoor_lab.defenses.network_split import split_network

    split = split_network(Residual(), "conv_a", ["bn_a"])
    assert split.cut_name == "relu_1" or "relu" in split.cut_name  # moved past bn_a and its ReLU
    assert len(split.head.graph.find_nodes(op="output")[0].args[0]) == 2  # the cut and the skip


def test_head_pools_before_the_relu_with_the_same_values_except_where_observed() -> None:
    from backdoor_lab.defenses.network_split import split_network
    from backdoor_lab.models.deepid import DeepID

    torch.manual_seed(0)
    model = DeepID(5).eval()
    x = torch.randn(6, 3, 55, 47)

    def calls(split) -> list[str]:
        return [n.target for n in split.head.graph.nodes if n.op == "call_module"]

    split = split_network(model, "conv3", observed=["pool3"])
    assert calls(split)[:6] == ["conv1", "pool1", "relu1", "conv2", "pool2", "relu2"]  # ReLU on a quarter
    assert calls(split)[-2:] == ["relu3", "pool3"]  # pool3's hook ranks the channels: its input stays rectified
    with torch.no_grad():
        assert torch.equal(split.tail(*split.head(x)), model(x))
    kept = split_network(model, "conv3", observed=["relu1", "pool2"])
    assert calls(kept)[:6] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2"]


def test_running_sums_need_readers_linear_in_the_cut() -> None:
    from backdoor_lab.defenses.network_split import split_network
    from backdoor_lab.models.deepid import DeepID

    split = split_network(DeepID(5), "conv3")
    assert [type(r.module).__name__ for r in split.readers] == ["Conv2d", "Linear"]  # conv4 and fc_pool3
    squashed = split_network(SigmoidNet(), "conv")
    assert squashed.readers is None and squashed.rest is None  # sigmoid reads the cut: re-run the tail per mask


def test_a_tail_without_linear_readers_still_equals_full_re_evaluation() -> None:

    torch.manual_seed(0)
    model = SigmoidNet().eval()
    x = torch.randn(32, 3, 6, 6) * torch.logspace(-1, 1, 32).view(-1, 1, 1, 1)
    with torch.no_grad():
        loader = DataLoader(TensorDataset(x, model(x).argmax(1)), batch_size=8)
    curves = []
    for fast in (True, False):
        pruner = FinePruner(model, "conv", step=1, full_curve=True, rectify=False, fast=fast)
        pruner.rank(loader)
        assert (pruner.split is not None) == fast and not pruner.incremental
        curves.append(pruner.measure_curve())
    assert curves[0] == curves[1] and min(p["clean_acc"] for p in curves[0]) < 1.0


class DataDependent(KnownNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # torch.fx cannot trace a branch on data
            return self.head(x.mean(dim=(2, 3)).repeat(1, 4))
        return super().forward(x)


def test_untraceable_network_falls_back_to_full_re_evaluation_with_one_warning() -> None:

    pruner = FinePruner(DataDependent(), "features.0", step=1)
    with pytest.warns(RuntimeWarning, match="re-evaluates the whole network") as record:
        pruner.run(DataLoader(known_data(), batch_size=16))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert pruner.split is None and pruner.pruned_channels == [0, 1]
    assert [p["clean_acc"] for p in pruner.prune_curve] == pytest.approx([1.0, 1.0, 1.0, 0.5])


class UnusedConv(KnownNet):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(1, 4, 1)  # registered, never called


class DictOut(KnownNet):
    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": super().forward(x)}


@pytest.mark.parametrize("fast", [True, False])
def test_bad_input_fails_clearly_before_any_pruning(fast) -> None:

    loader = DataLoader(known_data(), batch_size=16)
    cases = [
        (UnusedConv(), "spare", loader, "'spare' is not reached by UnusedConv.forward"),
        (DictOut(), "features.0", loader, r"must return logits of shape \(batch=16, classes\); it returned dict"),
        (KnownNet(), "features.0", DataLoader(TensorDataset(torch.zeros(0, 1, 2, 2)), batch_size=4), "no batches"),
    ]
    for model, layer, data, match in cases:
        pruner = FinePruner(model, layer, fast=fast)
        with pytest.raises(ValueError, match=match):
            pruner.rank(data)
        conv = dict(model.named_modules())[layer]
        assert not hasattr(conv, "weight_mask") or bool(conv.weight_mask.all()), "nothing may be pruned"


def test_dict_batches_name_the_accepted_keys_and_batch_to_xy(tmp_path) -> None:

    batches = [{"pixels": x, "cls": y} for x, y in known_data()]
    loader = DataLoader(batches, batch_size=16)
    with pytest.raises(ValueError, match=r"keys \['cls', 'pixels'\].*'inputs'.*'targets'.*batch_to_xy="):
        FinePruner(KnownNet(), "features.0").rank(loader)
    cb = FinePruningCallback(step=1, clean_dataloader=loader)
    with pytest.raises(ValueError, match="batch_to_xy="):
        _trainer(tmp_path, cb).fit(PlainModule())
    pruner = FinePruner(KnownNet(), "features.0", step=1, batch_to_xy=lambda b: (b["pixels"], b["cls"], None))
    assert pruner.run(loader) == [0, 1]


# ----------------------------------------------------------------- FinePruner's protocol: choose, apply, run
def _known_pruner(**kwargs) -> FinePruner:
    return FinePruner(KnownNet(), "features.0", **kwargs)


@pytest.mark.parametrize(
    ("accuracies", "drop", "chosen"),
    [
        ([1.0, 0.75, 0.5], 0.25, 1),  # exactly at baseline - drop passes (binary-exact values: no rounding)
        ([0.9, 1.0, 0.875, 0.5], 0.03125, 2),  # the baseline is the unpruned point, not the best one
        ([1.0, 0.5, 1.0], 0.25, 0),  # the first failing point stops the rule: no later recovery counts
        ([1.0, 1.0, 1.0, 1.0], 0.0, 3),  # nothing lost: the last point
    ],
)
def test_the_stop_rule_keeps_the_last_count_before_the_first_drop_past_the_budget(accuracies, drop, chosen) -> None:
    pruner = _known_pruner(max_accuracy_drop=drop)
    pruner.prune_curve = [{"pruned": i, "clean_acc": a, "asr": None} for i, a in enumerate(accuracies)]
    assert pruner.choose() == chosen


def test_choose_before_the_curve_says_what_to_call_first() -> None:
    with pytest.raises(RuntimeError, match=r"^the stop rule needs the curve: call measure_curve\(\) first$"):
        _known_pruner().choose()
    assert _known_pruner(prune_ratio=0.5).choose() == 2  # a ratio needs no curve


def test_apply_masks_the_count_it_is_given_and_frees_the_cached_pass() -> None:
    pruner = _known_pruner()  # stop rule: pruning the class channel (2) drops accuracy to 50%, so it keeps 2
    loader = DataLoader(known_data(), batch_size=16)
    pruner.rank(loader)
    pruner.measure_curve()
    assert pruner.choose() == 2
    assert pruner.apply(3) == [0, 1, 2]  # an explicit count wins over the stop rule
    assert pruner.keep_mask().tolist() == [False, False, False, True]
    assert pruner._clean is None and pruner._triggered is None and pruner._cache is None  # the pass's tensors freed
    assert pruner.apply() == [0, 1]


def test_run_ranks_both_loaders_with_their_indices_then_applies_the_stop_rule() -> None:
    seen: list[int] = []

    def transfer(batch, dataloader_idx: int):
        seen.append(dataloader_idx)
        return batch

    pruner = _known_pruner(transfer=transfer)
    triggered = DataLoader(TensorDataset(torch.full((32, 1, 2, 2), 2.0), torch.ones(32, dtype=torch.long)), 16)
    assert pruner.run(DataLoader(known_data(), batch_size=16), triggered, clean_idx=3, triggered_idx=5) == [0, 1]
    assert pruner.triggered_activation == pytest.approx([0.0, 0.1, 2.0, 3.0])  # the triggered loader was read
    assert set(seen) == {3, 5} and seen.count(3) == 4 and seen.count(5) == 2  # one pass each, with its index
    assert pruner.prune_curve[0]["asr"] == 1.0
    assert pruner.trigger_channel_ranks(top=1) == [2]  # the trigger drives channel 2 most; it is third to prune


class SharedWeight(nn.Module):
    """Reads the pruned conv's weight a second time, after the cut: masking the cut's value misses that read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)) + self.conv.weight.sum(dim=(1, 2, 3)))


def test_a_cut_right_unmasked_but_wrong_masked_falls_back_and_frees_its_tensors() -> None:
    """The split equals the network with every channel kept; masked, the second weight read differs: the check
    of the cut (half the channels masked) must catch it, warn once, drop the cached tensors and re-evaluate."""
    torch.manual_seed(0)
    model = SharedWeight()
    x = torch.randn(32, 1, 3, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    pruner = FinePruner(model, "conv", prune_ratio=0.5)
    with pytest.warns(RuntimeWarning, match=r"the split at relu does not give the whole network's logits\)$"):
        pruner.rank(DataLoader(TensorDataset(x, y), batch_size=8))
    assert pruner.split is None and pruner._cache is None
    assert all(b.crossing is None and b.hits is None for b in pruner._clean.batches)
    curve = pruner.measure_curve()  # the full re-evaluation: masking reaches the second read too
    with torch.no_grad():
        for point in curve:
            set_channel_mask(pruner.modules, kept_channels(4, pruner.pruning_order()[: int(point["pruned"])]))
            assert point["clean_acc"] == float((model(x).argmax(1) == y).float().mean())
        set_channel_mask(pruner.modules, torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("logit_scale", "dtype", "running_sums"),
    [
        (1.0, torch.float32, True),
        (1000.0, torch.float32, True),  # the tolerance scales with the largest logit: large logits keep the sums
        (1.0, torch.bfloat16, False),  # bf16 rounding is far coarser than the sums' tolerance: re-run the readers
    ],
)
def test_running_sums_stand_in_for_the_readers_only_in_full_precision(logit_scale, dtype, running_sums) -> None:
    from backdoor_lab.models.traffic_cnn import TrafficSignCNN

    torch.manual_seed(0)
    model = TrafficSignCNN(4, channels=(4, 4, 4, 4, 16), hidden=16).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(logit_scale)
        model.classifier[-1].bias.mul_(logit_scale)
    model = model.to(dtype)
    x = torch.randn(64, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    pruner = FinePruner(model, "conv5")
    pruner.rank(DataLoader(TensorDataset(x, y), batch_size=16))
    assert pruner.split is not None and pruner.incremental is running_sums
