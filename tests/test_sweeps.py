"""Hydra multirun sweeps through the real scripts: pairing, failures, the sweep configs, launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from .conftest import CONF, ROOT


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> args`` from ``cwd`` as a user would run it (outputs land in cwd/outputs)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def multirun_dir(cwd: Path, task: str) -> Path:
    (found,) = (cwd / "outputs" / task).glob("multirun-*")
    return found


def jobs_of(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def overrides(job: Path) -> dict[str, str]:
    lines = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    return dict(line.lstrip("- ").strip("'\"").split("=", 1) for line in lines)


def test_defend_jobs_of_a_sweep_pair_with_their_own_training_runs(tmp_path: Path) -> None:
    """The bug this replaces: every defend job took the newest checkpoint, whatever its seed."""
    trained = run_script("train.py", "-m", "debug=tiny", "seed=0,1", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    defended = run_script("defend.py", "-m", "debug=tiny", "seed=0,1", "defenses=[none]", cwd=tmp_path)
    assert defended.returncode == 0, defended.stderr[-3000:]
    train_runs = {overrides(job)["seed"]: str(job) for job in jobs_of(multirun_dir(tmp_path, "train"))}
    for job in jobs_of(multirun_dir(tmp_path, "defend")):
        result = json.loads((job / "defense" / "none" / "metrics.json").read_text())
        seed = overrides(job)["seed"]
        assert Path(result["train_run"]) == Path(train_runs[seed]) and str(result["seed"]) == seed
    summary = (multirun_dir(tmp_path, "defend") / "summary.md").read_text()
    assert "2 jobs, 2 defense results, 0 failed" in summary


def test_a_failing_job_keeps_the_others_and_is_listed_in_the_summary(tmp_path: Path) -> None:
    assert run_script("train.py", "debug=tiny", cwd=tmp_path).returncode == 0
    sweep = run_script("defend.py", "-m", "debug=tiny", "defenses=[pruning]", "prune.prune_ratio=0.5,1.5", cwd=tmp_path)
    assert sweep.returncode != 0  # Hydra re-raises the first failure after running every job
    folder = multirun_dir(tmp_path, "defend")
    good, bad = jobs_of(folder)
    assert json.loads((good / "defense" / "pruning" / "metrics.json").read_text())["pruned_fraction"] == 0.5
    assert json.loads((bad / "job.json").read_text())["status"] == "failed" if (bad / "job.json").exists() else True
    summary = (folder / "summary.md").read_text()
    failed_section = summary.split("## Failed or missing jobs", 1)[1]
    assert "prune.prune_ratio=1.5" in failed_section and "prune_ratio" in failed_section
    assert "prune.prune_ratio=0.5" not in failed_section
    assert "| Pruning |" in summary


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config, overrides=overrides, return_hydra_config=True)


def test_paper_and_ablation_sweeps_are_one_word(tmp_path: Path) -> None:
    paper = _compose("train", ["sweep=paper"])
    params = paper.hydra.sweeper.params
    assert params.seed == "0,1,2" and len(params.experiment.split(",")) == 6
    assert all((CONF / "experiment" / f"{e}.yaml").is_file() for e in params.experiment.split(","))
    assert list(paper.defenses) == ["none", "fine_tuning", "pruning", "fine_pruning"]
    ablation = _compose("train", ["sweep=ablation"])
    assert ablation.hydra.sweeper.params["fine_tune.epochs"] == "5,20,100"
    assert list(ablation.defenses) == ["fine_tuning", "fine_pruning"]
    defenses = _compose("train", ["sweep=defenses"])
    assert defenses.hydra.sweeper.params == params  # the same checkpoints: tasks, attacks and seeds as sweep=paper
    successors = ["none", "fine_tuning", "pruning", "fine_pruning", "anp", "nad", "clp"]
    assert list(defenses.defenses) == successors
    assert sorted(successors) == sorted(p.stem for p in (CONF / "defense").glob("*.yaml"))  # every plug-in


def test_launcher_and_sweeper_configs_compose() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    joblib = _compose("train", ["hydra/launcher=joblib"])
    assert "JoblibLauncher" in joblib.hydra.launcher._target_
    slurm = _compose("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])
    assert "SlurmLauncher" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.partition == "gpu"
    search = _compose("train", ["sweep=attack_search"])
    assert "OptunaSweeper" in search.hydra.sweeper._target_ and search.hydra.sweeper.direction == "maximize"
    assert search.objective.clean_floor == 0.9 and list(search.defenses) == ["fine_pruning"]


@pytest.mark.slow
def test_attack_search_runs_trials_and_returns_the_objective(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    done = run_script("train.py", "-m", "sweep=attack_search", "debug=tiny", "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (best,) = (tmp_path / "outputs" / "train").glob("multirun-*/optimization_results.yaml")
    assert "best_value" in best.read_text()
