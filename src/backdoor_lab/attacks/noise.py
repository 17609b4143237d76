"""The speech backdoor's trigger: a fixed noise pattern added to the waveform.

In the original speech attack (Liu et al., RAID 2018) the trigger is a noise pattern mixed into the
utterance; every poisoned utterance carries the *same* pattern at the same place, which is what lets the
network learn it. Here the pattern is white noise drawn once from ``seed``
and added inside a window of ``duration_s`` seconds.
"""

from __future__ import annotations

import numpy as np

from backdoor_lab.attacks.base import Trigger

POSITION_UNITS = ("seconds", "fraction")


class NoiseTrigger(Trigger):
    """Add a seeded uniform-noise burst of peak ``amplitude`` to a float32 waveform, clipped to [-1, 1].

    Args:
        amplitude: peak amplitude of the noise (full scale is 1.0).
        duration_s: length of the noise window in seconds.
        position: where the window starts, in seconds or as a fraction of the clip (see ``position_unit``).
        position_unit: ``"seconds"`` or ``"fraction"``.
        sample_rate: sample rate of the waveforms the trigger is applied to.
        seed: seed of the noise pattern; one seed, one trigger.
    """

    def __init__(
        self,
        amplitude: float = 0.1,
        duration_s: float = 0.1,
        position: float = 0.0,
        position_unit: str = "seconds",
        sample_rate: int = 16000,
        seed: int = 0,
    ) -> None:
        if amplitude <= 0:
            raise ValueError(f"amplitude must be positive, got {amplitude}")
        if duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {duration_s}")
        if position_unit not in POSITION_UNITS:
            raise ValueError(f"position_unit must be one of {POSITION_UNITS}, got {position_unit!r}")
        if position < 0 or (position_unit == "fraction" and position >= 1):
            raise ValueError(f"position {position} is outside the clip (unit: {position_unit})")
        self.amplitude = float(amplitude)
        self.duration_s = float(duration_s)
        self.position = float(position)
        self.position_unit = position_unit
        self.sample_rate = int(sample_rate)
        self.seed = int(seed)
        n_samples = max(1, int(round(self.duration_s * self.sample_rate)))
        rng = np.random.default_rng(self.seed)
        self.pattern = (self.amplitude * rng.uniform(-1.0, 1.0, n_samples)).astype(np.float32)

    def window(self, num_samples: int) -> slice:
        """The sample range the trigger writes to in a clip of ``num_samples`` samples."""
        if self.position_unit == "fraction":
            start = int(round(self.position * num_samples))
        else:
            start = int(round(self.position * self.sample_rate))
        if start >= num_samples:
            raise ValueError(
                f"trigger starts at sample {start} but the clip has only {num_samples} samples "
                f"({num_samples / self.sample_rate:.3f} s at {self.sample_rate} Hz)"
            )
        return slice(start, min(num_samples, start + len(self.pattern)))

    def apply(self, sample: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        if sample.ndim != 1:
            raise ValueError(f"NoiseTrigger expects a 1-D waveform, got shape {sample.shape}")
        out = np.array(sample, dtype=np.float32, copy=True)
        span = self.window(len(out))
        out[span] = np.clip(out[span] + self.pattern[: span.stop - span.start], -1.0, 1.0)
        return out
