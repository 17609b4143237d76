"""Known-answer pins of every built-in data source, so that moving or sharing data code changes no sample.

Each source is built at a tiny size (the built-in ones rendered, the real-data loaders read from the small
fixtures their own tests write) and hashed: every split's inputs, labels, sample ids, regions and groups,
the class names, the image sources' model inputs, and the name of the cache file (the digest of the cache
parameters, with the fixture's temporary root replaced by ``<root>``). The literals were recorded from the
code before the data modules were split into packages. A changed pin means a changed sample, split or
label, or a cache file name that no longer finds (or wrongly finds) a cache written by earlier code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import backdoor_lab.data.base as data_base
from backdoor_lab.data.base import DataSource, RawSplit
from backdoor_lab.data.faces.folders import AlignedFaceFolder
from backdoor_lab.data.faces.lfw import LFWFaces
from backdoor_lab.data.faces.synthetic import SyntheticFaces
from backdoor_lab.data.signs.gtsrb import GTSRBSigns
from backdoor_lab.data.signs.synthetic import SyntheticTrafficSigns
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import SpokenDigits

from .machine import REFERENCE_KIND, cpu_kind
from .test_face_data import write_folder, write_lfw
from .test_signs_data import _write_gtsrb
from .test_speech_data import digit_tone, make_speech_commands, write_wav


def _signs(tmp: Path) -> DataSource:
    return SyntheticTrafficSigns(
        cache_dir=tmp / "cache",
        train_per_class=2,
        val_per_class=1,
        test_per_class=1,
        classes=["stop", "speed_limit_30", "yield"],
        progress=False,
    )


def _gtsrb(tmp: Path) -> DataSource:
    _write_gtsrb(tmp / "root")
    return GTSRBSigns(str(tmp / "root"), val_fraction=0.34, cache_dir=str(tmp / "cache"), progress=False)


def _spoken_digits(tmp: Path) -> DataSource:
    return SpokenDigits(
        n_utterances=20,
        voices=["en-US+f3", "en+m1"],
        test_voice_fraction=0.5,
        val_fraction=0.2,
        seed=3,
        cache_dir=tmp / "cache",
        progress=False,
    )


def _speech_commands(tmp: Path) -> DataSource:
    make_speech_commands(tmp / "root", [f"{i * 7919:08x}" for i in range(12)])
    return SpeechCommandsDigits(
        tmp / "root", validation_percentage=30, testing_percentage=30, cache_dir=tmp / "cache", progress=False
    )


def _write_fsdd(root: Path) -> Path:
    for label in range(10):
        for speaker in ("jackson", "theo", "nicolas"):
            for n in (0, 6, 12):
                write_wav(root / "recordings" / f"{label}_{speaker}_{n}.wav", digit_tone(label, 8000), 8000)
    return root


def _fsdd_by_index(tmp: Path) -> DataSource:
    return FreeSpokenDigits(_write_fsdd(tmp / "root"), cache_dir=tmp / "cache", progress=False)


def _fsdd_by_speaker(tmp: Path) -> DataSource:
    return FreeSpokenDigits(_write_fsdd(tmp / "root"), split_by="speaker", cache_dir=tmp / "cache", progress=False)


def _aligned_folder(tmp: Path) -> DataSource:
    write_folder(tmp / "root")
    return AlignedFaceFolder(tmp / "root", max_images_per_identity=4, seed=3, cache_dir=tmp / "cache", progress=False)


def _lfw(tmp: Path) -> DataSource:
    write_lfw(tmp / "root", {"Ada_Lovelace": 6, "Alan_Turing": 5, "Grace_Hopper": 2})
    return LFWFaces(tmp / "root", min_images=3, cache_dir=tmp / "cache", progress=False)


def _synthetic_faces(tmp: Path) -> DataSource:
    return SyntheticFaces(
        num_identities=3,
        train_per_identity=2,
        val_per_identity=1,
        test_per_identity=1,
        cache_dir=tmp / "cache",
        progress=False,
    )


SOURCES: dict[str, Callable[[Path], DataSource]] = {
    "signs": _signs,
    "gtsrb": _gtsrb,
    "spoken_digits": _spoken_digits,
    "speech_commands": _speech_commands,
    "fsdd_by_index": _fsdd_by_index,
    "fsdd_by_speaker": _fsdd_by_speaker,
    "aligned_folder": _aligned_folder,
    "lfw": _lfw,
    "synthetic_faces": _synthetic_faces,
}

EXPECTED: dict[str, dict[str, str]] = {
    "signs": {
        "cache": "signs-423dcd4e286b",
        "classes": "2a5b348d74fff3df",
        "train": "ce6cf2df796a66d3",
        "val": "18061bde175f26dd",
        "test": "390a8ec8ede54385",
        "tensor": "3e69b620ce328ac8",
    },
    "gtsrb": {
        "cache": "gtsrb-9e770e15b319",
        "classes": "662ad545bbea893b",
        "train": "a61bdbec92aca2ed",
        "val": "0c4156337a7d3bb4",
        "test": "b83682b26321e0e0",
        "tensor": "7b4c05867ce8a3eb",
    },
    "spoken_digits": {
        "cache": "spoken_digits-d8391ff9664f",
        "classes": "5902143d8a258b64",
        "train": "75f6cb7134082003",
        "val": "a338d2c1fe7fb263",
        "test": "dd080898c9d23d77",
    },
    "speech_commands": {
        "cache": "speech_commands_digits-5033996e8be1",
        "classes": "5902143d8a258b64",
        "train": "e13d918ac9bc5219",
        "val": "a4ea53be10c1229a",
        "test": "f7d3625f77601fc5",
    },
    "fsdd_by_index": {
        "cache": "free_spoken_digits-ebb9346aa8da",
        "classes": "5902143d8a258b64",
        "train": "28b144a6b5bfe117",
        "val": "f2d2276f2577b2f4",
        "test": "c9d09c84795bf411",
    },
    "fsdd_by_speaker": {
        "cache": "free_spoken_digits-9a4383c6c950",
        "classes": "5902143d8a258b64",
        "train": "ca7536329dd72e68",
        "val": "2ee0d0abca288882",
        "test": "67b3170fce3812ad",
    },
    "aligned_folder": {
        "cache": "aligned_faces-a38921137b0c",
        "classes": "afe01cec97f6884f",
        "train": "fa9952018bfe4ab8",
        "val": "912c4de771802bfe",
        "test": "015465ceff56fdca",
        "tensor": "0745f7b9ae2e2f8e",
    },
    "lfw": {
        "cache": "lfw_faces-b07a3e3b42af",
        "classes": "33f982eb0a4cc785",
        "train": "627582cd5ca2f364",
        "val": "07aaacaa8f82e758",
        "test": "27c8f65e6cdd0ed9",
        "tensor": "0e345c89785a1dc9",
    },
    "synthetic_faces": {
        "cache": "synthetic_faces-ad222e21e50a",
        "classes": "47c2065e4e763131",
        "train": "bc68f20bd6e68d01",
        "val": "d6a9589b98334efa",
        "test": "bd01bc0a7ded6a54",
        "tensor": "a2e19577e2ec25e6",
    },
}


def _digest(*arrays: np.ndarray | None) -> str:
    """sha256 (first 16 hex digits) of the arrays' dtypes, shapes and bytes; ``None`` counts as absent."""
    h = hashlib.sha256()
    for value in arrays:
        if value is None:
            h.update(b"none;")
            continue
        value = np.ascontiguousarray(value)
        h.update(f"{value.dtype.str}{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:16]


def _split_digest(split: RawSplit) -> str:
    return _digest(split.inputs, split.labels, split.sample_ids, split.regions, split.groups)


def _pins(source: DataSource, splits: dict[str, RawSplit], cache_name: str) -> dict[str, str]:
    pins = {"cache": cache_name, "classes": _digest(np.array(source.class_names))}
    for name, split in splits.items():
        pins[name] = _split_digest(split)
    if splits["test"].inputs.dtype == np.uint8:  # images: the model inputs too (waveform features use BLAS sums)
        pins["tensor"] = _digest(source.to_tensor(splits["test"].inputs).numpy())
    return pins


# EXPECTED was recorded on tests/machine.py's REFERENCE_KIND of CPU. The rendered signs pass floats through
# vector kernels on their way to uint8, and another kind rounds a few pixels the other way: its pins, by kind.
# On a kind with none recorded, the pins that some kind moves are not compared (the rest still are).
BY_CPU: dict[str, dict[str, dict[str, str]]] = {
    "x86_64-AuthenticAMD-avx2": {"signs": {"test": "33c0e15bc8a40852", "tensor": "3f6f58fe242ab547"}},
}


def expected_pins(key: str) -> dict[str, str]:
    """EXPECTED[key] as this kind of CPU computes it."""
    kind = cpu_kind()
    if kind == REFERENCE_KIND:
        return EXPECTED[key]
    if kind in BY_CPU:
        return {**EXPECTED[key], **BY_CPU[kind].get(key, {})}
    moved = {name for pins in BY_CPU.values() for name in pins.get(key, {})}
    return {name: pin for name, pin in EXPECTED[key].items() if name not in moved}


@pytest.mark.parametrize("key", SOURCES)
def test_source_builds_the_pinned_splits_and_cache_name(key: str, tmp_path: Path, monkeypatch) -> None:
    cache_params: list[dict] = []
    digest = data_base.config_digest

    def recording_digest(params: dict) -> str:
        cache_params.append(params)
        return digest(params)

    monkeypatch.setattr(data_base, "config_digest", recording_digest)
    source = SOURCES[key](tmp_path)
    splits = source.load()
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    stem = cache_file.name.rsplit("-", 1)[0]
    assert cache_file.name == f"{stem}-{digest(cache_params[0])}.npz"  # these params named the file
    root = str((tmp_path / "root").resolve())
    portable = {k: "<root>" if v == root else v for k, v in cache_params[0].items()}
    pins = _pins(source, splits, f"{stem}-{digest(portable)}")
    print(f'"{key}": {pins},')
    assert set(pins) == set(EXPECTED[key])
    expected = expected_pins(key)
    assert {name: pins[name] for name in expected} == expected
    reread = source.load()  # from the cache file this time
    assert {name: _split_digest(split) for name, split in reread.items()} == {
        name: pins[name] for name in ("train", "val", "test")
    }
