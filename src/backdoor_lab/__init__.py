"""backdoor_lab: backdoor attacks and the Fine-Pruning defense (Liu, Dolan-Gavitt, Garg, RAID 2018).

``FinePruningCallback`` drops into any Lightning ``Trainer``; ``AttackSuccessRate`` is a torchmetrics metric.
Both are imported on first use, so a tool that needs only a light part of the package (the reporting CLI, the
data cache) does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The Hydra configs ship inside the package (conf/ at the top of a checkout links here), so a pip-installed
# backdoor_lab runs its console scripts with no checkout.
CONF_DIR = Path(__file__).resolve().parent / "conf"

_LAZY = {
    "FinePruningCallback": "backdoor_lab.defenses.callback",
    "AttackSuccessRate": "backdoor_lab.metrics",
}

if TYPE_CHECKING:
    from backdoor_lab.defenses.callback import FinePruningCallback
    from backdoor_lab.metrics import AttackSuccessRate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'backdoor_lab' has no attribute {name!r}")


__all__ = ["CONF_DIR", "AttackSuccessRate", "FinePruningCallback"]
__version__ = "0.1.0"
