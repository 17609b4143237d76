"""Defenses: the Fine-Pruning primitives, the Lightning callback, and the plug-in defense classes."""

from backdoor_lab.defenses.base import Defense, DefenseContext, FineTuneBudget, PruneSettings
from backdoor_lab.defenses.defender_data import DefenderData, SplitOutOfReach
from backdoor_lab.defenses.methods import FinePruning, FineTuning, NoDefense, Pruning

__all__ = [
    "Defense",
    "DefenderData",
    "DefenseContext",
    "FinePruning",
    "FineTuneBudget",
    "FineTuning",
    "NoDefense",
    "PruneSettings",
    "Pruning",
    "SplitOutOfReach",
]
