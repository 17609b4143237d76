"""``NADCallback``'s arguments, fresh state and set-up checks (``defenses/nad.py``), each with its exact answer."""

from __future__ import annotations

import copy

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from backdoor_lab.defenses.nad import NADCallback
from tests.test_nad import ConvNet, DistilOnly


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
