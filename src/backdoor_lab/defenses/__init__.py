"""Defenses: Fine-Pruning (the primitives, the Lightning callback, the plug-ins) and its successors ANP, NAD, CLP.

Each defense is a plug-in (``conf/defense/<name>.yaml``) and, for plain Lightning projects, a callback.
"""

from backdoor_lab.defenses.anp import ANP, ANPCallback, ANPSettings
from backdoor_lab.defenses.base import Defense, DefenseContext, FineTuneBudget, PruneSettings
from backdoor_lab.defenses.clp import CLP, CLPCallback, CLPSettings
from backdoor_lab.defenses.defender_data import DefenderData, SplitOutOfReach
from backdoor_lab.defenses.methods import FinePruning, FineTuning, NoDefense, Pruning
from backdoor_lab.defenses.nad import NAD, NADCallback, NADSettings

__all__ = [
    "ANP",
    "CLP",
    "NAD",
    "ANPCallback",
    "ANPSettings",
    "CLPCallback",
    "CLPSettings",
    "Defense",
    "DefenderData",
    "DefenseContext",
    "FinePruning",
    "FineTuneBudget",
    "FineTuning",
    "NADCallback",
    "NADSettings",
    "NoDefense",
    "PruneSettings",
    "Pruning",
    "SplitOutOfReach",
]
