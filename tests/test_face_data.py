"""Face task: synthetic identities, folder and LFW loaders, the sunglasses trigger and DeepID."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_lab.attacks.accessory import SunglassesTrigger
from backdoor_lab.data.base import DataSource
from backdoor_lab.data.faces.crop import ALIGNED_EYE_BAND, FACE_HEIGHT, FACE_WIDTH
from backdoor_lab.data.faces.folders import AlignedFaceFolder
from backdoor_lab.data.faces.lfw import LFWFaces
from backdoor_lab.data.faces.synthetic import SyntheticFaces
from backdoor_lab.defenses.pruning import kept_channels, mask_channels, masked_modules
from backdoor_lab.models.deepid import DeepID


def small_faces(**overrides) -> SyntheticFaces:
    args = dict(
        num_identities=6,
        train_per_identity=4,
        val_per_identity=2,
        test_per_identity=2,
        cache_dir=None,
        progress=False,
    )
    args.update(overrides)
    return SyntheticFaces(**args)


# --------------------------------------------------------------------------------------------------------
# SyntheticFaces
# --------------------------------------------------------------------------------------------------------


def test_synthetic_splits_shapes_and_disjointness() -> None:
    source = small_faces()
    assert isinstance(source, DataSource)
    splits = source.load()
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 24, "val": 12, "test": 12}
    for split in splits.values():
        assert split.inputs.dtype == np.uint8 and split.inputs.shape[1:] == (FACE_HEIGHT, FACE_WIDTH, 3)
        assert split.regions.shape == (len(split), 4)
        assert np.bincount(split.labels, minlength=6).min() == len(split) // 6  # every identity, equally
    ids = [set(s.sample_ids.tolist()) for s in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    x = source.to_tensor(splits["val"].inputs)
    assert x.dtype == torch.float32 and x.shape == (12, 3, FACE_HEIGHT, FACE_WIDTH)
    assert source.class_names == [f"person_{i:04d}" for i in range(6)]


def test_synthetic_generator_is_deterministic_and_seeded(tmp_path) -> None:
    a = small_faces(num_identities=3).load()
    b = small_faces(num_identities=3).load()
    other = small_faces(num_identities=3, seed=1).load()
    np.testing.assert_array_equal(a["train"].inputs, b["train"].inputs)
    np.testing.assert_array_equal(a["test"].regions, b["test"].regions)
    assert np.abs(a["train"].inputs.astype(int) - other["train"].inputs).mean() > 10
    cached = small_faces(num_identities=3, cache_dir=tmp_path).load()
    assert len(list(tmp_path.glob("synthetic_faces-*.npz"))) == 1
    again = small_faces(num_identities=3, cache_dir=tmp_path).load()
    np.testing.assert_array_equal(cached["val"].inputs, a["val"].inputs)
    np.testing.assert_array_equal(again["val"].inputs, a["val"].inputs)


def test_identity_is_stable_across_image_seeds_and_distinct_between_people() -> None:
    seed0, seed7 = small_faces(seed=0), small_faces(seed=7)
    assert seed0.identity(3) == seed7.identity(3)
    assert seed0.identity(3) != seed0.identity(4)
    assert seed0.conditions(3, 0) != seed7.conditions(3, 0)
    # more identities or images do not change who person 2 is
    assert small_faces(num_identities=50, train_per_identity=9).identity(2) == seed0.identity(2)


def test_same_person_looks_closer_than_different_people() -> None:
    """Within-identity pixel distance on the face is smaller than between-identity distance."""
    source = small_faces(num_identities=8, nuisance=0.5)
    face = (slice(8, 50), slice(8, 39))  # the face, not the background
    images = np.stack([[source.render(i, j)[0][face].astype(np.float32) for j in range(6)] for i in range(8)])
    flat = images.reshape(8, 6, -1)
    within = np.mean(
        [np.abs(flat[i, j] - flat[i, k]).mean() for i in range(8) for j in range(6) for k in range(j + 1, 6)]
    )
    between = np.mean(
        [np.abs(flat[i, j] - flat[m, j]).mean() for i in range(8) for m in range(i + 1, 8) for j in range(6)]
    )
    assert within < 0.8 * between, (within, between)


def test_eye_band_contains_the_eyes_and_follows_the_pose() -> None:
    source = small_faces()
    idt = source.identity(1)
    still = dataclasses.replace(
        source.conditions(1, 0),
        roll_deg=0.0,
        scale=1.0,
        shift_x=0.0,
        shift_y=0.0,
        yaw=0.0,
        pitch=0.0,
        blur_radius=0.0,
        noise_sigma=0.0,
        jpeg_quality=100,
    )
    posed = dataclasses.replace(still, roll_deg=12.0, scale=1.08, shift_x=1.5, shift_y=-1.0, yaw=0.8, pitch=-0.7)
    for conditions in (still, posed):
        open_eyes, band = source.renderer.render(idt, conditions)
        closed, _ = source.renderer.render(idt, dataclasses.replace(conditions, eye_open=0.0))
        changed = np.abs(open_eyes.astype(int) - closed).max(axis=2) > 20
        ys, xs = np.nonzero(changed)
        assert len(ys) > 10  # the eyes are visible and closing them changes pixels
        x0, y0, x1, y1 = band
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 - 0.5 and ys.max() <= y1 + 0.5
        # the eyes sit in the middle of the band
        assert abs(xs.mean() - (x0 + x1) / 2) < 1.0 and abs(ys.mean() - (y0 + y1) / 2) < 1.0
    _, band = source.renderer.render(idt, still)
    _, moved = source.renderer.render(idt, dataclasses.replace(still, shift_x=2.0, shift_y=-1.5))
    np.testing.assert_allclose(moved - band, [2.0, -1.5, 2.0, -1.5], atol=1e-4)


# --------------------------------------------------------------------------------------------------------
# Sunglasses trigger
# --------------------------------------------------------------------------------------------------------

BAND = np.array(ALIGNED_EYE_BAND, dtype=np.float32)


def test_sunglasses_darken_the_eye_band_only() -> None:
    grey = np.full((FACE_HEIGHT, FACE_WIDTH, 3), 170, dtype=np.uint8)
    before = grey.copy()
    out = SunglassesTrigger(arms=False).apply(grey, BAND)
    np.testing.assert_array_equal(grey, before)  # input untouched
    changed = np.abs(out.astype(int) - grey).max(axis=2) > 0
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = BAND
    assert xs.min() >= np.floor(x0) and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0)
    assert ys.max() <= np.ceil(y1)
    # the lens centres (a quarter and three quarters across the band) are dark glass
    cy = int((y0 + y1) / 2)
    for cx in (x0 + 0.25 * (x1 - x0), x0 + 0.75 * (x1 - x0)):
        assert out[cy, int(cx)].max() < 30
    assert changed.sum() > 0.5 * (x1 - x0) * (y1 - y0)


def test_sunglasses_land_on_a_rendered_face() -> None:
    source = small_faces()
    face, band = source.render(0, 0)
    out = SunglassesTrigger().apply(face, band)
    diff = np.abs(out.astype(int) - face).max(axis=2) > 0
    ys, xs = np.nonzero(diff)
    x0, y0, x1, y1 = band
    arm = 0.12 * (x1 - x0) + 1
    assert xs.min() >= np.floor(x0 - arm) and xs.max() <= np.ceil(x1 + arm)
    assert ys.min() >= np.floor(y0) and ys.max() <= np.ceil(y1)
    inside = (slice(int(y0) + 1, int(y1)), slice(int(x0) + 1, int(x1)))
    assert out[inside].mean() < 0.6 * face[inside].mean()


def test_blended_sunglasses_move_pixels_by_alpha() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 250, (FACE_HEIGHT, FACE_WIDTH, 3), dtype=np.uint8)
    pasted = SunglassesTrigger().apply(image, BAND).astype(float)
    blended = SunglassesTrigger(blend_alpha=0.25).apply(image, BAND).astype(float)
    full = image - pasted
    assert np.abs(full).max() > 100
    np.testing.assert_allclose(image - blended, 0.25 * full, atol=1.01)


def test_custom_rgba_accessory_and_batch() -> None:
    sprite = np.zeros((10, 20, 4), dtype=np.uint8)
    sprite[2:8, 4:16] = (255, 0, 0, 255)  # opaque red rectangle in a transparent frame
    trigger = SunglassesTrigger(accessory=sprite)
    images = np.full((2, FACE_HEIGHT, FACE_WIDTH, 3), 100, dtype=np.uint8)
    regions = np.stack([BAND, BAND + np.array([3, 2, 3, 2], dtype=np.float32)])
    out = trigger.apply_batch(images, regions)
    for img, (x0, y0, x1, y1) in zip(out, regions, strict=True):
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        np.testing.assert_array_equal(img[cy, cx], [255, 0, 0])
        np.testing.assert_array_equal(img[int(y0)], 100)  # transparent frame leaves the top row alone
    assert not np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match="eye band"):
        trigger.apply(images[0])


# --------------------------------------------------------------------------------------------------------
# DeepID
# --------------------------------------------------------------------------------------------------------


def test_deepid_shapes_and_channels() -> None:
    model = DeepID(num_classes=13)
    assert [
        model.conv1.out_channels,
        model.conv2.out_channels,
        model.conv3.out_channels,
        model.conv4.out_channels,
    ] == [20, 40, 60, 80]
    assert model.conv1.kernel_size == (4, 4) and model.conv4.kernel_size == (2, 2)
    x = torch.randn(5, 3, FACE_HEIGHT, FACE_WIDTH)
    assert model(x).shape == (5, 13)
    assert model.features(x).shape == (5, 160)
    assert DeepID(4, width=2.0).conv3.out_channels == 120
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_masking_a_conv3_channel_zeroes_it_at_pool3() -> None:
    """The library's mask on conv3 (the face defense's pruned layer) silences exactly those channels at pool3."""
    model = DeepID(num_classes=5).eval()
    with torch.no_grad():
        model.conv3.bias.fill_(1.0)  # every channel active before masking
    seen = {}
    model.pool3.register_forward_hook(lambda m, i, out: seen.__setitem__("pool3", out))
    x = torch.randn(4, 3, FACE_HEIGHT, FACE_WIDTH)
    model(x)
    before = seen["pool3"].clone()
    assert (before.abs().sum(dim=(0, 2, 3)) > 0).all()
    keep = kept_channels(60, [3, 17])
    assert [name for name, _ in masked_modules(model, "conv3")] == ["conv3"]  # DeepID has no norm after conv3
    mask_channels(model, "conv3", [3, 17])
    model(x)
    assert seen["pool3"][:, ~keep].abs().max() == 0.0
    torch.testing.assert_close(seen["pool3"][:, keep], before[:, keep], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# AlignedFaceFolder and LFW
# --------------------------------------------------------------------------------------------------------

COLOURS = {"alice": (200, 30, 30), "bob": (30, 200, 30), "carol": (90, 90, 90)}


def write_folder(root, n: int = 5) -> None:
    for k in range(n):  # nested like YouTube Faces: <identity>/<video>/aligned_detect_*.jpg
        path = root / "alice" / f"video{k % 2}" / f"aligned_detect_{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (FACE_WIDTH, FACE_HEIGHT), COLOURS["alice"]).save(path)
    (root / "bob").mkdir()
    for k in range(n):  # flat, larger and of another aspect
        Image.new("RGB", (120, 90), COLOURS["bob"]).save(root / "bob" / f"{k}.png")
    (root / "carol").mkdir()
    for k in range(n):  # grayscale jpegs of the wrong size
        Image.new("L", (64, 80), 90).save(root / "carol" / f"{k}.jpg")


def test_aligned_face_folder_reads_nested_and_flat_layouts(tmp_path) -> None:
    write_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an identity")
    source = AlignedFaceFolder(tmp_path, progress=False, seed=3)
    assert isinstance(source, DataSource)
    splits = source.load()
    assert source.class_names == ["alice", "bob", "carol"]
    assert sum(len(s) for s in splits.values()) == 15
    for split in splits.values():
        assert split.inputs.shape[1:] == (FACE_HEIGHT, FACE_WIDTH, 3)
        assert set(split.labels.tolist()) == {0, 1, 2}
        for image, label in zip(split.inputs, split.labels, strict=True):
            expected = COLOURS[source.class_names[label]]
            np.testing.assert_allclose(image.reshape(-1, 3).mean(axis=0), expected, atol=3)
        np.testing.assert_allclose(split.regions, np.tile(BAND, (len(split), 1)))
    ids = [set(s.sample_ids.tolist()) for s in splits.values()]
    assert len(ids[0] | ids[1] | ids[2]) == 15


def test_aligned_face_folder_filters_and_errors(tmp_path) -> None:
    write_folder(tmp_path)
    for k in range(2):
        (tmp_path / "dave").mkdir(exist_ok=True)
        Image.new("RGB", (FACE_WIDTH, FACE_HEIGHT)).save(tmp_path / "dave" / f"{k}.png")
    few = AlignedFaceFolder(tmp_path, min_images_per_identity=3, max_identities=2, progress=False)
    assert few.class_names == ["alice", "bob"]  # dave has too few, carol is past max_identities
    (tmp_path / "erin" / "video0").mkdir(parents=True)
    with pytest.raises(ValueError, match="erin"):
        AlignedFaceFolder(tmp_path, progress=False).load()
    (tmp_path / "erin" / "video0").rmdir()
    (tmp_path / "erin").rmdir()
    (tmp_path / "alice" / "video0" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        AlignedFaceFolder(tmp_path, progress=False).load()


def write_lfw(root, counts: dict[str, int]) -> None:
    """LFWPeople's on-disk layout: lfw-py/{lfw_funneled/<Name>/<Name>_0001.jpg, people.txt, lfw-names.txt}."""
    base = root / "lfw-py"
    for idx, (name, count) in enumerate(counts.items()):
        folder = base / "lfw_funneled" / name
        folder.mkdir(parents=True)
        for k in range(1, count + 1):
            img = np.full((250, 250, 3), 20, dtype=np.uint8)
            img[72:182, 78:172] = 40 * (idx + 1)  # the face window carries the identity's grey level
            Image.fromarray(img).save(folder / f"{name}_{k:04d}.jpg")
    (base / "lfw-names.txt").write_text("".join(f"{n}\t{c}\n" for n, c in counts.items()))
    # people.txt: number of folds, then per fold its number of people and "<Name>\t<count>" lines
    (base / "people.txt").write_text("1\n" + f"{len(counts)}\n" + "".join(f"{n}\t{c}\n" for n, c in counts.items()))


def test_lfw_loads_through_torchvision_layout(tmp_path) -> None:
    write_lfw(tmp_path, {"Ada_Lovelace": 6, "Alan_Turing": 5, "Grace_Hopper": 2})
    source = LFWFaces(tmp_path, min_images=3, progress=False)
    splits = source.load()
    assert source.class_names == ["Ada_Lovelace", "Alan_Turing"]
    assert sum(len(s) for s in splits.values()) == 11
    for split in splits.values():
        assert split.inputs.shape[1:] == (FACE_HEIGHT, FACE_WIDTH, 3)
        for image, label in zip(split.inputs, split.labels, strict=True):
            assert abs(image.mean() - 40 * (label + 1)) < 4  # cropped to the face window


def test_lfw_missing_names_the_expected_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="lfw-py"):
        LFWFaces(tmp_path, progress=False).load()
