"""ANP (Wu & Wang, NeurIPS 2021): known answers on hand-planted backdoors, and the defense's Lightning life cycle.

The planted network has one backdoor channel that is dormant on clean data by a small margin: a perturbation
of 0.4 wakes it, and when awake it routes every input to the target class. ANP's worst-case perturbation must
find it, so its mask is driven to 0 while the clean channels' masks stay at 1. The same channel dormant by a wide
margin cannot be woken within eps, and ANP must leave it (the method's documented reach, and the proof that the
perturbation is what decides). A mask that the hooks ignore, or a perturbation that descends instead of ascends,
leaves the backdoor channel's mask at 1 and fails the known-answer tests.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from backdoor_lab.defenses import DefenderData, DefenseContext
from backdoor_lab.defenses.anp import (
    ANP,
    ANPCallback,
    ANPSettings,
    anp_masks,
    choose_pruned,
    optimize_masks,
)
from backdoor_lab.defenses.methods import NO_FINE_TUNING
from backdoor_lab.defenses.neurons import MaskedNeurons
from backdoor_lab.models.classifier import BackdoorClassifier
from tests.nets import LinearOnly, Residual
from tests.test_known_answer import attack_success, clean_accuracy, make_trainer, snapshot
from tests.trainers import quiet_trainer

TARGET = 0
BACKDOOR = 3  # the planted backdoor channel of PlantedNet
FAST = ANPSettings(iterations=40, batch_size=8)  # tiny tensors: a few dozen steps settle every mask


pytestmark = pytest.mark.usefixtures("one_thread")


class PlantedNet(nn.Module):
    """1x1 conv (4 -> 5 channels) [-> BatchNorm] -> ReLU -> mean over space -> linear (5 -> 3), weights by hand.

    Inputs: channels 0..2 hold the class one-hot as planes of ones, channel 3 is the trigger plane. Conv channels
    0..2 copy the class planes (the clean task). Channel 3 is the backdoor: ReLU(sum of class planes + 5 * trigger
    - (1 + margin)), that is -margin on every clean input (dormant) and 5 - margin when triggered, read by the
    target class with weight 100. Channel 4 is always on (2.0) and unused. With ``batchnorm`` the conv has no bias
    and a BatchNorm with identity statistics adds the same shifts as its ``beta``, so the function is the same.

    Under ANP's perturbation the backdoor channel's pre-activation is (m + delta) - (1 + margin)(1 + delta_b):
    with margin 0.1 the worst case (0.4, -0.4) gives m - 0.26 > 0 for every m above 0.26, so it fires on clean
    data and flips it to the target; with margin 3 it stays below 0 for every m, delta and delta_b.
    """

    def __init__(self, batchnorm: bool = False, margin: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(5) if batchnorm else None
        self.relu = nn.ReLU()
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            weight = torch.zeros(5, 4)
            weight[0, 0] = weight[1, 1] = weight[2, 2] = 1.0
            weight[BACKDOOR, :3] = 1.0
            weight[BACKDOOR, 3] = 5.0
            self.conv.weight.copy_(weight.view(5, 4, 1, 1))
            shift = torch.tensor([0.0, 0.0, 0.0, -(1.0 + margin), 2.0])
            if self.bn is None:
                self.conv.bias.copy_(shift)
            else:
                self.bn.running_var.fill_(1.0 - self.bn.eps)  # normalises to exactly the conv's output
                self.bn.bias.copy_(shift)
            head = torch.zeros(3, 5)
            head[0, 0] = head[1, 1] = head[2, 2] = 2.0
            head[TARGET, BACKDOOR] = 100.0
            self.head.weight.copy_(head)
            self.head.bias.copy_(torch.tensor([0.0, 0.1, 0.2]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        return self.head(self.relu(out).mean(dim=(2, 3)))


def planted_sets(per_class: int = 8) -> tuple[TensorDataset, TensorDataset]:
    """Clean (x, y) and triggered (x, target, true) sets; the triggered set keeps target-class samples."""
    labels = torch.arange(3).repeat_interleave(per_class)
    x = torch.zeros(len(labels), 4, 2, 2)
    x[torch.arange(len(labels)), labels] = 1.0
    triggered = x.clone()
    triggered[:, 3] = 1.0
    return TensorDataset(x, labels), TensorDataset(triggered, torch.full_like(labels, TARGET), labels)


def planted_model(batchnorm: bool = False, margin: float = 0.1, lr: float = 0.0) -> BackdoorClassifier:
    return BackdoorClassifier(
        net=PlantedNet(batchnorm, margin), num_classes=3, optimizer=partial(torch.optim.SGD, lr=lr)
    )


def loaders(clean: TensorDataset, triggered: TensorDataset) -> tuple[DataLoader, DataLoader]:
    return DataLoader(clean, batch_size=8), DataLoader(triggered, batch_size=8)


def defend(
    model: BackdoorClassifier, clean: TensorDataset, triggered: TensorDataset, settings: ANPSettings = FAST
) -> tuple[ANP, dict]:
    """ANP through the plug-in, as the pipeline runs it: check, apply on DefenderData, export."""
    L.seed_everything(0, verbose=False)
    defense = ANP(settings)
    defense.check(model)
    data = DefenderData(clean, triggered, class_names=["a", "b", "c"], batch_size=8, eval_batch_size=8)
    record = defense.apply(DefenseContext(model, data, make_trainer))
    return defense, record


# --------------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True], ids=["conv", "batchnorm"])
def test_anp_prunes_exactly_the_planted_backdoor_channel(batchnorm: bool) -> None:
    model = planted_model(batchnorm)
    clean, triggered = planted_sets()
    clean_loader, triggered_loader = loaders(clean, triggered)
    assert clean_accuracy(model, clean_loader) == 1.0 and attack_success(model, triggered_loader) == 1.0
    bn_stats = None if model.net.bn is None else snapshot(model.net.bn)

    defense, record = defend(model, clean, triggered)

    values = record["mask_values"]["net.conv"]
    assert values[BACKDOOR] < 0.05, "the worst-case perturbation must drive the backdoor's mask to ~0"
    assert min(values[c] for c in (0, 1, 2)) > 0.95, "the clean channels' masks must stay high"
    assert values[4] == 1.0  # unused channel: no gradient at all
    assert record["masks"] == {"net.conv": [BACKDOOR]}
    assert record["pruned_count"] == 1 and record["pruned_fraction"] == pytest.approx(1 / 5)
    assert record["layer_channels"] == {"net.conv": 5}
    assert record["threshold"] == 0.2 and record["prune_fraction"] is None
    assert record["fine_tune"] == NO_FINE_TUNING and record["iterations"] == FAST.iterations
    assert record["val"] == {"clean_acc_before": 1.0, "asr_before": 1.0, "clean_acc_after": 1.0, "asr_after": 0.0}

    assert attack_success(model, triggered_loader) == 0.0 and clean_accuracy(model, clean_loader) == 1.0
    assert model.net.conv.weight[BACKDOOR].abs().max() == 0
    if batchnorm:
        assert model.net.bn.weight[BACKDOOR] == 0 and model.net.bn.bias[BACKDOOR] == 0
        for key in ("running_mean", "running_var", "num_batches_tracked"):  # eval mode: statistics untouched
            assert torch.equal(model.net.bn.state_dict()[key], bn_stats[key])
    defense.export(model)
    assert "net.conv.weight" in dict(model.named_parameters()) and not hasattr(model.net.conv, "weight_mask")
    assert attack_success(model, triggered_loader) == 0.0 and clean_accuracy(model, clean_loader) == 1.0


@pytest.mark.parametrize("batchnorm", [False, True], ids=["conv", "batchnorm"])
def test_a_channel_dormant_beyond_the_perturbation_bound_is_left_alone(batchnorm: bool) -> None:
    """Margin 3: no perturbation within eps wakes the channel, so nothing pushes its mask (ANP's known reach)."""
    model = planted_model(batchnorm, margin=3.0)
    clean, triggered = planted_sets()
    _, record = defend(model, clean, triggered)
    assert record["mask_values"]["net.conv"] == [1.0] * 5
    assert record["masks"] == {"net.conv": []}
    assert attack_success(model, loaders(clean, triggered)[1]) == 1.0


def test_prune_fraction_prunes_the_smallest_masks() -> None:
    model = planted_model()
    clean, triggered = planted_sets()
    # 0.3 of 5 units rounds to 2: the backdoor (mask ~0), then the lowest of the rest (ties: by index)
    _, record = defend(model, clean, triggered, ANPSettings(iterations=40, batch_size=8, prune_fraction=0.3))
    assert record["masks"] == {"net.conv": [0, BACKDOOR]}
    assert record["pruned_count"] == 2 and record["threshold"] is None and record["prune_fraction"] == 0.3


def test_choose_pruned_by_threshold_and_by_fraction() -> None:
    values = {"a": [0.9, 0.1, 0.5], "b": [0.05, 1.0], "c": [0.1]}
    assert choose_pruned(values, ANPSettings(threshold=0.2)) == {"a": [1], "b": [0], "c": [0]}
    assert choose_pruned(values, ANPSettings(threshold=0.1)) == {"a": [], "b": [0], "c": []}  # strictly below
    # 3 of 6: 0.05 (b0), then the 0.1 tie broken by layer order (a1 before c0)
    assert choose_pruned(values, ANPSettings(prune_fraction=0.4)) == {"a": [1], "b": [0], "c": []}
    assert choose_pruned(values, ANPSettings(prune_fraction=0.5)) == {"a": [1], "b": [0], "c": [0]}
    assert choose_pruned(values, ANPSettings(prune_fraction=0.0)) == {"a": [], "b": [], "c": []}


# --------------------------------------------------------------------------------------------------------
# The hooks and the plain-PyTorch core
# --------------------------------------------------------------------------------------------------------


def _by_hand(net: Residual, x: Tensor, coeff: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Residual's forward with (out - b) * scale + b * shift applied at stem, bn_a (not conv_a) and conv_b."""

    def unit(out: Tensor, bias: Tensor, name: str) -> Tensor:
        scale, shift = (t.view(1, -1, 1, 1) for t in coeff[name])
        b = bias.view(1, -1, 1, 1)
        return (out - b) * scale + b * shift

    def conv(module: nn.Conv2d, inputs: Tensor) -> Tensor:  # functional: the modules' hooks must not run here
        return F.conv2d(inputs, module.weight, module.bias, padding=module.padding)

    bn = net.bn_a
    stem = unit(conv(net.stem, x), net.stem.bias, "stem")
    skip = torch.relu(stem)
    normed = F.batch_norm(conv(net.conv_a, skip), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    a = unit(normed, bn.bias, "conv_a")
    out = unit(conv(net.conv_b, torch.relu(a)), net.conv_b.bias, "conv_b")
    return net.head(torch.relu(out + skip).mean(dim=(2, 3)))


@torch.no_grad()
def test_hooks_apply_the_reference_formula_after_the_batchnorm_or_the_conv() -> None:
    torch.manual_seed(0)
    net = Residual().eval()
    x = torch.randn(4, 3, 6, 6)
    plain = net(x)
    units = MaskedNeurons(net)
    assert [u.name for u in units.units] == ["stem", "conv_a", "conv_b"]
    assert [type(u.module).__name__ for u in units.units] == ["Conv2d", "BatchNorm2d", "Conv2d"]
    assert torch.allclose(net(x), plain, atol=1e-6), "masks of 1, unperturbed: the network's own function"
    units.reset_noise(0.4, torch.Generator().manual_seed(1))
    for unit in units.units:
        unit.mask.uniform_(0.2, 1.0)
        assert unit.noise.abs().max() <= 0.4 and unit.noise_bias.abs().max() <= 0.4
    masked = {u.name: (u.mask, torch.ones_like(u.mask)) for u in units.units}
    perturbed = {u.name: (u.mask + u.noise, 1 + u.noise_bias) for u in units.units}
    torch.testing.assert_close(net(x), _by_hand(net, x, masked))
    units.perturb(True)
    torch.testing.assert_close(net(x), _by_hand(net, x, perturbed))
    assert not torch.allclose(net(x), plain, atol=1e-3)
    units.close()
    assert torch.equal(net(x), plain)


def _perturbed_residual() -> tuple[nn.Module, Tensor, Tensor, MaskedNeurons]:
    """The held-out residual net under masks, a batch, and a perturbation drawn in [-0.25, 0.25] (exact in float32,
    so the bound is checked exactly), switched on."""
    torch.manual_seed(0)
    net = Residual().eval()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    units = MaskedNeurons(net)
    units.reset_noise(0.25, torch.Generator().manual_seed(0))
    units.perturb(True)
    return net, x, y, units


def test_the_perturbation_ascends_the_loss_and_stays_within_eps() -> None:
    net, x, y, units = _perturbed_residual()
    start = [t.clone() for t in units.noises]
    with torch.no_grad():
        before = float(F.cross_entropy(net(x), y))
    units.ascend(lambda: F.cross_entropy(net(x), y), step=0.25, eps=0.25)
    with torch.no_grad():
        after = float(F.cross_entropy(net(x), y))
    assert after > before, "the perturbation must make the loss worse (the worst case), not better"
    moved = torch.cat([(t - s).abs().flatten() for t, s in zip(units.noises, start, strict=True)])
    assert moved.max() > 0
    assert max(float(t.abs().max()) for t in units.noises) <= 0.25, "clipped to [-eps, eps]"
    assert sum(int((t.abs() == 0.25).sum()) for t in units.noises) > 0  # some steps reached the bound
    assert all(not t.requires_grad for t in units.noises) and all(m.grad is None for m in units.masks)
    units.close()


def test_the_model_is_left_exactly_as_it_was() -> None:
    torch.manual_seed(0)
    net = Residual()
    net.train()
    net.conv_b.eval()  # a module's own mode must come back as it was, not the model's
    net.stem.weight.requires_grad_(False)
    before = snapshot(net)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))), batch_size=8)
    masks, values = anp_masks(net, data, ANPSettings(iterations=5, batch_size=4))
    after = snapshot(net)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # BN stats too
    assert net.training and net.bn_a.training and not net.conv_b.training
    assert not net.stem.weight.requires_grad and net.conv_a.weight.requires_grad
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert list(values) == ["stem", "conv_a", "conv_b"] and [len(v) for v in values.values()] == [8, 12, 8]
    assert all(0.0 <= v <= 1.0 for vs in values.values() for v in vs) and set(masks) == set(values)


def test_the_search_is_deterministic_given_a_seed() -> None:
    torch.manual_seed(0)
    net = Residual()
    data = DataLoader(TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))), batch_size=8)
    settings = ANPSettings(iterations=5, batch_size=4)

    def run(seed: int) -> dict:
        return optimize_masks(net, data, settings, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert run(0) == first
    assert run(1) != first  # the seed is used (noise and batches)
    torch.manual_seed(7)
    global_seeded = optimize_masks(net, data, settings)
    torch.manual_seed(7)
    assert optimize_masks(net, data, settings) == global_seeded


# --------------------------------------------------------------------------------------------------------
# The defense: settings, models it refuses, what it may read
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eps", -1),
        ("eps", 0.0),
        ("eps", 1.5),
        ("alpha", 1.2),
        ("iterations", 0),
        ("iterations", 2.5),
        ("mask_lr", 0),
        ("noise_steps", True),
        ("batch_size", 0),
        ("threshold", -0.1),
        ("prune_fraction", 1.0),
        ("prune_fraction", "0.1"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^anp\.{key} must be .*, got {value!r}$") as info:
        ANPSettings(**{key: value})
    assert "\n" not in str(info.value)


def test_a_model_without_convs_is_refused_in_one_line() -> None:
    model = BackdoorClassifier(net=LinearOnly(), num_classes=2, optimizer=partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match=r"^anp: ANP masks conv channels and BackdoorClassifier has no nn\.Conv2d$"):
        ANP(ANPSettings()).check(model)
    data = DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match=r"^anp: ANP masks conv channels and LinearOnly has no nn\.Conv2d$"):
        optimize_masks(LinearOnly(), data, FAST)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_the_triggered_data_never_decides() -> None:
    """The same masks whether the triggered split is the real one, noise, or absent (a plain fit without it)."""
    clean, triggered = planted_sets()
    _, real = defend(planted_model(), clean, triggered)
    x, target, true = triggered.tensors
    noise = TensorDataset(torch.randn_like(x) * 10, (target + 1) % 3, true)
    _, garbage = defend(planted_model(), clean, noise)
    assert garbage["mask_values"] == real["mask_values"] and garbage["masks"] == real["masks"]
    assert garbage["val"]["asr_before"] != real["val"]["asr_before"]  # the noise set was read, for the record

    L.seed_everything(0, verbose=False)
    callback = ANPCallback(FAST, clean_dataloader=DataLoader(clean, batch_size=8), progress=False)
    model = planted_model()
    quiet_trainer(None, [callback], 0, num_sanity_val_steps=0).fit(
        model, train_dataloaders=DataLoader(clean, batch_size=8)
    )
    assert callback.mask_values == real["mask_values"] and callback.val["asr_before"] is None


# --------------------------------------------------------------------------------------------------------
# The callback in a plain Lightning fit
# --------------------------------------------------------------------------------------------------------


class PlantedData(L.LightningDataModule):
    """A plain datamodule: clean training data, and [clean, triggered] val loaders (BackdoorClassifier's order)."""

    def __init__(self) -> None:
        super().__init__()
        self.clean, self.triggered = planted_sets()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.clean, batch_size=8, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return list(loaders(self.clean, self.triggered))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
def test_callback_masks_then_fine_tunes_with_the_masks_kept(tmp_path, precision: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = PlantedData()
    model = planted_model(lr=0.5)
    callback = ANPCallback(FAST, clean_dataloader_idx=0, progress=False)
    trainer = quiet_trainer(tmp_path, [callback], 2, precision=precision, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)

    assert callback.masks == {"net.conv": [BACKDOOR]}, "mask gradients must flow under every precision"
    assert callback.mask_values["net.conv"][BACKDOOR] < 0.05
    assert trainer.global_step == 2 * 3  # the fine-tuning epochs ran after the search
    conv = model.net.conv
    assert conv.weight[BACKDOOR].abs().max() == 0 and conv.bias[BACKDOOR] == 0, "masked through the fine-tuning"
    assert not torch.equal(conv.weight_orig[:3].float(), PlantedNet().conv.weight[:3]), "the clean path trained"
    model.float()
    clean_loader, triggered_loader = loaders(dm.clean, dm.triggered)
    assert attack_success(model, triggered_loader) == 0.0 and clean_accuracy(model, clean_loader) == 1.0


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoints_hold_plain_weights_and_the_callback_state_restores_masks(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    dm = PlantedData()
    callback = ANPCallback(FAST, clean_dataloader_idx=0, progress=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/clean_acc", mode="max", save_last=True)
    trainer = quiet_trainer(tmp_path, [callback, ckpt], 1, enable_checkpointing=True, num_sanity_val_steps=0)
    trainer.fit(planted_model(lr=0.5), datamodule=dm)

    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    state = saved["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert state["net.conv.weight"][BACKDOOR].abs().max() == 0 and state["net.conv.bias"][BACKDOOR] == 0
    fresh = planted_model()
    fresh.load_state_dict(state, strict=True)  # plain weights: an unmasked copy loads them as they are
    assert attack_success(fresh, loaders(dm.clean, dm.triggered)[1]) == 0.0

    (callback_state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ANPCallback")]
    restored = ANPCallback(FAST)
    restored.load_state_dict(callback_state)
    assert restored.masks == callback.masks and restored.mask_values == callback.mask_values
    assert restored.val == callback.val and restored.record() == callback.record()

    # A resumed fit re-installs the recorded masks and does not search again.
    resumed = ANPCallback(FAST, clean_dataloader_idx=0, progress=False)
    resumed.find_masks = lambda *args: pytest.fail("a resumed fit must not search again")
    model = planted_model(lr=0.5)
    quiet_trainer(tmp_path, [resumed], 2, num_sanity_val_steps=0).fit(
        model, datamodule=dm, ckpt_path=tmp_path / "ck" / "last.ckpt", weights_only=True
    )
    assert resumed.masks == callback.masks and resumed.mask_values == callback.mask_values
    assert model.net.conv.weight_mask[BACKDOOR].abs().max() == 0 and model.net.conv.weight[BACKDOOR].abs().max() == 0


@torch.no_grad()
def test_a_conv_without_bias_is_scaled_and_perturbed_as_a_whole() -> None:
    """No BatchNorm and no bias: ``b`` is 0, so the unit's output is ``out * m`` (``out * (m + delta)``)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1, bias=False)
    net = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(2, 2, 2, 2)
    out = conv(x)
    units = MaskedNeurons(net)
    (unit,) = units.units
    assert unit.module is conv and not unit.perturbed and unit.mask.device == conv.weight.device
    unit.mask.copy_(torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(net(x), (out * torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)).flatten(1))
    units.reset_noise(0.4, torch.Generator().manual_seed(2))
    units.perturb(True)
    scale = (unit.mask + unit.noise).view(1, 3, 1, 1)
    torch.testing.assert_close(net(x), (out * scale).flatten(1))
    units.close()


def test_one_ascent_step_moves_each_noise_by_step_times_the_gradients_sign() -> None:
    net, x, y, units = _perturbed_residual()
    start = [t.clone() for t in units.noises]
    for t in units.noises:  # the gradient at the start, through the same hooks
        t.requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), units.noises)
    for t in units.noises:
        t.requires_grad_(False)
    units.ascend(lambda: F.cross_entropy(net(x), y), step=0.1, eps=0.25)
    for t, s, g in zip(units.noises, start, grads, strict=True):
        torch.testing.assert_close(t, (s + 0.1 * torch.sign(g)).clamp(-0.25, 0.25))
    units.close()


def test_a_conv_the_forward_never_calls_gets_no_perturbation_and_breaks_nothing() -> None:
    """A module tree may hold convs the forward skips (an unused head): their noise has no gradient."""

    class WithUnusedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.unused = nn.Conv2d(1, 2, 1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = WithUnusedHead().eval()
    x, y = torch.randn(4, 1, 3, 3), torch.randint(0, 2, (4,))
    units = MaskedNeurons(net)
    units.reset_noise(0.25, torch.Generator().manual_seed(0))
    units.perturb(True)
    unused = [u for u in units.units if u.name == "unused"][0]
    before = unused.noise.clone()
    units.ascend(lambda: F.cross_entropy(net(x), y), step=0.1, eps=0.25)
    assert torch.equal(unused.noise, before)
    units.close()


def test_masked_neurons_live_on_the_networks_device_or_the_one_named() -> None:
    """Masks and perturbations are made where the network is (the meta device stands in for a GPU here: a tensor
    made on the CPU instead would show), or on the device named."""

    def conv_net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1, bias=False))

    on_meta = MaskedNeurons(conv_net().to("meta"))
    named = MaskedNeurons(conv_net(), device=torch.device("meta"))
    for neurons in (on_meta, named):
        assert len(neurons.masks) == 2 and len(neurons.noises) == 4
        assert all(t.device.type == "meta" for t in [*neurons.masks, *neurons.noises])
        assert all(m.requires_grad for m in neurons.masks) and not any(t.requires_grad for t in neurons.noises)
        assert [m.shape[0] for m in neurons.masks] == [3, 2]
    assert all(t.device.type == "cpu" for t in MaskedNeurons(conv_net()).masks)


def _reference_anp_masks(net: nn.Sequential, x: Tensor, y: Tensor, settings: ANPSettings, seed: int) -> list[float]:
    """ANP's search (Wu & Wang, Algorithm 1) written out for one conv layer with bias, on one fixed batch: a random
    start of the neuron and bias perturbations in [-eps, eps], ``noise_steps`` signed ascent steps of eps /
    noise_steps, then SGD (momentum 0.9) of the masks on alpha * natural + (1 - alpha) * robust loss, clipped to
    [0, 1]."""
    conv, rest = net[0], net[1:]
    channels, eps = conv.out_channels, settings.eps
    shape = (1, channels, 1, 1)
    noise_gen = torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
    )
    mask = torch.ones(channels, requires_grad=True)
    optimizer = torch.optim.SGD([mask], lr=settings.mask_lr, momentum=0.9)

    def loss(m: Tensor, d: Tensor | None = None, d_bias: Tensor | None = None) -> Tensor:
        out, b = conv(x), conv.bias.detach().view(shape)
        if d is None:
            return F.cross_entropy(rest((out - b) * m.view(shape) + b), y)
        return F.cross_entropy(rest((out - b) * (m + d).view(shape) + b * (1 + d_bias).view(shape)), y)

    with torch.enable_grad():
        for _ in range(settings.iterations):
            start = torch.rand(2 * channels, generator=noise_gen) * (2 * eps) - eps
            d, d_bias = start[:channels].clone(), start[channels:].clone()
            for _ in range(settings.noise_steps):
                d.requires_grad_(True)
                d_bias.requires_grad_(True)
                g, g_bias = torch.autograd.grad(loss(mask, d, d_bias), [d, d_bias])
                step = eps / settings.noise_steps
                d = (d.detach() + step * torch.sign(g)).clamp(-eps, eps)
                d_bias = (d_bias.detach() + step * torch.sign(g_bias)).clamp(-eps, eps)
            optimizer.zero_grad()
            total = settings.alpha * loss(mask) + (1 - settings.alpha) * loss(mask, d, d_bias)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
    return mask.detach().tolist()


@pytest.mark.parametrize(("alpha", "noise_steps"), [(0.2, 1), (0.7, 3)])
def test_the_mask_search_is_anps_algorithm_step_by_step(alpha: float, noise_steps: int) -> None:
    """Masks after a few iterations equal the algorithm written out above: the loss's alpha split, the ascent's
    step and count, the random start, momentum and clipping are each visible in them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 4, (16,))
    settings = ANPSettings(eps=0.4, alpha=alpha, iterations=4, mask_lr=0.5, noise_steps=noise_steps, batch_size=None)
    found = optimize_masks(net, [(x, y)], settings, generator=torch.Generator().manual_seed(3))
    expected = _reference_anp_masks(net, x, y, settings, seed=3)
    assert list(found) == ["0"]
    torch.testing.assert_close(torch.tensor(found["0"]), torch.tensor(expected), rtol=0, atol=1e-6)
    assert min(expected) < 0.95  # the masks moved: the comparison has something to see


def test_the_search_draws_its_batches_with_replacement_from_its_own_seed() -> None:
    """``batch_size`` samples per iteration, drawn with replacement by a sampler seeded from the search's seed (+1,
    apart from the noise's), each handed to ``transfer`` with the search's ``dataloader_idx``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 3))
    data = DataLoader(TensorDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10) % 3), batch_size=5)
    seen: list = []

    def transfer(batch: list, idx: int) -> list:
        seen.append((batch[0].flatten().long().tolist(), idx))
        return batch

    settings = ANPSettings(iterations=3, batch_size=4)
    optimize_masks(net, data, settings, transfer=transfer, generator=torch.Generator().manual_seed(3), dataloader_idx=2)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    sampler_gen = torch.Generator().manual_seed(seed + 1)
    order = list(RandomSampler(range(10), replacement=True, num_samples=12, generator=sampler_gen))
    assert seen == [(order[4 * i : 4 * i + 4], 2) for i in range(3)]
    with pytest.raises(ValueError) as err:
        optimize_masks(net, data, settings, batch_to_xy=lambda batch: (batch[0], None, None))
    assert str(err.value) == "ANP needs labelled clean batches; batch_to_xy returned no targets"
