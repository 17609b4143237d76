"""What a defense run's W&B dashboard holds, read back from the offline run's own files (nothing is uploaded)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import wandb
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from backdoor_lab.reporting import (
    CURVE_COLUMNS,
    log_config,
    log_defense_result,
    plot_prune_curve,
    wandb_run_settings,
)
from backdoor_lab.reporting.wandb_offline import read_offline_run

OVERRIDES = ["experiment=signs_badnets", "seed=0", "attack.poison_rate=0.05", "defenses=[none,fine_pruning]"]
CURVE = [
    {"pruned": 0, "fraction": 0.0, "clean_acc": 0.99, "asr": 1.0},
    {"pruned": 128, "fraction": 0.5, "clean_acc": 0.97, "asr": 0.9},
    {"pruned": 240, "fraction": 0.9375, "clean_acc": 0.93, "asr": None},  # a point measured without triggered data
]
CONFIG = {
    "seed": 0,
    "attack": {"name": "badnets", "poison_rate": 0.05, "target": "speed_limit_30"},
    "prune": {"prune_ratio": None, "max_accuracy_drop": 0.04},
    "fine_tune": {"epochs": 20, "optimizer": {"lr": 0.02}},
    "train_run": "/runs/train/signs-badnets/0",
    "train_wandb_id": "abc123",
}
METRICS = {
    "kind": "defense",
    "defense": "fine_pruning",
    "task": "signs-badnets",
    "attack_variant": "baseline",
    "seed": 0,
    "before": {"clean_acc": 0.993, "asr": 0.995},
    "after": {"clean_acc": 0.992, "asr": 0.3},
    "pruned_fraction": 0.921875,
    "pruned_channels": [3, 5, 8],
    "fine_tune": {"epochs": 20},
    "prune_curve": CURVE,
    "config": CONFIG,
    "train_run": "/runs/train/signs-badnets/0",
}


def test_run_settings_name_and_tag_the_run_by_its_overrides() -> None:
    settings = wandb_run_settings(["+experiment=signs_badnets", "seed=0", "ckpt_path=/a/b.ckpt"], "train", "sweep-1")
    assert settings["name"] == "train-signs_badnets-seed=0"
    assert settings["tags"] == ["experiment=signs_badnets", "seed=0", "ckpt_path=/a/b.ckpt"]
    assert settings["group"] == "sweep-1" and settings["job_type"] == "train"
    long_tag = wandb_run_settings(["x=" + "9" * 100], "train", None)["tags"][0]
    assert len(long_tag) == 64  # W&B refuses longer tags
    assert wandb_run_settings([], "defend", None, task="signs-badnets")["name"] == "defend-signs-badnets"


@pytest.fixture
def finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> tuple[Path, str]:
    """One defense run logged through a CSVLogger and an offline WandbLogger, then finished; returns its folder
    and everything it printed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    # The run's settings alone must keep it quiet: undo the process-wide silence that conftest's WANDB_SILENT set.
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    wandb.teardown()  # the next run sets wandb up afresh, from this environment
    monkeypatch.chdir(tmp_path)
    png = plot_prune_curve(tmp_path / "prune_curve.png", CURVE, 0.5)
    settings = wandb_run_settings(OVERRIDES, job_type="fine_pruning", group="multirun-x")
    loggers = [
        CSVLogger(tmp_path, name="csv", version=""),
        WandbLogger(project="backdoor_lab", save_dir=str(tmp_path), offline=True, **settings),
    ]
    log_config(loggers, CONFIG)
    log_defense_result(loggers, METRICS, png)
    wandb.finish()
    wandb.teardown()
    captured = capfd.readouterr()
    return tmp_path, captured.out + captured.err


def test_offline_run_holds_config_metrics_curve_table_plot_and_image(finished_run: tuple[Path, str]) -> None:
    tmp_path, printed = finished_run
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)

    assert run.name == "fine_pruning-signs_badnets-seed=0-attack.poison_rate=0.05"
    assert run.tags == OVERRIDES and run.group == "multirun-x" and run.job_type == "fine_pruning"
    assert run.config["attack"] == CONFIG["attack"] and run.config["fine_tune"]["epochs"] == 20
    assert run.config["prune"]["prune_ratio"] is None and run.config["train_wandb_id"] == "abc123"

    # Before and after under distinct keys, so the summary keeps both; metrics.json's scalars beside them.
    summary = run.summary
    assert summary["test/before/clean_acc"] == pytest.approx(0.993) and summary["test/before/asr"] == 0.995
    assert summary["test/after/clean_acc"] == pytest.approx(0.992) and summary["test/after/asr"] == 0.3
    assert summary["defense/pruned_fraction"] == 0.921875
    assert summary["before.asr"] == 0.995 and summary["after.asr"] == 0.3 and summary["fine_tune.epochs"] == 20
    assert summary["defense"] == "fine_pruning" and summary["train_run"] == "/runs/train/signs-badnets/0"
    assert "pruned_channels" not in summary and "config.seed" not in summary  # lists and the config stay out

    table = run.table("prune_curve/table")
    assert table["columns"] == list(CURVE_COLUMNS)
    assert table["data"] == [[p[c] for c in CURVE_COLUMNS] for p in CURVE]

    chart = run.chart("prune_curve/plot")
    assert chart["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert chart["panel_config"]["stringSettings"]["xname"] == "fraction of channels pruned"
    lines = run.chart_table("prune_curve/plot")["data"]
    assert [row for row in lines if row[1] == "clean accuracy (val)"] == [
        [p["fraction"], "clean accuracy (val)", p["clean_acc"]] for p in CURVE
    ]
    assert [row for row in lines if row[1] == "attack success rate (val)"] == [
        [0.0, "attack success rate (val)", 1.0],
        [0.5, "attack success rate (val)", 0.9],
    ]

    image = run.media("prune_curve/image")
    assert image.suffix == ".png" and image.parent.parent == run.files_dir / "media" / "images"
    with Image.open(image) as logged, Image.open(tmp_path / "prune_curve.png") as original:
        assert logged.size == original.size
    assert summary["prune_curve/image"]["caption"] == "signs-badnets fine_pruning: prune curve"

    # No banner, no warning, no sync hint per run. Lightning passes wandb.init(anonymous=None), which wandb
    # warns about once per process, not per run.
    lines = [line for line in printed.splitlines() if "wandb:" in line and "anonymous setting" not in line]
    assert lines == []


def test_csv_logger_gets_the_config_as_hparams_and_the_test_metrics(finished_run: tuple[Path, str]) -> None:
    tmp_path, _ = finished_run
    assert yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text()) == CONFIG
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["test/before/asr"]) == 0.995 and float(row["test/after/asr"]) == 0.3
    assert float(row["defense/pruned_fraction"]) == 0.921875


def test_a_logger_that_cannot_hold_media_is_skipped(tmp_path: Path) -> None:
    csv_only = CSVLogger(tmp_path, name="csv", version="")
    log_defense_result(csv_only, METRICS, tmp_path / "absent.png")  # no W&B run: table, plot, image skipped
    log_defense_result(None, METRICS)
    assert (tmp_path / "csv" / "metrics.csv").read_text().startswith("defense/pruned_fraction,")


def test_a_job_that_fails_closes_its_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed job of a sweep must not leave its W&B run open for the next job to log into (``task_wrapper``)."""
    from omegaconf import OmegaConf

    from backdoor_lab.pipeline import task_wrapper

    monkeypatch.setenv("WANDB_MODE", "offline")

    @task_wrapper
    def job(cfg: object) -> dict:
        wandb.init(project="backdoor_lab", dir=str(tmp_path))
        assert wandb.run is not None
        raise RuntimeError("a bug in the job")

    with pytest.raises(RuntimeError, match="a bug in the job"):
        job(OmegaConf.create({}))
    assert wandb.run is None
    wandb.teardown()
