"""backdoor_lab: backdoor attacks and the Fine-Pruning defense (Liu, Dolan-Gavitt, Garg, RAID 2018).

``FinePruningCallback`` drops into any Lightning ``Trainer``; ``AttackSuccessRate`` is a torchmetrics metric.
"""

from backdoor_lab.defenses.callback import FinePruningCallback
from backdoor_lab.metrics import AttackSuccessRate

__all__ = ["AttackSuccessRate", "FinePruningCallback"]
__version__ = "0.1.0"
