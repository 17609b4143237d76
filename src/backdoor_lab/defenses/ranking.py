"""Reading a channel ranking, and the settings every pruning defense shares: what FinePruner's protocol uses.

Kept apart from ``pruner.py`` (the rank -> curve -> choose -> mask protocol) so that the callback, the records and
the successors' defenses read rankings and show progress the same way without importing the protocol.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress


def progress_bar(enabled: bool) -> Progress:
    """The project's one progress-bar style (rich); quiet unless enabled and writing to a terminal."""
    return Progress(transient=True, disable=not (enabled and Console().is_terminal))


def check_prune_settings(
    prune_ratio: float | None,
    max_accuracy_drop: float | None,
    step: int | None,
    max_batches: int | None,
    error: type[Exception] = ValueError,
) -> None:
    """Settings FinePruner and FinePruningCallback share, checked in one place (``error``: the type raised)."""
    if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
        raise error(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if max_accuracy_drop is None or not 0.0 <= max_accuracy_drop <= 1.0:
        raise error(f"max_accuracy_drop must be a fraction in [0, 1] (0.04 = 4 points), got {max_accuracy_drop}")
    if step is not None and step < 1:
        raise error(f"step must be a positive channel count, got {step}")
    if max_batches is not None and max_batches < 1:
        raise error(f"max_batches must be positive, got {max_batches}")


def ratio_count(ratio: float, num_channels: int) -> int:
    """Channels a ``prune_ratio`` prunes: rounded, but never every channel (0.999 of 256 is 255, not 256)."""
    return min(int(round(ratio * num_channels)), num_channels - 1)


def pruning_order(channel_activation: list[float]) -> list[int]:
    """Channels by increasing mean clean activation; ties (e.g. dead channels) broken by index."""
    return sorted(range(len(channel_activation)), key=lambda c: (channel_activation[c], c))


def trigger_channel_ranks(
    channel_activation: list[float], triggered_activation: list[float], top: int = 10
) -> list[int]:
    """Pruning-order positions (0 = pruned first) of the ``top`` channels the trigger raises most.

    Fine-pruning can only work when these sit early in the order (dormant on clean data); PAPER.md.
    """
    if not triggered_activation or not channel_activation:
        return []
    n = len(channel_activation)
    position = {c: i for i, c in enumerate(pruning_order(channel_activation))}
    lift = [triggered_activation[c] - channel_activation[c] for c in range(n)]
    most = sorted(range(n), key=lambda c: -lift[c])[:top]
    return sorted(position[c] for c in most)
