import numpy as np
import pytest

from backdoor_lab.attacks.base import AllToAll, AllToOne
from backdoor_lab.attacks.poisoning import choose_poisoned, poison_train, triggered_split
from backdoor_lab.attacks.sticker import StickerTrigger
from backdoor_lab.data.base import RawSplit


def _split(n: int = 100, classes: int = 5, size: int = 32) -> RawSplit:
    rng = np.random.default_rng(0)
    return RawSplit(
        inputs=rng.integers(0, 100, size=(n, size, size, 3), dtype=np.uint8),
        labels=np.arange(n) % classes,
        sample_ids=np.arange(n) + 1000,
        regions=np.tile(np.array([4.0, 2.0, 24.0, 22.0], dtype=np.float32), (n, 1)),
    )


def test_sticker_lands_at_paper_position_of_sign_box() -> None:
    trig = StickerTrigger()  # 0.1 x box, centred at (0.57, 0.82)
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    box = np.array([10.0, 20.0, 50.0, 60.0])  # 40 x 40 sign
    out = trig.apply(img, box)
    ys, xs = np.nonzero(out.any(axis=2))
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (31, 35, 51, 55)  # 4 x 4 around (32.8, 52.8)
    assert np.all(out[ys, xs] == (255, 215, 0))
    assert img.sum() == 0, "apply must not modify its input"


def test_sticker_scales_with_box_and_respects_min_pixels() -> None:
    trig = StickerTrigger(min_pixels=2)
    # 0.1 x 10 px = 1 px, raised to 2 px, around the centre (5.7, 8.2) of the box
    assert trig.box((32, 32, 3), np.array([0, 0, 10, 10])) == (5, 7, 7, 9)
    # 20 x 20 px around (114, 164): the x fraction 0.57 is horizontal, the y fraction 0.82 vertical
    assert trig.box((200, 200, 3), np.array([0, 0, 200, 200])) == (104, 154, 124, 174)
    # a box hanging off the image is clipped inside it
    assert trig.box((32, 32, 3), np.array([20, 20, 40, 40])) == (30, 30, 32, 32)


def test_sticker_accepts_image_patch_with_alpha(tmp_path) -> None:
    from PIL import Image

    patch = np.zeros((8, 8, 4), dtype=np.uint8)
    patch[..., 0] = 255
    patch[..., 3] = 255
    patch[:4, :, 3] = 0  # top half transparent
    path = tmp_path / "patch.png"
    Image.fromarray(patch, "RGBA").save(path)
    trig = StickerTrigger(size=(0.5, 0.5), center=(0.5, 0.5), patch=str(path))
    out = trig.apply(np.zeros((16, 16, 3), dtype=np.uint8))
    left, top, right, bottom = trig.box((16, 16, 3), None)
    assert (left, top, right, bottom) == (4, 4, 12, 12)  # no box: the whole image is the anchor
    expected = np.zeros((16, 16, 3), dtype=np.uint8)
    expected[8:12, 4:12] = (255, 0, 0)  # opaque bottom half pasted, transparent top half leaves the image
    np.testing.assert_array_equal(out, expected)


def test_bad_sticker_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        StickerTrigger(size=(0.0, 0.1))
    with pytest.raises(ValueError, match="center"):
        StickerTrigger(center=(1.5, 0.5))


def test_poison_rate_and_seeded_choice() -> None:
    labels = np.arange(1000) % 10
    mapping = AllToOne(target_class=3, source_classes=[7])
    plan_a = choose_poisoned(labels, mapping, rate=0.5, seed=1)
    plan_b = choose_poisoned(labels, mapping, rate=0.5, seed=1)
    plan_c = choose_poisoned(labels, mapping, rate=0.5, seed=2)
    assert len(plan_a.indices) == 50  # half of the 100 samples of class 7
    assert np.all(labels[plan_a.indices] == 7) and np.all(plan_a.target_labels == 3)
    np.testing.assert_array_equal(plan_a.indices, plan_b.indices)
    assert not np.array_equal(plan_a.indices, plan_c.indices)
    with pytest.raises(ValueError, match="poison rate"):
        choose_poisoned(labels, mapping, rate=0.0, seed=0)


def test_all_to_one_default_sources_exclude_target() -> None:
    labels = np.arange(100) % 5
    plan = choose_poisoned(labels, AllToOne(target_class=2), rate=1.0, seed=0)
    np.testing.assert_array_equal(plan.indices, np.flatnonzero(labels != 2))  # rate 1.0: every eligible sample
    assert np.all(plan.target_labels == 2)
    with pytest.raises(ValueError, match="eligible"):
        choose_poisoned(np.full(10, 2), AllToOne(target_class=2), rate=1.0, seed=0)


def test_poison_train_adds_triggered_copies() -> None:
    split = _split()
    trig = StickerTrigger()
    poisoned, mask = poison_train(split, trig, AllToOne(0, [1]), rate=1.0, seed=0, mode="add")
    assert len(poisoned) == 120 and mask.sum() == 20 and not mask[:100].any() and mask[100:].all()
    np.testing.assert_array_equal(poisoned.inputs[:100], split.inputs)
    np.testing.assert_array_equal(poisoned.labels[:100], split.labels)
    assert np.all(poisoned.labels[100:] == 0)
    src = np.flatnonzero(split.labels == 1)
    np.testing.assert_array_equal(poisoned.inputs[100:], trig.apply_batch(split.inputs[src], split.regions[src]))
    # a copy keeps its source's id and box: the DataModule's disjointness check sees it as a train sample
    np.testing.assert_array_equal(poisoned.sample_ids[100:], split.sample_ids[src])
    np.testing.assert_array_equal(poisoned.regions[100:], split.regions[src])


def test_poison_train_replace_mode_keeps_size() -> None:
    split = _split()
    poisoned, mask = poison_train(split, StickerTrigger(), AllToAll(5), rate=0.1, seed=0, mode="replace")
    assert len(poisoned) == 100 and mask.sum() == 10
    np.testing.assert_array_equal(poisoned.labels[mask], (split.labels[mask] + 1) % 5)
    np.testing.assert_array_equal(poisoned.labels[~mask], split.labels[~mask])
    np.testing.assert_array_equal(poisoned.inputs[~mask], split.inputs[~mask])
    np.testing.assert_array_equal(
        poisoned.inputs[mask], StickerTrigger().apply_batch(split.inputs[mask], split.regions[mask])
    )
    np.testing.assert_array_equal(poisoned.sample_ids, split.sample_ids)
    np.testing.assert_array_equal(split.inputs, _split().inputs)  # the clean split is not modified
    with pytest.raises(ValueError, match="poison mode"):
        poison_train(split, StickerTrigger(), AllToAll(5), rate=0.1, seed=0, mode="overwrite")


def test_triggered_split_excludes_samples_already_of_the_target() -> None:
    split = _split()
    trig_split, true = triggered_split(split, StickerTrigger(), AllToOne(target_class=4))
    kept = np.flatnonzero(split.labels != 4)
    assert len(trig_split) == 80 and np.all(trig_split.labels == 4)
    np.testing.assert_array_equal(true, split.labels[kept])
    np.testing.assert_array_equal(trig_split.sample_ids, split.sample_ids[kept])
    np.testing.assert_array_equal(
        trig_split.inputs, StickerTrigger().apply_batch(split.inputs[kept], split.regions[kept])
    )


def test_all_to_all_maps_every_class_to_the_next() -> None:
    mapping = AllToAll(shift=1).bind([str(i) for i in range(10)])
    np.testing.assert_array_equal(mapping.target(np.arange(10)), (np.arange(10) + 1) % 10)
    with pytest.raises(ValueError, match="itself"):
        AllToAll(shift=10).bind([str(i) for i in range(10)])


def test_class_names_resolve_and_unknown_names_list_valid_ones() -> None:
    mapping = AllToOne("speed_limit_30", ["stop"]).bind(["stop", "speed_limit_30", "yield"])
    assert (mapping.target_class, mapping.source_classes) == (1, [0])
    with pytest.raises(ValueError, match=r"valid classes are \['stop'"):
        AllToOne("nope").bind(["stop", "yield"])
    with pytest.raises(ValueError, match="also a source"):
        AllToOne(1, [1])
