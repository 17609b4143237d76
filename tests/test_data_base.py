"""The shared data helpers (``data/base.py``) against answers worked out by hand: the stratified hold-out, the
cache key, the image transform, the scale checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoor_lab.data.base import check_scale, config_digest, images_to_tensor, scaled, stratified_holdout


def test_the_holdout_takes_its_share_of_every_class_and_never_a_lone_sample() -> None:
    labels = np.array([0] * 10 + [1] * 2 + [2])
    keep, hold = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(labels[hold].tolist()) == [0, 0, 1]  # round(0.2 * 10) = 2; a class of 2 gives at least 1
    assert 12 in keep  # a class of one sample is never held out
    assert sorted([*keep, *hold]) == list(range(13)) and not set(keep) & set(hold)
    again = stratified_holdout(labels, 0.2, seed=0)
    assert np.array_equal(again[1], hold) and not np.array_equal(stratified_holdout(labels, 0.2, seed=1)[1], hold)
    assert stratified_holdout(labels, 0.99, seed=0)[1].tolist().count(12) == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_the_holdout_fraction_must_lie_strictly_between_zero_and_one(fraction: float) -> None:
    with pytest.raises(ValueError, match=rf"^holdout fraction must be in \(0, 1\), got {fraction}$"):
        stratified_holdout(np.array([0, 0, 1, 1]), fraction, seed=0)


def test_the_cache_key_is_twelve_hex_digits_of_the_sorted_settings() -> None:
    key = config_digest({"b": 1, "a": [2, 3]})
    assert key == config_digest({"a": [2, 3], "b": 1}) and len(key) == 12 and int(key, 16) >= 0
    assert key != config_digest({"a": [2, 3], "b": 2})
    assert config_digest({"path": __import__("pathlib").Path("x")}) == config_digest({"path": "x"})  # str() of others


def test_images_become_normalized_channel_first_floats() -> None:
    images = np.array([[[[0, 255, 128]]]], dtype=np.uint8)  # one 1x1 RGB image
    x = images_to_tensor(images)
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx(
        [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25], abs=1e-6
    )
    assert images_to_tensor(images, mean=0.0, std=1.0).flatten().tolist() == pytest.approx([0.0, 1.0, 128 / 255])


def test_scale_is_a_positive_number_and_scaled_counts_are_at_least_one() -> None:
    assert check_scale(2) == 2.0 and isinstance(check_scale(2), float) and check_scale(0.001) == 0.001
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match=r"^data.source.scale must be a positive number \(1.0 = the documented"):
            check_scale(bad)
    assert scaled(10, 0.25) == 2 and scaled(10, 0.01) == 1 and scaled(3, 1.5) == 4
