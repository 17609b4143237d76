"""``BackdoorDataModule`` on an in-memory source whose every count is known: the roles it builds, its summary, its
loaders, its checks, and what the splits (``RawSplit``) keep aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from backdoor_lab.attacks.base import AllToOne, Attack, Trigger
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.data.tensor_loader import GatheredTensorDataset, collate_gathered
from backdoor_lab.splits import RawSplit

CLASSES = ["a", "b", "c"]


class Corner(Trigger):
    """Sets the top-left pixel to 255."""

    def apply(self, sample: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        out = sample.copy()
        out[0, 0] = 255
        return out


def split(n: int, first_id: int, value: int) -> RawSplit:
    labels = np.arange(n) % 3
    inputs = np.full((n, 2, 2, 1), value, dtype=np.uint8)
    inputs[:, 1, 1, 0] = labels  # each sample's label is readable from its pixels
    inputs[:, 0, 1, 0] = np.arange(n) % 251  # and its position in the split
    return RawSplit(inputs, labels.astype(np.int64), np.arange(first_id, first_id + n, dtype=np.int64))


class Tiny:
    """train 30 (10 per class), val 12, test 15; ``to_tensor`` records each chunk it converts."""

    name = "tiny"
    class_names = CLASSES

    def __init__(self, train: int = 30, drop: str | None = None, overlap: bool = False) -> None:
        self.sizes = {"train": train, "val": 12, "test": 15}
        self.drop, self.overlap = drop, overlap
        self.loads, self.chunks = 0, []

    def load(self) -> dict[str, RawSplit]:
        self.loads += 1
        splits = {
            "train": split(self.sizes["train"], 0, 10),
            "val": split(12, 0 if self.overlap else 100_000, 20),
            "test": split(15, 200_000, 30),
        }
        splits.pop(self.drop, None)
        return splits

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        self.chunks.append(len(inputs))
        return torch.from_numpy(inputs).permute(0, 3, 1, 2).float()


def module(source: Tiny | None = None, mode: str = "add", **kwargs) -> BackdoorDataModule:
    attack = Attack("corner", Corner(), AllToOne("c"), poison_rate=0.5, poison_mode=mode)
    return BackdoorDataModule(source or Tiny(), attack, name="tiny-data", **kwargs)


def test_the_defaults_are_the_documented_ones() -> None:
    dm = BackdoorDataModule(Tiny(), Attack("corner", Corner(), AllToOne("c"), poison_rate=0.5))
    assert (dm.name, dm.fit_on, dm.batch_size, dm.eval_batch_size) == ("data", "poisoned", 128, 512)
    assert (dm.num_workers, dm.seed, dm.summary, dm.datasets) == (0, 0, {}, {})
    assert module(batch_size=1, eval_batch_size=1).batch_size == 1  # the smallest batch is allowed


def test_the_seed_chooses_the_poisoned_samples_and_replace_mode_swaps_them() -> None:
    def copied(seed: int, mode: str = "add") -> list[int]:
        dm = module(seed=seed, mode=mode)
        dm.setup()
        x = dm.dataset("poisoned").tensors[0]
        return x[:, 0, 0, 1][x[:, 0, 0, 0] == 255].long().tolist()  # positions of the triggered samples

    assert copied(3) == copied(3) and copied(3) != copied(4) and copied(0) == copied(0)
    assert sorted(copied(3)) == sorted(copied(3, mode="replace"))  # the same choice, swapped in place
    dm = module(seed=3, mode="replace")
    dm.setup()
    assert (
        dm.summary["train_poisoned"] == 10 and dm.summary["fit_samples"] == 30 and dm.summary["poisoned_share"] == 1 / 3
    )


def test_the_roles_and_the_summary_are_counted_exactly() -> None:
    dm = module(batch_size=4, eval_batch_size=5, seed=1)
    dm.setup()
    # AllToOne("c"): classes a and b (20 of 30 train samples) are eligible; half of them are poisoned and added.
    assert dm.summary == {
        "name": "tiny-data",
        "source": "tiny",
        "classes": 3,
        "train_clean": 30,
        "train_poisoned": 10,
        "poisoned_share": 10 / 40,
        "fit_on": "poisoned",
        "fit_samples": 40,
        "val": 12,
        "test": 15,
        "test_triggered": 10,  # the 5 test samples of class c already are the target
    }
    assert dm.class_names == CLASSES and dm.num_classes == 3
    poisoned = dm.dataset("poisoned")
    x, y = poisoned.tensors
    assert torch.all(y[30:] == 2) and torch.all(x[30:, 0, 0, 0] == 255) and torch.all(x[:30, 0, 0, 0] == 10)
    assert torch.all(x[30:, 0, 1, 1] != 2)  # the copies come from classes a and b
    clean_val, triggered_val = (loader.dataset.tensors for loader in dm.val_dataloader())
    assert torch.all(clean_val[0][:, 0, 0, 0] == 20) and len(clean_val) == 2
    assert len(triggered_val) == 3 and torch.all(triggered_val[1] == 2) and not torch.any(triggered_val[2] == 2)
    assert torch.all(triggered_val[0][:, 0, 0, 0] == 255) and len(triggered_val[0]) == 8
    test_clean, test_triggered = (loader.dataset.tensors for loader in dm.test_dataloader())
    assert torch.all(test_clean[0][:, 0, 0, 0] == 30) and len(test_clean[0]) == 15 and len(test_triggered[0]) == 10
    assert torch.equal(dm.dataset("defender_clean").tensors[0], clean_val[0])
    assert torch.all(dm.attacker_clean_dataloader().dataset.tensors[0][:, 0, 0, 0] == 10)


def test_the_train_loader_follows_fit_on_and_shuffles_with_the_training_batch_size() -> None:
    dm = module(batch_size=4, eval_batch_size=5, pin_memory=False, num_workers=0)
    dm.setup()
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.batch_size == 4 and not train.drop_last
    assert len(train.dataset) == 40 and train.pin_memory is False and train.num_workers == 0
    for loader in (*dm.val_dataloader(), *dm.test_dataloader(), dm.clean_val_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler) and loader.batch_size == 5 and not loader.drop_last
    for loader in (train, *dm.val_dataloader(), *dm.test_dataloader(), dm.attacker_clean_dataloader()):
        # batches gathered in one call per tensor (tests/test_tensor_loader.py), over the role's own tensors
        assert isinstance(loader.dataset, GatheredTensorDataset) and loader.collate_fn is collate_gathered
    assert train.dataset.tensors[0].data_ptr() == dm.dataset("poisoned").tensors[0].data_ptr()
    dm.fit_on = "clean"  # switched between fits, as the pruning-aware attack does
    assert len(dm.train_dataloader().dataset) == 30
    dm.fit_on = "defender_clean"
    assert len(dm.train_dataloader().dataset) == 12
    dm.fit_on = "test_clean"
    with pytest.raises(ValueError, match=r"^fit_on must be one of \('poisoned', 'clean', 'defender_clean'\)"):
        dm.train_dataloader()
    assert module(pin_memory=True).pin_memory is True
    workers = module(pin_memory=True, num_workers=2)
    workers.setup()
    loader = workers.train_dataloader()
    assert loader.num_workers == 2 and loader.pin_memory is True  # handed to every loader (never iterated here)
    assert module().pin_memory is torch.cuda.is_available()


def test_fit_on_is_summarised_and_setup_loads_once() -> None:
    source = Tiny()
    dm = module(source, fit_on="defender_clean")
    dm.setup()
    dm.setup("test")
    assert source.loads == 1 and dm.summary["fit_on"] == "defender_clean" and dm.summary["fit_samples"] == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fit_on": "val"}, r"^fit_on must be one of"),
        ({"batch_size": 0}, r"^data.batch_size must be a positive integer, got 0$"),
        ({"batch_size": True}, r"^data.batch_size must be a positive integer, got True$"),
        ({"eval_batch_size": 2.0}, r"^data.eval_batch_size must be a positive integer, got 2.0$"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        module(**kwargs)


def test_data_before_setup_a_missing_split_and_shared_samples_are_refused() -> None:
    with pytest.raises(RuntimeError, match=r"^BackdoorDataModule.setup\(\) must run before its data is asked for$"):
        module().dataset("poisoned")
    with pytest.raises(ValueError, match=r"^Tiny.load\(\) returned no \['val'\] split\(s\)$"):
        module(Tiny(drop="val")).setup()
    with pytest.raises(ValueError, match=r"^train and val splits share 12 samples \(e.g. id 0\): leakage$"):
        module(Tiny(overlap=True)).setup()


def test_inputs_are_converted_in_chunks_of_2048() -> None:
    source = Tiny(train=4100)
    dm = module(source)
    dm.setup()
    x = dm.dataset("clean").tensors[0]
    assert source.chunks == [2048, 2048, 4] and len(x) == 4100
    assert torch.equal(x[:, 0, 1, 1], torch.arange(4100).remainder(3).float())  # in order across chunks
    assert x.is_contiguous()  # Tiny's to_tensor permutes HWC to CHW: stored in CHW order, once, not per batch


def test_a_raw_split_keeps_its_fields_aligned() -> None:
    s = split(6, 0, 1)
    s.regions = np.arange(24, dtype=np.float32).reshape(6, 4)
    s.groups = np.arange(6)
    part = s.subset(np.array([4, 1]))
    assert part.labels.tolist() == [1, 1] and part.sample_ids.tolist() == [4, 1] and part.groups.tolist() == [4, 1]
    assert part.regions[0].tolist() == [16, 17, 18, 19] and len(part) == 2
    assert part.inputs[:, 1, 1, 0].tolist() == [1, 1] and part.inputs is not s.inputs
    bare = split(3, 0, 1).subset(np.array([2]))
    assert bare.regions is None and bare.groups is None and bare.sample_ids.tolist() == [2]
    with pytest.raises(ValueError, match=r"^RawSplit.labels has 2 rows but inputs has 3$"):
        RawSplit(np.zeros((3, 1)), np.zeros(2), np.arange(3))
    with pytest.raises(ValueError, match=r"^RawSplit.groups has 1 rows but inputs has 3$"):
        RawSplit(np.zeros((3, 1)), np.zeros(3), np.arange(3), groups=np.zeros(1))
