"""The successors' settings (the root ``anp``, ``nad`` and ``clp`` config nodes) and their checks, in one place.

Each is a frozen dataclass that refuses a bad value at construction with a one-line error naming the config key
(``anp.eps must be a number in (0, 1], got 2``), so a sweep fails before any work, and the Lightning callbacks
build the same objects from their arguments. Defaults are the papers' and their reference code's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from torch import nn


def real_number(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int``, and never a meant setting)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def finite_number(value: Any) -> bool:
    return real_number(value) and math.isfinite(value)


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ANPSettings:
    """ANP's knobs (the root ``anp`` config); defaults as the paper's code and BackdoorBench.

    Args:
        eps: bound of the multiplicative neuron perturbation (reference ``--anp-eps`` 0.4).
        alpha: trade-off, loss = alpha * natural + (1 - alpha) * robust (``--anp-alpha`` 0.2).
        iterations: mask-optimisation steps, one clean batch each (``--nb-iter`` 2000).
        mask_lr: SGD (momentum 0.9) learning rate of the masks (``--lr`` 0.2).
        noise_steps: signed ascent steps of the perturbation per iteration (``--anp-steps`` 1).
        batch_size: clean samples per iteration, drawn with replacement (``--batch-size`` 128); None: the clean
            loader's own batches, cycled.
        threshold: prune the units whose mask ends below this (the paper's 0.2).
        prune_fraction: instead of ``threshold``, prune exactly this fraction of all units, smallest masks first.
    """

    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 2000
    mask_lr: float = 0.2
    noise_steps: int = 1
    batch_size: int | None = 128
    threshold: float = 0.2
    prune_fraction: float | None = None

    def __post_init__(self) -> None:
        checks = [
            ("eps", finite_number(self.eps) and 0 < self.eps <= 1, "a number in (0, 1]"),
            ("alpha", finite_number(self.alpha) and 0 <= self.alpha <= 1, "a number in [0, 1]"),
            ("iterations", integer(self.iterations) and self.iterations >= 1, "an integer >= 1"),
            ("mask_lr", finite_number(self.mask_lr) and self.mask_lr > 0, "a number > 0"),
            ("noise_steps", integer(self.noise_steps) and self.noise_steps >= 1, "an integer >= 1"),
            (
                "batch_size",
                self.batch_size is None or (integer(self.batch_size) and self.batch_size >= 1),
                "an integer >= 1 or null",
            ),
            ("threshold", finite_number(self.threshold) and 0 <= self.threshold <= 1, "a number in [0, 1]"),
            (
                "prune_fraction",
                self.prune_fraction is None or (finite_number(self.prune_fraction) and 0 <= self.prune_fraction < 1),
                "a number in [0, 1) or null",
            ),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ValueError(f"anp.{key} must be {what}, got {getattr(self, key)!r}")


def check_nad_settings(
    layers: Sequence[str],
    betas: Sequence[float],
    p: float,
    teacher_epochs: int | None,
    prefix: str = "",
    error: type[Exception] = ValueError,
    allow_no_layers: bool = False,
) -> None:
    """One-line errors naming the key (``prefix`` is ``"nad."`` for the config, ``""`` for the callback)."""
    if not layers and not allow_no_layers:
        raise error(f"{prefix}layers is empty: name the modules whose attention maps NAD distils")
    if any(not isinstance(name, str) or not name for name in layers):
        raise error(f"{prefix}layers must be module names (strings), got {list(layers)!r}")
    if len(set(layers)) != len(layers):
        raise error(f"{prefix}layers names a module twice: {list(layers)}")
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta < 0:
            raise error(f"{prefix}betas must be finite numbers >= 0, got {list(betas)!r}")
    if layers and len(betas) != len(layers):
        raise error(
            f"{prefix}betas must have one weight per layer in {prefix}layers: {len(layers)} layers, {len(betas)} betas"
        )
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0:
        raise error(f"{prefix}p must be a finite number > 0, got {p!r}")
    if teacher_epochs is not None and (
        isinstance(teacher_epochs, bool) or not isinstance(teacher_epochs, int) or teacher_epochs < 1
    ):
        raise error(
            f"{prefix}teacher_epochs must be an integer >= 1, got {teacher_epochs!r}: "
            "a teacher that is not fine-tuned is the backdoored model itself"
        )


@dataclass(frozen=True)
class NADSettings:
    """NAD's settings (the root ``nad`` config; defaults from the reference code, see ``conf/nad/default.yaml``).

    Args:
        layers: the modules whose outputs are distilled as attention maps (``named_modules`` names, e.g.
            ``net.relu3``); empty = the model's own ``attention_layers``.
        betas: the weight of each layer's attention loss, low to high (NAD and BackdoorBench: 500, 1000, 1000).
        p: the power of ``|f|`` in the attention map (NAD: 2).
        teacher_epochs: epochs the teacher is fine-tuned on the defender's clean split (NAD: 5 to 10).
    """

    layers: Sequence[str] = ()
    betas: Sequence[float] = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    teacher_epochs: int = 10

    def __post_init__(self) -> None:
        # Hydra hands lists over as ListConfig: keep plain, hashable tuples.
        layers = tuple(self.layers or ())
        betas = tuple(float(b) if real_number(b) else b for b in (self.betas or ()))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "betas", betas)
        p = float(self.p) if real_number(self.p) else self.p
        object.__setattr__(self, "p", p)
        check_nad_settings(layers, betas, p, self.teacher_epochs, prefix="nad.", allow_no_layers=True)

    def layers_for(self, model: nn.Module) -> list[str]:
        """The distilled layers: ``layers``, else the model's ``attention_layers``."""
        return list(self.layers or getattr(model, "attention_layers", None) or [])


@dataclass(frozen=True)
class CLPSettings:
    """What CLP prunes (the root ``clp`` config).

    Args:
        u: a channel is pruned when its UCLC exceeds ``mean + u * std`` of its layer (>= 0; the paper's and the
            reference code's default 3; smaller prunes more).
        layers: the conv layers to prune (names in ``named_modules``); None: every ``nn.Conv2d``, as the paper.
    """

    u: float = 3.0
    layers: Sequence[str] | None = None  # kept as a tuple (a Hydra ListConfig or a list is converted)

    def __post_init__(self) -> None:
        u = self.u
        if not finite_number(u) or u < 0:
            raise ValueError(f"clp.u must be a finite number >= 0, got {u!r}")
        object.__setattr__(self, "u", float(u))
        if self.layers is not None:
            if isinstance(self.layers, str | bytes) or not isinstance(self.layers, Iterable):
                raise ValueError(f"clp.layers must be null or a list of conv layer names, got {self.layers!r}")
            layers = tuple(self.layers)  # a Hydra ListConfig, a list or a tuple
            if not layers or not all(isinstance(name, str) and name for name in layers):
                raise ValueError(f"clp.layers must be null or a non-empty list of conv layer names, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"clp.layers names a layer twice: {list(layers)}")
            object.__setattr__(self, "layers", layers)
