"""Attack success rate as a torchmetrics ``Metric`` (sums reduce across processes)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


def attack_counted(attack_targets: torch.Tensor, true_labels: torch.Tensor | None) -> torch.Tensor:
    """Which triggered samples count towards attack success: those whose true label is not the target.

    A sample that was already of the target class proves nothing about the trigger. Without true labels,
    every sample counts (clean accuracy uses the same code with targets = true labels).
    """
    if true_labels is None:
        return torch.ones_like(attack_targets, dtype=torch.bool)
    return true_labels.to(attack_targets.device) != attack_targets


class AttackSuccessRate(Metric):
    """Share of triggered inputs classified as the attacker's target.

    ``update(preds, attack_targets, true_labels=None)``: ``preds`` are logits (N, C) or class indices (N,).
    When ``true_labels`` is given, samples whose true label equals their attack target are ignored, so a
    sample that was already of the target class never counts as a success.
    """

    is_differentiable = False
    higher_is_better = False  # for the defender
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, preds: torch.Tensor, attack_targets: torch.Tensor, true_labels: torch.Tensor | None = None
    ) -> None:
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if preds.shape != attack_targets.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and attack_targets {tuple(attack_targets.shape)} differ")
        keep = attack_counted(attack_targets, true_labels)
        self.hits += (preds[keep] == attack_targets[keep]).sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.total.clamp(min=1)
