"""The figures of a folder of runs: summary.png (bars per defense) and prune_ratio.png (results against the ratio).

Drawn from what ``table.collect_runs`` read, grouped as the table groups them, so a figure and its table row
always show the same runs.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from backdoor_lab.reporting.files import atomic_path  # noqa: E402
from backdoor_lab.reporting.table import (  # noqa: E402
    DefenseResult,
    Runs,
    defense_label,
    defense_order,
    result_groups,
)


def _mean_percent(values: Iterable[float | None]) -> float:
    present = [100 * v for v in values if v is not None]
    return statistics.fmean(present) if present else math.nan


def _savefig(fig: Any, path: Path) -> None:
    try:
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _grid(count: int) -> tuple[Any, list[Any]]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), dpi=110, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_summary(path: Path, runs: Runs, keys: Sequence[str]) -> Path:
    """Bars of clean accuracy and ASR (mean, std as error bar) per defense, one panel per task x variant x setting."""
    groups = result_groups(runs, keys)
    fig, axes = _grid(max(len(groups), 1))
    for ax, group in zip(axes, groups, strict=False):
        names = list(group.rows)
        for offset, (metric, color, label) in enumerate(
            [("clean_acc", "tab:blue", "clean accuracy"), ("asr", "tab:red", "attack success rate")]
        ):
            means, stds = [], []
            for name in names:
                values = [100 * r.after[metric] for r in group.rows[name] if r.after[metric] is not None]
                means.append(statistics.fmean(values) if values else 0.0)
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            xs = [i + (offset - 0.5) * 0.38 for i in range(len(names))]
            ax.bar(xs, means, width=0.38, yerr=stds, color=color, label=label, capsize=3)
        ax.set_xticks(range(len(names)), [defense_label(n) for n in names], rotation=15)
        ax.set_ylim(0, 105)
        ax.set_ylabel("% (test)")
        title = f"{group.task} · {group.attack_variant}"
        if keys:
            title += "\n" + ", ".join(f"{k}={v}" for k, v in zip(keys, group.settings, strict=True))
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if groups:
        axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    return path


def plot_prune_ratio(path: Path, runs: Runs, keys: Sequence[str]) -> Path | None:
    """After-defense clean accuracy (solid) and ASR (dashed) against the prune ratio, one colour per defense.

    Drawn only when some pruning defense was run at more than one prune ratio.
    """
    pruning = [r for r in runs.results if r.prunes and r.prune_ratio is not None]
    if len({r.prune_ratio for r in pruning}) < 2:
        return None
    panel_keys = [k for k in keys if k.split(".")[-1] != "prune_ratio"]
    panels: dict[tuple, dict[str, dict[float, list[DefenseResult]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in pruning:
        panel = (r.task, r.attack_variant, tuple(r.overrides.get(k, "default") for k in panel_keys))
        panels[panel][r.defense][r.prune_ratio].append(r)
    fig, axes = _grid(len(panels))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, by_defense) in zip(axes, sorted(panels.items()), strict=True):
        for i, (defense, by_ratio) in enumerate(sorted(by_defense.items(), key=lambda kv: defense_order(kv[0]))):
            ratios = sorted(by_ratio)
            for metric, style, what in (("clean_acc", "o-", "clean"), ("asr", "s--", "ASR")):
                means = [_mean_percent([r.after[metric] for r in by_ratio[x]]) for x in ratios]
                ax.plot(ratios, means, style, color=colors[i % len(colors)], label=f"{defense_label(defense)}: {what}")
        title = f"{panel[0]} · {panel[1]}"
        if panel_keys:
            title += "\n" + ", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel[2], strict=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("prune ratio")
        ax.set_ylabel("% after the defense (test)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    return path
