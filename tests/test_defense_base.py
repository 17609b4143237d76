"""The shared defense settings (``defenses/base.py``): the fine-tuning budget's checks and validation period, and
how ``PruneSettings`` becomes a ``FinePruningCallback`` for a given model."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from backdoor_lab.defenses import FineTuneBudget, PruneSettings

SGD = partial(torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": -1}, "fine_tune.epochs must be an integer >= 0, got -1"),
        ({"epochs": True}, "fine_tune.epochs must be an integer >= 0, got True"),
        ({"epochs": 1.5}, "fine_tune.epochs must be an integer >= 0, got 1.5"),
        (
            {"val_every_n_epochs": -1},
            "fine_tune.val_every_n_epochs must be an integer >= 0 (0: never), got -1",
        ),
        (
            {"val_every_n_epochs": 2.0},
            "fine_tune.val_every_n_epochs must be an integer >= 0 (0: never), got 2.0",
        ),
        (
            {"val_every_n_epochs": False},
            "fine_tune.val_every_n_epochs must be an integer >= 0 (0: never), got False",
        ),
    ],
)
def test_the_budget_refuses_bad_counts_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        FineTuneBudget(**{"epochs": 2, "optimizer": SGD, **kwargs})
    assert str(err.value) == message


def test_the_validation_period_is_the_budgets_or_past_the_last_epoch() -> None:
    assert FineTuneBudget(epochs=0, optimizer=SGD).val_period() == 1  # a period is >= 1, never 0
    assert FineTuneBudget(epochs=1, optimizer=SGD).val_period() == 2
    assert FineTuneBudget(epochs=7, optimizer=SGD).val_period() == 8
    assert FineTuneBudget(epochs=7, optimizer=SGD, val_every_n_epochs=7).val_period() == 7
    assert FineTuneBudget(epochs=7, optimizer=SGD, val_every_n_epochs=2).val_period() == 2


def test_prune_settings_become_the_callback_with_the_models_layers_as_defaults() -> None:
    model = SimpleNamespace(prune_layer="net.conv5", rank_layer="net.relu5")
    settings = PruneSettings(prune_ratio=0.5, max_accuracy_drop=0.1, step=3, full_curve=False, max_batches=7)
    cb = settings.callback(model)
    assert (cb.layer, cb.activation_layer) == ("net.conv5", "net.relu5")
    assert (cb.prune_ratio, cb.max_accuracy_drop, cb.step, cb.full_curve, cb.max_batches) == (0.5, 0.1, 3, False, 7)
    own = PruneSettings(layer="net.conv4", rank_layer="net.relu4").callback(model)
    assert (own.layer, own.activation_layer) == ("net.conv4", "net.relu4") and own.full_curve is True
    same = PruneSettings(layer="net.conv5", rank_layer="net.conv5").callback(model)
    assert same.activation_layer is None  # ranking at the pruned layer itself
    bare = PruneSettings().callback(SimpleNamespace())
    assert bare.layer is None and bare.activation_layer is None
