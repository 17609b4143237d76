"""The speech task: espeak synthesis, WAV reading and resampling, real-dataset layouts, trigger, model."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_lab.attacks.noise import NoiseTrigger
from backdoor_lab.data.base import DataSource
from backdoor_lab.data.speech.audio import AudioFileError, load_audio, read_wav, resample, trim_silence
from backdoor_lab.data.speech.digits import DIGIT_WORDS
from backdoor_lab.data.speech.espeak import EspeakSynthesizer
from backdoor_lab.data.speech.features import LogMelSpectrogram
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import SpokenDigits
from backdoor_lab.defenses.pruning import kept_channels, mask_channels, masked_modules
from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """Write float samples in [-1, 1] ((T,) mono or (T, C)) as integer PCM of ``width`` bytes."""
    samples = np.asarray(samples, dtype=np.float64)
    frames = samples if samples.ndim == 2 else samples[:, None]
    if width == 1:
        data = np.round(frames * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = np.round(frames * (2**23 - 1)).astype(np.int32).reshape(-1)
        data = np.stack([ints & 0xFF, (ints >> 8) & 0xFF, (ints >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        data = np.round(frames * (2 ** (8 * width - 1) - 1)).astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(data)
    return path


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def dominant_freq(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


# --- espeak synthesis -------------------------------------------------------------------------------------

TINY = dict(
    n_utterances=30,
    voices=["en-US+f3", "en+m1", "en-GB-scotland+klatt"],
    test_voice_fraction=0.34,
    val_fraction=0.2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny_splits() -> dict:
    return SpokenDigits(cache_dir=None, seed=3, **TINY).load()


def test_synthesis_is_deterministic_for_a_seed(tiny_splits: dict, tmp_path: Path) -> None:
    again = SpokenDigits(cache_dir=tmp_path, seed=3, **TINY).load()  # synthesised after other utterances
    cached = SpokenDigits(cache_dir=tmp_path, seed=3, **TINY).load()  # read back from the cache file
    other_seed = SpokenDigits(cache_dir=None, seed=4, **TINY).load()
    assert len(list(tmp_path.glob("spoken_digits-*.npz"))) == 1
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(tiny_splits[split].inputs, again[split].inputs)
        np.testing.assert_array_equal(tiny_splits[split].inputs, cached[split].inputs)
        np.testing.assert_array_equal(tiny_splits[split].sample_ids, cached[split].sample_ids)
    assert not np.array_equal(tiny_splits["train"].inputs, other_seed["train"].inputs)
    waves = tiny_splits["train"].inputs
    assert waves.dtype == np.float32 and waves.shape[1] == 16000
    assert np.abs(waves).max() <= 1.0 and np.all(np.abs(waves).max(axis=1) > 0.2)  # real speech, not silence


def test_espeak_repeats_an_utterance_exactly_and_voices_differ() -> None:
    with EspeakSynthesizer() as synth:
        first = synth.synthesize("seven", "en+m1", rate=150, pitch=40, seed=9)
        synth.synthesize("two", "en-US+f3", rate=200, pitch=70, seed=1)  # state a leaky library would keep
        assert np.array_equal(first, synth.synthesize("seven", "en+m1", rate=150, pitch=40, seed=9))
        voices = ["en+m1", "en-US+f3", "en+klatt", "en-GB-scotland+croak", "en-US-nyc+whisper", "en+Andrea"]
        spectra = []
        for voice in voices:
            speech = trim_silence(synth.synthesize("seven", voice, rate=175, pitch=50, seed=9))
            power = np.abs(np.fft.rfft(speech[:4096], n=4096)) ** 2
            spectra.append(np.log(np.add.reduceat(power, np.geomspace(1, 2048, 30).astype(int)) + 1e-9))
    spectra = np.stack(spectra)
    distance = np.sqrt(((spectra[:, None] - spectra[None]) ** 2).mean(-1))
    assert distance[~np.eye(len(voices), dtype=bool)].min() > 0.2


def test_default_voices_are_many_and_distinct() -> None:
    source = SpokenDigits(cache_dir=None, progress=False)
    assert len(source.voice_names) >= 50
    variants = [v.split("+")[1] for v in source.voice_names]
    assert len(set(variants)) == len(variants)  # one variant per voice: test voices are unseen timbres


def test_test_voices_are_held_out_and_splits_disjoint(tiny_splits: dict) -> None:
    train, val, test = tiny_splits["train"], tiny_splits["val"], tiny_splits["test"]
    assert set(test.groups).isdisjoint(set(train.groups) | set(val.groups))
    assert len(set(test.groups)) == 1 and len(set(train.groups)) == 2
    ids = [set(s.sample_ids.tolist()) for s in (train, val, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert sum(map(len, ids)) == 30
    assert sorted(set(test.labels.tolist())) == list(range(10)) and len(val) == len(train) == 10


def test_unknown_voice_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown espeak voice 'en\+nosuchvoice'.*Available variants:.*f3"):
        SpokenDigits(voices=["en-US+f3", "en+nosuchvoice"], cache_dir=None)
    with pytest.raises(ValueError, match=r"language 'xx'.*Available languages:.*en-US"):
        SpokenDigits(voices=["en-US+f3", "xx+m1"], cache_dir=None)


def test_to_tensor_gives_normalised_log_mel(tiny_splits: dict) -> None:
    source = SpokenDigits(cache_dir=None, **TINY)
    assert isinstance(source, DataSource) and source.class_names == list(DIGIT_WORDS)
    features = source.to_tensor(tiny_splits["test"].inputs)
    assert features.shape == (10, 1, 40, 63) and features.dtype == torch.float32
    assert torch.allclose(features.mean(dim=(1, 2, 3)), torch.zeros(10), atol=1e-4)
    assert torch.allclose(features.std(dim=(1, 2, 3)), torch.ones(10), atol=1e-3)


def test_log_mel_puts_a_tone_in_its_band() -> None:
    logmel = LogMelSpectrogram(sample_rate=16000, n_mels=40, normalize=False)
    low, high = (torch.from_numpy(tone(f, 16000, 1.0)).float()[None] for f in (300.0, 4000.0))
    band_low = logmel(low)[0].mean(dim=1).argmax().item()
    band_high = logmel(high)[0].mean(dim=1).argmax().item()
    assert band_low < 12 < 25 < band_high


# --- trigger ----------------------------------------------------------------------------------------------


def test_noise_trigger_changes_only_its_window() -> None:
    rng = np.random.default_rng(0)
    clip = (0.3 * rng.standard_normal(16000)).clip(-1, 1).astype(np.float32)
    original = clip.copy()
    trigger = NoiseTrigger(amplitude=0.5, duration_s=0.1, position=0.25, sample_rate=16000, seed=7)
    out = trigger.apply(clip)
    np.testing.assert_array_equal(clip, original)  # input untouched
    changed = np.flatnonzero(out != clip)
    assert changed.min() >= 4000 and changed.max() < 5600 and len(changed) > 1500
    assert np.abs(out).max() <= 1.0
    np.testing.assert_array_equal(out, NoiseTrigger(amplitude=0.5, duration_s=0.1, position=0.25, seed=7).apply(clip))
    assert not np.array_equal(out, NoiseTrigger(amplitude=0.5, duration_s=0.1, position=0.25, seed=8).apply(clip))
    by_fraction = NoiseTrigger(amplitude=0.5, duration_s=0.1, position=0.25, position_unit="fraction", seed=7)
    np.testing.assert_array_equal(by_fraction.apply(clip), out)
    batch = trigger.apply_batch(np.stack([clip, clip]))
    np.testing.assert_array_equal(batch[1], out)
    with pytest.raises(ValueError, match="only 1000 samples"):
        trigger.apply(clip[:1000])


# --- WAV reading and resampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_widths_and_stereo_mixdown(tmp_path: Path, width: int) -> None:
    left, right = tone(440, 8000, 0.1, 0.6), tone(440, 8000, 0.1, 0.2)
    path = write_wav(tmp_path / f"w{width}.wav", np.stack([left, right], axis=1), 8000, width)
    samples, rate = read_wav(path)
    assert rate == 8000 and samples.dtype == np.float32 and samples.shape == (800,)
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2.0 / 2 ** (8 * width - 1) + 1e-6)


def test_unreadable_wav_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(AudioFileError, match="garbage.wav"):
        read_wav(garbage)
    truncated = write_wav(tmp_path / "truncated.wav", tone(440, 16000, 0.1), 16000)
    truncated.write_bytes(truncated.read_bytes()[:-400])
    with pytest.raises(AudioFileError, match="truncated.wav.*truncated"):
        read_wav(truncated)


def test_wrong_sample_rate_is_resampled(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "tone8k.wav", tone(440, 8000, 0.5), 8000)
    samples = load_audio(path, 16000)
    assert samples.shape == (8000,)
    assert dominant_freq(samples, 16000) == pytest.approx(440, abs=4)
    interior = slice(800, 7200)  # the band-limited resampler is exact away from the clip edges
    np.testing.assert_allclose(samples[interior], tone(440, 16000, 0.5)[interior], atol=2e-3)


def test_resample_between_espeak_and_task_rates() -> None:
    signal = tone(1000, 22050, 0.4) + tone(7000, 22050, 0.4, 0.3) + tone(9500, 22050, 0.4, 0.3)
    out = resample(signal, 22050, 16000)
    assert out.shape == (6400,)
    expected = tone(1000, 16000, 0.4) + tone(7000, 16000, 0.4, 0.3)  # 9.5 kHz is above the new Nyquist
    np.testing.assert_allclose(out[1000:5400], expected[1000:5400], atol=0.03)


# --- real dataset layouts ---------------------------------------------------------------------------------


def digit_tone(label: int, rate: int) -> np.ndarray:
    """A short clip whose amplitude encodes the digit, so a test can tell which file became which row."""
    return tone(500, rate, 0.2, amplitude=0.04 * (label + 1))


def label_from_clip(clip: np.ndarray) -> int:
    return int(round(np.abs(clip).max() / 0.04)) - 1


def make_speech_commands(root: Path, speakers: list[str]) -> None:
    for label, word in enumerate(DIGIT_WORDS):
        for speaker in speakers:
            write_wav(root / word / f"{speaker}_nohash_0.wav", digit_tone(label, 16000), 16000)


def check_layout_splits(splits: dict, n_total: int) -> None:
    for data in splits.values():
        assert data.inputs.shape[1] == 16000
        assert [label_from_clip(clip) for clip in data.inputs] == data.labels.tolist()
    ids = np.concatenate([s.sample_ids for s in splits.values()])
    assert len(ids) == len(set(ids.tolist())) == n_total


def test_speech_commands_lists_split_by_speaker(tmp_path: Path) -> None:
    speakers = [f"{i:08x}" for i in range(6)]
    make_speech_commands(tmp_path, speakers)
    (tmp_path / "validation_list.txt").write_text("".join(f"{w}/{speakers[0]}_nohash_0.wav\n" for w in DIGIT_WORDS))
    (tmp_path / "testing_list.txt").write_text(
        "".join(f"{w}/{s}_nohash_0.wav\n" for w in DIGIT_WORDS for s in speakers[1:3])
    )
    (tmp_path / "_background_noise_").mkdir()  # other folders of the real dataset are ignored
    splits = SpeechCommandsDigits(tmp_path, progress=False).load()
    check_layout_splits(splits, 60)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [30, 10, 20]
    groups = {split: set(data.groups.tolist()) for split, data in splits.items()}
    assert groups["train"].isdisjoint(groups["val"] | groups["test"]) and groups["val"].isdisjoint(groups["test"])


def test_speech_commands_hash_rule_is_speaker_disjoint(tmp_path: Path) -> None:
    speakers = [f"{i * 7919:08x}" for i in range(12)]
    make_speech_commands(tmp_path, speakers)
    source = SpeechCommandsDigits(tmp_path, validation_percentage=30, testing_percentage=30, progress=False)
    expected = {s: source.hash_split(s) for s in speakers}
    assert set(expected.values()) == {"train", "val", "test"}
    splits = source.load()
    check_layout_splits(splits, 120)
    for split, data in splits.items():
        assert len(data) == 10 * sum(v == split for v in expected.values())


def test_free_spoken_digits_resamples_and_splits(tmp_path: Path) -> None:
    speakers = ["jackson", "theo", "nicolas"]
    for label in range(10):
        for speaker in speakers:
            for n in (0, 6, 12, 13):
                write_wav(tmp_path / "recordings" / f"{label}_{speaker}_{n}.wav", digit_tone(label, 8000), 8000)
    by_index = FreeSpokenDigits(tmp_path, progress=False).load()
    check_layout_splits(by_index, 120)
    assert [len(by_index[s]) for s in ("train", "val", "test")] == [60, 30, 30]
    by_speaker = FreeSpokenDigits(tmp_path, split_by="speaker", test_speakers=["theo"], progress=False).load()
    check_layout_splits(by_speaker, 120)
    groups = {split: set(data.groups.tolist()) for split, data in by_speaker.items()}
    assert all(len(g) == 1 for g in groups.values()) and len(set.union(*groups.values())) == 3
    assert groups["test"] == {sorted(speakers).index("theo")}


def test_missing_or_bad_dataset_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"<root>/<word>/<speaker>_nohash_<n>\.wav"):
        SpeechCommandsDigits(tmp_path / "nowhere").load()
    with pytest.raises(FileNotFoundError, match=r"<root>/recordings/<digit>_<speaker>_<n>\.wav"):
        FreeSpokenDigits(tmp_path).load()
    make_speech_commands(tmp_path, ["aaaa0000"])
    (tmp_path / "seven" / "bbbb1111_nohash_0.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(AudioFileError, match=r"seven/bbbb1111_nohash_0\.wav"):
        SpeechCommandsDigits(tmp_path, progress=False).load()


# --- model ------------------------------------------------------------------------------------------------


def test_spectrogram_alexnet_shapes_and_conv5() -> None:
    model = SpectrogramAlexNet().eval()
    for shape in [(40, 63), (64, 101)]:
        assert model(torch.randn(3, 1, *shape)).shape == (3, 10)
    assert SpectrogramAlexNet(width=1.0).conv5.out_channels == 256
    assert SpectrogramAlexNet(width=1.0).channels == (96, 256, 384, 384, 256)
    custom = SpectrogramAlexNet(num_classes=7, in_channels=3, channels=[8, 16, 16, 16, 40]).eval()
    assert custom.conv5.out_channels == 40 and custom(torch.randn(2, 3, 40, 63)).shape == (2, 7)
    # No normalisation by default (as the original); with batch_norm, after conv1..conv4 but never conv5,
    # so that a masked conv5 channel stays zero.
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    normed = SpectrogramAlexNet(batch_norm=True)
    assert all(isinstance(getattr(normed, f"norm{i}"), torch.nn.BatchNorm2d) for i in range(1, 5))
    assert not hasattr(normed, "norm5")


def test_masking_a_conv5_channel_zeroes_it_after_relu() -> None:
    """The library's mask (what FinePruningCallback installs on net.conv5) silences exactly those channels at relu5."""
    model = SpectrogramAlexNet().eval()
    with torch.no_grad():
        model.conv5.bias.fill_(1.0)  # every channel active before masking
    seen = {}
    model.relu5.register_forward_hook(lambda _m, _i, out: seen.__setitem__("relu5", out))
    x = torch.randn(4, 1, 40, 63)
    model(x)
    before = seen["relu5"].clone()
    assert (before.sum(dim=(0, 2, 3)) > 0).all()
    keep = kept_channels(model.conv5.out_channels, [0, 5])
    assert [name for name, _ in masked_modules(model, "conv5")] == ["conv5"]  # no norm after conv5 to mask
    mask_channels(model, "conv5", [0, 5])
    model(x)
    assert seen["relu5"][:, ~keep].abs().max() == 0.0
    torch.testing.assert_close(seen["relu5"][:, keep], before[:, keep], rtol=0, atol=0)
