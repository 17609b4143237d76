"""The results table of a folder of runs: reading the runs, and the text of summary.csv and summary.md.

Reads the files the pipeline leaves (never a checkpoint): each job folder's ``job.json`` (status, expected
defenses, overrides, train run), its ``defense/<name>/metrics.json`` and, for the "Initial" row, the training
run's ``metrics.json``. The table follows Liu et al. (RAID 2018), Table 1: per task and attack, clean accuracy
and ASR of the backdoored model (Initial) and after every defense (fine-tuning, pruning, fine-pruning and its
successors), here as mean ± std over seeds with the number of runs, with each defense's own time. Jobs that
failed, are unfinished or lack an expected defense are
listed, never dropped, and everything a finished defense measured is kept even when its job failed later.
The figures are drawn in ``plots.py``, and ``summary.py`` writes all the files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from backdoor_lab.nested import flatten

JOB_FILE = "job.json"
DEFENSE_DIR = "defense"
METRICS_FILE = "metrics.json"
INITIAL = "none"  # the defense that only measures: its result is the table's "Initial" row
DEFENSE_LABELS = {
    INITIAL: "Initial",
    "fine_tuning": "Fine-tuning",
    "pruning": "Pruning",
    "fine_pruning": "Fine-pruning",
    "anp": "ANP",
    "nad": "NAD",
    "clp": "CLP",
}
# Overrides that never split the table: the seed is what it averages over; the others name inputs, not settings.
NOT_GROUPING = ("seed", "defenses", "ckpt_path", "experiment", "data", "attack")
PATH_COLUMNS = ("job_dir", "metrics", "train_run", "checkpoint")
CSV_METRICS = (
    "before_clean_acc",
    "before_asr",
    "after_clean_acc",
    "after_asr",
    "pruned_fraction",
    "prune_ratio",
    "wall_s",
)


@dataclass(frozen=True)
class DefenseResult:
    """One defense applied to one trained model: a row of summary.csv."""

    job_dir: Path
    defense: str
    task: str
    attack_variant: str
    seed: int | None
    overrides: Mapping[str, str]
    before: Mapping[str, float | None]
    after: Mapping[str, float | None]
    pruned_fraction: float | None
    prune_ratio: float | None
    prunes: bool  # the defense has a prune curve: it belongs on prune_ratio.png
    metrics_path: Path
    train_run: str | None
    checkpoint: str | None
    wall_s: float | None = None  # the defense's own time (metrics.json), without the before/after test passes


@dataclass(frozen=True)
class JobProblem:
    """A job that failed, has not finished, or lacks a defense it was asked for."""

    job_dir: Path
    overrides: Sequence[str]
    status: str
    error: str | None
    missing_defenses: Sequence[str]


@dataclass
class Runs:
    """Everything a folder of runs holds: one Initial measurement per job, the defense results, the problems."""

    root: Path
    initial: list[DefenseResult] = field(default_factory=list)
    results: list[DefenseResult] = field(default_factory=list)
    problems: list[JobProblem] = field(default_factory=list)
    jobs: int = 0
    wall_s: float = 0.0  # the jobs' own wall times (job.json), added up
    timed_jobs: int = 0


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["seed=0", "+x.y=1", "~z"]`` -> ``{"seed": "0", "x.y": "1", "z": "<deleted>"}``."""
    parsed: dict[str, str] = {}
    for item in overrides:
        item = str(item)
        if item.startswith("~"):
            parsed[item[1:].split("=", 1)[0]] = "<deleted>"
        elif "=" in item:
            key, value = item.split("=", 1)
            parsed[key.lstrip("+")] = value
    return parsed


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def _hydra_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(item) for item in yaml.safe_load(path.read_text()) or []]


def _prune_ratio(metrics: Mapping[str, Any], overrides: Mapping[str, str]) -> float | None:
    """The prune ratio the defense was asked for (None: the stop rule), from its recorded config.

    The shortest config key wins (``prune.prune_ratio`` over ``defense.prune.prune_ratio``, the same value);
    an override is the fallback for a metrics.json that does not record its config.
    """
    config = flatten(metrics.get("config") or {})
    keys = sorted((k for k in config if k.split(".")[-1] == "prune_ratio"), key=lambda k: (k.count("."), k))
    if keys:
        value = config[keys[0]]
    else:
        value = next((v for k, v in overrides.items() if k.split(".")[-1] == "prune_ratio"), None)
    if value in (None, "null", "None"):
        return None
    return float(value)


def _rates(node: Any) -> dict[str, float | None]:
    node = node if isinstance(node, Mapping) else {}
    return {"clean_acc": node.get("clean_acc"), "asr": node.get("asr")}


def _defense_result(job_dir: Path, path: Path, overrides: Mapping[str, str], train_run: str | None) -> DefenseResult:
    metrics = _read_json(path)
    return DefenseResult(
        job_dir=job_dir,
        defense=str(metrics.get("defense") or path.parent.name),
        task=str(metrics.get("task", "?")),
        attack_variant=str(metrics.get("attack_variant", "baseline")),
        seed=metrics.get("seed"),
        overrides=overrides,
        before=_rates(metrics.get("before")),
        after=_rates(metrics.get("after")),
        pruned_fraction=metrics.get("pruned_fraction"),
        prune_ratio=_prune_ratio(metrics, overrides),
        prunes="prune_curve" in metrics,
        metrics_path=path,
        train_run=metrics.get("train_run") or train_run,
        checkpoint=metrics.get("checkpoint"),
        wall_s=metrics.get("wall_s"),
    )


def _train_metrics(job_dir: Path, train_run: str | None, root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The training run's metrics.json: the job's own folder, or the reused run it names."""
    candidates = [job_dir / METRICS_FILE]
    if train_run:
        candidates += [Path(train_run) / METRICS_FILE, root / train_run / METRICS_FILE]
    for path in candidates:
        if path.is_file():
            metrics = _read_json(path)
            if metrics.get("kind") == "train":
                return path, metrics
    return None


def _initial(
    job_dir: Path, results: list[DefenseResult], overrides: Mapping[str, str], train_run: str | None, root: Path
) -> DefenseResult | None:
    """The model before any defense, once per job: the ``none`` defense, else the train run, else a ``before``."""
    for result in results:
        if result.defense == INITIAL:
            return result
    found = _train_metrics(job_dir, train_run, root)
    if found is not None:
        path, metrics = found
        rates = _rates(metrics)
        return DefenseResult(
            job_dir=job_dir,
            defense=INITIAL,
            task=str(metrics.get("task", "?")),
            attack_variant=str(metrics.get("attack_variant", "baseline")),
            seed=metrics.get("seed"),
            overrides=overrides,
            before=rates,
            after=rates,
            pruned_fraction=0.0,
            prune_ratio=None,
            prunes=False,
            metrics_path=path,
            train_run=str(metrics.get("run_dir") or path.parent),
            checkpoint=metrics.get("checkpoint"),
        )
    if results:
        first = results[0]
        return replace(first, defense=INITIAL, after=first.before, pruned_fraction=0.0, prune_ratio=None, prunes=False)
    return None


def _job_dirs(root: Path) -> list[Path]:
    """Every job folder under ``root``: it holds a job.json, or it is a Hydra job folder (``.hydra/overrides.yaml``)."""
    dirs = {p.parent for p in root.rglob(JOB_FILE)}
    dirs |= {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(dirs, key=lambda d: [int(part) if part.isdigit() else part for part in d.relative_to(root).parts])


# What a half-copied, hand-edited or foreign file raises when read: reported against its job, never fatal.
UNREADABLE = (OSError, ValueError, TypeError, AttributeError, KeyError)


def collect_runs(folder: str | Path, job_errors: Mapping[Path, str] | None = None) -> Runs:
    """Read every job under ``folder``. ``job_errors``: errors known from elsewhere (a Hydra callback's
    ``JobReturn``) for jobs that died before writing their job.json."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    known_errors = {Path(k).resolve(): v for k, v in (job_errors or {}).items()}
    runs = Runs(root=root)
    for job_dir in _job_dirs(root):
        runs.jobs += 1
        job_path = job_dir / JOB_FILE
        if not job_path.is_file():
            error = known_errors.get(job_dir) or (
                "no job.json: a run from before job.json was recorded"
                if (job_dir / METRICS_FILE).is_file()
                else "no job.json: the job failed before it started, or is still starting"
            )
            runs.problems.append(JobProblem(job_dir, _hydra_overrides(job_dir), "missing", error, []))
            continue
        try:
            job = _read_json(job_path)
            override_list = [str(o) for o in job.get("overrides", _hydra_overrides(job_dir))]
            expected = [str(d) for d in job.get("defenses", [])]
        except UNREADABLE as err:
            runs.problems.append(JobProblem(job_dir, _hydra_overrides(job_dir), "unreadable", f"{job_path}: {err}", []))
            continue
        if isinstance(job.get("wall_s"), int | float):
            runs.wall_s += float(job["wall_s"])
            runs.timed_jobs += 1
        overrides = parse_overrides(override_list)
        train_run = job.get("train_run")
        results, read_errors = [], []
        for path in sorted((job_dir / DEFENSE_DIR).glob(f"*/{METRICS_FILE}")):
            try:
                results.append(_defense_result(job_dir, path, overrides, train_run))
            except UNREADABLE as err:
                read_errors.append(f"unreadable {path.relative_to(job_dir)}: {err}")
        runs.results.extend(results)
        try:
            initial = _initial(job_dir, results, overrides, train_run, root)
        except UNREADABLE as err:
            initial, read_errors = None, [*read_errors, f"unreadable train run metrics: {err}"]
        if initial is not None:
            runs.initial.append(initial)
        finished = {r.defense for r in results}
        missing = [d for d in expected if d not in finished]
        status = str(job.get("status", "unknown"))
        if status != "done" or missing or read_errors or job_dir in known_errors:  # e.g. failed after job.json
            error = job.get("error") or known_errors.get(job_dir)
            if status == "running" and not error:
                error = "job.json says running: still running, or killed before it could record a failure"
            error = "; ".join(str(e) for e in (*read_errors, error) if e) or None
            runs.problems.append(JobProblem(job_dir, override_list, status, error, missing))
    return runs


def varying_keys(runs: Runs) -> list[str]:
    """Override keys that take more than one value within some task x attack variant (the seed aside)."""
    rows = runs.initial + runs.results
    keys = sorted({k for r in rows for k in r.overrides if k not in NOT_GROUPING and not k.startswith("hydra.")})
    by_cell: dict[tuple[str, str], list[DefenseResult]] = defaultdict(list)
    for r in rows:
        by_cell[(r.task, r.attack_variant)].append(r)
    return [k for k in keys if any(len({r.overrides.get(k) for r in cell}) > 1 for cell in by_cell.values())]


def format_mean_std(values: Sequence[float | None]) -> str:
    """``"98.50 ± 0.50 (3)"``: percent, sample std over runs (ddof 1), n; one run has no std: ``"98.50 (1)"``."""
    present = [100.0 * v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return "–"
    mean = statistics.fmean(present)
    if len(present) == 1:
        return f"{mean:.2f} ({len(present)})"
    return f"{mean:.2f} ± {statistics.stdev(present):.2f} ({len(present)})"


def defense_order(name: str) -> tuple[int, str]:
    order = list(DEFENSE_LABELS)
    return (order.index(name), name) if name in order else (len(order), name)


def defense_label(name: str) -> str:
    return DEFENSE_LABELS.get(name, name)


def _group_key(result: DefenseResult, keys: Sequence[str]) -> tuple[str, str, tuple[str, ...]]:
    return result.task, result.attack_variant, tuple(result.overrides.get(k, "default") for k in keys)


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


@dataclass
class ResultGroup:
    task: str
    attack_variant: str
    settings: tuple[str, ...]
    rows: dict[str, list[DefenseResult]]  # defense -> one result per job


def result_groups(runs: Runs, keys: Sequence[str]) -> list[ResultGroup]:
    grouped: dict[tuple[str, str, tuple[str, ...]], dict[str, list[DefenseResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in runs.initial:
        grouped[_group_key(r, keys)][INITIAL].append(r)
    for r in runs.results:
        if r.defense != INITIAL:  # already counted once per job as the Initial row
            grouped[_group_key(r, keys)][r.defense].append(r)
    ordered = sorted(grouped, key=lambda g: (g[0], g[1], [_sort_key(v) for v in g[2]]))
    return [
        ResultGroup(*key, dict(sorted(grouped[key].items(), key=lambda kv: defense_order(kv[0])))) for key in ordered
    ]


def _row_order(r: DefenseResult, keys: Sequence[str]) -> tuple:
    settings = [_sort_key(r.overrides.get(k, "default")) for k in keys]
    seed = r.seed if r.seed is not None else -1
    return r.task, r.attack_variant, settings, defense_order(r.defense), seed, str(r.job_dir)


def _relative(path: Path | str | None, root: Path) -> str:
    if path is None:
        return ""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def summary_csv(runs: Runs, keys: Sequence[str]) -> str:
    """One row per defense result, in table order; rates as fractions, paths relative to the folder."""
    columns = ["task", "attack_variant", "seed", "defense", *keys, *CSV_METRICS, *PATH_COLUMNS]
    rows = sorted(runs.results, key=lambda r: _row_order(r, keys))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        values = {
            "before_clean_acc": r.before["clean_acc"],
            "before_asr": r.before["asr"],
            "after_clean_acc": r.after["clean_acc"],
            "after_asr": r.after["asr"],
            "pruned_fraction": r.pruned_fraction,
            "prune_ratio": r.prune_ratio,
            "wall_s": r.wall_s,
        }
        writer.writerow(
            {
                "task": r.task,
                "attack_variant": r.attack_variant,
                "seed": r.seed,
                "defense": r.defense,
                **{k: r.overrides.get(k, "default") for k in keys},
                **{k: "" if v is None else v for k, v in values.items()},
                "job_dir": _relative(r.job_dir, runs.root),
                "metrics": _relative(r.metrics_path, runs.root),
                "train_run": _relative(r.train_run, runs.root),
                "checkpoint": _relative(r.checkpoint, runs.root),
            }
        )
    return buffer.getvalue()


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1 h 02 min"``; ``125`` -> ``"2 min 05 s"``; ``7`` -> ``"7 s"``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def summary_markdown(runs: Runs, keys: Sequence[str]) -> str:
    lines = [
        f"# Results: {runs.root}",
        "",
        f"{runs.jobs} jobs, {len(runs.results)} defense results, {len(runs.problems)} failed or incomplete jobs. "
        "Test split; percent, mean ± sample std over seeds (number of runs).",
    ]
    if runs.timed_jobs:
        total = format_duration(runs.wall_s)
        lines += ["", f"Wall time: {total}, the sum of {runs.timed_jobs} jobs' own times (job.json)."]
    for group in result_groups(runs, keys):
        title = f"{group.task} · {group.attack_variant}"
        if keys:
            title += " · " + ", ".join(f"{k}={v}" for k, v in zip(keys, group.settings, strict=True))
        header = "| defense | clean accuracy (%) | ASR (%) | defense time |"
        lines += ["", f"## {title}", "", header, "|---|---|---|---|"]
        for defense, results in group.rows.items():
            clean = format_mean_std([r.after["clean_acc"] for r in results])
            asr = format_mean_std([r.after["asr"] for r in results])
            lines.append(
                f"| {defense_label(defense)} | {clean} | {asr} | {_mean_duration([r.wall_s for r in results])} |"
            )
    lines += ["", "## Failed or missing jobs", ""]
    if not runs.problems:
        lines.append("None.")
    for p in runs.problems:
        overrides = " ".join(p.overrides) or "(no overrides)"
        text = f"- `{_relative(p.job_dir, runs.root) or '.'}` ({overrides}): {p.status}"
        if p.missing_defenses:
            text += "; missing " + ", ".join(p.missing_defenses)
        if p.error:
            text += f"; error: {p.error.strip().splitlines()[-1] if p.error.strip() else p.error}"
        lines.append(text)
    return "\n".join(lines) + "\n"


def _mean_duration(seconds: Iterable[float | None]) -> str:
    """The mean of the recorded times, or "–" where none was recorded (runs of older code, the Initial row)."""
    present = [float(s) for s in seconds if isinstance(s, int | float)]
    return format_duration(statistics.fmean(present)) if present else "–"
