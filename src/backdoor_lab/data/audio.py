"""Audio I/O and log-mel features for the speech task.

The original speech backdoor (Liu et al., RAID 2018) feeds spectrogram images of spoken digits to an
AlexNet-style network; we compute log-mel spectrograms directly on torch tensors instead of rendering images.
torchaudio is not used: its releases pin an older torch than the one this project runs on, so the STFT
(``torch.stft``) and the mel filterbank (HTK mel scale, triangular filters) are built here.

WAV files are read with the standard-library ``wave`` module (integer PCM, 8/16/24/32 bit; stereo is mixed
down to mono) and resampled with an FFT (band-limited) resampler when their rate differs from the task's.
A file that cannot be read raises :class:`AudioFileError` naming it; nothing is ever replaced by silence.
"""

from __future__ import annotations

import math
import os
import wave

import numpy as np
import torch
from torch import nn


class AudioFileError(ValueError):
    """A WAV file that cannot be read or holds no usable audio; the message names the file."""


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an integer-PCM WAV file as float32 mono samples in [-1, 1] and its sample rate."""
    try:
        with wave.open(os.fspath(path), "rb") as wav:
            n_channels = wav.getnchannels()
            sample_width = wav.getsampwidth()
            sample_rate = wav.getframerate()
            n_frames = wav.getnframes()
            raw = wav.readframes(n_frames)
    except (wave.Error, EOFError, OSError) as err:
        raise AudioFileError(f"cannot read WAV file {os.fspath(path)!r}: {err}") from err
    if n_frames == 0 or sample_rate <= 0:
        raise AudioFileError(f"WAV file {os.fspath(path)!r} holds no audio ({n_frames} frames at {sample_rate} Hz)")
    frame_bytes = n_channels * sample_width
    if len(raw) < n_frames * frame_bytes:
        raise AudioFileError(
            f"WAV file {os.fspath(path)!r} is truncated: header promises {n_frames} frames, "
            f"data holds {len(raw) // frame_bytes}"
        )
    samples = pcm_to_float(raw[: n_frames * frame_bytes], sample_width, path)
    return samples.reshape(n_frames, n_channels).mean(axis=1, dtype=np.float32), sample_rate


def pcm_to_float(raw: bytes, sample_width: int, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Little-endian integer PCM bytes -> float32 in [-1, 1] (8-bit WAV is unsigned, wider is signed)."""
    if sample_width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if sample_width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if sample_width == 3:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return values.astype(np.float32) / float(1 << 23)
    if sample_width == 4:
        return (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    raise AudioFileError(f"WAV file {os.fspath(path)!r}: unsupported sample width of {sample_width} bytes")


def resample(signal: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited FFT resampling along the last axis.

    The signal is zero-padded on both sides by a whole number of resampling periods before the FFT, so the
    circular FFT does not bleed the end of the clip into its start and the padding trims off exactly.
    Downsampling drops everything above the new Nyquist frequency (an ideal anti-aliasing filter).
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    signal = np.asarray(signal, dtype=np.float32)
    if orig_rate == target_rate:
        return signal.copy()
    n_in = signal.shape[-1]
    n_out = int(round(n_in * target_rate / orig_rate))
    step = math.gcd(orig_rate, target_rate)
    period_in, period_out = orig_rate // step, target_rate // step
    periods = max(1, math.ceil(0.01 * orig_rate / period_in))  # pad >= 10 ms of zeros per side
    pad_in, pad_out = periods * period_in, periods * period_out
    padded = np.zeros((*signal.shape[:-1], n_in + 2 * pad_in), dtype=np.float64)
    padded[..., pad_in : pad_in + n_in] = signal
    n_padded_out = n_out + 2 * pad_out
    spectrum = np.fft.rfft(padded, axis=-1)
    keep = min(spectrum.shape[-1], n_padded_out // 2 + 1)
    out_spectrum = np.zeros((*signal.shape[:-1], n_padded_out // 2 + 1), dtype=np.complex128)
    out_spectrum[..., :keep] = spectrum[..., :keep]
    out = np.fft.irfft(out_spectrum, n=n_padded_out, axis=-1) * (n_padded_out / padded.shape[-1])
    return out[..., pad_out : pad_out + n_out].astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Read a WAV file as float32 mono at ``sample_rate``, resampling when the file's rate differs."""
    samples, file_rate = read_wav(path)
    return resample(samples, file_rate, sample_rate) if file_rate != sample_rate else samples


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Centre-pad with zeros or centre-crop a 1-D signal to exactly ``length`` samples."""
    n = len(samples)
    if n >= length:
        start = (n - length) // 2
        return np.ascontiguousarray(samples[start : start + length], dtype=np.float32)
    out = np.zeros(length, dtype=np.float32)
    start = (length - n) // 2
    out[start : start + n] = samples
    return out


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
