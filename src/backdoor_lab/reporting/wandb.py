"""What a run shows on its W&B dashboard (and, where a logger can hold it, in its CSV logs).

The functions take a run's Lightning loggers, any mix of ``CSVLogger`` and ``WandbLogger``; a logger that cannot
hold a thing (a table, an image) is skipped. Key layout of one defense's run:

- config: the resolved config (``seed``, ``attack.poison_rate``, ``prune.prune_ratio``, ``train_run`` ...)
- ``test/before/{clean_acc,asr}``, ``test/after/{clean_acc,asr}``, ``defense/pruned_fraction``: distinct keys,
  so the run summary shows both sides
- ``prune_curve/table`` (``wandb.Table`` of the curve), ``prune_curve/plot`` (line plot of it),
  ``prune_curve/image`` (prune_curve.png)
- the run summary: every scalar of metrics.json under its dotted path (``before.clean_acc``, ``pruned_fraction``)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from backdoor_lab.reporting.curves import CURVE_COLUMNS

Loggers = Logger | Iterable[Logger] | None | bool
# Overrides left out of a run's name: long lists and paths that say nothing a tag does not.
NAME_EXCLUDED_KEYS = ("defenses", "ckpt_path", "paths.output_dir", "paths.root_dir", "paths.run_dir")
MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def _as_list(loggers: Loggers) -> list[Logger]:
    if loggers is None or isinstance(loggers, bool):
        return []
    if isinstance(loggers, Logger):
        return [loggers]
    return list(loggers)


def _wandb_runs(loggers: Loggers) -> list[Any]:
    return [lg.experiment for lg in _as_list(loggers) if isinstance(lg, WandbLogger)]


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """metrics.json's scalar values under dotted paths; lists (channels, curves) and the config are left out."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if not prefix and key == "config":
            continue
        if isinstance(value, Mapping):
            flat.update(_scalars(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, bool | int | float | str):
            flat[f"{prefix}{key}"] = value
    return flat


def log_config(loggers: Loggers, config: Mapping[str, Any]) -> None:
    """The resolved config as hyper-parameters: W&B's run config and the CSV logger's hparams.yaml."""
    for logger in _as_list(loggers):
        logger.log_hyperparams(dict(config))
        logger.save()  # the CSV logger writes hparams.yaml only on save


def log_run_summary(loggers: Loggers, metrics: Mapping[str, Any]) -> None:
    """metrics.json's scalars into the W&B run summary (a training run's as much as a defense's)."""
    scalars = _scalars(metrics)
    for run in _wandb_runs(loggers):
        run.summary.update(scalars)


def _curve_plot(curve: Sequence[Mapping[str, Any]], title: str) -> Any:
    import wandb

    series = [("clean accuracy (val)", "clean_acc"), ("attack success rate (val)", "asr")]
    xs, ys, keys = [], [], []
    for label, column in series:
        points = [p for p in curve if p.get(column) is not None]
        if points:
            xs.append([p["fraction"] for p in points])
            ys.append([p[column] for p in points])
            keys.append(label)
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="fraction of channels pruned")


def log_defense_result(
    loggers: Loggers, metrics: Mapping[str, Any], curve_png: str | Path | None = None, key_prefix: str = ""
) -> None:
    """A defense's before/after test metrics, its prune curve (table, line plot, PNG) and its metrics.json summary.

    ``key_prefix`` (e.g. ``"fine_pruning/"``) keeps several defenses apart when they share one W&B run.
    """
    scalars = {
        f"{key_prefix}test/{side}/{name}": float(metrics[side][name])
        for side in ("before", "after")
        for name in ("clean_acc", "asr")
        if metrics.get(side, {}).get(name) is not None
    }
    if metrics.get("pruned_fraction") is not None:
        scalars[f"{key_prefix}defense/pruned_fraction"] = float(metrics["pruned_fraction"])
    for logger in _as_list(loggers):
        logger.log_metrics(scalars)
        logger.save()

    runs = _wandb_runs(loggers)
    if not runs:
        return
    import wandb

    media: dict[str, Any] = {}
    curve = metrics.get("prune_curve") or []
    title = f"{metrics.get('task', '')} {metrics.get('defense', '')}: prune curve".strip()
    if curve:
        media[f"{key_prefix}prune_curve/table"] = wandb.Table(
            columns=list(CURVE_COLUMNS), data=[[p.get(c) for c in CURVE_COLUMNS] for p in curve]
        )
        media[f"{key_prefix}prune_curve/plot"] = _curve_plot(curve, title)
    if curve_png is not None and Path(curve_png).is_file():
        media[f"{key_prefix}prune_curve/image"] = wandb.Image(str(curve_png), caption=title)
    for run in runs:
        if media:
            run.log(media)
        run.summary.update({f"{key_prefix}{k}": v for k, v in _scalars(metrics).items()})


def wandb_run_settings(
    overrides: Sequence[str], job_type: str, group: str | None, task: str | None = None
) -> dict[str, Any]:
    """``WandbLogger`` arguments that tell the runs of a sweep apart: name, tags, group, job type, quiet.

    The name is the job type, the experiment (or ``task``) and the other overrides: ``train-signs_badnets-seed=0-
    attack.poison_rate=0.05``; the tags are the overrides. ``settings`` silences wandb's per-run banner and
    warnings (a sweep would print them for every job); the run files are the same.
    """
    import wandb

    parsed = [str(o).lstrip("+") for o in overrides]
    experiment = next((o.split("=", 1)[1] for o in parsed if o.startswith("experiment=")), task)
    named = [o for o in parsed if not o.startswith("experiment=") and o.split("=", 1)[0] not in NAME_EXCLUDED_KEYS]
    name = "-".join(part for part in (job_type, experiment, *named) if part)
    tags = list(dict.fromkeys(o[:MAX_TAG_LENGTH] for o in parsed))
    settings: dict[str, Any] = {
        "name": name,
        "tags": tags,
        "job_type": job_type,
        "settings": wandb.Settings(silent=True),
    }
    if group:
        settings["group"] = group
    return settings
