"""The built-in and real sources' documented defaults and setting checks, without building any data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backdoor_lab.data.base import DEFAULT_CACHE_DIR
from backdoor_lab.data.faces.crop import ALIGNED_EYE_BAND
from backdoor_lab.data.faces.folders import AlignedFaceFolder
from backdoor_lab.data.faces.synthetic import SyntheticFaces
from backdoor_lab.data.signs.gtsrb import GTSRBSigns
from backdoor_lab.data.signs.synthetic import SIGN_CLASSES, SyntheticTrafficSigns
from backdoor_lab.data.speech.digits import SpokenDigitSource
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import ENGLISH_DIALECTS, SpokenDigits


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
        ({"num_identities": 1}, "num_identities must be >= 2, got 1"),
        ({"num_identities": 1, "scale": 4.0}, "num_identities must be >= 2, got 1"),
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


def test_synthetic_signs_defaults_and_the_smallest_counts() -> None:
    signs = SyntheticTrafficSigns()
    assert signs.counts == {"train": 500, "val": 80, "test": 150} and signs.class_names == list(SIGN_CLASSES)
    assert (signs.cache_dir, signs.seed, signs.image_size, signs.progress) == (DEFAULT_CACHE_DIR, 0, 32, True)
    assert SyntheticTrafficSigns(scale=0.001).counts == {"train": 1, "val": 1, "test": 1}  # never below one
    with pytest.raises(ValueError) as err:
        SyntheticTrafficSigns(val_per_class=0)
    assert str(err.value) == "val_per_class must be >= 1, got 0"


def _features(source: SpokenDigitSource) -> tuple[int, int, int, int]:
    """(sample rate, n_fft, hop length, n_mels) of a spoken-digit source's log-mel features."""
    n_mels = source.to_tensor(np.zeros((1, source.num_samples), dtype=np.float32)).shape[2]
    return source.sample_rate, source.features.n_fft, source.features.hop_length, n_mels


def test_spoken_digits_defaults() -> None:
    digits = SpokenDigits()
    assert (digits.n_utterances, digits.n_voices, digits.voices_arg, digits.dialects) == (
        3000,
        60,
        None,
        list(ENGLISH_DIALECTS),
    )
    assert (digits.test_voice_fraction, digits.val_fraction, digits.seed, digits.progress) == (0.2, 0.1, 0, True)
    assert (digits.duration_s, digits.num_samples, digits.cache_dir) == (1.0, 16000, DEFAULT_CACHE_DIR)
    assert (digits.rate_range, digits.pitch_range, digits.intonation_range) == ((120, 220), (25, 75), (20, 80))
    assert (digits.peak_range, digits.noise_std_range) == ((0.3, 0.95), (0.0, 0.005))
    assert _features(digits) == (16000, 512, 256, 40)


@pytest.mark.parametrize(
    ("kwargs", "voices", "utterances"),
    [
        ({"scale": 0.05}, 3, 150),  # 60 voices and 3000 utterances times 0.05
        ({"scale": 0.01}, 2, 30),  # never fewer than two voices (train and test)
        ({"scale": 0.001}, 2, 20),  # never fewer than one utterance per digit and voice
        ({"scale": 0.001, "voices": ["en+m1", "en-US+f3", "en+m3"]}, 3, 30),  # explicit voices are kept
        ({"scale": 0.5, "n_voices": 4, "n_utterances": 100}, 2, 50),
        ({"scale": 1.0, "n_voices": 4, "n_utterances": 45}, 4, 45),
    ],
)
def test_spoken_digits_scale_keeps_every_voice_saying_every_digit(kwargs: dict, voices: int, utterances: int) -> None:
    digits = SpokenDigits(cache_dir=None, **kwargs)
    assert (digits.n_voices, len(digits.voice_names), digits.n_utterances) == (voices, voices, utterances)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_voice_fraction": 0.0}, "test_voice_fraction must be in (0, 1), got 0.0"),
        ({"test_voice_fraction": 1.0}, "test_voice_fraction must be in (0, 1), got 1.0"),
        ({"test_voice_fraction": 1.5}, "test_voice_fraction must be in (0, 1), got 1.5"),
        ({"n_voices": 1, "n_utterances": 10}, "need at least 2 voices (train and test), got 1"),
        ({"voices": ["en+m1"], "n_utterances": 10}, "need at least 2 voices (train and test), got 1"),
        (
            {"n_voices": 2, "n_utterances": 19},
            "n_utterances=19 gives some of the 2 voices fewer than one utterance per digit; raise n_utterances or "
            "lower n_voices",
        ),
        ({"voices": ["en+m1", "en+m1"], "n_utterances": 20}, "voices must be distinct, got ['en+m1', 'en+m1']"),
        ({"n_voices": 105, "n_utterances": 1050}, "n_voices=105 exceeds the 104 espeak variants; pass explicit voices"),
        ({"rate_range": (220, 120)}, "rate_range must be (low, high) with low <= high, got (220, 120)"),
        ({"pitch_range": (75, 25)}, "pitch_range must be (low, high) with low <= high, got (75, 25)"),
        ({"intonation_range": (80, 20)}, "intonation_range must be (low, high) with low <= high, got (80, 20)"),
        ({"peak_range": (0.9, 0.3)}, "peak_range must be (low, high) with low <= high, got (0.9, 0.3)"),
        ({"noise_std_range": (0.1, 0.0)}, "noise_std_range must be (low, high) with low <= high, got (0.1, 0.0)"),
    ],
)
def test_spoken_digits_refuse_bad_settings_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SpokenDigits(cache_dir=None, **kwargs)
    assert str(err.value) == message


def test_spoken_digits_accept_the_edges_of_their_settings() -> None:
    """A range may be a single value, every espeak variant may be used once, a fraction may come close to 1."""
    one_value = SpokenDigits(
        cache_dir=None,
        n_voices=2,
        n_utterances=20,
        rate_range=(150, 150),
        peak_range=(0.5, 0.5),
        test_voice_fraction=0.99,
    )
    assert (one_value.rate_range, one_value.peak_range, one_value.test_voice_fraction) == ((150, 150), (0.5, 0.5), 0.99)
    every = SpokenDigits(cache_dir=None, n_voices=104, n_utterances=1040)
    variants = [voice.split("+")[1] for voice in every.voice_names]
    assert sorted(variants) == sorted(every.synthesizer.variants)  # drawn without replacement
    dialects = {voice.split("+")[0] for voice in every.voice_names}
    assert dialects == set(ENGLISH_DIALECTS)  # the first dialect ("en") included


def test_spoken_digits_voices_are_drawn_from_the_seed() -> None:
    """The built-in speech data's speakers: a function of the seed alone (the README's numbers depend on them)."""
    first = SpokenDigits(cache_dir=None).voice_names
    assert first[:4] == ["en-GB-x-gbcwmd+m7", "en-US-nyc+f4", "en+iven2", "en-029+RicishayMax"]
    assert SpokenDigits(cache_dir=None).voice_names == first
    assert SpokenDigits(cache_dir=None, seed=1).voice_names != first


def test_speech_commands_defaults_and_checks(tmp_path: Path) -> None:
    commands = SpeechCommandsDigits(tmp_path)
    assert (commands.split_rule, commands.validation_percentage, commands.testing_percentage) == ("auto", 10.0, 10.0)
    assert (commands.limit_per_class, commands.seed, commands.cache_dir, commands.progress) == (None, 0, None, True)
    assert _features(commands) == (16000, 512, 256, 40) and commands.num_samples == 16000
    assert SpeechCommandsDigits(tmp_path, limit_per_class=7).limit_per_class == 7
    for rule in ("lists", "hash"):
        assert SpeechCommandsDigits(tmp_path, split_rule=rule).split_rule == rule
    with pytest.raises(ValueError) as err:
        SpeechCommandsDigits(tmp_path, split_rule="random")
    assert str(err.value) == "split_rule must be 'auto', 'lists' or 'hash', got 'random'"


def test_free_spoken_digits_defaults_and_checks(tmp_path: Path) -> None:
    fsdd = FreeSpokenDigits(tmp_path)
    assert (fsdd.split_by, fsdd.test_speakers, fsdd.val_speakers, fsdd.seed, fsdd.progress) == (
        "index",
        None,
        None,
        0,
        True,
    )
    assert _features(fsdd) == (16000, 512, 256, 40) and fsdd.cache_dir is None
    named = FreeSpokenDigits(tmp_path, split_by="speaker", test_speakers=("theo",), val_speakers=("jackson", 7))
    assert (named.test_speakers, named.val_speakers) == (["theo"], ["jackson", "7"])
    with pytest.raises(ValueError) as err:
        FreeSpokenDigits(tmp_path, split_by="digit")
    assert str(err.value) == "split_by must be 'index' or 'speaker', got 'digit'"


def test_aligned_face_folder_defaults_and_missing_root(tmp_path: Path) -> None:
    faces = AlignedFaceFolder(tmp_path)
    assert (faces.min_images, faces.max_identities, faces.max_images_per_identity) == (3, None, None)
    assert (faces.val_fraction, faces.test_fraction, faces.seed, faces.crop_box) == (0.15, 0.15, 0, None)
    assert (faces.eye_band, faces.cache_dir, faces.progress) == (tuple(ALIGNED_EYE_BAND), None, True)
    cropped = AlignedFaceFolder(tmp_path, crop_box=(0, 0.1, 1, 0.9), progress=False)
    assert (cropped.crop_box, cropped.progress) == ((0.0, 0.1, 1.0, 0.9), False)
    with pytest.raises(FileNotFoundError) as err:
        AlignedFaceFolder(tmp_path / "nowhere")
    assert str(err.value) == f"aligned face folder {tmp_path / 'nowhere'} does not exist"
