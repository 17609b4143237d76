"""The results table over folders of runs as the pipeline lays them out (job.json, defense/<name>/metrics.json)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backdoor_lab.reporting import NoRunsError, summarize
from backdoor_lab.reporting.cli import main as cli_main
from backdoor_lab.reporting.table import format_duration, format_mean_std

from .conftest import ROOT

TASK = "signs-badnets"


def _write(path: Path, data: dict | list | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _hydra_job(job_dir: Path, overrides: list[str]) -> None:
    _write(job_dir / ".hydra" / "overrides.yaml", "".join(f"- {o}\n" for o in overrides))


def _train_run(run_dir: Path, seed: int, clean: float, asr: float, variant: str = "baseline") -> None:
    _write(
        run_dir / "metrics.json",
        {
            "kind": "train",
            "task": TASK,
            "data": "signs",
            "attack": "badnets",
            "attack_variant": variant,
            "seed": seed,
            "clean_acc": clean,
            "asr": asr,
            "config": {"seed": seed, "attack": {"poison_rate": 0.1}},
            "overrides": [f"seed={seed}"],
            "train_key": f"key{seed}",
            "checkpoint": str(run_dir / "model.safetensors"),
            "run_dir": str(run_dir),
        },
    )


def _defense(
    job_dir: Path,
    name: str,
    seed: int,
    before: tuple[float, float],
    after: tuple[float, float],
    train_run: Path,
    pruned: float = 0.0,
    prune_ratio: float | None = None,
    variant: str = "baseline",
) -> None:
    metrics = {
        "kind": "defense",
        "defense": name,
        "task": TASK,
        "data": "signs",
        "attack": "badnets",
        "attack_variant": variant,
        "seed": seed,
        "before": {"clean_acc": before[0], "asr": before[1]},
        "after": {"clean_acc": after[0], "asr": after[1]},
        "pruned_fraction": pruned,
        "pruned_channels": [],
        "layer": "backbone.conv5",
        "fine_tune": {"epochs": 5},
        "config": {"seed": seed, "prune": {"prune_ratio": prune_ratio}, "defense": {"prune": {"prune_ratio": None}}},
        "overrides": [f"seed={seed}"],
        "train_run": str(train_run),
        "checkpoint": str(train_run / "model.safetensors"),
    }
    if "prun" in name:
        metrics["prune_curve"] = [{"pruned": 0, "fraction": 0.0, "clean_acc": before[0], "asr": before[1]}]
    _write(job_dir / "defense" / name / "metrics.json", metrics)


def _job(job_dir: Path, overrides: list[str], defenses: list[str], train_run: Path, status="done", error=None) -> None:
    _hydra_job(job_dir, overrides)
    job = {"status": status, "error": error, "defenses": defenses, "overrides": overrides, "train_run": str(train_run)}
    job["wall_s"] = 600.5  # ten minutes each
    _write(job_dir / "job.json", job)


INITIAL = {0: (0.99, 1.0), 1: (0.995, 1.0), 2: (1.0, 0.97)}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun of 7 jobs: fine_tune.epochs=5 x seeds 0-2 (train.py jobs, complete); fine_tune.epochs=20 x seeds 0-2
    reusing those models (seed 0 complete, seed 1 failed after fine-tuning, seed 2 done without fine-pruning);
    fine_tune.epochs=20 seed=3, which died before writing job.json."""
    root = tmp_path / "multirun-x"
    _write(root / "multirun.yaml", "hydra: {}\n")
    defenses = ["fine_tuning", "fine_pruning"]
    five = {0: ((0.95, 0.5), (0.97, 0.1)), 1: ((0.96, 0.5), (0.98, 0.2)), 2: ((0.97, 0.5), (0.99, 0.6))}
    for seed in range(3):
        job = root / str(seed)
        overrides = ["experiment=signs_badnets", f"seed={seed}", "fine_tune.epochs=5"]
        _job(job, overrides, defenses, train_run=job)
        _train_run(job, seed, *INITIAL[seed])
        ft, fp = five[seed]
        _defense(job, "fine_tuning", seed, INITIAL[seed], ft, job)
        _defense(job, "fine_pruning", seed, INITIAL[seed], fp, job, pruned=0.9)
    twenty = {3: ((0.90, 0.4), (0.92, 0.05)), 4: ((0.91, 0.3), None), 5: ((0.92, 0.2), None)}
    for num, (ft, fp) in twenty.items():
        seed, job, train_run = num - 3, root / str(num), root / str(num - 3)
        overrides = ["experiment=signs_badnets", f"seed={seed}", "fine_tune.epochs=20"]
        failed = num == 4
        error = "Traceback ...\nRuntimeError: fine-pruning ran out of memory" if failed else None
        _job(job, overrides, defenses, train_run, status="failed" if failed else "done", error=error)
        _defense(job, "fine_tuning", seed, INITIAL[seed], ft, train_run)
        if fp is not None:
            _defense(job, "fine_pruning", seed, INITIAL[seed], fp, train_run, pruned=0.8)
    _hydra_job(root / "6", ["experiment=signs_badnets", "seed=3", "fine_tune.epochs=20"])
    return root


def test_format_mean_std() -> None:
    assert format_mean_std([0.97, 0.98, 0.99]) == "98.00 ± 1.00 (3)"
    assert format_mean_std([0.5, None]) == "50.00 (1)"  # one run: no std
    assert format_mean_std([None]) == "–"


def test_summary_table_mean_std_over_seeds_with_failed_and_missing_jobs(sweep: Path) -> None:
    path = summarize(sweep)
    assert path == sweep.resolve() / "summary.md"
    text = path.read_text()
    sections = {block.split("\n", 1)[0]: block for block in text.split("\n## ")[1:]}
    five = sections["signs-badnets · baseline · fine_tune.epochs=5"]
    assert "| Initial | 99.50 ± 0.50 (3) | 99.00 ± 1.73 (3) |" in five
    assert "| Fine-tuning | 96.00 ± 1.00 (3) | 50.00 ± 0.00 (3) |" in five
    assert "| Fine-pruning | 98.00 ± 1.00 (3) | 30.00 ± 26.46 (3) |" in five
    # The reused models' Initial row comes from the train runs the jobs name; the failed job's finished
    # fine-tuning counts; fine-pruning has only the one job that finished it.
    twenty = sections["signs-badnets · baseline · fine_tune.epochs=20"]
    assert "| Initial | 99.50 ± 0.50 (3) | 99.00 ± 1.73 (3) |" in twenty
    assert "| Fine-tuning | 91.00 ± 1.00 (3) | 30.00 ± 10.00 (3) |" in twenty
    assert "| Fine-pruning | 92.00 (1) | 5.00 (1) |" in twenty
    assert twenty.index("Initial") < twenty.index("Fine-tuning") < twenty.index("Fine-pruning")

    failed = sections["Failed or missing jobs"].strip().splitlines()[2:]
    assert failed == [
        "- `4` (experiment=signs_badnets seed=1 fine_tune.epochs=20): failed; missing fine_pruning; "
        "error: RuntimeError: fine-pruning ran out of memory",
        "- `5` (experiment=signs_badnets seed=2 fine_tune.epochs=20): done; missing fine_pruning",
        "- `6` (experiment=signs_badnets seed=3 fine_tune.epochs=20): missing; error: no job.json: "
        "the job failed before it started, or is still starting",
    ]
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (sweep / "prune_ratio.png").exists()  # no prune ratio varies here
    # Six jobs recorded their wall time (the seventh never wrote job.json).
    assert "Wall time: 1 h 00 min, the sum of 6 jobs' own times (job.json)." in text


@pytest.mark.parametrize(("seconds", "text"), [(7, "7 s"), (125, "2 min 05 s"), (3725, "1 h 02 min")])
def test_durations_read_as_hours_minutes_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_summary_csv_one_row_per_defense_result(sweep: Path) -> None:
    summarize(sweep)
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10  # 6 + 2 + 1 + 1 finished defenses; the job without job.json has none
    assert list(rows[0]) == [
        "task",
        "attack_variant",
        "seed",
        "defense",
        "fine_tune.epochs",
        "before_clean_acc",
        "before_asr",
        "after_clean_acc",
        "after_asr",
        "pruned_fraction",
        "prune_ratio",
        "wall_s",
        "job_dir",
        "metrics",
        "train_run",
        "checkpoint",
    ]
    # Sorted by task, variant, setting (numerically: 5 before 20), defense, seed.
    order = [(r["fine_tune.epochs"], r["defense"], r["seed"]) for r in rows]
    assert order[:6] == [("5", "fine_tuning", s) for s in "012"] + [("5", "fine_pruning", s) for s in "012"]
    assert order[6:] == [("20", "fine_tuning", s) for s in "012"] + [("20", "fine_pruning", "0")]
    reused = rows[9]
    assert reused["after_clean_acc"] == "0.92" and reused["after_asr"] == "0.05" and reused["pruned_fraction"] == "0.8"
    assert reused["before_clean_acc"] == "0.99" and reused["prune_ratio"] == ""  # the stop rule
    assert reused["job_dir"] == "3" and reused["metrics"] == "3/defense/fine_pruning/metrics.json"
    assert reused["train_run"] == "0" and reused["checkpoint"] == "0/model.safetensors"


def test_summary_is_rewritten_as_jobs_finish(sweep: Path) -> None:
    summarize(sweep)
    job = sweep / "6"
    _job(job, ["experiment=signs_badnets", "seed=3", "fine_tune.epochs=20"], ["fine_tuning"], train_run=job)
    _train_run(job, 3, 0.5, 0.5)
    _defense(job, "fine_tuning", 3, (0.5, 0.5), (0.94, 0.6), job)
    text = summarize(sweep).read_text()
    assert "| Fine-tuning | 91.75 ± 1.71 (4) | 37.50 ± 17.08 (4) |" in text
    assert "`6`" not in text


def test_prune_ratio_sweep_groups_the_table_and_draws_the_ratio_plot(tmp_path: Path) -> None:
    train = tmp_path / "train" / "r0"
    _train_run(train, 0, 0.99, 1.0, variant="pruning_aware")
    root = tmp_path / "multirun-ratio"
    ratios = {0.2: (0.97, 0.9), 0.5: (0.95, 0.5), 0.8: (0.90, 0.1)}
    for num, (ratio, after) in enumerate(ratios.items()):
        job = root / str(num)
        overrides = [f"prune.prune_ratio={ratio}"]
        _job(job, overrides, ["none", "pruning"], train)
        _defense(job, "none", 0, (0.99, 1.0), (0.99, 1.0), train, variant="pruning_aware")
        _defense(job, "pruning", 0, (0.99, 1.0), after, train, pruned=ratio, prune_ratio=ratio, variant="pruning_aware")
    text = summarize(root).read_text()
    assert "## signs-badnets · pruning_aware · prune.prune_ratio=0.5" in text
    assert "| Initial | 99.00 (1) | 100.00 (1) |" in text
    assert "| Pruning | 95.00 (1) | 50.00 (1) |" in text
    assert "| No" not in text and text.count("| Initial |") == 3  # the `none` defense is the Initial row
    with open(root / "summary.csv") as fh:
        ratio_column = [r["prune_ratio"] for r in csv.DictReader(fh) if r["defense"] == "pruning"]
    assert ratio_column == ["0.2", "0.5", "0.8"]  # read from the recorded config
    assert (root / "prune_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_without_runs_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(NoRunsError, match="no runs under"):
        summarize(tmp_path / "empty")


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "backdoor_lab.reporting", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_from_any_working_dir(sweep: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = _run_cli(os.path.relpath(sweep, workdir), cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "| Fine-pruning | 98.00 ± 1.00 (3) | 30.00 ± 26.46 (3) |" in done.stdout
    assert "RuntimeError: fine-pruning ran out of memory" in done.stdout
    assert done.stdout.startswith((sweep / "summary.md").read_text())
    assert (sweep / "summary.csv").is_file() and not list(workdir.iterdir())


def test_cli_refuses_a_folder_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main([str(tmp_path)])
    assert exited.value.code == 2 and "no runs under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_main([str(tmp_path / "absent")])
    assert exited.value.code == 2 and "is not a folder" in capsys.readouterr().err


APP = """
import json, os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.seed == cfg.fail_seed:
        raise ValueError(f"seed {cfg.seed} is out of range")
    overrides = list(HydraConfig.get().overrides.task)
    job = {"status": "done", "error": None, "defenses": ["none"], "overrides": overrides, "train_run": str(out)}
    (out / "job.json").write_text(json.dumps(job))
    metrics = {"kind": "defense", "defense": "none", "task": "t-a", "attack_variant": "baseline", "seed": cfg.seed,
               "before": {"clean_acc": 0.9, "asr": 0.8}, "after": {"clean_acc": 0.9, "asr": 0.8}}
    (out / "defense" / "none").mkdir(parents=True)
    (out / "defense" / "none" / "metrics.json").write_text(json.dumps(metrics))


main()
"""
APP_CONFIG = """
seed: 0
fail_seed: -1
hydra:
  sweep:
    dir: sweep
    subdir: ${hydra.job.num}
  callbacks:
    sweep_summary:
      _target_: backdoor_lab.reporting.SweepSummary
"""


@pytest.mark.parametrize("fail_seed", [pytest.param(-1, marks=pytest.mark.slow), 1])
def test_sweep_summary_callback_keeps_the_summary_of_a_sweep_with_a_failed_job(tmp_path: Path, fail_seed: int) -> None:
    """BasicLauncher runs every job even when one raises; on_multirun_end is then skipped (Hydra re-raises the
    failure), so the summary written at each on_job_end is the one that survives."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "app.yaml").write_text(APP_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "app.py", "-m", "seed=0,1,2", f"fail_seed={fail_seed}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    announced = done.stdout.count("Sweep summary: ")
    text = (tmp_path / "sweep" / "summary.md").read_text()
    if fail_seed < 0:
        assert done.returncode == 0, done.stderr
        assert announced == 4  # three on_job_end and on_multirun_end
        assert "| Initial | 90.00 ± 0.00 (3) | 80.00 ± 0.00 (3) |" in text
        assert "## Failed or missing jobs\n\nNone." in text
    else:
        assert done.returncode == 1 and "seed 1 is out of range" in done.stderr
        assert announced == 3  # the jobs after the failure ran; on_multirun_end did not
        assert "| Initial | 90.00 ± 0.00 (2) | 80.00 ± 0.00 (2) |" in text
        assert "- `1` (seed=1 fail_seed=1): missing; error: ValueError: seed 1 is out of range" in text


def test_an_unreadable_result_is_listed_and_the_rest_kept(sweep: Path) -> None:
    (sweep / "1" / "defense" / "fine_pruning" / "metrics.json").write_text('{"kind": "defense", "bef')
    text = summarize(sweep).read_text()
    assert "| Fine-pruning | 98.00 ± 1.41 (2) | 35.00 ± 35.36 (2) |" in text  # seeds 0 and 2
    assert "| Fine-tuning | 96.00 ± 1.00 (3) | 50.00 ± 0.00 (3) |" in text
    assert "- `1` (experiment=signs_badnets seed=1 fine_tune.epochs=5): done; missing fine_pruning; error: " in text
    assert "unreadable defense/fine_pruning/metrics.json: Unterminated string" in text


def test_a_job_that_failed_after_recording_its_results_is_listed(sweep: Path) -> None:
    """Hydra's JobReturn (via the callback) knows of a failure after job.json said done: the job is listed."""
    text = summarize(sweep, job_errors={sweep / "0": "KeyError: 'clean_acc'"}).read_text()
    assert "- `0` (experiment=signs_badnets seed=0 fine_tune.epochs=5): done; error: KeyError: 'clean_acc'" in text
    assert "| Fine-pruning | 98.00 ± 1.00 (3) | 30.00 ± 26.46 (3) |" in text  # its results still count


def test_each_defense_time_is_tabled_and_a_new_defense_is_labelled(tmp_path: Path) -> None:
    """Defense times come from each metrics.json's ``wall_s`` (mean over seeds); runs of older code show "–"."""
    root = tmp_path / "runs"
    for seed, wall in ((0, 30.0), (1, 90.0)):
        job = root / str(seed)
        _train_run(job, seed, 0.99, 1.0)
        _job(job, [f"seed={seed}"], ["anp", "fine_tuning"], job)
        _defense(job, "anp", seed, (0.99, 1.0), (0.97, 0.05), job)
        metrics = json.loads((job / "defense" / "anp" / "metrics.json").read_text())
        _write(job / "defense" / "anp" / "metrics.json", {**metrics, "wall_s": wall})
        _defense(job, "fine_tuning", seed, (0.99, 1.0), (0.98, 0.9), job)
    text = summarize(root).read_text()
    assert "| ANP | 97.00 ± 0.00 (2) | 5.00 ± 0.00 (2) | 1 min 00 s |" in text
    assert "| Fine-tuning | 98.00 ± 0.00 (2) | 90.00 ± 0.00 (2) | – |" in text
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert sorted(r["wall_s"] for r in rows if r["defense"] == "anp") == ["30.0", "90.0"]


def test_exported_records_summarize_to_the_same_table_and_hold_no_weights(sweep: Path, tmp_path: Path) -> None:
    """bench/export_records.py: what a commit keeps of a sweep gives the sweep's own table, from the copies alone."""
    import importlib.util

    from backdoor_lab.reporting.side_by_side import defense_table, read_summary_csv

    spec = importlib.util.spec_from_file_location(
        "export_records", Path(__file__).parents[1] / "bench/export_records.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summarize(sweep)
    for job in sweep.glob("*/"):
        (job / "model.safetensors").write_bytes(b"weights")  # must not travel
    out = tmp_path / "records"
    written = module.export(sweep, out)
    assert {p.name for p in written} >= {"signs-badnets-baseline-seed0", "signs-badnets-baseline-seed2"}
    assert not list(out.rglob("*.safetensors"))
    exported, original = read_summary_csv(out / "summary.csv"), read_summary_csv(sweep / "summary.csv")
    done = [r for r in original if (sweep / r["job_dir"] / "job.json").is_file()]
    status = {r["job_dir"]: json.loads((sweep / r["job_dir"] / "job.json").read_text())["status"] for r in done}
    kept = [r for r in done if status[r["job_dir"]] == "done"]
    assert defense_table(exported) == defense_table(kept)
    with pytest.raises(FileExistsError, match="never overwritten"):
        module.export(sweep, out)


def test_the_end_to_end_bench_adds_its_row_to_the_end_of_its_table(tmp_path: Path) -> None:
    """bench/end_to_end.py's row lands under the table's last row, not after the sections that follow it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("end_to_end", Path(__file__).parents[1] / "bench/end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "docs/benchmarks.md"
    module.append_row(path, "| first |")
    module.append_row(path, "| second |")
    path.write_text(path.read_text() + "\n## A later section\n\n| other | table |\n")
    module.append_row(path, "| third |")
    lines = path.read_text().splitlines()
    header = lines.index(module.HEADER)
    assert lines[header + 2 : header + 6] == ["| first |", "| second |", "| third |", ""]
    assert lines[-1] == "| other | table |"
