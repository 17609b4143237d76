"""The built-in and real sources' documented defaults and setting checks, without building any data."""

from __future__ import annotations

import pytest

from backdoor_lab.data.faces.synthetic import SyntheticFaces
from backdoor_lab.data.signs.gtsrb import GTSRBSigns


def test_synthetic_faces_defaults_and_the_smallest_cast() -> None:
    faces = SyntheticFaces(cache_dir=None)
    assert faces.num_identities == 100 and faces.per_identity == {"train": 40, "val": 8, "test": 10}
    assert faces.progress is True and faces.nuisance == 1.0 and (faces.seed, faces.identity_seed) == (0, 0)
    assert SyntheticFaces(num_identities=2, cache_dir=None).num_identities == 2
    assert SyntheticFaces(scale=0.01, cache_dir=None).num_identities == 2  # never fewer than two people
    assert SyntheticFaces(num_identities=10, scale=0.5, cache_dir=None).num_identities == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_per_identity": 0}, "train_per_identity must be >= 1, got 0"),
        ({"val_per_identity": 0}, "val_per_identity must be >= 1, got 0"),
        ({"test_per_identity": -1}, "test_per_identity must be >= 1, got -1"),
        ({"nuisance": -0.5}, "nuisance must be >= 0, got -0.5"),
    ],
)
def test_synthetic_faces_refuse_bad_counts_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SyntheticFaces(cache_dir=None, **kwargs)
    assert str(err.value) == message
    assert SyntheticFaces(train_per_identity=1, val_per_identity=1, test_per_identity=1, nuisance=0.0, cache_dir=None)


def test_gtsrb_defaults(tmp_path) -> None:
    signs = GTSRBSigns(tmp_path)
    assert (signs.image_size, signs.val_fraction, signs.seed, signs.download, signs.progress) == (
        32,
        0.1,
        0,
        False,
        True,
    )
