"""Audio files in, fixed-length float32 waveforms out.

WAV files are read with the standard-library ``wave`` module (integer PCM, 8/16/24/32 bit; stereo is mixed
down to mono) and resampled with an FFT (band-limited) resampler when their rate differs from the task's.
A file that cannot be read raises :class:`AudioFileError` naming it; nothing is ever replaced by silence.
"""

from __future__ import annotations

import math
import os
import wave

import numpy as np


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


def trim_silence(samples: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold`` times the peak."""
    loud = np.flatnonzero(np.abs(samples) > threshold * np.abs(samples).max())
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples
