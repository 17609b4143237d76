"""What every trigger and label mapping offers to the poisoning code, and the ``Attack`` that bundles them."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

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


POISON_MODES = ("add", "replace")


@dataclass(frozen=True)
class Attack:
    """One data-poisoning attack: what it stamps (``trigger``), what labels it flips to (``mapping``), how much.

    Built from ``conf/attack/*.yaml`` with ``_target_``. Configs name classes (``"stop"``); ``for_classes``
    returns a copy whose mapping is resolved against the data's class names, so the configured object is
    never half-built and never mutated.

    Args:
        name: short name used in run folders and tables (``badnets``, ``noise``, ``sunglasses``).
        trigger: the trigger stamped on raw samples.
        mapping: which true labels flip, and to what.
        poison_rate: fraction of the *eligible* training samples that get a poisoned copy, in (0, 1].
        poison_mode: ``"add"`` triggered copies (as the original attacks) or ``"replace"`` the chosen samples.
    """

    name: str
    trigger: Trigger
    mapping: LabelMapping
    poison_rate: float = 0.1
    poison_mode: str = "add"

    def __post_init__(self) -> None:
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, int | float):
            raise ValueError(f"attack.poison_rate must be a number in (0, 1], got {self.poison_rate!r}")
        if not 0.0 < self.poison_rate <= 1.0:
            raise ValueError(
                f"attack.poison_rate must be in (0, 1] (a fraction of the eligible samples), got {self.poison_rate}"
            )
        if self.poison_mode not in POISON_MODES:
            raise ValueError(f"attack.poison_mode must be one of {POISON_MODES}, got {self.poison_mode!r}")

    def for_classes(self, class_names: list[str]) -> Attack:
        """This attack with its mapping bound to ``class_names`` (unknown class names fail here, listing valid ones)."""
        return replace(self, mapping=copy.deepcopy(self.mapping).bind(list(class_names)))
