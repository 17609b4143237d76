"""Spoken digits "zero" .. "nine": the speech task of Fine-Pruning (Liu et al., RAID 2018).

The original speech backdoor was trained on the Pannous spoken-digit set, about 3000 utterances rendered by
text-to-speech voices. Three sources give the same ten classes and the same waveform format (float32, mono,
``sample_rate`` Hz, padded or cropped to ``duration_s`` seconds) and the same log-mel features:

* :class:`SpokenDigits` (built in): synthesised with espeak-ng from the ``espeakng-loader`` wheel, many
  voices, random speaking rate and pitch per utterance; whole voices are held out for the test split.
* :class:`SpeechCommandsDigits`: the digit words of Google Speech Commands, split by speaker.
* :class:`FreeSpokenDigits`: the Free Spoken Digit Dataset (FSDD) recordings.
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import os
import re
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from backdoor_lab.data.audio import LogMelSpectrogram, fit_length, load_audio, resample
from backdoor_lab.data.base import RawSplit, cached_splits, file_listing_digest, stratified_holdout

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# English dialects of espeak-ng 1.52 (en-Shaw is left out: it is the Shavian script, not an accent).
ENGLISH_DIALECTS = (
    "en",
    "en-029",
    "en-GB-scotland",
    "en-GB-x-gbclan",
    "en-GB-x-gbcwmd",
    "en-GB-x-rp",
    "en-US",
    "en-US-nyc",
)

DEFAULT_CACHE_DIR = "~/.cache/backdoor_lab"

# Bump when the synthesis pipeline changes, so caches written by older code are not read back.
_SYNTHESIS_FORMAT = 1

# espeak-ng API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakSynthesizer:
    """Text to speech with libespeak-ng through ctypes, one freshly loaded library per utterance.

    libespeak-ng keeps synthesis state in C statics (pitch-flutter phase, wave generator) that neither
    ``espeak_Terminate`` nor a new ``espeak_Initialize`` resets, so the same call gives different samples
    depending on what was spoken before. Loading the library, speaking one utterance and unloading it
    (``dlclose``) makes every utterance a function of its own arguments only. The library is loaded from a
    private copy so that another user of libespeak-ng in this process cannot keep it from unloading. The
    library is not thread-safe; use one synthesizer from one thread.
    """

    def __init__(self, library_path: str | None = None, data_path: str | None = None) -> None:
        import espeakng_loader

        source = library_path or espeakng_loader.get_library_path()
        self.data_path = data_path or espeakng_loader.get_data_path()
        self._tmpdir = tempfile.mkdtemp(prefix="backdoor_lab-espeak-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._library_path = shutil.copy(source, os.path.join(self._tmpdir, "libespeak-ng.so"))
        self._languages = sorted(p.name for p in Path(self.data_path, "lang").rglob("*") if p.is_file())
        self._variants = sorted(p.name for p in Path(self.data_path, "voices", "!v").iterdir() if p.is_file())
        with self._session() as (lib, sample_rate, _):
            lib.espeak_Info.restype = ctypes.c_char_p
            self.version = lib.espeak_Info(None).decode()
            self.sample_rate = sample_rate

    @property
    def languages(self) -> list[str]:
        return list(self._languages)

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def check_voice(self, voice: str) -> str:
        """Return ``voice`` ("language" or "language+variant") or raise listing what is available.

        espeak-ng itself accepts an unknown variant silently and speaks with the default voice.
        """
        language, _, variant = voice.partition("+")
        bad = []
        if language.lower() not in {name.lower() for name in self._languages}:
            bad.append(f"language {language!r}")
        if variant and variant not in self._variants:
            bad.append(f"variant {variant!r}")
        if bad:
            raise ValueError(
                f"unknown espeak voice {voice!r} ({' and '.join(bad)} not found in {self.data_path}). "
                "A voice is 'language' or 'language+variant'. "
                f"Available languages: {', '.join(self._languages)}. "
                f"Available variants: {', '.join(self._variants)}"
            )
        return voice

    def synthesize(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
    ) -> np.ndarray:
        """Speak ``text``; float32 samples in [-1, 1] at ``self.sample_rate``.

        ``rate`` is in words per minute (espeak accepts 80..450), ``pitch`` and ``pitch_range`` are 0..100,
        ``seed`` drives espeak's breath and voicing noise.
        """
        self.check_voice(voice)
        with self._session() as (lib, _, chunks):
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng refused voice {voice!r}")
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
            lib.espeak_ng_SetRandSeed(int(seed))
            encoded = text.encode("utf-8")
            status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r} in voice {voice!r}")
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        if not np.any(pcm):
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} in voice {voice!r}")
        return pcm.astype(np.float32) / 32768.0

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> EspeakSynthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> _EspeakSession:
        return _EspeakSession(self._library_path, self.data_path)


class _EspeakSession:
    """Context manager: load the library, initialise it for synchronous synthesis, then unload it."""

    def __init__(self, library_path: str, data_path: str) -> None:
        self.library_path = library_path
        self.data_path = data_path

    def __enter__(self) -> tuple[ctypes.CDLL, int, list[np.ndarray]]:
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib = lib
        sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if sample_rate <= 0:
            self._unload()
            raise RuntimeError(f"espeak_Initialize failed (data path {self.data_path})")
        chunks: list[np.ndarray] = []

        def collect(wav: ctypes.Array, num_samples: int, events: int) -> int:
            if wav and num_samples > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
            return 0  # 0: continue synthesis

        self._callback = _SynthCallback(collect)  # must outlive the synthesis
        lib.espeak_SetSynthCallback(self._callback)
        return lib, sample_rate, chunks

    def __exit__(self, *exc: object) -> None:
        self._lib.espeak_Terminate()
        self._unload()

    def _unload(self) -> None:
        handle = self._lib._handle
        del self._lib
        _ctypes.dlclose(handle)


def waveforms_to_logmel(waveforms: np.ndarray, features: LogMelSpectrogram, batch_size: int = 256) -> torch.Tensor:
    """float32 (N, T) waveforms -> float32 (N, 1, n_mels, frames), in batches to bound STFT memory."""
    waveforms = np.asarray(waveforms, dtype=np.float32)
    if waveforms.ndim != 2:
        raise ValueError(f"expected waveforms of shape (N, T), got {waveforms.shape}")
    with torch.no_grad():
        parts = [
            features(torch.from_numpy(np.ascontiguousarray(waveforms[i : i + batch_size])))
            for i in range(0, len(waveforms), batch_size)
        ]
    if not parts:
        n_mels = features.filterbank.shape[1]
        return torch.zeros(0, 1, n_mels, features.num_frames(waveforms.shape[1]))
    return torch.cat(parts).unsqueeze(1)


class _LogMelFeatures:
    """The shared ``to_tensor`` of the speech sources."""

    features: LogMelSpectrogram

    def _init_features(self, sample_rate: int, n_mels: int, n_fft: int, hop_length: int) -> None:
        self.features = LogMelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)

    @property
    def class_names(self) -> list[str]:
        return list(DIGIT_WORDS)

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        """float32 (N, T) waveforms -> per-utterance standardised log-mel (N, 1, n_mels, frames)."""
        return waveforms_to_logmel(inputs, self.features)


class SpokenDigits(_LogMelFeatures):
    """Spoken digits synthesised by espeak-ng voices: the built-in stand-in for the original TTS digit set.

    Each voice is an English dialect with an espeak voice variant ("en-US+f3"); by default every voice gets a
    different variant, so a held-out test voice is a speaker whose timbre never occurs in training. Every
    utterance draws its own speaking rate, pitch, intonation range, loudness, start time inside the clip and
    background-noise level. Utterances are spread evenly over voices and digits.

    Splits: ``test`` holds every utterance of ``test_voice_fraction`` of the voices; ``val`` (the defender's
    clean data) is a class-stratified ``val_fraction`` of the remaining voices' utterances; ``train`` is the
    rest. ``groups`` is the voice index (into :attr:`voice_names`), ``sample_ids`` the utterance index.

    Args:
        n_utterances: total utterances over the three splits.
        n_voices: voices to draw when ``voices`` is not given (at most one per variant).
        voices: explicit espeak voices ("language" or "language+variant"); overrides ``n_voices``.
        dialects: espeak languages to draw voices from (must say English digits).
        test_voice_fraction: share of voices held out for the test split.
        val_fraction: share of the non-test utterances held out for the val split.
        sample_rate, duration_s: waveform format of every split.
        rate_range: espeak speaking rate in words per minute, drawn per utterance.
        pitch_range: espeak base pitch (0..100), drawn per utterance.
        intonation_range: espeak pitch range (0..100), drawn per utterance.
        peak_range: peak amplitude each utterance is scaled to.
        noise_std_range: standard deviation of white background noise, drawn per utterance; (0, 0) disables.
        seed: one seed for the voices, every per-utterance draw and the splits.
        cache_dir: where synthesised splits are cached (None: synthesise every time).
        n_mels, n_fft, hop_length: log-mel feature settings.
        progress: show a progress bar while synthesising.
    """

    name = "spoken_digits"

    def __init__(
        self,
        n_utterances: int = 3000,
        n_voices: int = 60,
        voices: Sequence[str] | None = None,
        dialects: Sequence[str] = ENGLISH_DIALECTS,
        test_voice_fraction: float = 0.2,
        val_fraction: float = 0.1,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
        rate_range: Sequence[int] = (120, 220),
        pitch_range: Sequence[int] = (25, 75),
        intonation_range: Sequence[int] = (20, 80),
        peak_range: Sequence[float] = (0.3, 0.95),
        noise_std_range: Sequence[float] = (0.0, 0.005),
        seed: int = 0,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        n_mels: int = 40,
        n_fft: int = 512,
        hop_length: int = 256,
        progress: bool = True,
    ) -> None:
        if not 0.0 < test_voice_fraction < 1.0:
            raise ValueError(f"test_voice_fraction must be in (0, 1), got {test_voice_fraction}")
        self.n_utterances = int(n_utterances)
        self.n_voices = int(n_voices) if voices is None else len(voices)
        self.voices_arg = None if voices is None else [str(v) for v in voices]
        self.dialects = [str(d) for d in dialects]
        self.test_voice_fraction = float(test_voice_fraction)
        self.val_fraction = float(val_fraction)
        self.sample_rate = int(sample_rate)
        self.duration_s = float(duration_s)
        self.rate_range = _int_range("rate_range", rate_range)
        self.pitch_range = _int_range("pitch_range", pitch_range)
        self.intonation_range = _int_range("intonation_range", intonation_range)
        self.peak_range = _float_range("peak_range", peak_range)
        self.noise_std_range = _float_range("noise_std_range", noise_std_range)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.progress = progress
        if self.n_voices < 2:
            raise ValueError(f"need at least 2 voices (train and test), got {self.n_voices}")
        if self.n_utterances < 10 * self.n_voices:
            raise ValueError(
                f"n_utterances={self.n_utterances} gives some of the {self.n_voices} voices fewer than one "
                "utterance per digit; raise n_utterances or lower n_voices"
            )
        self._synthesizer: EspeakSynthesizer | None = None
        self.voice_names = self._choose_voices()
        self._init_features(self.sample_rate, n_mels, n_fft, hop_length)

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    def __getstate__(self) -> dict:
        # The synthesizer owns a temporary library copy; an unpickled source makes its own.
        return {**self.__dict__, "_synthesizer": None}

    @property
    def synthesizer(self) -> EspeakSynthesizer:
        if self._synthesizer is None:
            self._synthesizer = EspeakSynthesizer()
        return self._synthesizer

    def load(self) -> dict[str, RawSplit]:
        params = {
            "format": _SYNTHESIS_FORMAT,
            "espeak": self.synthesizer.version,
            "voices": self.voice_names,
            "n_utterances": self.n_utterances,
            "test_voice_fraction": self.test_voice_fraction,
            "val_fraction": self.val_fraction,
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            "rate_range": self.rate_range,
            "pitch_range": self.pitch_range,
            "intonation_range": self.intonation_range,
            "peak_range": self.peak_range,
            "noise_std_range": self.noise_std_range,
            "seed": self.seed,
        }
        if self.cache_dir is None:
            return self._build()
        return cached_splits(self.cache_dir, self.name, params, self._build)

    def _choose_voices(self) -> list[str]:
        synth = self.synthesizer
        if self.voices_arg is not None:
            if len(set(self.voices_arg)) != len(self.voices_arg):
                raise ValueError(f"voices must be distinct, got {self.voices_arg}")
            return [synth.check_voice(v) for v in self.voices_arg]
        for dialect in self.dialects:
            synth.check_voice(dialect)
        variants = synth.variants
        if self.n_voices > len(variants):
            raise ValueError(
                f"n_voices={self.n_voices} exceeds the {len(variants)} espeak variants; pass explicit voices"
            )
        rng = np.random.default_rng([self.seed, 1])
        chosen = rng.choice(len(variants), size=self.n_voices, replace=False)
        dialect_of = rng.integers(0, len(self.dialects), size=self.n_voices)
        return [f"{self.dialects[d]}+{variants[v]}" for v, d in zip(chosen, dialect_of, strict=True)]

    def _plan(self) -> dict[str, np.ndarray]:
        """Every per-utterance draw, from the seed alone."""
        n = self.n_utterances
        index = np.arange(n)
        rng = np.random.default_rng([self.seed, 2])
        return {
            "voice": index % self.n_voices,
            "digit": (index // self.n_voices) % len(DIGIT_WORDS),
            "rate": rng.integers(self.rate_range[0], self.rate_range[1] + 1, size=n),
            "pitch": rng.integers(self.pitch_range[0], self.pitch_range[1] + 1, size=n),
            "intonation": rng.integers(self.intonation_range[0], self.intonation_range[1] + 1, size=n),
            "peak": rng.uniform(*self.peak_range, size=n),
            "noise_std": rng.uniform(*self.noise_std_range, size=n),
            "offset": rng.uniform(0.0, 1.0, size=n),
            "espeak_seed": rng.integers(1, 2**31 - 1, size=n),
        }

    def _render(self, plan: dict[str, np.ndarray], i: int) -> np.ndarray:
        synth = self.synthesizer
        speech = synth.synthesize(
            DIGIT_WORDS[plan["digit"][i]],
            self.voice_names[plan["voice"][i]],
            rate=plan["rate"][i],
            pitch=plan["pitch"][i],
            pitch_range=plan["intonation"][i],
            seed=plan["espeak_seed"][i],
        )
        speech = trim_silence(speech)
        speech = resample(speech, synth.sample_rate, self.sample_rate)
        speech = fit_length(speech, min(len(speech), self.num_samples))  # centre-crop the rare overlong word
        speech *= plan["peak"][i] / max(float(np.abs(speech).max()), 1e-6)
        clip = np.zeros(self.num_samples, dtype=np.float32)
        start = int(plan["offset"][i] * (self.num_samples - len(speech)))
        clip[start : start + len(speech)] = speech
        if plan["noise_std"][i] > 0:
            noise_rng = np.random.default_rng([self.seed, 3, i])
            clip += (plan["noise_std"][i] * noise_rng.standard_normal(self.num_samples)).astype(np.float32)
        return np.clip(clip, -1.0, 1.0)

    def _build(self) -> dict[str, RawSplit]:
        plan = self._plan()
        waveforms = np.empty((self.n_utterances, self.num_samples), dtype=np.float32)
        steps = track(range(self.n_utterances), description="Synthesising spoken digits", disable=not self.progress)
        for i in steps:
            waveforms[i] = self._render(plan, i)
        labels = plan["digit"].astype(np.int64)
        voice = plan["voice"].astype(np.int64)
        sample_ids = np.arange(self.n_utterances, dtype=np.int64)

        rng = np.random.default_rng([self.seed, 4])
        n_test_voices = max(1, int(round(self.test_voice_fraction * self.n_voices)))
        test_voices = rng.permutation(self.n_voices)[:n_test_voices]
        is_test = np.isin(voice, test_voices)
        trainval = np.flatnonzero(~is_test)
        keep, hold = stratified_holdout(labels[trainval], self.val_fraction, self.seed)
        index = {"train": trainval[keep], "val": trainval[hold], "test": np.flatnonzero(is_test)}
        return {
            split: RawSplit(inputs=waveforms[idx], labels=labels[idx], sample_ids=sample_ids[idx], groups=voice[idx])
            for split, idx in index.items()
        }


def trim_silence(samples: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold`` times the peak."""
    loud = np.flatnonzero(np.abs(samples) > threshold * np.abs(samples).max())
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


def _int_range(name: str, value: Sequence[int]) -> tuple[int, int]:
    low, high = (int(v) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value)}")
    return low, high


def _float_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value)}")
    return low, high


class _RecordedDigits(_LogMelFeatures, ABC):
    """Shared reading of a folder of labelled WAV recordings into three splits."""

    name: str
    layout: str

    def __init__(
        self,
        root: str | os.PathLike,
        sample_rate: int,
        duration_s: float,
        seed: int,
        cache_dir: str | os.PathLike | None,
        n_mels: int,
        n_fft: int,
        hop_length: int,
        progress: bool,
    ) -> None:
        self.root = Path(root).expanduser()
        self.sample_rate = int(sample_rate)
        self.duration_s = float(duration_s)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.progress = progress
        self._init_features(self.sample_rate, n_mels, n_fft, hop_length)

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    @abstractmethod
    def _index(self) -> list[tuple[Path, int, str, str]]:
        """(path, label, speaker, split) of every recording used."""

    @abstractmethod
    def _settings(self) -> dict:
        """Constructor settings that change which files land in which split."""

    def load(self) -> dict[str, RawSplit]:
        entries = self._index()
        if self.cache_dir is None:
            return self._read(entries)
        params = {
            "root": str(self.root.resolve()),
            "files": file_listing_digest((path for path, *_ in entries), self.root),
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            **self._settings(),
        }
        return cached_splits(self.cache_dir, self.name, params, lambda: self._read(entries))

    def _read(self, entries: list[tuple[Path, int, str, str]]) -> dict[str, RawSplit]:
        speakers = sorted({speaker for _, _, speaker, _ in entries})
        speaker_id = {speaker: i for i, speaker in enumerate(speakers)}
        waveforms = np.empty((len(entries), self.num_samples), dtype=np.float32)
        steps = track(entries, description=f"Reading {self.name}", disable=not self.progress or len(entries) < 500)
        for i, (path, *_) in enumerate(steps):
            waveforms[i] = fit_length(load_audio(path, self.sample_rate), self.num_samples)
        labels = np.array([label for _, label, _, _ in entries], dtype=np.int64)
        groups = np.array([speaker_id[speaker] for _, _, speaker, _ in entries], dtype=np.int64)
        split_of = np.array([split for *_, split in entries])
        out = {}
        for split in ("train", "val", "test"):
            idx = np.flatnonzero(split_of == split)
            if len(idx) == 0:
                raise ValueError(f"{self.name}: the {split} split of {self.root} is empty; check the split settings")
            out[split] = RawSplit(
                inputs=waveforms[idx], labels=labels[idx], sample_ids=idx.astype(np.int64), groups=groups[idx]
            )
        return out

    def _missing(self, what: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.name}: {what}. Expected layout: {self.layout}")


class SpeechCommandsDigits(_RecordedDigits):
    """The ten digit words of Google Speech Commands (v0.01 or v0.02), split by speaker.

    Layout: ``<root>/<word>/<speaker>_nohash_<n>.wav`` for word in zero..nine. With ``split_rule="auto"``
    the dataset's own ``validation_list.txt`` and ``testing_list.txt`` are used when both exist, else the
    dataset's hashing rule (SHA-1 of the speaker id, as in the reference ``which_set``) assigns each speaker
    to one split with ``validation_percentage`` / ``testing_percentage``. Either way no speaker appears in
    two splits; ``val`` is the defender's clean data. ``limit_per_class`` keeps a seeded subset of each
    class in each split for small runs.
    """

    name = "speech_commands_digits"
    layout = "<root>/<word>/<speaker>_nohash_<n>.wav with word in zero..nine (Speech Commands)"
    _FILE = re.compile(r"^(?P<speaker>[^_]+)_nohash_(?P<n>\d+)\.wav$")
    _MAX_WAVS_PER_CLASS = 2**27 - 1

    def __init__(
        self,
        root: str | os.PathLike,
        split_rule: str = "auto",
        validation_percentage: float = 10.0,
        testing_percentage: float = 10.0,
        limit_per_class: int | None = None,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        n_mels: int = 40,
        n_fft: int = 512,
        hop_length: int = 256,
        progress: bool = True,
    ) -> None:
        if split_rule not in ("auto", "lists", "hash"):
            raise ValueError(f"split_rule must be 'auto', 'lists' or 'hash', got {split_rule!r}")
        super().__init__(root, sample_rate, duration_s, seed, cache_dir, n_mels, n_fft, hop_length, progress)
        self.split_rule = split_rule
        self.validation_percentage = float(validation_percentage)
        self.testing_percentage = float(testing_percentage)
        self.limit_per_class = limit_per_class

    def _settings(self) -> dict:
        return {
            "split_rule": self._resolved_rule(),
            "validation_percentage": self.validation_percentage,
            "testing_percentage": self.testing_percentage,
            "limit_per_class": self.limit_per_class,
            "seed": self.seed,
        }

    def _resolved_rule(self) -> str:
        lists_present = all((self.root / name).is_file() for name in ("validation_list.txt", "testing_list.txt"))
        if self.split_rule == "lists" and not lists_present:
            raise self._missing(f"split_rule='lists' needs validation_list.txt and testing_list.txt in {self.root}")
        if self.split_rule == "auto":
            return "lists" if lists_present else "hash"
        return self.split_rule

    def hash_split(self, speaker: str) -> str:
        """The Speech Commands reference rule: a stable split per speaker from the SHA-1 of its id."""
        digest = int(hashlib.sha1(speaker.encode()).hexdigest(), 16)
        percentage = (digest % (self._MAX_WAVS_PER_CLASS + 1)) * (100.0 / self._MAX_WAVS_PER_CLASS)
        if percentage < self.validation_percentage:
            return "val"
        if percentage < self.validation_percentage + self.testing_percentage:
            return "test"
        return "train"

    def _index(self) -> list[tuple[Path, int, str, str]]:
        if not self.root.is_dir():
            raise self._missing(f"dataset folder {self.root} does not exist")
        missing = [word for word in DIGIT_WORDS if not (self.root / word).is_dir()]
        if missing:
            raise self._missing(f"no folder for {', '.join(missing)} in {self.root}")
        rule = self._resolved_rule()
        listed: dict[str, str] = {}
        if rule == "lists":
            for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
                for line in (self.root / name).read_text().splitlines():
                    if line.strip():
                        listed[line.strip()] = split
        entries = []
        for label, word in enumerate(DIGIT_WORDS):
            for path in sorted((self.root / word).glob("*.wav")):
                match = self._FILE.match(path.name)
                if match is None:
                    raise ValueError(f"{self.name}: unexpected file name {path}; expected layout: {self.layout}")
                speaker = match["speaker"]
                split = listed.get(f"{word}/{path.name}", "train") if rule == "lists" else self.hash_split(speaker)
                entries.append((path, label, speaker, split))
        if not entries:
            raise self._missing(f"no .wav files under the digit folders of {self.root}")
        return self._limit(entries)

    def _limit(self, entries: list[tuple[Path, int, str, str]]) -> list[tuple[Path, int, str, str]]:
        if self.limit_per_class is None:
            return entries
        rng = np.random.default_rng(self.seed)
        keep = []
        for split in ("train", "val", "test"):
            for label in range(len(DIGIT_WORDS)):
                idx = [i for i, e in enumerate(entries) if e[1] == label and e[3] == split]
                if len(idx) > self.limit_per_class:
                    idx = sorted(rng.choice(idx, size=self.limit_per_class, replace=False).tolist())
                keep.extend(idx)
        return [entries[i] for i in sorted(keep)]


class FreeSpokenDigits(_RecordedDigits):
    """The Free Spoken Digit Dataset (FSDD): 8 kHz recordings, resampled to ``sample_rate``.

    Layout: ``<root>/recordings/<digit>_<speaker>_<n>.wav``.

    ``split_by="index"`` (default) follows the dataset's documented rule, recordings 0-4 of every speaker and
    digit are the test split, and extends it: 5-9 are the val split, the rest train. All splits then share
    the speakers (FSDD has only six). ``split_by="speaker"`` holds out whole speakers instead:
    ``test_speakers`` and ``val_speakers`` when given, else one seeded speaker each.
    """

    name = "free_spoken_digits"
    layout = "<root>/recordings/<digit>_<speaker>_<n>.wav (Free Spoken Digit Dataset)"
    _FILE = re.compile(r"^(?P<digit>\d)_(?P<speaker>.+)_(?P<n>\d+)\.wav$")

    def __init__(
        self,
        root: str | os.PathLike,
        split_by: str = "index",
        test_speakers: Sequence[str] | None = None,
        val_speakers: Sequence[str] | None = None,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        n_mels: int = 40,
        n_fft: int = 512,
        hop_length: int = 256,
        progress: bool = True,
    ) -> None:
        if split_by not in ("index", "speaker"):
            raise ValueError(f"split_by must be 'index' or 'speaker', got {split_by!r}")
        super().__init__(root, sample_rate, duration_s, seed, cache_dir, n_mels, n_fft, hop_length, progress)
        self.split_by = split_by
        self.test_speakers = None if test_speakers is None else [str(s) for s in test_speakers]
        self.val_speakers = None if val_speakers is None else [str(s) for s in val_speakers]

    def _settings(self) -> dict:
        return {
            "split_by": self.split_by,
            "test_speakers": self.test_speakers,
            "val_speakers": self.val_speakers,
            "seed": self.seed,
        }

    def _index(self) -> list[tuple[Path, int, str, str]]:
        folder = self.root / "recordings"
        if not folder.is_dir():
            raise self._missing(f"folder {folder} does not exist")
        files = []
        for path in sorted(folder.glob("*.wav")):
            match = self._FILE.match(path.name)
            if match is None:
                raise ValueError(f"{self.name}: unexpected file name {path}; expected layout: {self.layout}")
            files.append((path, int(match["digit"]), match["speaker"], int(match["n"])))
        if not files:
            raise self._missing(f"no .wav files in {folder}")
        if self.split_by == "index":
            return [(p, d, s, "test" if n < 5 else "val" if n < 10 else "train") for p, d, s, n in files]
        test, val = self._held_out_speakers(sorted({s for _, _, s, _ in files}))
        return [(p, d, s, "test" if s in test else "val" if s in val else "train") for p, d, s, _ in files]

    def _held_out_speakers(self, speakers: list[str]) -> tuple[set[str], set[str]]:
        named = (self.test_speakers or []) + (self.val_speakers or [])
        unknown = sorted(set(named) - set(speakers))
        if unknown:
            raise ValueError(f"{self.name}: unknown speakers {unknown}; found {speakers}")
        rng = np.random.default_rng(self.seed)
        free = [s for s in rng.permutation(speakers).tolist() if s not in named]
        needed = (self.test_speakers is None) + (self.val_speakers is None) + 1
        if len(free) < needed:
            raise ValueError(f"{self.name}: {len(speakers)} speakers {speakers} are too few to hold out whole speakers")
        test = set(self.test_speakers) if self.test_speakers is not None else {free.pop(0)}
        val = set(self.val_speakers) if self.val_speakers is not None else {free.pop(0)}
        if test & val:
            raise ValueError(f"{self.name}: speakers {sorted(test & val)} are in both test_speakers and val_speakers")
        if not set(speakers) - test - val:
            raise ValueError(f"{self.name}: no speaker left for training among {speakers}")
        return test, val
