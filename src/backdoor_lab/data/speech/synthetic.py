"""Spoken digits synthesised by espeak-ng voices: the built-in stand-in for the original TTS digit set.

The original speech backdoor (Liu et al., RAID 2018) was trained on the Pannous spoken-digit set, about 3000
utterances rendered by text-to-speech voices; ``SpokenDigits`` renders a set like it with many espeak-ng
voices, random speaking rate and pitch per utterance, and holds whole voices out for the test split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from rich.progress import track

from backdoor_lab.data.base import DEFAULT_CACHE_DIR, check_scale, scaled, stratified_holdout
from backdoor_lab.data.speech.audio import fit_length, resample, trim_silence
from backdoor_lab.data.speech.digits import DIGIT_WORDS, SpokenDigitSource
from backdoor_lab.data.speech.espeak import EspeakSynthesizer
from backdoor_lab.splits import RawSplit

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

# Bump when the synthesis pipeline changes, so caches written by older code are not read back.
_SYNTHESIS_FORMAT = 1


class SpokenDigits(SpokenDigitSource):
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
        scale: float = 1.0,
    ) -> None:
        scale = check_scale(scale)
        if scale != 1.0:  # fewer voices and utterances, at least two voices (train and test)
            n_voices = max(2, scaled(n_voices, scale)) if voices is None else n_voices
            n_utterances = max(10 * (n_voices if voices is None else len(voices)), scaled(n_utterances, scale))
        if not 0.0 < test_voice_fraction < 1.0:
            raise ValueError(f"test_voice_fraction must be in (0, 1), got {test_voice_fraction}")
        super().__init__(sample_rate, duration_s, seed, cache_dir, n_mels, n_fft, hop_length, progress)
        self.n_utterances = int(n_utterances)
        self.n_voices = int(n_voices) if voices is None else len(voices)
        self.voices_arg = None if voices is None else [str(v) for v in voices]
        self.dialects = [str(d) for d in dialects]
        self.test_voice_fraction = float(test_voice_fraction)
        self.val_fraction = float(val_fraction)
        self.rate_range = _int_range("rate_range", rate_range)
        self.pitch_range = _int_range("pitch_range", pitch_range)
        self.intonation_range = _int_range("intonation_range", intonation_range)
        self.peak_range = _float_range("peak_range", peak_range)
        self.noise_std_range = _float_range("noise_std_range", noise_std_range)
        if self.n_voices < 2:
            raise ValueError(f"need at least 2 voices (train and test), got {self.n_voices}")
        if self.n_utterances < 10 * self.n_voices:
            raise ValueError(
                f"n_utterances={self.n_utterances} gives some of the {self.n_voices} voices fewer than one "
                "utterance per digit; raise n_utterances or lower n_voices"
            )
        self._synthesizer: EspeakSynthesizer | None = None
        self.voice_names = self._choose_voices()

    def __getstate__(self) -> dict:
        # The synthesizer owns a temporary library copy; an unpickled source makes its own.
        return {**self.__dict__, "_synthesizer": None}

    @property
    def synthesizer(self) -> EspeakSynthesizer:
        if self._synthesizer is None:
            self._synthesizer = EspeakSynthesizer()
        return self._synthesizer

    def cache_key(self) -> dict:
        return {
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

    def build(self) -> dict[str, RawSplit]:
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
