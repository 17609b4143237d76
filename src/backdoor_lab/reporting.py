"""Files every run leaves beside its Hydra outputs: metrics.json, the prune curve as CSV and PNG."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVE_COLUMNS = ("pruned", "fraction", "clean_acc", "asr")


def write_new(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically to a file that must not exist yet (no earlier result is overwritten)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already; results are never overwritten, use a new output dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    return write_new(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_curve_csv(path: str | Path, curve: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for point in curve:
            writer.writerow({c: "" if point.get(c) is None else point[c] for c in CURVE_COLUMNS})
    if path.exists():
        os.unlink(tmp)
        raise FileExistsError(f"{path} exists already; results are never overwritten")
    os.replace(tmp, path)
    return path


def plot_prune_curve(
    path: str | Path, curve: Sequence[dict[str, Any]], kept_fraction: float | None = None, title: str = ""
) -> Path:
    """Clean accuracy and ASR against the fraction of channels pruned, with the kept mask marked."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already; results are never overwritten")
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
    fig.savefig(path)
    plt.close(fig)
    return path


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def summarize_sweep(sweep_dir: str | Path) -> Path | None:
    """One ``summary.csv`` row per finished job of a multirun: its overrides and its scalar metrics.

    With a ``defense.prune_ratio`` sweep it also draws ``summary.png``: clean accuracy and ASR after the
    defense against the prune ratio.
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: p.parent.name):
        job = metrics_path.parent
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            for line in overrides.read_text().splitlines():
                item = line.lstrip("- ").strip().strip("'\"")
                if "=" in item:
                    key, value = item.split("=", 1)
                    row[key] = value
        row.update(_flatten(json.loads(metrics_path.read_text())))
        rows.append(row)
    if not rows:
        return None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = sweep_dir / "summary.csv"
    with open(path, "w", newline="") as fh:  # the sweep's own folder: rewritten as jobs are added
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    ratio_rows = [r for r in rows if r.get("defense.prune_ratio") not in (None, "null") and "after.asr" in r]
    if ratio_rows:
        ratio_rows.sort(key=lambda r: float(r["defense.prune_ratio"]))
        x = [float(r["defense.prune_ratio"]) for r in ratio_rows]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot(x, [r["after.clean_acc"] for r in ratio_rows], "o-", label="clean accuracy (test)")
        ax.plot(x, [r["after.asr"] for r in ratio_rows], "s-", color="tab:red", label="attack success rate (test)")
        ax.set_xlabel("prune ratio")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{ratio_rows[0].get('method', 'defense')} sweep")
        fig.tight_layout()
        fig.savefig(sweep_dir / "summary.png")
        plt.close(fig)
    return path


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; kept importable without it
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback: after a multirun, gather every job's metrics.json into summary.csv (and a plot)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        path = summarize_sweep(config.hydra.sweep.dir)
        if path is not None:
            print(f"Sweep summary: {path}")
