"""One defense's prune curve (clean accuracy and ASR against the fraction of channels pruned) as CSV and PNG."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from backdoor_lab.reporting.files import atomic_path  # noqa: E402

CURVE_COLUMNS = ("pruned", "fraction", "clean_acc", "asr")


def write_curve_csv(path: str | Path, curve: Sequence[dict[str, Any]]) -> Path:
    with atomic_path(path, overwrite=False) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for point in curve:
            writer.writerow({c: "" if point.get(c) is None else point[c] for c in CURVE_COLUMNS})
    return Path(path)


def plot_prune_curve(
    path: str | Path, curve: Sequence[dict[str, Any]], kept_fraction: float | None = None, title: str = ""
) -> Path:
    """Clean accuracy and ASR against the fraction of channels pruned, with the kept mask marked."""
    fractions = [p["fraction"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(fractions, [p["clean_acc"] for p in curve], label="clean accuracy (val)", color="tab:blue")
    if any(p.get("asr") is not None for p in curve):
        ax.plot(fractions, [p["asr"] for p in curve], label="attack success rate (val)", color="tab:red")
    if kept_fraction is not None:
        ax.axvline(kept_fraction, color="grey", linestyle="--", label=f"kept mask ({kept_fraction:.0%})")
    ax.set_xlabel("fraction of channels pruned")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title or "Pruning (before fine-tuning)")
    fig.tight_layout()
    try:
        with atomic_path(path, overwrite=False) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
