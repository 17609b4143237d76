"""What a defense is handed and the settings it shares, with known answers: ``DefenderData``'s loaders and
refusals, and the ranking helpers of ``defenses/ranking.py`` at their boundaries (fast unit tests written against
the mutants the end-to-end tests let survive; docs/testing.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from rich.progress import Progress
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from backdoor_lab.data.tensor_loader import GatheredTensorDataset
from backdoor_lab.defenses.defender_data import DefenderData, SplitOutOfReach
from backdoor_lab.defenses.ranking import check_prune_settings, progress_bar, ratio_count, trigger_channel_ranks

CLEAN = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.long))
TRIGGERED = TensorDataset(torch.ones(4, 1), torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def over(loader, dataset: TensorDataset) -> bool:
    """The loader reads ``dataset``'s own tensors (not copies), gathered a batch at a time."""
    return isinstance(loader.dataset, GatheredTensorDataset) and [t.data_ptr() for t in loader.dataset.tensors] == [
        t.data_ptr() for t in dataset.tensors
    ]


def test_defender_data_defaults_and_what_each_loader_is() -> None:
    data = DefenderData(CLEAN, TRIGGERED, class_names=("a", "b"))
    assert (data.batch_size, data.eval_batch_size, data.num_workers, data.pin_memory) == (128, 512, 0, False)
    assert data.class_names == ["a", "b"] and data.num_classes == 2
    train = data.train_dataloader()
    assert over(train, CLEAN) and train.batch_size == 128 and isinstance(train.sampler, RandomSampler)
    for loader, dataset in ((data.clean_val_dataloader(), CLEAN), (data.triggered_val_dataloader(), TRIGGERED)):
        assert over(loader, dataset) and loader.batch_size == 512 and isinstance(loader.sampler, SequentialSampler)
        assert loader.num_workers == 0 and loader.pin_memory is False
    assert [over(v, d) for v, d in zip(data.val_dataloader(), (CLEAN, TRIGGERED), strict=True)] == [True, True]


def test_defender_data_of_a_datamodule_takes_its_loader_settings() -> None:
    dm = SimpleNamespace(
        dataset=lambda role: {"defender_clean": CLEAN, "val_triggered": TRIGGERED}[role],
        class_names=["a", "b"],
        batch_size=3,
        eval_batch_size=5,
        num_workers=1,
        pin_memory=True,
    )
    data = DefenderData.of(dm)
    assert over(data.train_dataloader(), CLEAN) and over(data.triggered_val_dataloader(), TRIGGERED)
    assert (data.batch_size, data.eval_batch_size, data.num_workers, data.pin_memory) == (3, 5, 1, True)
    loader = data.train_dataloader()
    assert loader.batch_size == 3 and loader.num_workers == 1 and loader.pin_memory is True
    assert data.clean_val_dataloader().batch_size == 5


def test_defender_data_refuses_the_test_and_predict_splits_in_words() -> None:
    data = DefenderData(CLEAN, TRIGGERED, class_names=["a"])
    with pytest.raises(SplitOutOfReach, match=r"^a defense has no test split: .* after the defense returns$"):
        data.test_dataloader()
    with pytest.raises(SplitOutOfReach, match=r"^a defense has no predict split: use clean_val_dataloader\(\)$"):
        data.predict_dataloader()


def test_prune_settings_boundaries() -> None:
    check_prune_settings(0.0, 0.0, 1, 1)  # every lower bound is allowed
    check_prune_settings(None, 1.0, None, None)  # a drop of 100 points is allowed (accept anything)
    check_prune_settings(0.999, 0.04, 8, 2)
    bad = [
        ((1.0, 0.04, None, None), r"^prune_ratio must be in \[0, 1\), got 1.0$"),
        ((-0.1, 0.04, None, None), r"^prune_ratio must be in \[0, 1\), got -0.1$"),
        ((None, None, None, None), r"^max_accuracy_drop must be a fraction in \[0, 1\] \(0.04 = 4 points\), got None$"),
        ((None, 1.5, None, None), r"^max_accuracy_drop must be .*, got 1.5$"),
        ((None, -0.01, None, None), r"^max_accuracy_drop must be .*, got -0.01$"),
        ((None, 0.04, 0, None), r"^step must be a positive channel count, got 0$"),
        ((None, 0.04, None, 0), r"^max_batches must be positive, got 0$"),
    ]

    class SettingError(Exception):
        pass

    for args, message in bad:
        with pytest.raises(SettingError, match=message):
            check_prune_settings(*args, error=SettingError)


def test_ratio_count_rounds_but_keeps_one_channel() -> None:
    assert ratio_count(0.5, 10) == 5 and ratio_count(0.26, 10) == 3 and ratio_count(0.0, 10) == 0
    assert ratio_count(0.999, 256) == 255 and ratio_count(0.99, 10) == 9


def test_trigger_channel_ranks_are_the_positions_of_the_channels_the_trigger_lifts_most() -> None:
    clean = [float(c) for c in range(12)]  # pruning order = channel order
    triggered = list(clean)
    for c in (0, 11):
        triggered[c] += 5.0
    ranks = trigger_channel_ranks(clean, triggered)
    assert len(ranks) == 10 and ranks[0] == 0 and ranks[-1] == 11  # the top 10 by default, lifted ones among them
    assert trigger_channel_ranks(clean, triggered, top=2) == [0, 11]
    assert trigger_channel_ranks(clean, []) == [] and trigger_channel_ranks([], triggered) == []


def test_progress_bar_is_transient_and_quiet_off_a_terminal() -> None:
    bar = progress_bar(True)
    assert isinstance(bar, Progress) and bar.live.transient is True
    assert bar.disable is True  # pytest captures the output: not a terminal
    assert progress_bar(False).disable is True
