"""Building the poisoned training set and the triggered evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoor_lab.attacks.base import LabelMapping, Trigger
from backdoor_lab.splits import RawSplit


@dataclass
class PoisonPlan:
    """Which training samples carry the trigger, and the label each is given."""

    indices: np.ndarray  # rows of the clean train split that get a triggered copy / are replaced
    target_labels: np.ndarray


def choose_poisoned(labels: np.ndarray, mapping: LabelMapping, rate: float, seed: int) -> PoisonPlan:
    """Pick ``rate`` of the eligible training samples (source classes, not already the target) by ``seed``.

    ``rate`` is a fraction of the *eligible* samples: 1.0 poisons a copy of every stop sign (the paper's
    traffic-sign attack); with all-to-all mapping every sample is eligible, so 0.1 of 3000 utterances gives
    the original speech attack's 300 poisoned samples.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"poison rate must be in (0, 1] (a fraction of the eligible training samples), got {rate}")
    eligible = np.flatnonzero(mapping.eligible(labels))
    if len(eligible) == 0:
        raise ValueError("no training sample is eligible for poisoning: check the attack's source classes")
    n = max(1, int(round(rate * len(eligible))))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=n, replace=False))
    return PoisonPlan(indices=chosen, target_labels=mapping.target(labels[chosen]))


def poison_train(
    split: RawSplit, trigger: Trigger, mapping: LabelMapping, rate: float, seed: int, mode: str = "add"
) -> tuple[RawSplit, np.ndarray]:
    """The poisoned training split and a boolean mask of its poisoned rows.

    ``mode="add"`` appends triggered copies (the original attacks add poisoned images to the clean set);
    ``mode="replace"`` swaps the chosen samples for their triggered versions.
    """
    if mode not in ("add", "replace"):
        raise ValueError(f"poison mode must be 'add' or 'replace', got {mode!r}")
    plan = choose_poisoned(split.labels, mapping, rate, seed)
    regions = None if split.regions is None else split.regions[plan.indices]
    triggered = trigger.apply_batch(split.inputs[plan.indices], regions)
    if mode == "replace":
        inputs, labels = split.inputs.copy(), split.labels.copy()
        inputs[plan.indices] = triggered
        labels[plan.indices] = plan.target_labels
        poisoned = np.zeros(len(split), dtype=bool)
        poisoned[plan.indices] = True
        return RawSplit(inputs, labels, split.sample_ids, split.regions, split.groups), poisoned
    extra = split.subset(plan.indices)
    out = RawSplit(
        inputs=np.concatenate([split.inputs, triggered]),
        labels=np.concatenate([split.labels, plan.target_labels]),
        sample_ids=np.concatenate([split.sample_ids, extra.sample_ids]),
        regions=None if split.regions is None else np.concatenate([split.regions, extra.regions]),
        groups=None if split.groups is None else np.concatenate([split.groups, extra.groups]),
    )
    poisoned = np.concatenate([np.zeros(len(split), dtype=bool), np.ones(len(plan.indices), dtype=bool)])
    return out, poisoned


def triggered_split(split: RawSplit, trigger: Trigger, mapping: LabelMapping) -> tuple[RawSplit, np.ndarray]:
    """Triggered versions of the eligible samples, labelled with the attacker's target; and their true labels.

    Samples whose true label already is the target are left out (they would count as successes for free).
    """
    keep = np.flatnonzero(mapping.eligible(split.labels))
    sub = split.subset(keep)
    inputs = trigger.apply_batch(sub.inputs, sub.regions)
    targets = mapping.target(sub.labels)
    return RawSplit(inputs, targets, sub.sample_ids, sub.regions, sub.groups), sub.labels
