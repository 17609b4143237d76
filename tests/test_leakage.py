"""Leakage by content: no input (pixels, waveform samples) appears in two of train, val and test.

Disjoint ``sample_ids`` prove nothing when two ids hold the same pixels (a renderer seeded by the position
within a split, a file listed twice, a DataModule that swaps one split for another after its id check). These
tests hash every sample's raw bytes, for every built-in source, every real-data loader on its tiny on-disk
fixture (the builders of the data tests, with every file made unique first) and the DataModule's datasets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_lab.attacks.base import AllToOne, Attack
from backdoor_lab.attacks.sticker import StickerTrigger
from backdoor_lab.data.base import RawSplit
from backdoor_lab.data.faces.folders import AlignedFaceFolder
from backdoor_lab.data.faces.lfw import LFWFaces
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.data.signs.gtsrb import GTSRBSigns
from backdoor_lab.data.signs.synthetic import SyntheticTrafficSigns
from backdoor_lab.data.speech.audio import read_wav
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import SpokenDigits
from tests.test_face_data import small_faces, write_folder, write_lfw
from tests.test_signs_data import _write_gtsrb
from tests.test_speech_data import TINY, digit_tone, make_speech_commands, write_wav


def content_hashes(samples: Iterable[np.ndarray | torch.Tensor]) -> list[str]:
    """SHA-256 of each sample's dtype, shape and bytes."""
    out = []
    for sample in samples:
        array = sample.numpy() if isinstance(sample, torch.Tensor) else np.asarray(sample)
        array = np.ascontiguousarray(array)
        out.append(hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest())
    return out


def assert_no_shared_content(groups: dict[str, Iterable[np.ndarray | torch.Tensor]]) -> dict[str, set[str]]:
    """Every pair of groups shares no sample content; returns each group's hashes."""
    hashes = {name: set(content_hashes(samples)) for name, samples in groups.items()}
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = hashes[a] & hashes[b]
            assert not shared, f"{a} and {b} share the content of {len(shared)} samples"
    return hashes


def assert_splits_disjoint_by_content(splits: dict[str, RawSplit], expected_total: int) -> None:
    """No content in two splits; and no sample lost or duplicated inside a split (the fixture is unique)."""
    assert set(splits) == {"train", "val", "test"}
    hashes = assert_no_shared_content({name: split.inputs for name, split in splits.items()})
    assert sum(len(h) for h in hashes.values()) == sum(len(s) for s in splits.values()) == expected_total


# --------------------------------------------------------------------------------------------------------
# Built-in sources
# --------------------------------------------------------------------------------------------------------


def test_synthetic_signs_splits_share_no_pixels(tmp_path: Path) -> None:
    source = SyntheticTrafficSigns(
        cache_dir=str(tmp_path), train_per_class=3, val_per_class=2, test_per_class=2, progress=False
    )
    splits = source.load()
    assert_splits_disjoint_by_content(splits, 18 * 7)
    # near-duplicates: val and test are rendered by the same code with the same per-class counts here, so a
    # seed taken from the position within a split would make them pixel-identical under different ids
    assert not np.array_equal(splits["val"].inputs, splits["test"].inputs)
    differing = np.abs(splits["val"].inputs.astype(int) - splits["test"].inputs.astype(int)).mean(axis=(1, 2, 3))
    assert differing.min() > 5, "a val image and the test image at its position are near-identical"


def test_spoken_digits_splits_share_no_waveform() -> None:
    splits = SpokenDigits(cache_dir=None, seed=3, **TINY).load()
    assert_splits_disjoint_by_content(splits, TINY["n_utterances"])


def test_synthetic_faces_splits_share_no_pixels() -> None:
    splits = small_faces().load()
    assert_splits_disjoint_by_content(splits, 6 * 8)


# --------------------------------------------------------------------------------------------------------
# Real-data loaders on their on-disk fixtures, every file made unique
# --------------------------------------------------------------------------------------------------------


def make_images_unique(root: Path, patterns: tuple[str, ...] = ("*.png", "*.jpg", "*.ppm")) -> int:
    """Stamp each image file's centre with a grey level of its own (blocks large enough to survive resizing)."""
    files = sorted(p for pattern in patterns for p in root.rglob(pattern))
    for index, path in enumerate(files):
        with Image.open(path) as img:
            pixels = np.array(img)
        h, w = pixels.shape[:2]
        pixels[h * 3 // 10 : h * 7 // 10, w * 3 // 10 : w // 2] = 10 + 8 * (index % 30)
        pixels[h * 3 // 10 : h * 7 // 10, w // 2 : w * 7 // 10] = 10 + 8 * (index // 30)
        Image.fromarray(pixels).save(path)
    return len(files)


def make_waves_unique(root: Path) -> int:
    """Add a DC offset of its own to each WAV file (the fixtures write one clip per digit)."""
    files = sorted(root.rglob("*.wav"))
    for index, path in enumerate(files):
        samples, rate = read_wav(path)
        write_wav(path, samples + 0.002 * (index + 1), rate)
    return len(files)


def test_gtsrb_splits_share_no_pixels(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path / "root")
    n_files = make_images_unique(tmp_path / "root")
    assert n_files == 3 * 6 + 3 * 3
    splits = GTSRBSigns(
        str(tmp_path / "root"), image_size=32, val_fraction=0.34, cache_dir=str(tmp_path / "c"), progress=False
    ).load()
    assert_splits_disjoint_by_content(splits, n_files)


def test_speech_commands_splits_share_no_waveform(tmp_path: Path) -> None:
    speakers = [f"{i * 7919:08x}" for i in range(12)]
    make_speech_commands(tmp_path, speakers)
    n_files = make_waves_unique(tmp_path)
    source = SpeechCommandsDigits(tmp_path, validation_percentage=30, testing_percentage=30, progress=False)
    assert_splits_disjoint_by_content(source.load(), n_files)


def test_free_spoken_digits_splits_share_no_waveform(tmp_path: Path) -> None:
    for label in range(10):
        for speaker in ("jackson", "theo", "nicolas"):
            for n in (0, 6, 12):
                write_wav(tmp_path / "recordings" / f"{label}_{speaker}_{n}.wav", digit_tone(label, 8000), 8000)
    n_files = make_waves_unique(tmp_path)
    for split_by in ("index", "speaker"):
        source = FreeSpokenDigits(tmp_path, split_by=split_by, test_speakers=["theo"], progress=False)
        assert_splits_disjoint_by_content(source.load(), n_files)


def test_aligned_face_folder_splits_share_no_pixels(tmp_path: Path) -> None:
    write_folder(tmp_path, n=6)
    n_files = make_images_unique(tmp_path)
    splits = AlignedFaceFolder(tmp_path, progress=False, seed=3).load()
    assert_splits_disjoint_by_content(splits, n_files)


def test_lfw_splits_share_no_pixels(tmp_path: Path) -> None:
    write_lfw(tmp_path, {"Ada_Lovelace": 6, "Alan_Turing": 5})
    n_files = make_images_unique(tmp_path)
    splits = LFWFaces(tmp_path, min_images=3, progress=False).load()
    assert_splits_disjoint_by_content(splits, n_files)


# --------------------------------------------------------------------------------------------------------
# The DataModule's datasets
# --------------------------------------------------------------------------------------------------------


# the attacker's sets, the defender's, the evaluation sets
ROLES = ("poisoned", "clean", "defender_clean", "val_clean", "val_triggered", "test_clean", "test_triggered")


@pytest.fixture(scope="module")
def signs_module(tmp_path_factory: pytest.TempPathFactory) -> BackdoorDataModule:
    source = SyntheticTrafficSigns(
        cache_dir=str(tmp_path_factory.mktemp("signs")),
        train_per_class=3,
        val_per_class=2,
        test_per_class=2,
        progress=False,
    )
    attack = Attack("badnets", StickerTrigger(), AllToOne("speed_limit_30", ["stop"]), poison_rate=1.0)
    dm = BackdoorDataModule(source, attack, fit_on="defender_clean")
    dm.setup()
    return dm


def test_datamodule_roles_share_no_inputs_across_splits(signs_module: BackdoorDataModule) -> None:
    dm = signs_module
    inputs = {role: dm.dataset(role).tensors[0] for role in ROLES}
    n_train = dm.summary["train_clean"]
    poisoned = inputs["poisoned"]
    # the attacker's set is the clean train split plus triggered copies of train samples
    assert torch.equal(poisoned[:n_train], inputs["clean"])
    assert len(poisoned) == n_train + dm.summary["train_poisoned"] > n_train
    clean_hashes = assert_no_shared_content(
        {"train": inputs["clean"], "val": inputs["val_clean"], "test": inputs["test_clean"]}
    )
    # the defender fine-tunes and prunes on the val split itself, nothing of train or test
    assert set(content_hashes(inputs["defender_clean"])) == clean_hashes["val"]
    # triggered copies: of train samples in the attacker's set, of val and test samples in the evaluation sets;
    # a copy made from a val or test image would hash like that image's triggered twin
    assert_no_shared_content(
        {
            "poisoned copies": poisoned[n_train:],
            "val_triggered": inputs["val_triggered"],
            "test_triggered": inputs["test_triggered"],
        }
    )
    everything_clean = set().union(*clean_hashes.values())
    assert not set(content_hashes(poisoned[n_train:])) & everything_clean  # every copy carries the trigger


# --------------------------------------------------------------------------------------------------------
# What a defense is handed: the defender's clean split, and the triggered val inputs for curves, nothing else
# --------------------------------------------------------------------------------------------------------


def _tensors_reachable(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes, containers and datasets (a defense's view)."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | type(None)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("backdoor_lab", "torch", "lightning"):
            stack.extend(vars(obj).values())
    return found


def test_a_defense_cannot_reach_the_test_split(signs_module: BackdoorDataModule) -> None:
    from backdoor_lab.defenses import DefenderData, DefenseContext, NoDefense, SplitOutOfReach

    dm = signs_module
    defender = DefenderData.of(dm)
    context = DefenseContext(model=torch.nn.Linear(1, 1), datamodule=defender, make_trainer=lambda cbs, n: None)
    # what it can iterate: the clean val split to fit on and decide on, the triggered val twin for curves
    fit = torch.cat([x for x, _ in context.datamodule.train_dataloader()])
    assert set(content_hashes(fit)) == set(content_hashes(dm.dataset("val_clean").tensors[0]))
    ranked = torch.cat([x for x, _ in context.datamodule.clean_val_dataloader()])
    assert torch.equal(ranked, dm.dataset("val_clean").tensors[0])
    assert len(context.datamodule.triggered_val_dataloader().dataset) == len(dm.dataset("val_triggered"))
    # a defense reaching for the test split or the attacker's data finds nothing to call
    with pytest.raises(SplitOutOfReach, match="no test split"):
        context.datamodule.test_dataloader()
    for reach in ("attacker_clean_dataloader", "source", "dataset", "_raw", "datasets"):
        assert not hasattr(context.datamodule, reach), reach
    # and no tensor reachable from what it holds carries a test or attacker-only sample
    reachable = set().union(*(content_hashes(t) for t in _tensors_reachable(context) if t.dim() == 4))
    for role in ("test_clean", "test_triggered", "clean", "poisoned"):
        assert not reachable & set(content_hashes(dm.dataset(role).tensors[0])), role
    assert reachable  # the walk does find the defender's own tensors
    assert NoDefense().apply(context)["pruned_fraction"] == 0.0


def test_the_pipeline_hands_defenses_defender_data_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A defense that tries the test split through the pipeline fails, and nothing is written for it."""
    from hydra import compose, initialize_config_dir

    from backdoor_lab import CONF_DIR, pipeline
    from backdoor_lab.defenses import SplitOutOfReach
    from backdoor_lab.defenses.methods import NoDefense

    def peeks_at_test(self, context):  # a defense that "tunes" itself on the test split
        next(iter(context.datamodule.test_dataloader()))

    monkeypatch.setattr(NoDefense, "apply", peeks_at_test)
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "debug=tiny",
                "defenses=[none]",
                f"paths.output_dir={tmp_path}",
                f"paths.run_dir={tmp_path / 'job'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                "data.source.scale=0.02",
                "logger=csv",
            ],
        )
    with pytest.raises(SplitOutOfReach):
        pipeline.train(cfg)
    assert not (tmp_path / "job" / "defense" / "none" / "metrics.json").exists()
