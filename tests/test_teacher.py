"""The distillation pieces on their own, with answers known by hand: NAD's teacher (``defenses/teacher.py``) and
its attention maps (``defenses/attention.py``). Fast unit tests, written against the mutants that the NAD
end-to-end tests let survive (docs/testing.md, mutation score)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from backdoor_lab.defenses.attention import attention_loss, attention_map, check_layers, layer_distance
from backdoor_lab.defenses.pruning import split_batch
from backdoor_lab.defenses.teacher import fine_tuned_copy, first_optimizer, frozen_copy, reshuffled, rng_devices
from backdoor_lab.models.classifier import BackdoorClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the teacher
def _classifier(lr: float = 0.0) -> BackdoorClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return BackdoorClassifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=lr))


def _data(n: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_the_teacher_record_is_the_per_sample_mean_loss_and_the_steps_of_each_epoch() -> None:
    """lr 0: the loss of every batch is the untrained copy's, so the record's epoch mean is exactly the mean
    cross-entropy over the samples (batches of 2, 2 and 1: a per-batch mean would weigh the last one double)."""
    model, data = _classifier(lr=0.0), _data(5)
    loader = DataLoader(data, batch_size=2)
    teacher, record = fine_tuned_copy(
        None, model, loader, epochs=3, transfer=lambda b: b, batch_to_xy=split_batch, optimizer=None
    )
    x, y = data.tensors
    expected = float(F.cross_entropy(model(x), y))
    assert record["loss_epoch_mean"] == pytest.approx([expected] * 3, rel=1e-6)
    assert record == {**record, "given": False, "epochs": 3, "steps": 9, "samples": 5}
    assert isinstance(record["samples"], int)
    _, once = fine_tuned_copy(None, model, loader, epochs=1, transfer=lambda b: b, batch_to_xy=split_batch)
    assert (once["steps"], once["samples"]) == (3, 5)
    assert teacher is not model and all(p.grad is None for p in teacher.parameters())  # grads released


def test_the_teacher_trains_with_the_given_optimizer_and_leaves_the_model_alone() -> None:
    model, data = _classifier(lr=0.0), _data(6)
    before = [p.detach().clone() for p in model.parameters()]
    teacher, record = fine_tuned_copy(
        None,
        model,
        DataLoader(data, batch_size=3),
        epochs=2,
        transfer=lambda b: b,
        batch_to_xy=split_batch,
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    assert record["steps"] == 4 and record["loss_epoch_mean"][1] < record["loss_epoch_mean"][0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not torch.equal(teacher.net[1].weight, model.net[1].weight)


def test_the_teacher_refuses_unlabelled_batches_in_one_line() -> None:
    with pytest.raises(MisconfigurationException, match="^NADCallback fine-tunes its teacher on labelled clean"):
        fine_tuned_copy(
            None,
            _classifier(),
            [(torch.zeros(2, 4),)],
            epochs=1,
            transfer=lambda b: b,
            batch_to_xy=lambda b: (b[0], None, None),
        )


def test_first_optimizer_reads_every_form_configure_optimizers_returns() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert first_optimizer(opt) is opt
    assert first_optimizer({"optimizer": opt, "lr_scheduler": sched}) is opt
    assert first_optimizer([opt, other]) is opt and first_optimizer((opt,)) is opt
    assert first_optimizer([{"optimizer": opt}, {"optimizer": other}]) is opt
    assert first_optimizer(([opt], [sched])) is opt
    for bad in ([], {"lr_scheduler": sched}, None):
        with pytest.raises(
            MisconfigurationException, match=r"^NADCallback could not read an optimizer .* pass teacher"
        ):
            first_optimizer(bad)


def test_frozen_copy_shares_the_trainer_and_copies_the_rest() -> None:
    holder = nn.Linear(2, 2)
    trainer = object()
    holder.trainer_ref = trainer
    shared = frozen_copy(holder, trainer)
    assert shared.trainer_ref is trainer and shared.weight is not holder.weight
    assert torch.equal(shared.weight, holder.weight)
    alone = frozen_copy(holder, None)
    assert alone.trainer_ref is not trainer and alone.weight is not holder.weight


def test_rng_devices_are_none_off_cuda() -> None:
    assert rng_devices(nn.Linear(2, 2)) == [] and rng_devices(nn.ReLU()) == []
    assert rng_devices(nn.Linear(2, 2, device="meta")) == []


def test_reshuffled_keeps_the_loader_but_shuffles_each_epoch() -> None:
    data = _data(40)
    collate = torch.utils.data.default_collate
    clean = DataLoader(data, batch_size=8, collate_fn=collate, pin_memory=False, num_workers=0)
    again = reshuffled(clean, None)
    assert isinstance(again, DataLoader) and again.dataset is data and again.batch_size == 8
    assert again.collate_fn is collate and again.pin_memory is False and again.num_workers == 0
    assert isinstance(again.sampler, torch.utils.data.RandomSampler)
    assert reshuffled(clean, 5).batch_size == 5
    assert reshuffled(DataLoader(data, batch_size=None), None).batch_size == 1
    pinned = reshuffled(DataLoader(data, batch_size=4, pin_memory=True), None)
    assert pinned.pin_memory is True

    def own_collate(batch: list) -> list:
        return batch

    custom = reshuffled(DataLoader(data, batch_size=4, collate_fn=own_collate, num_workers=1), None)
    assert custom.collate_fn is own_collate and custom.num_workers == 1

    class HasDataset:  # not a DataLoader, though it has a sized dataset: used as it is
        dataset = data

    holder = HasDataset()
    assert reshuffled(holder, 4) is holder
    not_a_loader = [data[0]]
    assert reshuffled(not_a_loader, 4) is not_a_loader

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([data[0]])

    streaming = DataLoader(Stream(), batch_size=1)
    assert reshuffled(streaming, 4) is streaming


# ----------------------------------------------------------------------------- attention maps
def test_attention_maps_take_any_spatial_rank_and_refuse_flat_features() -> None:
    f = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (N=1, C=2, L=2): a 1-d feature map
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)  # mean over channels of f^2, then L2-normalized
    torch.testing.assert_close(attention_map(f, 2.0), expected)
    with pytest.raises(ValueError, match=r"^attention_map needs a \(N, C, H, W\) feature map, got shape \(2, 5\): NAD"):
        attention_map(torch.ones(2, 5))


def test_the_distances_use_the_given_p() -> None:
    s = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])
    t = torch.tensor([[[2.0, 1.0], [1.0, 0.0]]])
    for p in (1.0, 3.0):
        a_s = F.normalize(s.abs().pow(p).mean(1), dim=1)
        a_t = F.normalize(t.abs().pow(p).mean(1), dim=1)
        want = float((a_s - a_t).pow(2).mean())
        assert float(layer_distance(s, t, p)) == pytest.approx(want)
        assert float(attention_loss([s], [t], [2.0], p)) == pytest.approx(2 * want)
    assert float(layer_distance(s, t, 1.0)) != pytest.approx(float(layer_distance(s, t, 2.0)))
    # p = 2 by default (NAD's and attention transfer's)
    assert float(layer_distance(s, t)) == float(layer_distance(s, t, 2.0))
    assert float(attention_loss([s], [t], [1.0])) == float(attention_loss([s], [t], [1.0], 2.0))


def test_attention_loss_names_the_counts_it_was_given() -> None:
    s = torch.ones(1, 1, 2, 2)
    with pytest.raises(
        ValueError, match=r"^attention_loss needs one student map, teacher map and beta per layer: 1, 1, 2$"
    ):
        attention_loss([s], [s], [1.0, 2.0])


def test_check_layers_lists_the_missing_names_and_the_feature_map_modules() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    check_layers(model, ["0", "1"])  # present: no error
    with pytest.raises(
        ValueError, match=r"^layers \['x'\] is not in Sequential; its feature-map modules .*: \['0', '1'\]$"
    ):
        check_layers(model, ["x", "0"])
    with pytest.raises(KeyError, match=r"nad.layers \['x', 'y'\] are not in Sequential"):
        check_layers(model, ["x", "y"], what="nad.layers", error=KeyError)
