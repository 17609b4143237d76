import hashlib

import numpy as np
import pytest

from backdoor_lab.attacks.accessory import SunglassesTrigger
from backdoor_lab.attacks.base import AllToAll, AllToOne
from backdoor_lab.attacks.noise import NoiseTrigger
from backdoor_lab.attacks.poisoning import choose_poisoned, poison_train, triggered_split
from backdoor_lab.attacks.sticker import StickerTrigger
from backdoor_lab.data.base import RawSplit
from backdoor_lab.data.faces.crop import ALIGNED_EYE_BAND, FACE_HEIGHT, FACE_WIDTH


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
    trig = StickerTrigger()  # min_pixels=2 by default
    # 0.1 x 10 px = 1 px, raised to 2 px, around the centre (5.7, 8.2) of the box
    assert trig.box((32, 32, 3), np.array([0, 0, 10, 10])) == (5, 7, 7, 9)
    # 20 x 20 px around (114, 164): the x fraction 0.57 is horizontal, the y fraction 0.82 vertical
    assert trig.box((200, 200, 3), np.array([0, 0, 200, 200])) == (104, 154, 124, 174)
    # a box hanging off the image is clipped inside it, at either side
    assert trig.box((32, 32, 3), np.array([25, 25, 45, 45])) == (30, 30, 32, 32)
    assert trig.box((32, 32, 3), np.array([-10, -20, 5, 5])) == (0, 0, 2, 2)
    # width from the x fraction, height from the y fraction
    assert StickerTrigger(size=(0.2, 0.1)).box((200, 200, 3), np.array([0, 0, 200, 200])) == (94, 154, 134, 174)


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


def test_half_transparent_and_opaque_rgb_patches_blend_by_their_alpha() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 128
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    out = StickerTrigger(size=(0.5, 0.5), center=(0.5, 0.5), patch=rgba).apply(image)
    alpha = 128 / 255
    expected = np.floor(np.array([0, 0, 200]) * alpha + 100 * (1 - alpha) + 0.5)
    np.testing.assert_array_equal(out[2:6, 2:6], np.broadcast_to(expected, (4, 4, 3)))
    np.testing.assert_array_equal(out[:2], 100)
    rgb = StickerTrigger(size=(0.5, 0.5), center=(0.5, 0.5), patch=rgba[..., :3]).apply(image)
    np.testing.assert_array_equal(rgb[2:6, 2:6], np.broadcast_to([0, 0, 200], (4, 4, 3)))  # no alpha: opaque


def test_bad_sticker_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        StickerTrigger(size=(0.0, 0.1))
    with pytest.raises(ValueError, match="center"):
        StickerTrigger(center=(1.5, 0.5))
    with pytest.raises(ValueError, match="size"):
        StickerTrigger(size=(1.5, 0.1))
    with pytest.raises(ValueError, match="center"):
        StickerTrigger(center=(0.5, 1.01))
    edge = StickerTrigger(size=(1.0, 1.0), center=(0.0, 1.0))  # the bounds themselves are valid
    assert edge.box((10, 10, 3), None) == (0, 0, 10, 10)


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
    with pytest.raises(ValueError, match="poison rate"):
        choose_poisoned(labels, mapping, rate=1.5, seed=0)
    assert len(choose_poisoned(labels, mapping, rate=0.001, seed=0).indices) == 1  # at least one sample


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
    np.testing.assert_array_equal(
        src[np.isin(src, choose_poisoned(split.labels, AllToOne(0, [1]), 1.0, 0).indices)], src
    )
    assert mask.dtype == bool
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
    built = AllToAll(num_classes=4, shift=3)  # bound at construction: usable without the data's class names
    np.testing.assert_array_equal(built.target(np.arange(4)), [3, 0, 1, 2])
    eligible = built.eligible(np.arange(4))
    assert eligible.dtype == bool and eligible.all()  # every class is a source in all-to-all
    with pytest.raises(ValueError, match="built for 4 classes but the data has 5"):
        built.bind([str(i) for i in range(5)])


def test_class_names_resolve_and_unknown_names_list_valid_ones() -> None:
    mapping = AllToOne("speed_limit_30", ["stop"]).bind(["stop", "speed_limit_30", "yield"])
    assert (mapping.target_class, mapping.source_classes) == (1, [0])
    with pytest.raises(ValueError, match=r"valid classes are \['stop'"):
        AllToOne("nope").bind(["stop", "yield"])
    with pytest.raises(ValueError, match="also a source"):
        AllToOne(1, [1])


# --- the face and speech triggers ------------------------------------------------------------------------

BAND = np.array(ALIGNED_EYE_BAND, dtype=np.float32)


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_default_triggers_are_pinned() -> None:
    """The default sunglasses and noise burst are part of every recorded result: a change must be deliberate.

    If this fails after an intended change of a trigger, re-run the affected results (docs/results) and update
    the digests.
    """
    face = np.full((FACE_HEIGHT, FACE_WIDTH, 3), 200, dtype=np.uint8)
    glasses = SunglassesTrigger().apply(face, BAND)
    assert _sha(glasses) == "67f51f0d1f1058a7390c6e969b242409a7ae373583e07da4c53388e9993d669d"
    noise = NoiseTrigger()
    assert noise.window(16000) == slice(0, 1600)  # 0.1 s at the start of a 16 kHz clip
    assert 0.099 < np.abs(noise.pattern).max() <= 0.1
    assert _sha(noise.pattern) == "b4bb38f96664ee17c0e97c33cf191bb9af2c21bccaf81ec50e1822755399d1a1"


def test_sunglasses_cover_the_scaled_band_and_the_arms_reach_beyond_it() -> None:
    x0, y0, x1, y1 = BAND
    _, full = SunglassesTrigger().sprite(FACE_HEIGHT, FACE_WIDTH, BAND)
    _, no_arms = SunglassesTrigger(arms=False).sprite(FACE_HEIGHT, FACE_WIDTH, BAND)
    _, half = SunglassesTrigger(scale=0.5, arms=False).sprite(FACE_HEIGHT, FACE_WIDTH, BAND)
    cols = np.flatnonzero(no_arms.max(axis=0) > 0)
    rows = np.flatnonzero(no_arms.max(axis=1) > 0)
    assert x0 - 1 <= cols.min() and cols.max() <= x1 and y0 - 1 <= rows.min() and rows.max() <= y1
    arm_cols = np.flatnonzero(full.max(axis=0) > 0)
    assert arm_cols.min() < cols.min() and arm_cols.max() > cols.max()
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    half_cols, half_rows = np.flatnonzero(half.max(axis=0) > 0), np.flatnonzero(half.max(axis=1) > 0)
    assert cx - hw - 1 <= half_cols.min() and half_cols.max() <= cx + hw
    assert cy - hh - 1 <= half_rows.min() and half_rows.max() <= cy + hh
    assert 0.2 * no_arms.sum() < half.sum() < 0.3 * no_arms.sum()  # a quarter of the area


def test_sunglasses_accessory_colour_lands_exactly_and_grey_images_get_its_luminance() -> None:
    accessory = np.zeros((4, 4, 3), dtype=np.uint8)
    accessory[:] = (10, 200, 30)
    face = np.full((FACE_HEIGHT, FACE_WIDTH, 3), 90, dtype=np.uint8)
    out = SunglassesTrigger(accessory=accessory).apply(face, BAND)
    x0, y0, x1, y1 = (int(np.ceil(v)) for v in BAND)
    np.testing.assert_array_equal(
        out[y0 : y1 - 1, x0 : x1 - 1], np.broadcast_to((10, 200, 30), (y1 - 1 - y0, x1 - 1 - x0, 3))
    )
    np.testing.assert_array_equal(out[: int(BAND[1]) - 1], 90)  # above the band: untouched
    np.testing.assert_array_equal(out[:, int(BAND[2]) + 1 :], 90)  # right of the band: untouched
    grey = SunglassesTrigger(accessory=accessory).apply(face[..., :1], BAND)
    assert grey.shape == (FACE_HEIGHT, FACE_WIDTH, 1) and grey.dtype == np.uint8
    luminance = round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)
    np.testing.assert_array_equal(grey[y0 : y1 - 1, x0 : x1 - 1], luminance)
    blended = SunglassesTrigger(accessory=accessory, blend_alpha=0.5).apply(face, BAND)
    np.testing.assert_array_equal(blended[y0 + 1, x0 + 1], np.rint((np.array([10, 200, 30]) + 90) / 2))


def test_sunglasses_settings_and_inputs_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="scale must be > 0"):
        SunglassesTrigger(scale=0.0)
    with pytest.raises(ValueError, match=r"opacity must be in \[0, 1\]"):
        SunglassesTrigger(opacity=1.5)
    with pytest.raises(ValueError, match=r"blend_alpha must be in \(0, 1\]"):
        SunglassesTrigger(blend_alpha=0.0)
    with pytest.raises(ValueError, match="blend_alpha"):
        SunglassesTrigger(blend_alpha=1.5)
    clear = SunglassesTrigger(opacity=0.0, arms=False, lens_colour=(0, 0, 0), frame_colour=(250, 250, 250))
    face = np.full((FACE_HEIGHT, FACE_WIDTH, 3), 120, dtype=np.uint8)
    cx, cy = int(BAND[0] + 0.25 * (BAND[2] - BAND[0])), int((BAND[1] + BAND[3]) / 2)
    assert np.all(clear.apply(face, BAND)[cy, cx] == 120)  # clear lenses let the eye show through
    with pytest.raises(ValueError, match="eye band"):
        SunglassesTrigger().apply(face)
    for bad in (face[..., :2], face[..., 0]):
        with pytest.raises(ValueError, match=r"expected a uint8 \(H, W, 1\|3\) image"):
            SunglassesTrigger().apply(bad, BAND)
    with pytest.raises(ValueError, match="cannot read accessory image"):
        SunglassesTrigger(accessory=str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"uint8 \(h, w, 3\|4\)"):
        SunglassesTrigger(accessory=np.zeros((4, 4, 3), dtype=np.float32))


def test_noise_trigger_settings_are_checked() -> None:
    for kwargs, message in [
        ({"amplitude": 0.0}, "amplitude must be positive"),
        ({"duration_s": 0.0}, "duration_s must be positive"),
        ({"position_unit": "ms"}, "position_unit must be one of"),
        ({"position": -0.1}, "outside the clip"),
        ({"position": 1.0, "position_unit": "fraction"}, "outside the clip"),
    ]:
        with pytest.raises(ValueError, match=message):
            NoiseTrigger(**kwargs)
    late = NoiseTrigger(position=0.5, position_unit="fraction", duration_s=0.5, sample_rate=8000)
    assert late.window(8000) == slice(4000, 8000) and len(late.pattern) == 4000
    assert late.window(6000) == slice(3000, 6000)  # cut at the end of a shorter clip
    with pytest.raises(ValueError, match="1-D waveform"):
        late.apply(np.zeros((2, 8000), dtype=np.float32))
    loud = NoiseTrigger(amplitude=2.0).apply(np.full(16000, 0.5, dtype=np.float32))
    assert loud.dtype == np.float32 and loud.max() == 1.0 and loud.min() == -1.0  # clipped to full scale


def _grouped_split(regions: bool) -> RawSplit:
    """A waveform-like split: groups (speakers) and, optionally, no regions."""
    split = _split(n=20, classes=4)
    return RawSplit(
        inputs=split.inputs,
        labels=split.labels,
        sample_ids=split.sample_ids,
        regions=split.regions if regions else None,
        groups=np.arange(20) // 5,
    )


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_poisoned_and_triggered_splits_keep_regions_and_groups(mode: str) -> None:
    split = _grouped_split(regions=True)
    mapping = AllToAll(4)
    poisoned, mask = poison_train(split, StickerTrigger(), mapping, rate=0.5, seed=3, mode=mode)
    plan = choose_poisoned(split.labels, mapping, 0.5, 3)
    assert mask.dtype == bool and mask.sum() == len(plan.indices) == 10
    rows = np.concatenate([np.arange(20), plan.indices]) if mode == "add" else np.arange(20)
    np.testing.assert_array_equal(poisoned.groups, split.groups[rows])
    np.testing.assert_array_equal(poisoned.regions, split.regions[rows])
    poisoned_rows = np.flatnonzero(mask) if mode == "replace" else rows[mask]
    np.testing.assert_array_equal(np.sort(poisoned_rows), plan.indices)  # the seed chooses, as choose_poisoned
    triggered, true = triggered_split(split, StickerTrigger(), mapping)
    np.testing.assert_array_equal(triggered.groups, split.groups)
    np.testing.assert_array_equal(triggered.regions, split.regions)
    np.testing.assert_array_equal(true, split.labels)


def test_poisoning_samples_without_regions() -> None:
    split = _grouped_split(regions=False)
    poisoned, mask = poison_train(split, StickerTrigger(), AllToAll(4), rate=0.5, seed=0)
    assert poisoned.regions is None and len(poisoned) == 30 and mask.sum() == 10
    plain, _ = poison_train(_split(n=20, classes=4), StickerTrigger(), AllToAll(4), rate=0.5, seed=0)
    assert plain.groups is None


def test_class_indices_given_as_text_and_out_of_range_indices() -> None:
    names = ["a", "b", "c"]
    assert AllToOne("2", ["0"]).bind(names).target_class == 2
    for bad in ("-1", -1, 3, "3"):
        with pytest.raises(ValueError, match=r"target_class: class index -?\d is out of range for 3 classes"):
            AllToOne(bad).bind(names)
    with pytest.raises(ValueError, match=r"source_classes: unknown class 'z'"):
        AllToOne("a", ["z"]).bind(names)


def test_attack_settings_are_checked_and_binding_leaves_the_configured_attack_alone() -> None:
    from backdoor_lab.attacks.base import Attack

    for rate in (0.0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="attack.poison_rate must be"):
            Attack("badnets", StickerTrigger(), AllToOne("b"), poison_rate=rate)
    with pytest.raises(ValueError, match="attack.poison_mode must be one of"):
        Attack("badnets", StickerTrigger(), AllToOne("b"), poison_mode="overwrite")
    attack = Attack("badnets", StickerTrigger(), AllToOne("b", ["a"]), poison_rate=1.0)
    bound = attack.for_classes(["a", "b"])
    assert (bound.mapping.target_class, bound.mapping.source_classes) == (1, [0])
    assert (attack.mapping.target_class, attack.mapping.source_classes) == ("b", ["a"])  # not mutated


def test_noise_lands_exactly_and_a_clip_too_short_for_it_is_refused() -> None:
    trigger = NoiseTrigger(position=0.5, position_unit="fraction", duration_s=0.5, sample_rate=8000)
    out = trigger.apply(np.zeros(6000, dtype=np.float64))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[3000:], trigger.pattern[:3000])  # added, cut at the clip's end
    np.testing.assert_array_equal(out[:3000], 0.0)
    with pytest.raises(ValueError, match="starts at sample 8000 but the clip has only 8000 samples"):
        NoiseTrigger(position=1.0, sample_rate=8000).apply(np.zeros(8000, dtype=np.float32))


@pytest.mark.parametrize("shift", [8, 20, 28])
def test_sunglasses_low_in_the_frame_are_the_same_glasses_moved_down(shift: int) -> None:
    """The sprite is reduced only over the rows and columns the glasses touch; that window must follow the glasses
    wherever they sit, down to the bottom of the image (a whole-pixel shift moves the sprite and nothing else)."""
    colour, covered = SunglassesTrigger().sprite(FACE_HEIGHT, FACE_WIDTH, BAND)
    moved = BAND + np.float32([0, shift, 0, shift])
    colour_low, covered_low = SunglassesTrigger().sprite(FACE_HEIGHT, FACE_WIDTH, moved)
    rows = FACE_HEIGHT - shift
    np.testing.assert_allclose(covered_low[shift:], covered[:rows], atol=1e-6)
    np.testing.assert_allclose(colour_low[shift:], colour[:rows], atol=1e-4)
    assert covered_low[:shift].max() == 0.0 and covered_low.sum() > 0.5 * covered.sum()
