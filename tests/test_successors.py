"""ANP, NAD and CLP on the held-out kinds of network (a residual block with BatchNorm, a sigmoid reader), through
the plug-ins as the pipeline applies them: each runs, records JSON, exports plain weights with its masks folded
in, and never asks for more than the defender's data."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.data import TensorDataset

from backdoor_lab.defenses import (
    ANP,
    CLP,
    NAD,
    ANPSettings,
    CLPSettings,
    DefenderData,
    DefenseContext,
    FineTuneBudget,
    NADSettings,
)
from backdoor_lab.models.classifier import BackdoorClassifier
from tests.nets import Residual, SigmoidNet
from tests.test_known_answer import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

NETWORKS = {  # factory, input shape, classes, NAD's layers
    "residual": (Residual, (3, 10, 10), 5, ["net.conv_a", "net.conv_b"]),
    "sigmoid": (SigmoidNet, (3, 6, 6), 3, ["net.conv"]),
}


def defense(name: str, layers: list[str]):
    budget = FineTuneBudget(epochs=2, optimizer=partial(torch.optim.SGD, lr=0.01))
    return {
        "anp": lambda: ANP(ANPSettings(iterations=15, batch_size=8, threshold=0.9)),
        "nad": lambda: NAD(NADSettings(layers=layers, betas=[100.0] * len(layers), teacher_epochs=1), budget),
        "clp": lambda: CLP(CLPSettings(u=0.5)),
    }[name]()


@pytest.mark.parametrize("name", ["anp", "nad", "clp"])
@pytest.mark.parametrize("network", list(NETWORKS))
def test_each_successor_defends_the_held_out_networks(name: str, network: str) -> None:
    factory, shape, classes, layers = NETWORKS[network]
    torch.manual_seed(0)
    model = BackdoorClassifier(factory(), num_classes=classes, optimizer=partial(torch.optim.SGD, lr=0.01))
    x, y = torch.randn(24, *shape), torch.randint(0, classes, (24,))
    data = DefenderData(TensorDataset(x, y), TensorDataset(x, torch.zeros_like(y), y), [str(c) for c in range(classes)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plug_in = defense(name, layers)
    plug_in.check(model)
    record = plug_in.apply(DefenseContext(model, data, make_trainer))
    plug_in.export(model)
    json.dumps(record, allow_nan=False)
    state = model.state_dict()
    assert set(state) == set(before)  # plain weights: no weight_orig / weight_mask left after export
    if name == "nad":
        assert record["fine_tune"]["samples"] == 24 and record["teacher"]["epochs"] == 1
        assert any(not torch.equal(state[k], before[k]) for k in before)
        return
    assert record["pruned_count"] > 0  # the thresholds above prune something on these random networks
    for layer, channels in record["masks"].items():
        assert state[f"{layer}.weight"][channels].abs().sum() == 0
        kept = [c for c in range(state[f"{layer}.weight"].shape[0]) if c not in set(channels)]
        assert torch.equal(state[f"{layer}.weight"][kept], before[f"{layer}.weight"][kept])
