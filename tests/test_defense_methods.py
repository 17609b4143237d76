"""What the paper's defenses record and hand over (``defenses/methods.py``), on the planted network whose answer is
known: channel 3 is the dormant backdoor, pruned first and alone; the defender's split has 24 samples."""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import pytest
import torch

from backdoor_lab.defenses import DefenderData, DefenseContext, FineTuneBudget, PruneSettings
from backdoor_lab.defenses.methods import NO_FINE_TUNING, FinePruning, FineTuning, NoDefense, Pruning
from backdoor_lab.defenses.pruning import MASKED_PARAMS
from backdoor_lab.resume import SkippedValidationDraws

from .test_known_answer import make_trainer, planted_data, planted_model
from .test_speed import _fine_tuned


def context(model) -> DefenseContext:
    clean, triggered = planted_data()
    data = DefenderData(clean.dataset, triggered.dataset, class_names=[], batch_size=8, eval_batch_size=8)
    return DefenseContext(model, data, make_trainer)


def budget(epochs: int = 2, every: int = 0) -> FineTuneBudget:
    optimizer = partial(torch.optim.SGD, lr=0.1)
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    return FineTuneBudget(epochs=epochs, optimizer=optimizer, scheduler=scheduler, val_every_n_epochs=every)


PRUNE = PruneSettings(max_accuracy_drop=0.04, full_curve=False)


def test_no_defense_and_fine_tuning_record_no_pruning() -> None:
    L.seed_everything(0, verbose=False)
    assert NoDefense().apply(context(planted_model())) == {
        "pruned_channels": [],
        "pruned_fraction": 0.0,
        "fine_tune": NO_FINE_TUNING,
    }
    assert NO_FINE_TUNING == {"epochs": 0, "steps": 0, "fit_on": None, "samples": 0}
    model = planted_model()
    record = FineTuning(budget()).apply(context(model))
    # 24 samples in batches of 8: 3 steps an epoch; the budget's optimizer and scheduler are the model's now.
    assert record == {
        "pruned_channels": [],
        "pruned_fraction": 0.0,
        "fine_tune": {"epochs": 2, "steps": 6, "fit_on": "defender_clean", "samples": 24},
    }
    assert model.scheduler_factory is not None and model.trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [
        0.025
    ]


def test_pruning_records_the_mask_the_curve_and_the_ranking() -> None:
    L.seed_everything(0, verbose=False)
    model = planted_model()
    defense = Pruning(PRUNE)
    defense.check(model)
    record = defense.apply(context(model))
    assert record["layer"] == "net.conv" and record["rank_layer"] == "net.conv" and record["num_channels"] == 5
    assert record["pruned_channels"] == [3] and record["pruned_fraction"] == 0.2
    assert record["pruning_order"][0] == 3 and record["fine_tune"] == NO_FINE_TUNING
    assert record["channel_activation"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0, 2.0])
    assert record["prune_curve"][0] == {"pruned": 0, "fraction": 0.0, "clean_acc": 1.0, "asr": 1.0}
    assert record["prune_curve"][1]["asr"] == 0.0
    assert record["trigger_channel_ranks"][0] == 0  # the trigger's channel is the first to be pruned
    assert model.net.conv.weight_mask[3].sum() == 0  # masked on the live model
    defense.export(model)
    assert not any(hasattr(model.net.conv, p + "_mask") for p in MASKED_PARAMS)
    assert model.net.conv.weight[3].abs().sum() == 0 and model.net.conv.bias[3] == 0
    Pruning(PRUNE).export(planted_model())  # nothing pruned yet: nothing to fold, no error


def test_fine_pruning_prunes_then_fine_tunes_with_the_mask_kept(caplog) -> None:
    L.seed_everything(0, verbose=False)
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.methods")
    model = planted_model()
    record = FinePruning(PRUNE, budget(epochs=1)).apply(context(model))
    assert record["pruned_channels"] == [3] and record["rank_layer"] == "net.conv"
    assert record["fine_tune"] == {"epochs": 1, "steps": 3, "fit_on": "defender_clean", "samples": 24}
    ours = [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.methods"]
    assert ours == ["Fine-tuning for 1 epochs (fine_tune.epochs) on the defender's clean split"]
    assert model.net.conv.weight[3].abs().sum() == 0  # still masked after fine-tuning


def test_the_rank_layer_is_recorded_and_checked() -> None:
    model = planted_model()
    settings = PruneSettings(rank_layer="net.relu", full_curve=False)
    defense = Pruning(settings)
    defense.check(model)
    assert defense.apply(context(model))["rank_layer"] == "net.relu"
    with pytest.raises(ValueError, match=r"^prune.rank_layer 'net.nope' is not a module of the model$"):
        Pruning(PruneSettings(rank_layer="net.nope")).check(model)
    with pytest.raises(ValueError, match=r"^layer 'net.head' is a Linear, not a Conv2d"):
        Pruning(PruneSettings(layer="net.head")).check(model)


@pytest.mark.parametrize(("every", "validated"), [(0, []), (1, [0, 1]), (2, [1]), (3, [])])
def test_fine_tuning_validates_as_its_budget_says_with_no_sanity_pass(every: int, validated: list[int]) -> None:
    epochs: list[int] = []

    class Watch(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            epochs.append(trainer.current_epoch)

    model = planted_model()
    ctx = context(model)
    ctx.make_trainer = lambda callbacks, n: make_trainer([*callbacks, Watch()], n)
    FineTuning(budget(epochs=2, every=every)).apply(ctx)
    assert epochs == validated


def test_skipped_validations_draw_what_they_would_have_drawn() -> None:
    """``SkippedValidationDraws``: fine-tuning that validates less often ends on the very same weights
    (``tests/test_speed.py`` shows the set-up; here it runs in the mutation selection)."""
    every_epoch = _fine_tuned(1)[1]
    assert torch.equal(_fine_tuned(0)[1], every_epoch) and torch.equal(_fine_tuned(3)[1], every_epoch)


def test_a_second_skipped_validation_draws_callback_draws_nothing() -> None:
    """``speed=exact`` hands the fine-tuning's Trainer its own ``SkippedValidationDraws`` next to the one
    ``fine_tune`` adds: the draws are still made once, so the weights are those of one callback (checked: two
    callbacks drawing twice end on other weights)."""
    assert torch.equal(_fine_tuned(0, SkippedValidationDraws())[1], _fine_tuned(0)[1])
