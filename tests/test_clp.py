"""CLP (Channel Lipschitzness-based Pruning, Zheng et al., ECCV 2022): known answers on hand-built weights.

The channel bound (UCLC) is checked against spectral norms known by construction (diagonal and rank-one kernels,
BatchNorm gains chosen to give round numbers); the pruning rule against layers with one planted outlier, where
the unbiased std of the reference code decides the boundary; the defense against a planted backdoor network whose
backdoor channel is the one with a large Lipschitz bound: after CLP the attack is gone and clean accuracy holds.
Then the Lightning side: the plug-in as the pipeline runs it, the callback with fine-tuning epochs after it,
checkpoints and resume, the refusals, the config, and that CLP never reads a sample.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from backdoor_lab.defenses import DefenderData, DefenseContext
from backdoor_lab.defenses.clp import CLP, CLPCallback, CLPSettings, channel_lipschitz, clp_masks
from backdoor_lab.defenses.methods import NO_FINE_TUNING
from backdoor_lab.models.classifier import BackdoorClassifier
from tests.conftest import CONF
from tests.nets import LinearOnly, Residual
from tests.test_known_answer import attack_success, clean_accuracy, make_trainer
from tests.trainers import quiet_trainer

TARGET = 0
BACKDOOR = 15  # the planted backdoor channel of PlantedLipschitzNet
CHANNELS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def rank_one(sigma: float, in_channels: int, taps: int) -> Tensor:
    """An ``(in_channels, taps)`` kernel matrix with one singular value, ``sigma`` (a unit outer product scaled)."""
    a = torch.arange(1.0, in_channels + 1)
    b = torch.linspace(-1.0, 2.0, taps)
    return sigma * torch.outer(a / a.norm(), b / b.norm())


def conv_with_bounds(sigmas: list[float], in_channels: int = 3, kernel: int = 3) -> nn.Conv2d:
    """A conv whose channel k has spectral norm ``sigmas[k]`` exactly (a rank-one kernel)."""
    conv = nn.Conv2d(in_channels, len(sigmas), kernel)
    with torch.no_grad():
        for k, sigma in enumerate(sigmas):
            conv.weight[k] = rank_one(sigma, in_channels, kernel * kernel).view(in_channels, kernel, kernel)
    return conv


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


# --------------------------------------------------------------------------------------------------------
# The channel bound
# --------------------------------------------------------------------------------------------------------


def test_channel_lipschitz_is_each_channels_spectral_norm_times_the_batchnorm_gain() -> None:
    conv = nn.Conv2d(3, 3, 2, bias=False)  # each channel's kernel is a (3, 4) matrix
    with torch.no_grad():
        conv.weight.zero_()
        diagonal = torch.zeros(3, 4)
        diagonal[0, 0], diagonal[1, 1], diagonal[2, 2] = 1.0, -7.0, 2.0  # singular values 7, 2, 1
        conv.weight[0] = diagonal.view(3, 2, 2)
        outer = torch.outer(torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0]))  # 5 x 2 = 10
        conv.weight[1] = outer.view(3, 2, 2)  # channel 2 stays zero
    torch.testing.assert_close(channel_lipschitz(conv), torch.tensor([7.0, 10.0, 0.0], dtype=torch.float64))

    bn = nn.BatchNorm2d(3, eps=1.0)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-3.0, 0.5, 1.0]))  # a negative gamma scales by its magnitude
        bn.running_var.copy_(torch.tensor([3.0, 0.0, 1.0]))  # sqrt(var + eps) = 2, 1, sqrt(2)
        bn.running_mean.fill_(5.0)  # a shift, not a gain: no effect
    torch.testing.assert_close(channel_lipschitz(conv, bn), torch.tensor([10.5, 5.0, 0.0], dtype=torch.float64))


def test_a_rank_one_kernel_gives_its_singular_value_for_any_kernel_size() -> None:
    sigmas = [0.25, 1.0, 3.5, 12.0]
    for kernel in (1, 3, 5):
        uclc = channel_lipschitz(conv_with_bounds(sigmas, in_channels=4, kernel=kernel))
        torch.testing.assert_close(uclc, torch.tensor(sigmas, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------
# The pruning rule: UCLC > mean + u * std of the layer (unbiased std, as the reference code)
# --------------------------------------------------------------------------------------------------------

# Fifteen channels of bound 1 and one of 10: mean 1.5625, unbiased std 2.25 (population std 2.18).
OUTLIER = 5
SIGMAS = [10.0 if k == OUTLIER else 1.0 for k in range(CHANNELS)]


@pytest.mark.parametrize(
    ("u", "pruned"),
    [
        (3.0, [OUTLIER]),  # threshold 8.31
        (3.7, [OUTLIER]),  # 9.89: still below 10
        (3.8, []),  # 10.11 with the unbiased std; the population std's 9.84 would prune it
        (30.0, []),
    ],
)
def test_exactly_the_outlying_channel_is_pruned_and_a_large_u_prunes_nothing(u: float, pruned: list[int]) -> None:
    masks, uclc = clp_masks(ConvBN(conv_with_bounds(SIGMAS)), CLPSettings(u=u))
    assert masks == {"conv": pruned}
    assert uclc["conv"] == pytest.approx(SIGMAS)


def test_a_layer_needs_eleven_channels_before_u3_can_prune() -> None:
    """With the unbiased std one channel's z-score is at most (n - 1) / sqrt(n): 2.85 for n = 10, 3.02 for 11."""
    for n, pruned in ((10, []), (11, [0])):
        masks, _ = clp_masks(ConvBN(conv_with_bounds([1e6] + [1.0] * (n - 1))), CLPSettings(u=3.0))
        assert masks == {"conv": pruned}


def spread_conv() -> nn.Conv2d:
    """Sixteen channels of bounds 1.0 .. 1.75: no outlier."""
    return conv_with_bounds([1.0 + 0.05 * k for k in range(CHANNELS)])


def test_a_batchnorm_gain_alone_makes_an_outlier() -> None:
    bn = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        bn.weight[7] = -10.0  # the kernel is ordinary; BatchNorm multiplies the channel by 10 (sign irrelevant)
    assert clp_masks(ConvBN(spread_conv()), CLPSettings())[0] == {"conv": []}
    assert clp_masks(ConvBN(spread_conv(), bn), CLPSettings())[0] == {"conv": [7]}


def test_a_large_kernel_that_batchnorm_scales_back_is_not_an_outlier() -> None:
    """Kernel x 10 and running variance x 100: the conv + BatchNorm map is the same as before, so is its bound."""
    conv, bn = spread_conv(), nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        conv.weight[7] *= 10.0
        bn.running_var[7] = 100.0
    assert clp_masks(ConvBN(conv), CLPSettings())[0] == {"conv": [7]}  # the kernel alone looks like a backdoor
    masks, uclc = clp_masks(ConvBN(conv, bn), CLPSettings())
    assert masks == {"conv": []}
    assert uclc["conv"][7] == pytest.approx(1.35, rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# A planted backdoor network: the backdoor channel has a large Lipschitz bound
# --------------------------------------------------------------------------------------------------------


class PlantedLipschitzNet(nn.Module):
    """3x3 conv (4 -> 16 channels, padding 1) -> ReLU -> mean over space -> linear (16 -> 3 classes), by hand.

    Inputs (4 x 4 x 4): planes 0..2 hold the class one-hot, plane 3 the trigger (0 clean, 1 triggered). Clean
    channel j (< 15) reads its class plane j % 3 at the centre tap with weight 1 + 0.05 j (UCLC 1.0 .. 1.7) and
    votes for that class. The backdoor channel 15 reads the trigger plane with 10/3 on all nine taps (UCLC 10,
    exactly 0 on clean inputs) and adds its mean (about 21) to the target's logit, which beats the true class's
    (at most 7). CLP's threshold at u = 3 is about 8.4: exactly channel 15 goes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, CHANNELS, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(CHANNELS, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.head.weight.zero_()
            self.head.bias.zero_()
            for j in range(BACKDOOR):
                self.conv.weight[j, j % 3, 1, 1] = 1.0 + 0.05 * j
                self.head.weight[j % 3, j] = 1.0
            self.conv.weight[BACKDOOR, 3] = 10.0 / 3.0
            self.head.weight[TARGET, BACKDOOR] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def planted_data(per_class: int = 4) -> tuple[TensorDataset, TensorDataset]:
    """Clean (x, y) and triggered (x, target, true label) samples; target-class samples stay in (ASR skips them)."""
    labels = torch.arange(3).repeat_interleave(per_class)
    x = torch.zeros(len(labels), 4, 4, 4)
    x[torch.arange(len(labels)), labels] = 1.0
    triggered = x.clone()
    triggered[:, 3] = 1.0
    return TensorDataset(x, labels), TensorDataset(triggered, torch.full_like(labels, TARGET), labels)


def planted_model() -> BackdoorClassifier:
    model = BackdoorClassifier(net=PlantedLipschitzNet(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.5))
    clean, triggered = planted_data()
    assert clean_accuracy(model, loader(clean)) == 1.0 and attack_success(model, loader(triggered)) == 1.0
    return model.train()


def loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=6)


def defender_data(clean: Dataset, triggered: Dataset) -> DefenderData:
    return DefenderData(clean, triggered, class_names=["a", "b", "c"], batch_size=6, eval_batch_size=6)


def defend(model: L.LightningModule, settings: CLPSettings, data: DefenderData | None = None) -> tuple[CLP, dict]:
    """CLP as the pipeline runs it: build, check, apply."""
    defense = CLP(settings)
    defense.check(model)
    record = defense.apply(DefenseContext(model, data or defender_data(*planted_data()), make_trainer))
    return defense, record


def test_clp_prunes_the_planted_backdoor_channel_and_the_attack_with_it() -> None:
    model = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean, triggered = planted_data()
    defense, record = defend(model, CLPSettings())
    assert record["masks"] == {"net.conv": [BACKDOOR]}
    assert record["layer_channels"] == {"net.conv": CHANNELS}
    assert record["pruned_count"] == 1 and record["pruned_fraction"] == 1 / CHANNELS
    assert record["uclc"]["net.conv"] == pytest.approx([1.0 + 0.05 * j for j in range(BACKDOOR)] + [10.0])
    assert 1.7 < record["thresholds"]["net.conv"] < 10.0
    assert record["u"] == 3.0 and record["fine_tune"] == NO_FINE_TUNING
    # the mask is installed on the model: the attack is gone, clean accuracy holds
    assert attack_success(model, loader(triggered)) == 0.0
    assert clean_accuracy(model, loader(clean)) == 1.0
    conv = model.net.conv
    assert conv.weight[BACKDOOR].abs().max() == 0 and conv.bias[BACKDOOR] == 0
    # nothing else moved: CLP does not fine-tune
    torch.testing.assert_close(conv.weight_orig, before["net.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.net.head.weight, before["net.head.weight"], rtol=0, atol=0)
    # export folds the mask into plain weights, which keep the defended behaviour
    defense.export(model)
    state = model.state_dict()
    assert "net.conv.weight" in state and not any(k.endswith(("_orig", "_mask")) for k in state)
    assert state["net.conv.weight"][BACKDOOR].abs().max() == 0
    assert attack_success(model, loader(triggered)) == 0.0


def test_a_large_u_leaves_the_planted_backdoor_alone() -> None:
    model = planted_model()
    _, record = defend(model, CLPSettings(u=10.0))
    assert record["masks"] == {"net.conv": []} and record["pruned_fraction"] == 0.0
    assert attack_success(model, loader(planted_data()[1])) == 1.0


class Unreadable(Dataset):
    """A dataset that fails any read: a defense that touches a sample fails with it."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raise AssertionError("CLP read a sample: it is data-free")


def test_clp_reads_no_data() -> None:
    """The plug-in, and the callback in a fit of zero epochs, on a DefenderData whose every sample fails to read."""
    unreadable = defender_data(Unreadable(), Unreadable())
    model = planted_model()
    _, record = defend(model, CLPSettings(), data=unreadable)
    assert record["masks"] == {"net.conv": [BACKDOOR]}
    assert attack_success(model, loader(planted_data()[1])) == 0.0
    model, cb = planted_model(), CLPCallback()
    make_trainer([cb], 0).fit(model, datamodule=unreadable)
    assert cb.masks == {"net.conv": [BACKDOOR]}
    assert attack_success(model, loader(planted_data()[1])) == 0.0


def planted_residual(channel: int = 4) -> BackdoorClassifier:
    """tests/nets.Residual (seeded) whose conv_a channel ``channel`` has a BatchNorm gain 50 times the others."""
    torch.manual_seed(0)
    net = Residual()
    with torch.no_grad():
        net.bn_a.weight.fill_(1.0)
        net.bn_a.weight[channel] = 50.0
    return BackdoorClassifier(net=net, num_classes=5, optimizer=partial(torch.optim.SGD, lr=0.1))


def test_with_batchnorm_the_conv_and_its_batchnorm_are_masked_and_the_channel_is_silent() -> None:
    model = planted_residual()
    expected = copy.deepcopy(model)  # the same network with channel 4 of conv_a and bn_a zeroed by hand
    with torch.no_grad():
        for param in (expected.net.conv_a.weight, expected.net.conv_a.bias, expected.net.bn_a.weight):
            param[4] = 0.0
        expected.net.bn_a.bias[4] = 0.0
    _, record = defend(model, CLPSettings())
    # stem and conv_b have 8 channels: below the 11 that u = 3 needs, they can lose none
    assert record["masks"] == {"net.stem": [], "net.conv_a": [4], "net.conv_b": []}
    assert record["layer_channels"] == {"net.stem": 8, "net.conv_a": 12, "net.conv_b": 8}
    assert record["pruned_fraction"] == 1 / 28
    assert model.net.bn_a.weight[4] == 0 and model.net.bn_a.bias[4] == 0 and model.net.conv_a.bias[4] == 0
    seen = {}
    handle = model.net.bn_a.register_forward_hook(lambda m, i, out: seen.setdefault("bn_a", out))
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))
    handle.remove()
    assert seen["bn_a"][:, 4].abs().max() == 0


def test_layers_restricts_clp_to_the_named_convs() -> None:
    model = planted_residual()
    _, record = defend(model, CLPSettings(layers=("net.stem", "net.conv_b")))
    assert record["masks"] == {"net.stem": [], "net.conv_b": []}
    assert set(record["uclc"]) == {"net.stem", "net.conv_b"}
    assert not hasattr(model.net.conv_a, "weight_mask") and model.net.bn_a.weight[4] == 50.0


# --------------------------------------------------------------------------------------------------------
# The callback in a plain Lightning fit: fine-tuning after it, checkpoints, resume
# --------------------------------------------------------------------------------------------------------


def test_callback_prunes_at_fit_start_and_the_fine_tuning_epochs_keep_the_mask() -> None:
    model = planted_model()
    before = model.net.conv.weight.detach().clone()
    clean, triggered = planted_data()
    cb = CLPCallback(u=3.0)
    make_trainer([cb], 3).fit(model, train_dataloaders=DataLoader(clean, batch_size=6, shuffle=True))
    assert cb.masks == {"net.conv": [BACKDOOR]} and cb.num_channels == {"net.conv": CHANNELS}
    assert cb.uclc["net.conv"][BACKDOOR] == pytest.approx(10.0)
    record = cb.record()
    assert record["pruned_count"] == 1 and record["u"] == 3.0 and record["masks"] == {"net.conv": [BACKDOOR]}
    conv = model.net.conv
    assert not torch.equal(conv.weight[:BACKDOOR], before[:BACKDOOR]), "the clean channels were fine-tuned"
    assert conv.weight[BACKDOOR].abs().max() == 0 and conv.bias[BACKDOOR] == 0, "the mask held through the epochs"
    assert attack_success(model, loader(triggered)) == 0.0
    assert clean_accuracy(model, loader(clean)) == 1.0


def test_checkpoints_hold_plain_weights_and_a_resumed_fit_reinstalls_the_masks(tmp_path) -> None:
    clean, triggered = planted_data()
    train = DataLoader(clean, batch_size=6, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    model = planted_model()
    quiet_trainer(tmp_path, [CLPCallback(), ckpt], 1, enable_checkpointing=True).fit(model, train_dataloaders=train)

    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    state = saved["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state), "plain weights only"
    assert state["net.conv.weight"][BACKDOOR].abs().max() == 0 and state["net.conv.bias"][BACKDOOR] == 0
    (cb_state,) = [v for k, v in saved["callbacks"].items() if "CLPCallback" in k]
    assert cb_state["masks"] == {"net.conv": [BACKDOOR]} and len(cb_state["uclc"]["net.conv"]) == CHANNELS
    fresh = planted_model()
    fresh.load_state_dict(state, strict=True)  # an unpruned copy loads the plain weights: the backdoor is gone
    assert attack_success(fresh, loader(triggered)) == 0.0

    # A fresh model and a callback whose u would prune nothing: the resumed fit takes the masks from the state.
    resumed_model, resumed = planted_model(), CLPCallback(u=100.0)
    trainer = quiet_trainer(tmp_path, [resumed], 2)
    trainer.fit(resumed_model, train_dataloaders=train, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert trainer.current_epoch == 2
    assert resumed.masks == {"net.conv": [BACKDOOR]} and resumed.uclc == cb_state["uclc"]
    conv = resumed_model.net.conv
    assert conv.weight_mask[BACKDOOR].abs().max() == 0 and conv.weight_mask[:BACKDOOR].min() == 1
    assert conv.weight[BACKDOOR].abs().max() == 0
    assert attack_success(resumed_model, loader(triggered)) == 0.0


# --------------------------------------------------------------------------------------------------------
# Refusals and the config
# --------------------------------------------------------------------------------------------------------


def test_a_model_without_conv_layers_is_refused_in_one_line() -> None:
    model = BackdoorClassifier(net=LinearOnly(), num_classes=2, optimizer=partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match=r"^clp: CLP prunes conv channels and BackdoorClassifier has none$"):
        CLP(CLPSettings()).check(model)
    with pytest.raises(MisconfigurationException, match="CLPCallback masks conv channels"):
        make_trainer([CLPCallback()], 1).fit(model, train_dataloaders=loader(TensorDataset(torch.zeros(2, 4))))


@pytest.mark.parametrize("layers", [["net.nope"], ["net.head"], ["net.conv", "net.relu"]])
def test_unknown_or_non_conv_layers_are_refused_with_the_convs_listed(layers: list[str]) -> None:
    model = planted_model()
    with pytest.raises(ValueError, match=r"clp.layers .* are not nn.Conv2d layers .*; its convs: \['net.conv'\]"):
        CLP(CLPSettings(layers=layers)).check(model)
    with pytest.raises(MisconfigurationException, match="^CLPCallback: clp.layers"):
        make_trainer([CLPCallback(layers=layers)], 0).fit(model, train_dataloaders=loader(planted_data()[0]))


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"u": -1}, "clp.u"),
        ({"u": float("nan")}, "clp.u"),
        ({"u": float("inf")}, "clp.u"),
        ({"u": "3"}, "clp.u"),
        ({"u": True}, "clp.u"),
        ({"layers": "net.conv"}, "clp.layers"),
        ({"layers": []}, "clp.layers"),
        ({"layers": [1]}, "clp.layers"),
        ({"layers": ["net.conv", "net.conv"]}, "clp.layers"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(settings: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} ") as err:
        CLPSettings(**settings)
    assert "\n" not in str(err.value)


def test_the_config_builds_clp_with_the_papers_default_and_takes_overrides(tmp_path) -> None:
    from backdoor_lab.pipeline import build_defense, build_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose(config_name="defend")
        changed = compose(config_name="defend", overrides=["clp.u=2.5", "clp.layers=[net.conv4,net.conv5]"])
    defense = build_defense(default, "clp")
    assert isinstance(defense, CLP) and defense.name == "clp" and defense.settings == CLPSettings(u=3.0)
    defense.check(build_model(default, 10))
    defense = build_defense(changed, "clp")
    assert defense.settings == CLPSettings(u=2.5, layers=("net.conv4", "net.conv5"))
    defense.check(build_model(changed, 10))
