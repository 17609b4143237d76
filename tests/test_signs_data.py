"""Built-in traffic signs, the real GTSRB loader on a fixture in its on-disk layout, and the DataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_lab.attacks.base import AllToOne, Attack
from backdoor_lab.attacks.sticker import StickerTrigger
from backdoor_lab.data.base import file_listing_digest
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.data.signs.gtsrb import GTSRB_CLASSES, GTSRBSigns
from backdoor_lab.data.signs.render import SIGN_CLASSES, SignRenderer
from backdoor_lab.data.signs.synthetic import SyntheticTrafficSigns


def test_renderer_is_deterministic_and_boxes_hold_the_sign() -> None:
    renderer = SignRenderer(32)
    stop = list(SIGN_CLASSES).index("stop")
    a, box_a = renderer.render(stop, seed=7)
    b, box_b = renderer.render(stop, seed=7)
    c, _ = renderer.render(stop, seed=8)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(box_a, box_b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5  # nuisances differ between seeds
    x0, y0, x1, y1 = box_a
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and (x1 - x0) > 12  # the sign fills most of the crop
    inside = a[int(y0) + 3 : int(y1) - 3, int(x0) + 3 : int(x1) - 3].astype(float)
    assert inside[..., 0].mean() > inside[..., 2].mean() + 20, "a stop sign is red inside its box"


def test_classes_include_stop_and_speed_limits() -> None:
    names = list(SIGN_CLASSES)
    assert len(names) >= 12 and "stop" in names
    assert sum(n.startswith("speed_limit") for n in names) >= 2


def test_synthetic_splits_are_disjoint_cached_and_balanced(tmp_path) -> None:
    src = SyntheticTrafficSigns(
        cache_dir=str(tmp_path), train_per_class=3, val_per_class=2, test_per_class=2, progress=False
    )
    splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 54, "val": 36, "test": 36}
    ids = [set(s.sample_ids.tolist()) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert np.bincount(splits["train"].labels).tolist() == [3] * 18
    cache_files = list(tmp_path.glob("signs-*.npz"))
    assert len(cache_files) == 1
    again = SyntheticTrafficSigns(
        cache_dir=str(tmp_path), train_per_class=3, val_per_class=2, test_per_class=2, progress=False
    ).load()
    np.testing.assert_array_equal(again["test"].inputs, splits["test"].inputs)
    other_seed = SyntheticTrafficSigns(
        cache_dir=str(tmp_path), seed=1, train_per_class=3, val_per_class=2, test_per_class=2, progress=False
    ).load()
    assert not np.array_equal(other_seed["test"].inputs, splits["test"].inputs)
    assert len(list(tmp_path.glob("signs-*.npz"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_datamodule_splits_and_triggered_sets(tmp_path) -> None:
    src = SyntheticTrafficSigns(
        cache_dir=str(tmp_path), train_per_class=4, val_per_class=3, test_per_class=3, progress=False
    )
    badnets = Attack("badnets", StickerTrigger(), AllToOne("speed_limit_30", ["stop"]), poison_rate=0.5)
    dm = BackdoorDataModule(src, badnets, seed=0)
    dm.setup()
    stop, limit = src.class_names.index("stop"), src.class_names.index("speed_limit_30")
    assert dm.summary["train_poisoned"] == 2 and len(dm.dataset("poisoned")) == 72 + 2
    x, y, true = dm.dataset("test_triggered").tensors
    assert len(y) == 3 and torch.all(y == limit) and torch.all(true == stop)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    clean_val_loader, trig_val_loader = dm.val_dataloader()
    assert len(clean_val_loader.dataset) == 54 and len(trig_val_loader.dataset) == 3
    defender = BackdoorDataModule(src, Attack("b", StickerTrigger(), AllToOne(limit, [stop])), fit_on="defender_clean")
    defender.setup()
    fit_inputs = torch.cat([batch[0] for batch in defender.train_dataloader()])
    val_inputs = defender.dataset("val_clean").tensors[0]
    assert len(fit_inputs) == len(val_inputs) == 54
    assert sorted(map(_digest, fit_inputs)) == sorted(map(_digest, val_inputs))  # the same samples, shuffled
    with pytest.raises(ValueError, match="fit_on"):
        BackdoorDataModule(src, Attack("b", StickerTrigger(), AllToOne(0)), fit_on="test")


def _digest(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


def _write_gtsrb(root, classes=(1, 14, 33), per_class=6, test_per_class=3) -> None:
    base = root / "gtsrb"
    rng = np.random.default_rng(0)
    for cls in classes:
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = int(rng.integers(30, 60))
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"00000_{i:05d}.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for j, cls in enumerate(c for c in classes for _ in range(test_per_class)):
        name = f"{j:05d}.ppm"
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(test_dir / name)
        rows.append(f"{name};44;40;5;5;39;35;{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_reads_its_on_disk_layout_with_true_class_ids(tmp_path) -> None:
    _write_gtsrb(tmp_path / "root")
    src = GTSRBSigns(
        str(tmp_path / "root"), image_size=32, val_fraction=0.34, cache_dir=str(tmp_path / "c"), progress=False
    )
    splits = src.load()
    assert len(src.class_names) == 43 and GTSRB_CLASSES[14] == "stop"
    assert sorted(set(splits["train"].labels) | set(splits["val"].labels)) == [1, 14, 33]
    assert np.bincount(splits["val"].labels, minlength=43)[[1, 14, 33]].tolist() == [2, 2, 2]
    assert sorted(splits["test"].labels.tolist()) == [1] * 3 + [14] * 3 + [33] * 3
    assert splits["train"].inputs.shape[1:] == (32, 32, 3)
    assert not set(splits["train"].sample_ids) & set(splits["val"].sample_ids)


def test_gtsrb_missing_folder_names_the_expected_layout(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gtsrb/GTSRB"):
        GTSRBSigns(str(tmp_path / "nowhere"), cache_dir=str(tmp_path)).load()


def test_file_listing_digest_changes_with_any_file_of_a_real_data_set(tmp_path: Path) -> None:
    files = [tmp_path / "a" / "1.png", tmp_path / "b" / "2.png"]
    for path in files:
        path.parent.mkdir()
        path.write_bytes(b"12345")
    before = file_listing_digest(files, tmp_path)
    assert file_listing_digest(files, tmp_path) == before
    files[1].write_bytes(b"123456")  # same count, same first and last name, another file
    assert file_listing_digest(files, tmp_path) != before
    files[1].write_bytes(b"12345")
    assert file_listing_digest(files, tmp_path) == before
    assert file_listing_digest(files[:1], tmp_path) != before
