"""How the sources build their splits, on tiny data: progress bars, the face crop, subsets and split rules.

Known answers where a rule is documented (the centred 47:55 face window, Speech Commands' hashing rule, FSDD's
recordings 0-4 / 5-9 / rest), and the properties a user relies on where it is a seeded draw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backdoor_lab.data.faces import folders
from backdoor_lab.data.faces import synthetic as synthetic_faces
from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH, eye_band
from backdoor_lab.data.faces.folders import AlignedFaceFolder, _fit_crop, _select, _split_per_identity
from backdoor_lab.data.faces.lfw import LFW_EYE_BAND, LFWFaces, _lfw_eye_band, _lfw_folder
from backdoor_lab.data.signs import gtsrb
from backdoor_lab.data.signs import synthetic as synthetic_signs
from backdoor_lab.data.signs.gtsrb import GTSRBSigns
from backdoor_lab.data.signs.synthetic import SIGN_CLASSES, SyntheticTrafficSigns
from backdoor_lab.data.speech import recorded
from backdoor_lab.data.speech import synthetic as synthetic_speech
from backdoor_lab.data.speech.digits import DIGIT_WORDS
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import SpokenDigits

from .test_face_data import write_lfw
from .test_signs_data import _write_gtsrb


class TrackRecorder:
    """Stands in for rich's ``track``: records how each progress bar was asked for."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, sequence, **kwargs):
        self.calls.append(kwargs)
        return sequence


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> TrackRecorder:
    recorder = TrackRecorder()
    for module in (synthetic_signs, gtsrb, synthetic_faces, folders, recorded, synthetic_speech):
        monkeypatch.setattr(module, "track", recorder)
    return recorder


def _silent_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded sources read empty files as silence: their split rules need names, not sound."""
    monkeypatch.setattr(recorded, "load_audio", lambda path, rate: np.zeros(100, dtype=np.float32))


# ---- progress bars -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_synthetic_signs_show_a_transient_bar_unless_told_not_to(bars: TrackRecorder, progress: bool) -> None:
    signs = SyntheticTrafficSigns(
        cache_dir=None, train_per_class=1, val_per_class=1, test_per_class=1, classes=list(SIGN_CLASSES)[:2]
    )
    signs.progress = progress
    signs.build()
    assert bars.calls == [{"description": "Rendering traffic signs", "disable": not progress, "transient": True}]


@pytest.mark.parametrize("progress", [True, False])
def test_gtsrb_shows_a_transient_bar_per_split_and_boxes_the_sign_inside_a_10_percent_margin(
    bars: TrackRecorder, tmp_path: Path, progress: bool
) -> None:
    _write_gtsrb(tmp_path)
    splits = GTSRBSigns(str(tmp_path), cache_dir=None, progress=progress).build()
    assert bars.calls == [
        {"description": f"Reading GTSRB {what}", "disable": not progress, "transient": True}
        for what in ("train", "test")
    ]
    for split in splits.values():
        assert np.array_equal(split.regions, np.tile(np.float32([3.2, 3.2, 28.8, 28.8]), (len(split), 1)))
    assert splits["test"].sample_ids.tolist() == list(range(18, 27))  # after the 18 training images
    assert splits["train"].labels.dtype == np.int64


@pytest.mark.parametrize("progress", [True, False])
def test_synthetic_faces_show_a_transient_bar_unless_told_not_to(bars: TrackRecorder, progress: bool) -> None:
    faces = synthetic_faces.SyntheticFaces(
        num_identities=2, train_per_identity=1, val_per_identity=1, test_per_identity=1, cache_dir=None
    )
    faces.progress = progress
    splits = faces.build()
    assert bars.calls == [{"description": "Rendering 6 synthetic faces", "disable": not progress, "transient": True}]
    assert splits["train"].labels.dtype == np.int64


def _write_identities(root: Path, counts: dict[str, int]) -> None:
    for k, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (FACE_WIDTH, FACE_HEIGHT), (40 * k, i, 0)).save(root / name / f"{i:02d}.png")


@pytest.mark.parametrize("progress", [True, False])
def test_face_folders_show_a_transient_bar_unless_told_not_to(
    bars: TrackRecorder, tmp_path: Path, progress: bool
) -> None:
    _write_identities(tmp_path, {"ann": 3, "bob": 3, "cyd": 4})
    AlignedFaceFolder(tmp_path, progress=progress).build()
    assert bars.calls == [
        {"description": "Reading 10 faces for aligned_faces", "disable": not progress, "transient": True}
    ]


def _touch_speech_commands(root: Path, speakers: list[str], lists: dict[str, list[str]] | None = None) -> None:
    """Speech Commands' layout with empty files (the audio is stubbed); ``lists``: split -> speakers listed."""
    for word in DIGIT_WORDS:
        (root / word).mkdir(parents=True, exist_ok=True)
        for speaker in speakers:
            (root / word / f"{speaker}_nohash_0.wav").touch()
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        if lists is not None:
            listed = [f"{w}/{s}_nohash_0.wav" for s in lists.get(split, []) for w in DIGIT_WORDS]
            (root / name).write_text("".join(f"{line}\n" for line in listed))


@pytest.mark.parametrize(("speakers", "progress", "shown"), [(50, True, True), (50, False, False), (49, True, False)])
def test_recorded_digits_show_a_bar_from_500_recordings(
    bars: TrackRecorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, speakers: int, progress: bool, shown: bool
) -> None:
    _silent_audio(monkeypatch)
    _touch_speech_commands(tmp_path, [f"{i:08x}" for i in range(speakers)], {"val": ["00000000"], "test": ["00000001"]})
    splits = SpeechCommandsDigits(tmp_path, progress=progress).build()
    assert sum(len(s) for s in splits.values()) == 10 * speakers
    assert bars.calls == [{"description": "Reading speech_commands_digits", "disable": not shown}]


def test_spoken_digits_hold_out_whole_voices_and_show_a_bar(bars: TrackRecorder) -> None:
    digits = SpokenDigits(cache_dir=None, n_voices=10, n_utterances=100)
    digits._render = lambda plan, i: np.full(digits.num_samples, i, dtype=np.float32)  # no espeak: the split only
    splits = digits.build()
    assert bars.calls == [{"description": "Synthesising spoken digits", "disable": False}]
    test, val, train = splits["test"], splits["val"], splits["train"]
    assert sorted(set(test.groups.tolist())) == [5, 9]  # 0.2 of 10 voices, drawn from the seed
    assert len(test) == 20 and set(train.groups.tolist()) == set(range(10)) - {5, 9} >= set(val.groups.tolist())
    assert len(val) == 10 and sorted(val.labels.tolist()) == list(range(10))  # 10% of every digit
    assert len(train) == 70 and train.sample_ids.dtype == np.int64
    for split in splits.values():  # every utterance's waveform, label and voice travel together
        assert np.array_equal(split.inputs[:, 0], split.sample_ids.astype(np.float32))
        assert np.array_equal(split.labels, (split.sample_ids // 10) % 10)
        assert np.array_equal(split.groups, split.sample_ids % 10)


def test_spoken_digits_clip_loud_noisy_utterances_to_full_scale() -> None:
    digits = SpokenDigits(
        cache_dir=None, voices=["en-US+f3", "en+m1"], n_utterances=20, peak_range=(1.0, 1.0), noise_std_range=(0.5, 0.5)
    )
    clip = digits._render(digits._plan(), 0)
    assert clip.dtype == np.float32 and clip.shape == (16000,)
    assert clip.max() == 1.0 and clip.min() == -1.0 and np.mean(np.abs(clip) == 1.0) > 0.01


# ---- faces: the crop, the subset, the split -----------------------------------------------------------------


def _ramp(width: int, height: int) -> Image.Image:
    """Red is the column, green the row (mod 256): where a crop came from is readable in its pixels."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x % 256, y % 256, np.zeros_like(x)], axis=-1).astype(np.uint8))


def test_face_crop_keeps_the_centred_window_of_a_wide_or_tall_image() -> None:
    rows, cols = np.arange(FACE_HEIGHT), np.arange(FACE_WIDTH)
    wide = _fit_crop(_ramp(FACE_WIDTH + 100, FACE_HEIGHT), None)  # 50 columns cut on each side
    assert wide.shape == (FACE_HEIGHT, FACE_WIDTH, 3) and wide.dtype == np.uint8
    assert (wide[:, :, 0] == 50 + cols).all() and (wide[:, :, 1] == rows[:, None]).all()
    tall = _fit_crop(_ramp(FACE_WIDTH, FACE_HEIGHT + 100), None)  # 50 rows cut at the top and the bottom
    assert (tall[:, :, 0] == cols).all() and (tall[:, :, 1] == 50 + rows[:, None]).all()
    boxed = _fit_crop(_ramp(2 * (FACE_WIDTH + 100), FACE_HEIGHT), (0.5, 0.0, 1.0, 1.0))  # the right half, then centred
    assert (boxed[:, :, 0] == FACE_WIDTH + 100 + 50 + cols).all()


def test_face_crop_shrinks_a_large_window_with_pillows_reducing_resize() -> None:
    """A window 4x too large is box-reduced by 2 before the bilinear resize (``reducing_gap=2``): anti-aliased."""
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, size=(4 * FACE_HEIGHT, 4 * FACE_WIDTH, 3), dtype=np.uint8))
    face = _fit_crop(big, None)
    expected = np.asarray(big.resize((FACE_WIDTH, FACE_HEIGHT), Image.BILINEAR, reducing_gap=2.0))
    plain = np.asarray(big.resize((FACE_WIDTH, FACE_HEIGHT), Image.BILINEAR))
    assert np.array_equal(face, expected) and not np.array_equal(face, plain)


def _listing(counts: dict[str, int]) -> dict[str, list[Path]]:
    return {name: [Path(f"{name}/{i:02d}.png") for i in reversed(range(n))] for name, n in counts.items()}


def test_select_keeps_identities_with_enough_images_and_subsamples_the_large_ones() -> None:
    kept = _select(_listing({"bob": 20, "ann": 4, "cyd": 2, "dee": 3}), 3, None, 5, seed=0)
    assert list(kept) == ["ann", "bob", "dee"]  # by name; cyd has fewer than 3
    assert kept["ann"] == sorted(_listing({"ann": 4})["ann"]) and len(kept["dee"]) == 3  # at most 5: all, sorted
    assert len(kept["bob"]) == len(set(kept["bob"])) == 5 and kept["bob"] == sorted(kept["bob"])
    assert kept == _select(_listing({"bob": 20, "ann": 4, "cyd": 2, "dee": 3}), 3, None, 5, seed=0)
    assert _select(_listing({"bob": 20}), 3, None, 5, seed=1)["bob"] != kept["bob"]
    assert list(_select(_listing({"bob": 20, "ann": 4, "dee": 3}), 4, 1, None, seed=0)) == ["ann"]


@pytest.mark.parametrize(
    ("counts", "min_images", "message"),
    [
        ({"ann": 5}, 2, "an identity needs >= 3 images to appear in train, val and test; got min 2"),
        ({"ann": 3, "bob": 4}, 5, "no identity has >= 5 images"),
    ],
)
def test_select_refuses_by_name(counts: dict[str, int], min_images: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        _select(_listing(counts), min_images, None, None, seed=0)
    assert str(err.value) == message


def test_split_per_identity_holds_out_its_fractions_of_every_identity() -> None:
    labels = np.repeat(np.arange(3), 10)
    split = _split_per_identity(labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    for name, per_identity in (("train", 6), ("val", 2), ("test", 2)):
        assert np.bincount(labels[split[name]]).tolist() == [per_identity] * 3, name
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(30))


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.2, 0.0), (-0.1, 0.3), (0.5, 0.5), (0.7, 0.9)])
def test_split_per_identity_refuses_fractions_that_leave_a_split_empty(val: float, test: float) -> None:
    with pytest.raises(ValueError) as err:
        _split_per_identity(np.repeat(np.arange(3), 10), val, test, seed=0)
    assert str(err.value) == f"need 0 < val_fraction, test_fraction and a sum below 1; got {val}, {test}"


# ---- Speech Commands ------------------------------------------------------------------------------------------


def _reference_which_set(speaker: str, validation_percentage: float, testing_percentage: float) -> str:
    """Speech Commands' own rule (input_data.which_set of the data set's release), written out."""
    max_per_class = 2**27 - 1
    digest = int(hashlib.sha1(speaker.encode()).hexdigest(), 16)
    percentage = (digest % (max_per_class + 1)) * (100.0 / max_per_class)
    if percentage < validation_percentage:
        return "val"
    if percentage < validation_percentage + testing_percentage:
        return "test"
    return "train"


def test_hash_split_is_the_data_sets_own_rule(tmp_path: Path) -> None:
    commands = SpeechCommandsDigits(tmp_path)
    speakers = [f"{i * 7919:08x}" for i in range(5000)]
    assert [commands.hash_split(s) for s in speakers] == [_reference_which_set(s, 10.0, 10.0) for s in speakers]
    digest = int(hashlib.sha1(b"cafe0001").hexdigest(), 16) % 2**27
    at = digest * (100.0 / (2**27 - 1))  # a speaker exactly on a boundary belongs above it
    assert SpeechCommandsDigits(tmp_path, validation_percentage=at).hash_split("cafe0001") == "test"
    assert SpeechCommandsDigits(tmp_path, validation_percentage=0, testing_percentage=at).hash_split("cafe0001") == (
        "train"
    )


def _entries_per(entries: list, split: str, label: int) -> list[str]:
    return [path.name for path, lab, _, s in entries if s == split and lab == label]


def test_limit_per_class_keeps_a_seeded_subset_of_each_class_in_each_split(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    speakers = [f"{i:08x}" for i in range(10)]
    _touch_speech_commands(tmp_path, speakers, {"val": speakers[:2], "test": speakers[2:4]})
    everything = SpeechCommandsDigits(tmp_path, split_rule="lists")._index()
    limited = SpeechCommandsDigits(tmp_path, split_rule="lists", limit_per_class=3)._entries
    assert len(everything) == 100 and len(limited) == 10 * (3 + 2 + 2)
    assert limited == [e for e in everything if e in limited]  # a subset, in the data set's order
    for label in range(10):
        train = _entries_per(limited, "train", label)
        assert len(train) == len(set(train)) == 3 and set(train) <= set(_entries_per(everything, "train", label))
        for split in ("val", "test"):  # at or under the limit: kept whole
            assert _entries_per(limited, split, label) == _entries_per(everything, split, label)
    again = SpeechCommandsDigits(tmp_path, split_rule="lists", limit_per_class=3)._entries
    other_seed = SpeechCommandsDigits(tmp_path, split_rule="lists", limit_per_class=3, seed=1)._entries
    assert again == limited and other_seed != limited


def test_a_class_at_the_limit_draws_nothing(tmp_path: Path) -> None:
    """A class with exactly ``limit_per_class`` recordings is kept whole without a draw, so which recordings the
    next class keeps does not depend on whether the one before had the limit or fewer."""
    speakers = [f"{i:08x}" for i in range(10)]
    _touch_speech_commands(tmp_path, speakers, {"val": speakers[:1], "test": speakers[1:2]})
    kept = []
    for at_zero in (3, 2):
        for speaker in speakers[2 + at_zero :]:  # "zero" has `at_zero` training recordings, "one" has eight
            (tmp_path / "zero" / f"{speaker}_nohash_0.wav").unlink(missing_ok=True)
        entries = SpeechCommandsDigits(tmp_path, split_rule="lists", limit_per_class=3)._entries
        assert len(_entries_per(entries, "train", 0)) == at_zero
        kept.append(_entries_per(entries, "train", 1))
    assert kept[0] == kept[1] and len(kept[0]) == 3


def test_speech_commands_lists_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _silent_audio(monkeypatch)
    speakers = [f"{i:08x}" for i in range(4)]
    _touch_speech_commands(tmp_path, speakers, {"val": speakers[:1], "test": speakers[1:2]})
    splits = SpeechCommandsDigits(tmp_path, split_rule="lists", progress=False).build()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 10, 10]
    assert splits["train"].labels.dtype == splits["train"].groups.dtype == np.int64
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        SpeechCommandsDigits(tmp_path, split_rule="lists")._index()
    assert str(err.value) == (
        f"speech_commands_digits: split_rule='lists' needs validation_list.txt and testing_list.txt in {tmp_path}. "
        f"Expected layout: {SpeechCommandsDigits.layout}"
    )


def test_speech_commands_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    layout = f"Expected layout: {SpeechCommandsDigits.layout}"

    def message(root: Path, kind: type[Exception] = FileNotFoundError) -> str:
        with pytest.raises(kind) as err:
            SpeechCommandsDigits(root, progress=False).build()
        return str(err.value)

    assert (
        message(tmp_path / "nowhere")
        == f"speech_commands_digits: dataset folder {tmp_path / 'nowhere'} does not exist. {layout}"
    )
    for word in DIGIT_WORDS[:5] + DIGIT_WORDS[7:]:
        (tmp_path / word).mkdir()
    assert message(tmp_path) == f"speech_commands_digits: no folder for five, six in {tmp_path}. {layout}"
    (tmp_path / "five").mkdir()
    (tmp_path / "six").mkdir()
    assert message(tmp_path) == f"speech_commands_digits: no .wav files under the digit folders of {tmp_path}. {layout}"
    (tmp_path / "six" / "take 1.wav").touch()
    assert message(tmp_path, ValueError) == (
        f"speech_commands_digits: unexpected file name {tmp_path / 'six' / 'take 1.wav'}; expected layout: "
        f"{SpeechCommandsDigits.layout}"
    )
    (tmp_path / "six" / "take 1.wav").unlink()
    _silent_audio(monkeypatch)
    _touch_speech_commands(tmp_path, ["0000000a", "0000000b"], {"test": ["0000000a"]})  # nobody in val
    assert message(tmp_path, ValueError) == (
        f"speech_commands_digits: the val split of {tmp_path} is empty; check the split settings"
    )


# ---- FSDD -----------------------------------------------------------------------------------------------------


def _touch_fsdd(root: Path, speakers: list[str], takes: range = range(12)) -> Path:
    """FSDD's layout with empty files: its split rules read names only (``test_data_pins`` writes real tones)."""
    (root / "recordings").mkdir(parents=True)
    for speaker in speakers:
        for digit in range(10):
            for n in takes:
                (root / "recordings" / f"{digit}_{speaker}_{n}.wav").touch()
    return root


def test_fsdd_by_index_is_the_data_sets_rule_extended(tmp_path: Path) -> None:
    """Recordings 0-4 of every speaker and digit are the test split (FSDD's README), 5-9 val, the rest train."""
    entries = FreeSpokenDigits(_touch_fsdd(tmp_path, ["jackson"]))._entries
    split_of = {path.name: split for path, _, _, split in entries}
    for n, split in ((0, "test"), (4, "test"), (5, "val"), (9, "val"), (10, "train"), (11, "train")):
        assert split_of[f"3_jackson_{n}.wav"] == split, n


def test_fsdd_by_speaker_holds_out_named_or_seeded_speakers(tmp_path: Path) -> None:
    speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    root = _touch_fsdd(tmp_path, speakers, range(1))

    def held_out(**kwargs) -> tuple[set[str], set[str]]:
        entries = FreeSpokenDigits(root, split_by="speaker", **kwargs)._index()
        return tuple({s for _, _, s, split in entries if split == name} for name in ("test", "val"))

    assert held_out(test_speakers=["theo"], val_speakers=["lucas", "george"]) == ({"theo"}, {"lucas", "george"})
    test, val = held_out()
    assert len(test) == len(val) == 1 and test != val and held_out() == (test, val)
    named_test, seeded_val = held_out(test_speakers=["theo"])
    assert named_test == {"theo"} and len(seeded_val) == 1 and seeded_val != {"theo"}
    seeded_test, named_val = held_out(val_speakers=["theo"])
    assert named_val == {"theo"} and len(seeded_test) == 1 and seeded_test != {"theo"}


@pytest.mark.parametrize(
    ("speakers", "kwargs", "message"),
    [
        (["a", "b", "c"], {"test_speakers": ["z"]}, "unknown speakers ['z']; found ['a', 'b', 'c']"),
        (["a", "b"], {}, "2 speakers ['a', 'b'] are too few to hold out whole speakers"),
        (["a", "b"], {"test_speakers": ["a"]}, "2 speakers ['a', 'b'] are too few to hold out whole speakers"),
        (
            ["a", "b", "c"],
            {"test_speakers": ["a", "b"], "val_speakers": ["b"]},
            "speakers ['b'] are in both test_speakers and val_speakers",
        ),
        (
            ["a", "b"],
            {"test_speakers": ["a"], "val_speakers": ["b"]},
            "2 speakers ['a', 'b'] are too few to hold out whole speakers",
        ),
    ],
)
def test_fsdd_by_speaker_refuses_by_name(tmp_path: Path, speakers: list[str], kwargs: dict, message: str) -> None:
    root = _touch_fsdd(tmp_path, speakers, range(1))
    with pytest.raises(ValueError) as err:
        FreeSpokenDigits(root, split_by="speaker", **kwargs)._index()
    assert str(err.value) == f"free_spoken_digits: {message}"


def test_fsdd_names_what_is_missing(tmp_path: Path) -> None:
    layout = FreeSpokenDigits.layout
    with pytest.raises(FileNotFoundError) as err:
        FreeSpokenDigits(tmp_path)._index()
    assert str(err.value) == (
        f"free_spoken_digits: folder {tmp_path / 'recordings'} does not exist. Expected layout: {layout}"
    )
    (tmp_path / "recordings").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        FreeSpokenDigits(tmp_path)._index()
    assert (
        str(err.value) == f"free_spoken_digits: no .wav files in {tmp_path / 'recordings'}. Expected layout: {layout}"
    )
    (tmp_path / "recordings" / "seven.wav").touch()
    with pytest.raises(ValueError) as err:
        FreeSpokenDigits(tmp_path)._index()
    assert str(err.value) == (
        f"free_spoken_digits: unexpected file name {tmp_path / 'recordings' / 'seven.wav'}; expected layout: {layout}"
    )


def test_face_folders_skip_hidden_folders_and_other_files_and_name_what_is_empty(tmp_path: Path) -> None:
    _write_identities(tmp_path, {"ann": 3, "bob": 3})
    _write_identities(tmp_path, {".thumbnails": 3})  # a viewer's cache, with images: not an identity
    (tmp_path / "ann" / "notes.txt").write_text("not an image")
    (tmp_path / "bob" / "video0.png").mkdir()  # a folder named like an image is not one
    faces = AlignedFaceFolder(tmp_path, progress=False)
    assert faces.class_names == ["ann", "bob"] and [len(faces._listing[n]) for n in faces.class_names] == [3, 3]
    (tmp_path / "cyd").mkdir()
    with pytest.raises(ValueError) as err:
        AlignedFaceFolder(tmp_path, progress=False)._find()
    kinds = ".jpg, .jpeg, .png, .bmp, .ppm, .pgm, .tif, .tiff, .webp"
    assert str(err.value) == f"identity folder {tmp_path / 'cyd'} holds no images ({kinds})"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        AlignedFaceFolder(empty, progress=False)._find()
    assert str(err.value) == f"{empty} holds no identity folders"


# ---- LFW ------------------------------------------------------------------------------------------------------


def test_lfw_eye_band_is_the_funneled_eyes_mapped_into_the_face_window() -> None:
    """Eyes at (104, 114) and (146, 114) of the 250x250 frame; the window (78, 72)-(172, 182) is halved to 47x55."""
    expected = tuple(float(v) for v in eye_band((13.0, 21.0), (34.0, 21.0)))
    assert _lfw_eye_band() == expected == LFW_EYE_BAND


def test_lfw_defaults_and_what_it_says_when_files_are_missing(tmp_path: Path) -> None:
    lfw = LFWFaces(tmp_path)
    assert (lfw.min_images, lfw.image_set, lfw.verify_checksums, lfw.progress) == (20, "funneled", False, True)
    assert (lfw.max_identities, lfw.max_images_per_identity, lfw.eye_band) == (None, None, LFW_EYE_BAND)
    assert lfw.crop_box == (78 / 250, 72 / 250, 172 / 250, 182 / 250)
    some = LFWFaces(tmp_path, max_identities=1, max_images_per_identity=3, verify_checksums=True, progress=False)
    assert (some.max_identities, some.max_images_per_identity, some.verify_checksums) == (1, 3, True)
    assert (_lfw_folder("funneled"), _lfw_folder("original"), _lfw_folder("nonsense")) == (
        "lfw_funneled",
        "lfw",
        "lfw_funneled",
    )
    base = tmp_path / "lfw-py"
    expected = (
        f"LFW not found under {base}: expected the extracted images in {base}/lfw_funneled/<Name>/<Name>_0001.jpg "
        f"plus {base}/people.txt and {base}/lfw-names.txt (download them by hand; nothing is fetched)"
    )
    for verify, suffix in ((False, ""), (True, " and, with verify_checksums=True, the original archive")):
        with pytest.raises(FileNotFoundError) as err:
            LFWFaces(tmp_path, verify_checksums=verify, progress=False)._find()
        assert str(err.value) == expected + suffix
    with pytest.raises(FileNotFoundError) as err:
        LFWFaces(tmp_path, image_set="original", progress=False)._find()
    assert f"{base}/lfw/<Name>/<Name>_0001.jpg" in str(err.value)  # the folder of the image set asked for
    write_lfw(tmp_path, {"Ada_Lovelace": 3, "Alan_Turing": 3})
    assert list(LFWFaces(tmp_path, min_images=3, progress=False)._find()) == ["Ada_Lovelace", "Alan_Turing"]
    with pytest.raises(FileNotFoundError):  # the images are there, but not the archive the checksums are of
        LFWFaces(tmp_path, min_images=3, verify_checksums=True, progress=False)._find()
    (base / "people.txt").unlink()  # the extracted images alone are not LFW
    with pytest.raises(FileNotFoundError) as err:
        LFWFaces(tmp_path, min_images=3, progress=False)._find()
    assert str(err.value) == expected
    with pytest.raises(FileNotFoundError):  # the checksum check wants the original archive as well
        LFWFaces(tmp_path, min_images=3, verify_checksums=True, progress=False)._find()


def test_lfw_reads_the_image_set_it_is_given(tmp_path: Path) -> None:
    write_lfw(tmp_path, {"Ada_Lovelace": 3, "Alan_Turing": 4})
    (tmp_path / "lfw-py" / "lfw_funneled").rename(tmp_path / "lfw-py" / "lfw")  # the unaligned originals' folder
    found = LFWFaces(tmp_path, image_set="original", min_images=3, progress=False)._find()
    assert {name: len(files) for name, files in found.items()} == {"Ada_Lovelace": 3, "Alan_Turing": 4}
    assert all(path.parent.parent.name == "lfw" for files in found.values() for path in files)
