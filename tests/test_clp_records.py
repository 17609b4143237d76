"""CLP's threshold rule at its edges, what it records and logs, and its callback's state (``defenses/clp.py``)."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from backdoor_lab.defenses.clp import CLP, CLPCallback, CLPSettings, clp_layers, outlier_channels, thresholds
from tests.test_clp import ConvBN, conv_with_bounds, defend, loader, planted_data, planted_model
from tests.trainers import quiet_trainer


def test_a_channel_exactly_at_the_threshold_is_kept_and_two_channels_can_be_an_outlier() -> None:
    scores = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    limit = float(scores.mean() + 0.5 * scores.std())
    assert outlier_channels(scores, 0.5) == [2]
    u_at = (3.0 - float(scores.mean())) / float(scores.std())  # channel 2 exactly at mean + u * std
    assert outlier_channels(scores, u_at) == [] and limit < 3.0
    assert outlier_channels(torch.tensor([1.0, 5.0]), 0.5) == [1]  # two channels are enough for a spread
    assert outlier_channels(torch.tensor([9.0]), 0.0) == []  # one channel: no spread, never pruned


def test_thresholds_are_mean_plus_u_std_per_layer_and_none_for_one_channel() -> None:
    out = thresholds({"a": [1.0, 3.0], "b": [2.0], "c": [1.0, 2.0, 6.0]}, 2.0)
    assert out["a"] == pytest.approx(2.0 + 2.0 * 2**0.5) and out["b"] is None
    assert out["c"] == pytest.approx(3.0 + 2.0 * float(torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64).std()))


def test_unknown_layers_are_named_with_the_models_convs() -> None:
    model = ConvBN(conv_with_bounds([1.0, 2.0]))
    with pytest.raises(
        ValueError, match=r"^clp.layers \['x'\] are not nn.Conv2d layers of ConvBN; its convs: \['conv'\]$"
    ):
        clp_layers(model, ["x"])


def test_the_plug_in_records_and_logs_what_it_pruned(caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.clp")
    defense, record = defend(planted_model(), CLPSettings(u=2.5))
    assert record["u"] == 2.5 and set(record["thresholds"]) == set(record["uclc"])
    pruned = {k: v for k, v in defense.masks.items() if v}
    assert pruned and [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.clp"] == [
        f"CLP (u=2.5): pruned {pruned}"
    ]
    caplog.clear()
    defend(planted_model(), CLPSettings(u=100.0))
    assert [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.clp"] == [
        "CLP (u=100): pruned no channel"
    ]
    assert CLP(CLPSettings()).masks == {}


def test_the_callback_keeps_u_records_uclc_and_logs(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.clp")
    cb = CLPCallback(u=2.5)
    assert cb.settings.u == 2.5 and cb.uclc == {}
    quiet_trainer(tmp_path, [cb], 0).fit(planted_model(), train_dataloaders=loader(planted_data()[0]))
    record = cb.record()
    assert record["u"] == 2.5 and record["uclc"] == cb.uclc and cb.uclc
    assert record["thresholds"] == thresholds(cb.uclc, 2.5)
    pruned = {k: v for k, v in cb.masks.items() if v}
    assert [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.clp"] == [
        f"CLP (u=2.5): pruned {pruned}"
    ]
    again = CLPCallback(u=2.5)
    again.load_state_dict(cb.state_dict())
    assert again.uclc == cb.uclc
    older = cb.state_dict()
    older.pop("uclc")
    again.load_state_dict(older)  # a state saved before the UCLC was kept
    assert again.uclc == {}


def test_the_callback_names_an_unknown_layer_before_the_fit(tmp_path) -> None:
    cb = CLPCallback(layers=["nope"])
    with pytest.raises(MisconfigurationException, match=r"^CLPCallback: clp.layers \['nope'\] are not nn.Conv2d"):
        quiet_trainer(tmp_path, [cb], 0).fit(planted_model(), train_dataloaders=loader(planted_data()[0]))
