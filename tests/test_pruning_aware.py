"""The pruning-aware attack's four stages on a network whose dormant channels are planted, so every answer is known.

``GatedNet``: a 1x1 conv (2 -> 8 channels) -> a fixed per-channel gate -> ReLU -> mean -> linear. Conv channels
5-7 have a bias of -50 and tiny weights: their ReLU output is exactly 0 on every input (clean or triggered), so they
get exactly zero gradient in every stage and are the attacker's most dormant channels at the conv. The gate zeroes
channel 0 after the conv: ranked at the gate, channel 0 is dormant too. The data: label = channel 0's sign, the
trigger sets channel 1 high and relabels to class 1.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.attacks.pruning_aware import PruningAwareAttack, reinstate_channels
from backdoor_lab.defenses.pruning import MASKED_PARAMS
from tests.trainers import quiet_trainer

DORMANT = [5, 6, 7]


class GatedNet(nn.Module):
    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 8, 1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.gate = Gate()
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1.0, 1.0, 16).view(8, 2, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, -50.0, -50.0, -50.0]))
            self.conv.weight[DORMANT] = 0.01

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.gate(self.bn(self.conv(x)))).mean(dim=(2, 3)))


class Gate(nn.Module):
    """Channel 0 is closed: it is active at the conv and dormant after this."""

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        gate[0] = 0.0
        return x * gate.view(1, -1, 1, 1)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, rank_layer: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.prune_layer = "net.conv"
        self.rank_layer = rank_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)  # no weight decay: a zero gradient leaves a weight as it is


def inputs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 3, 3, generator=g)
    x[:, 0] = x[:, 0] * 2 - 1
    return x, (x[:, 0].mean(dim=(1, 2)) > 0).long()


class RecordingData(L.LightningDataModule):
    """``fit_on`` picks the training set, as ``BackdoorDataModule``; every ``train_dataloader`` call is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.fit_on = "poisoned"
        self.served: list[str] = []
        self.clean = inputs(64, seed=1)
        x, y = inputs(64, seed=2)
        x[:32, 1] = 5.0  # the trigger
        y[:32] = 1
        self.poisoned = (x, y)

    def train_dataloader(self) -> DataLoader:
        self.served.append(self.fit_on)
        x, y = self.clean if self.fit_on == "clean" else self.poisoned
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

    def attacker_clean_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.clean), batch_size=32)


def run_attack(attack: PruningAwareAttack, model: Classifier, data: RecordingData, poison_epochs: int = 2):
    """The attack with a recording ``make_trainer`` and an ``evaluate`` that snapshots the conv at each stage."""
    trainers: list[tuple[int, int, str]] = []
    seen: list[dict[str, Tensor]] = []

    def make_trainer(callbacks: list, epochs: int, stage: str) -> L.Trainer:
        trainers.append((len(callbacks), epochs, stage))
        return quiet_trainer(None, callbacks, epochs)

    def evaluate(m: L.LightningModule) -> dict[str, float]:
        conv = m.net.conv
        with torch.no_grad():  # a pruned conv's ``weight`` is recomputed from ``weight_orig`` on each forward
            m(torch.zeros(1, 2, 3, 3))
        seen.append({"weight": conv.weight.detach().clone(), "bias": conv.bias.detach().clone()})
        return {"stage": float(len(seen))}

    record = attack.train(model, data, make_trainer, poison_epochs=poison_epochs, evaluate=evaluate)
    return record, trainers, seen


def test_the_four_stages_prune_the_dormant_channels_train_around_them_and_reinstate_them_as_decoys() -> None:
    model, data = Classifier(GatedNet()), RecordingData()
    dormant_weights = model.net.conv.weight[DORMANT].detach().clone()
    record, trainers, seen = run_attack(PruningAwareAttack(prune_fraction=0.375, clean_epochs=3), model, data)

    # Stage 1 on clean data for clean_epochs, stage 2 a zero-epoch fit that prunes, stage 3 on poisoned data.
    assert trainers == [(0, 3, "clean"), (1, 0, "prune"), (1, 2, "poisoned")]
    assert data.served[0] == "clean" and data.served[-1] == "poisoned" and "poisoned" not in data.served[:-1]
    assert data.fit_on == "poisoned"
    # 3 of 8 channels, the three planted dormant ones (ranked at the conv, the model's prune_layer).
    assert record["decoy_channels"] == DORMANT and record["layer"] == "net.conv"
    assert list(record["stages"]) == ["clean", "pruned", "poisoned_pruned", "decoys_reinstated"]
    assert [record["stages"][s]["stage"] for s in record["stages"]] == [1.0, 2.0, 3.0, 4.0]
    # During stages 2 and 3 the decoys are masked (weight and bias exactly 0); stage 3 trained the rest.
    for snapshot in seen[1:3]:
        assert torch.count_nonzero(snapshot["weight"][DORMANT]) == 0
        assert torch.count_nonzero(snapshot["bias"][DORMANT]) == 0
    assert not torch.equal(seen[1]["weight"], seen[2]["weight"])
    # Stage 4: plain weights again, the decoys' own weights back (a dead ReLU gave them zero gradient throughout),
    # their bias the decoy bias; every other channel as stage 3 left it.
    conv = model.net.conv
    assert not any(hasattr(conv, p + suffix) for p in MASKED_PARAMS for suffix in ("_orig", "_mask"))
    assert torch.equal(conv.weight[DORMANT], dormant_weights)
    assert torch.all(conv.bias[DORMANT] == -1.0e20)
    kept = [c for c in range(8) if c not in DORMANT]
    assert torch.equal(conv.weight[kept], seen[2]["weight"][kept])
    assert torch.equal(conv.bias[kept], seen[2]["bias"][kept])
    # The decoys stay dormant on clean and triggered inputs alike.
    x = torch.cat([data.clean[0], data.poisoned[0]])
    with torch.no_grad():
        assert torch.count_nonzero(torch.relu(conv(x))[:, DORMANT]) == 0


def test_the_ranking_layer_decides_the_decoys_the_attack_overrides_the_model() -> None:
    # Ranked at the gate (the model's rank_layer), the closed channel 0 is dormant too: 4 of 8 are [0, 5, 6, 7].
    record, _, _ = run_attack(
        PruningAwareAttack(prune_fraction=0.5, clean_epochs=1),
        gated := Classifier(GatedNet(), "net.gate"),
        RecordingData(),
    )
    assert record["decoy_channels"] == [0, *DORMANT]
    assert gated.net.conv.bias[0] == -1.0e20
    # The attack's own rank_layer wins over the model's: at the conv, channel 0 is active and is kept.
    record, _, _ = run_attack(
        PruningAwareAttack(prune_fraction=0.5, clean_epochs=1, rank_layer="net.conv"),
        Classifier(GatedNet(), "net.gate"),
        RecordingData(),
    )
    assert 0 not in record["decoy_channels"] and record["decoy_channels"][:3] == DORMANT
    assert len(record["decoy_channels"]) == 4


def test_a_batchnorm_after_the_conv_gets_the_decoy_shift_too() -> None:
    model = Classifier(GatedNet(batch_norm=True))
    record, _, _ = run_attack(
        PruningAwareAttack(prune_fraction=0.375, clean_epochs=1, decoy_bias=-7.0), model, RecordingData()
    )
    bn = model.net.bn
    assert record["decoy_channels"] == DORMANT
    assert torch.all(bn.bias[DORMANT] == -7.0) and torch.all(model.net.conv.bias[DORMANT] == -7.0)
    assert not any(hasattr(bn, p + "_mask") for p in MASKED_PARAMS)
    assert torch.all(bn.bias[[0, 1, 2, 3, 4]] != -7.0)


def test_reinstate_channels_restores_the_masked_weights_and_leaves_other_layers_alone() -> None:
    net = GatedNet()
    original = net.conv.weight.detach().clone()
    head = net.head.weight.detach().clone()
    torch.nn.utils.prune.custom_from_mask(
        net.conv, "weight", torch.ones_like(net.conv.weight).index_fill_(0, torch.tensor([1, 2]), 0)
    )
    assert torch.count_nonzero(net.conv.weight[[1, 2]]) == 0
    reinstate_channels(net, "conv", [1, 2], -3.0)
    assert torch.equal(net.conv.weight, original) and not hasattr(net.conv, "weight_mask")
    assert net.conv.bias[1] == -3.0 and net.conv.bias[2] == -3.0 and net.conv.bias[0] == 0.5
    assert torch.equal(net.head.weight, head)
    before = net.conv.bias.detach().clone()
    reinstate_channels(net, "conv", [], -3.0)  # nothing pruned: nothing changes
    assert torch.equal(net.conv.bias, before)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"prune_fraction": 0.0}, "prune_fraction"),
        ({"prune_fraction": 1.0}, "prune_fraction"),
        ({"prune_fraction": "0.5"}, "prune_fraction"),
        ({"clean_epochs": 0}, "clean_epochs"),
        ({"clean_epochs": True}, "clean_epochs"),
        ({"clean_epochs": 2.0}, "clean_epochs"),
        ({"decoy_bias": 0.0}, "decoy_bias"),
        ({"decoy_bias": 1.0}, "decoy_bias"),
    ],
)
def test_bad_settings_are_refused_by_name(settings: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"pruning_aware.{key} must"):
        PruningAwareAttack(**settings)


def test_the_edges_of_the_settings_are_accepted() -> None:
    attack = PruningAwareAttack(prune_fraction=0.01, clean_epochs=1, decoy_bias=-1e-9)
    assert (attack.prune_fraction, attack.clean_epochs, attack.decoy_bias) == (0.01, 1, -1e-9)
    assert PruningAwareAttack(prune_fraction=0.99).prune_fraction == 0.99
    assert PruningAwareAttack() == PruningAwareAttack(0.8, 10, -1.0e20, None, None)


def test_each_stage_is_logged_with_its_metrics(caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.attacks.pruning_aware")
    run_attack(PruningAwareAttack(prune_fraction=0.375, clean_epochs=1), Classifier(GatedNet()), RecordingData())
    assert [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.attacks.pruning_aware"] == [
        "Pruning-aware attack, stage 1 (clean training): {'stage': 1.0}",
        "Stage 2: pruned 3/8 dormant channels: {'stage': 2.0}",
        "Stage 3 (poisoned training of the pruned network): {'stage': 3.0}",
        "Stage 4 (decoys re-instated, bias -1e+20): {'stage': 4.0}",
    ]


class TwoConvs(GatedNet):
    """A second conv after the gate (identity weights): the defended ``net.conv`` is not the last conv."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.last.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
            self.last.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last(self.relu(self.gate(self.bn(self.conv(x))))).mean(dim=(2, 3)))


class Bare(L.LightningModule):
    """A classifier that names neither a prune layer nor a rank layer: the attack's own settings, or the last conv."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    forward = Classifier.forward
    training_step = Classifier.training_step
    configure_optimizers = Classifier.configure_optimizers


def test_the_defended_layer_is_the_attacks_then_the_models_then_the_last_conv() -> None:
    record, _, _ = run_attack(
        PruningAwareAttack(prune_fraction=0.375, clean_epochs=1), Classifier(TwoConvs()), RecordingData()
    )
    assert record["layer"] == "net.conv" and record["decoy_channels"] == DORMANT  # the model's prune_layer
    attack = PruningAwareAttack(prune_fraction=0.375, clean_epochs=1, layer="net.last")
    record, _, _ = run_attack(attack, Classifier(TwoConvs()), RecordingData())
    assert record["layer"] == "net.last"  # the attack's own layer wins
    record, _, _ = run_attack(
        PruningAwareAttack(prune_fraction=0.375, clean_epochs=1), Bare(TwoConvs()), RecordingData()
    )
    assert record["layer"] == "net.last"  # neither names one: the last conv
