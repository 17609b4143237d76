"""backdoor_lab: backdoor attacks and the Fine-Pruning defense (Liu, Dolan-Gavitt, Garg, RAID 2018).

``FinePruningCallback`` drops into any Lightning ``Trainer``; ``AttackSuccessRate`` is a torchmetrics metric.
"""

from pathlib import Path

# The Hydra configs ship inside the package (conf/ at the top of a checkout links here), so a pip-installed
# backdoor_lab runs its console scripts with no checkout.
CONF_DIR = Path(__file__).resolve().parent / "conf"

from backdoor_lab.defenses.callback import FinePruningCallback  # noqa: E402
from backdoor_lab.metrics import AttackSuccessRate  # noqa: E402

__all__ = ["CONF_DIR", "AttackSuccessRate", "FinePruningCallback"]
__version__ = "0.1.0"
