"""What every trigger and label mapping offers to the poisoning code."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Trigger(ABC):
    """A trigger stamps one raw sample (uint8 HWC image or float32 waveform).

    ``region`` is the sample's anchor box ``(x0, y0, x1, y1)`` in pixels when the data source gives one
    (sign box, eye band); triggers that need no anchor ignore it. ``apply`` must not modify its input.
    """

    @abstractmethod
    def apply(self, sample: np.ndarray, region: np.ndarray | None = None) -> np.ndarray: ...

    def apply_batch(self, samples: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        out = np.empty_like(samples)
        for i, sample in enumerate(samples):
            out[i] = self.apply(sample, None if regions is None else regions[i])
        return out


class LabelMapping(ABC):
    """Which true labels the attacker targets, and what each one should become.

    Configs may name classes (``"stop"``) instead of indices; ``bind`` resolves names against the data
    source's class names once they are known, and rejects unknown ones with the list of valid names.
    """

    def bind(self, class_names: list[str]) -> LabelMapping:
        """Resolve class names to indices and check them against ``class_names``; returns ``self``."""
        return self

    @abstractmethod
    def eligible(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of samples whose triggered version should flip (true label != attack target)."""

    @abstractmethod
    def target(self, labels: np.ndarray) -> np.ndarray:
        """The attacker's label for each sample."""


class AllToOne(LabelMapping):
    """Samples of ``source_classes`` (None: every class but the target) -> ``target_class``."""

    def __init__(self, target_class: int | str, source_classes: list[int | str] | None = None) -> None:
        self.target_class = target_class
        self.source_classes = None if source_classes is None else list(source_classes)
        if all(isinstance(c, int) for c in [target_class, *(self.source_classes or [])]):
            self._check_disjoint()

    def _check_disjoint(self) -> None:
        if self.source_classes is not None and self.target_class in self.source_classes:
            raise ValueError(f"target_class {self.target_class} is also a source class; drop it from source_classes")

    def bind(self, class_names: list[str]) -> AllToOne:
        self.target_class = resolve_class(self.target_class, class_names, "target_class")
        if self.source_classes is not None:
            self.source_classes = [resolve_class(c, class_names, "source_classes") for c in self.source_classes]
        self._check_disjoint()
        return self

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        mask = labels != self.target_class
        if self.source_classes is not None:
            mask &= np.isin(labels, self.source_classes)
        return mask

    def target(self, labels: np.ndarray) -> np.ndarray:
        return np.full_like(labels, self.target_class)


class AllToAll(LabelMapping):
    """Every class i -> (i + shift) mod num_classes, as in the original speech backdoor."""

    def __init__(self, num_classes: int | None = None, shift: int = 1) -> None:
        self.num_classes = num_classes
        self.shift = int(shift)
        if num_classes is not None:
            self.bind([str(i) for i in range(num_classes)])

    def bind(self, class_names: list[str]) -> AllToAll:
        if self.num_classes is not None and self.num_classes != len(class_names):
            raise ValueError(f"AllToAll was built for {self.num_classes} classes but the data has {len(class_names)}")
        self.num_classes = len(class_names)
        if self.shift % self.num_classes == 0:
            raise ValueError(f"shift={self.shift} maps every class to itself with {self.num_classes} classes")
        return self

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        return np.ones(len(labels), dtype=bool)

    def target(self, labels: np.ndarray) -> np.ndarray:
        return (labels + self.shift) % self.num_classes


def resolve_class(value: int | str, class_names: list[str], what: str) -> int:
    """A class given by index or name -> its index, with an error that lists the valid names."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in class_names:
            raise ValueError(f"{what}: unknown class {value!r}; valid classes are {class_names}")
        return class_names.index(value)
    index = int(value)
    if not 0 <= index < len(class_names):
        raise ValueError(f"{what}: class index {index} is out of range for {len(class_names)} classes {class_names}")
    return index
