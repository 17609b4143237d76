"""NAD's settings and their checks: one-line errors naming the key, shared by the config and the callback.

``NADSettings`` is the root ``nad`` config node (``conf/nad/default.yaml``); ``check_nad_settings`` is also what
``NADCallback`` runs on its own arguments, so both routes refuse the same bad values with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


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
        betas = tuple(float(b) if is_number(b) else b for b in (self.betas or ()))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "betas", betas)
        p = float(self.p) if is_number(self.p) else self.p
        object.__setattr__(self, "p", p)
        check_nad_settings(layers, betas, p, self.teacher_epochs, prefix="nad.", allow_no_layers=True)

    def layers_for(self, model: nn.Module) -> list[str]:
        """The distilled layers: ``layers``, else the model's ``attention_layers``."""
        return list(self.layers or getattr(model, "attention_layers", None) or [])


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
