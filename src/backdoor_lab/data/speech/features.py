"""Log-mel spectrograms of waveforms: the model inputs of the speech task.

The original speech backdoor (Liu et al., RAID 2018) feeds spectrogram images of spoken digits to an
AlexNet-style network; we compute log-mel spectrograms directly on torch tensors instead of rendering images.
torchaudio is not used: its releases pin an older torch than the one this project runs on, so the STFT
(``torch.stft``) and the mel filterbank (HTK mel scale, triangular filters) are built here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + freq / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters, equally spaced on the mel scale, each with unit peak."""
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} Hz, got f_min={f_min}, f_max={f_max}")
    bin_freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min))),
        float(hz_to_mel(torch.tensor(f_max))),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = mel_to_hz(mel_edges)
    lower, centre, upper = hz_edges[:-2], hz_edges[1:-1], hz_edges[2:]
    rising = (bin_freqs[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - bin_freqs[:, None]) / (upper - centre)[None, :]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMelSpectrogram(nn.Module):
    """Waveforms (N, T) -> log-mel spectrograms in dB (N, n_mels, frames).

    ``top_db`` floors every spectrogram at its own peak minus ``top_db`` decibels, so digital silence
    (exact zeros from a synthesizer) does not dominate the dynamic range. With ``normalize`` each spectrogram
    is standardised to zero mean and unit variance on its own, which removes recording gain differences
    between speakers and datasets.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 256,
        n_mels: int = 40,
        f_min: float = 20.0,
        f_max: float | None = None,
        top_db: float = 80.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.top_db = top_db
        self.normalize = normalize
        f_max = sample_rate / 2 if f_max is None else f_max
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer(
            "filterbank", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max), persistent=False
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` (centred STFT)."""
        return 1 + num_samples // self.hop_length

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms of shape (N, T), got {tuple(waveforms.shape)}")
        stft = torch.stft(
            waveforms.float(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = stft.real.square() + stft.imag.square()  # (N, freqs, frames)
        mel = torch.einsum("nft,fm->nmt", power, self.filterbank)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        peak = db.amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - self.top_db)
        if self.normalize:
            mean = db.mean(dim=(1, 2), keepdim=True)
            std = db.std(dim=(1, 2), keepdim=True).clamp(min=1e-5)
            db = (db - mean) / std
        return db


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
