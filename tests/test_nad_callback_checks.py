"""``NADCallback``'s arguments, fresh state and set-up checks (``defenses/nad.py``), each with its exact answer."""

from __future__ import annotations

import copy
import logging
from functools import partial

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from backdoor_lab.defenses import FineTuneBudget
from backdoor_lab.defenses.nad import NAD, NADCallback, NADSettings, _add_to_loss
from tests.test_callback_lightning import RecordingLogger
from tests.test_nad import ConvNet, DistilOnly
from tests.trainers import quiet_trainer

BUDGET = FineTuneBudget(epochs=1, optimizer=partial(torch.optim.SGD, lr=0.1))


def test_a_fresh_callback_holds_its_arguments_and_an_empty_record() -> None:
    loader = object()
    cb = NADCallback(["net.relu"], [3], p=1, teacher_batch_size=1, clean_dataloader=loader, clean_dataloader_idx=2)
    assert cb.betas == [3.0] and isinstance(cb.betas[0], float) and cb.p == 1.0 and cb.teacher_epochs == 10
    assert (cb.teacher_batch_size, cb.clean_dataloader, cb.clean_dataloader_idx) == (1, loader, 2)
    assert cb.teacher_record == {"given": False, "epochs": 0, "steps": 0, "samples": 0}
    assert cb.distance == {"before": None, "after": None}
    assert cb.loss_first is None and cb.loss_last is None and cb.loss_epoch_mean == [] and cb.teacher_state is None
    given = NADCallback(["net.relu"], [1.0], teacher=ConvNet(), teacher_epochs=5)
    assert given.teacher_epochs == 0 and given.teacher_record["given"] is True  # a given teacher is not trained


@pytest.mark.parametrize("size", [0, -3, True])
def test_a_bad_teacher_batch_size_is_refused(size) -> None:
    with pytest.raises(MisconfigurationException, match=rf"^teacher_batch_size must be >= 1, got {size!r}$"):
        NADCallback(["net.relu"], [1.0], teacher_batch_size=size)


def test_set_up_names_what_is_wrong() -> None:
    student = DistilOnly()
    with pytest.raises(
        MisconfigurationException, match=r"^NADCallback layers \['net.nope'\] is not in DistilOnly; its"
    ):
        NADCallback(["net.nope"], [1.0]).setup(None, student, "fit")
    with pytest.raises(
        MisconfigurationException,
        match=r"^NADCallback's teacher is the student itself: pass a fine-tuned copy, or no teacher$",
    ):
        NADCallback(["net.relu"], [1.0], teacher=student).setup(None, student, "fit")
    other = nn.Sequential(nn.Conv2d(1, 1, 1))
    with pytest.raises(
        MisconfigurationException, match=r"^NADCallback layers \(in the teacher\) \['net.relu'\] is not"
    ):
        NADCallback(["net.relu"], [1.0], teacher=other).setup(None, student, "fit")
    manual = DistilOnly()
    manual.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match=r"^NADCallback adds its attention term .* your own loss$"):
        NADCallback(["net.relu"], [1.0], teacher=copy.deepcopy(student)).setup(None, manual, "fit")
    NADCallback(["net.nope"], [1.0]).setup(None, student, "validate")  # only a fit distils, and checks
    NADCallback(["net.relu"], [1.0], teacher=copy.deepcopy(student)).setup(None, student, "fit")  # all well


def test_the_state_round_trips_and_another_settings_checkpoint_is_refused() -> None:
    cb = NADCallback(["net.relu"], [2.0])
    cb.distance = {"before": {"net.relu": 0.5}, "after": {"net.relu": 0.25}}
    cb.loss_first, cb.loss_last, cb.loss_epoch_mean = 3.0, 1.0, [2.0, 1.5]
    cb.teacher_record = {"given": False, "epochs": 2, "steps": 4, "samples": 16}
    state = cb.state_dict()
    assert sorted(state) == sorted(
        ["settings", "teacher_state", "teacher_record", "distance", "loss_first", "loss_last", "loss_epoch_mean"]
    )
    again = NADCallback(["net.relu"], [2.0])
    again.load_state_dict(state)
    assert again.distance == cb.distance and again.teacher_record == cb.teacher_record
    assert (again.loss_first, again.loss_last, again.loss_epoch_mean) == (3.0, 1.0, [2.0, 1.5])
    with pytest.raises(MisconfigurationException, match=r"resume with the same layers, betas and p$"):
        NADCallback(["net.relu"], [9.0]).load_state_dict(state)


def test_the_attention_term_is_added_to_a_tensor_or_a_dicts_loss() -> None:
    term = torch.tensor(2.0)
    assert _add_to_loss(torch.tensor(1.0), term) == 3.0
    assert _add_to_loss({"loss": torch.tensor(1.0), "extra": 7}, term) == {"loss": torch.tensor(3.0), "extra": 7}
    assert _add_to_loss(None, term) is None  # a skipped batch stays skipped
    for out in ([1.0], {"logits": torch.zeros(1)}):
        with pytest.raises(
            MisconfigurationException, match=rf"^NADCallback: training_step returned a {type(out).__name__};"
        ):
            _add_to_loss(out, term)


def test_the_plug_ins_check_names_the_missing_pieces() -> None:
    settings = NADSettings(layers=(), betas=(1.0,))
    with pytest.raises(
        ValueError, match=r"^nad.layers is empty and DistilOnly names no attention_layers: NAD needs the"
    ):
        NAD(settings, BUDGET).check(DistilOnly())
    with pytest.raises(ValueError, match=r"^nad.layers \['net.nope'\] is not in DistilOnly"):
        NAD(NADSettings(layers=("net.nope",), betas=(1.0,)), BUDGET).check(DistilOnly())


def test_the_teacher_and_the_term_are_logged_and_a_saved_teacher_is_reused(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.nad")
    cb = NADCallback(["net.relu"], [1.0], teacher_epochs=2, measure=False)
    logger = RecordingLogger()
    quiet_trainer(tmp_path, [cb], 1, logger=logger, log_every_n_steps=1, num_sanity_val_steps=0).fit(DistilOnly())
    ours = [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.nad"]
    assert ours == ["NAD: teacher fine-tuned for 2 epochs (2 steps) on the clean data"]  # 16 samples, one batch
    assert any("nad/attention_loss" in metrics for metrics, _ in logger.metrics)
    resumed = NADCallback(["net.relu"], [1.0], teacher_epochs=2, measure=False)
    resumed.load_state_dict(cb.state_dict())
    caplog.clear()
    quiet_trainer(tmp_path, [resumed], 1, num_sanity_val_steps=0).fit(DistilOnly())
    ours = [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.nad"]
    assert ours == ["NAD: distilling from the teacher saved in the checkpoint"]
    assert resumed.teacher_record == cb.teacher_record


def test_the_plug_ins_empty_layers_error_says_where_to_set_them() -> None:
    with pytest.raises(ValueError) as err:
        NAD(NADSettings(layers=(), betas=(1.0,)), BUDGET).check(DistilOnly())
    assert str(err.value) == (
        "nad.layers is empty and DistilOnly names no attention_layers: NAD needs the conv stages whose attention it "
        "distils; set model.attention_layers in conf/model/<name>.yaml or nad.layers=[...]"
    )
