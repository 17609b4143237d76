"""What every spoken-digit source shares: the ten words, fixed-length clips and log-mel model inputs."""

from __future__ import annotations

import os

import numpy as np
import torch

from backdoor_lab.data.base import CachedSource
from backdoor_lab.data.speech.features import LogMelSpectrogram, waveforms_to_logmel

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class SpokenDigitSource(CachedSource):
    """Base of the speech sources: the ten digit classes and log-mel model inputs.

    Every source's waveforms are float32 mono clips of ``duration_s`` seconds at ``sample_rate`` Hz;
    ``to_tensor`` turns them into per-utterance standardised log-mel spectrograms.
    """

    features: LogMelSpectrogram

    def __init__(
        self,
        sample_rate: int,
        duration_s: float,
        seed: int,
        cache_dir: str | os.PathLike | None,
        n_mels: int,
        n_fft: int,
        hop_length: int,
        progress: bool,
    ) -> None:
        self.sample_rate = int(sample_rate)
        self.duration_s = float(duration_s)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.progress = progress
        self.features = LogMelSpectrogram(
            sample_rate=self.sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )

    @property
    def class_names(self) -> list[str]:
        return list(DIGIT_WORDS)

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    def to_tensor(self, inputs: np.ndarray) -> torch.Tensor:
        """float32 (N, T) waveforms -> per-utterance standardised log-mel (N, 1, n_mels, frames)."""
        return waveforms_to_logmel(inputs, self.features)
