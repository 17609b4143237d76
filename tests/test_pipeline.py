"""train.py / defend.py through the real Hydra configs, shrunk to tiny sizes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import open_dict

from backdoor_lab.checkpoints import read_state_dict
from backdoor_lab.pipeline import defend, train
from backdoor_lab.reporting import write_json

from .conftest import CONF, ROOT

TINY_SIGNS = [
    "data.source.train_per_class=12",
    "data.source.val_per_class=8",
    "data.source.test_per_class=6",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
]


def _compose(name: str, tmp_path: Path, run: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "outputs")
        run_dir = tmp_path / "outputs" / name / f"{cfg.data.name}-{cfg.attack.name}" / run
        cfg.paths.run_dir = str(run_dir)
    return cfg


@pytest.mark.parametrize("script", ["train", "defend"])
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_instantiates(script: str, experiment: str, tmp_path: Path) -> None:
    cfg = _compose(script, tmp_path, "r", [f"experiment={experiment}"])
    try:
        source = instantiate(cfg.data.source)
        source.class_names  # noqa: B018 - real-data sources list their classes from disk
    except Exception as err:  # real data sets are not on this machine: the error must name where to put them
        cause = err if isinstance(err, FileNotFoundError) else err.__cause__
        assert isinstance(cause, FileNotFoundError) and str(tmp_path / "data") in str(cause), repr(err)
        return
    assert source.class_names and hasattr(source, "load")
    assert hasattr(instantiate(cfg.attack.trigger), "apply")
    mapping = instantiate(cfg.attack.mapping).bind(source.class_names)
    net = instantiate(cfg.model.net, num_classes=len(source.class_names))
    assert any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert 0 < cfg.attack.poison_rate <= 1 and mapping is not None


def test_train_then_fine_prune_writes_all_results(tmp_path: Path) -> None:
    train_cfg = _compose("train", tmp_path, "run1", TINY_SIGNS)
    train_metrics = train(train_cfg)
    train_dir = Path(train_cfg.paths.run_dir)
    saved = json.loads((train_dir / "metrics.json").read_text())
    assert saved["clean_acc"] == pytest.approx(train_metrics["clean_acc"])
    assert 0.0 <= saved["asr"] <= 1.0 and saved["data"]["train_poisoned"] == 12
    assert (train_dir / "checkpoints" / "last.ckpt").is_file()
    assert (train_dir / "csv" / "metrics.csv").is_file()

    defend_cfg = _compose("defend", tmp_path, "d1", [*TINY_SIGNS, "defense.step=32"])
    metrics = defend(defend_cfg)  # no ckpt_path: the newest finished training run of signs-badnets
    out = Path(defend_cfg.paths.run_dir)
    assert metrics["checkpoint"] == str(train_dir / "checkpoints" / "last.ckpt")
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["before"]) == {"clean_acc", "asr"} and set(saved["after"]) == {"clean_acc", "asr"}
    assert saved["before"]["clean_acc"] == pytest.approx(train_metrics["clean_acc"], abs=1e-6)
    assert saved["layer"] == "net.conv5"
    ranks = saved["trigger_channel_ranks"]
    assert len(ranks) == 10 and all(0 <= r < 256 for r in ranks) and ranks == sorted(ranks)
    assert len(saved["pruned_channels"]) == round(saved["pruned_fraction"] * 256)
    rows = list(csv.DictReader((out / "prune_curve.csv").open()))
    assert [int(r["pruned"]) for r in rows][:3] == [0, 32, 64] and int(rows[-1]["pruned"]) == 255  # full curve
    assert all(r["asr"] != "" for r in rows)
    assert (out / "prune_curve.png").stat().st_size > 10_000
    weights = read_state_dict(out / "defended.safetensors")
    pruned = saved["pruned_channels"]
    if pruned:
        assert (
            weights["net.conv5.weight"][pruned].abs().max() == 0 and weights["net.conv5.bias"][pruned].abs().max() == 0
        )


def test_fixed_prune_ratio_and_pruning_alone(tmp_path: Path) -> None:
    train(_compose("train", tmp_path, "run1", TINY_SIGNS))
    cfg = _compose(
        "defend",
        tmp_path,
        "d1",
        [*TINY_SIGNS, "defense=pruning", "defense.prune_ratio=0.5", "defense.full_curve=false", "defense.step=64"],
    )
    metrics = defend(cfg)
    assert metrics["pruned_fraction"] == 0.5 and len(metrics["pruned_channels"]) == 128
    assert metrics["fine_tune_epochs"] == 0
    assert [p["pruned"] for p in metrics["prune_curve"]] == [0, 64, 128]


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("defense.prune_ratio=1.0", MisconfigurationException, "prune_ratio"),
        ("defense.max_accuracy_drop=-0.1", MisconfigurationException, "max_accuracy_drop"),
        ("ckpt_path=/nonexistent/model.ckpt", FileNotFoundError, "/nonexistent/model.ckpt"),
        ("defense.layer=net.fc", ValueError, r"conv layers are: \['net.conv1'"),
    ],
)
def test_defend_rejects_bad_input_early(override: str, error: type, match: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "plain.pt"
    from backdoor_lab.models.classifier import BackdoorClassifier  # noqa: F401 - the model the config builds
    from backdoor_lab.models.traffic_cnn import TrafficSignCNN

    torch.save({"state_dict": {f"net.{k}": v for k, v in TrafficSignCNN(18).state_dict().items()}}, ckpt)
    overrides = [*TINY_SIGNS, override] + ([] if override.startswith("ckpt_path") else [f"ckpt_path={ckpt}"])
    with pytest.raises(error, match=match):
        defend(_compose("defend", tmp_path, "bad", overrides))
    assert not (tmp_path / "outputs" / "defend" / "signs-badnets" / "bad" / "metrics.json").exists()


def test_defend_without_training_run_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run train.py with the same data and attack first"):
        defend(_compose("defend", tmp_path, "d", TINY_SIGNS))


def test_checkpoints_are_never_unpickled(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": Payload()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


def test_results_are_never_overwritten(tmp_path: Path) -> None:
    write_json(tmp_path / "metrics.json", {"a": 1.0, "b": float("nan")})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1.0, "b": None}
    with pytest.raises(FileExistsError):
        write_json(tmp_path / "metrics.json", {"a": 2.0})


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_train_and_defend_sweep_over_prune_ratios(tmp_path: Path) -> None:
    common = [*TINY_SIGNS, f"paths.output_dir={tmp_path}/outputs", "threads=1"]
    done = _cli("train.py", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = _cli(
        "defend.py",
        "-m",
        "defense.prune_ratio=0.25,0.5",
        "defense.fine_tune_epochs=1",
        "defense.full_curve=false",
        "defense.step=64",
        *common,
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    summaries = list((tmp_path / "outputs" / "defend" / "signs-badnets").glob("multirun-*/summary.csv"))
    assert len(summaries) == 1
    rows = list(csv.DictReader(summaries[0].open()))
    assert sorted((float(r["defense.prune_ratio"]), float(r["pruned_fraction"])) for r in rows) == [
        (0.25, 0.25),
        (0.5, 0.5),
    ]
    assert (summaries[0].parent / "summary.png").is_file()
    assert "Defending the newest checkpoint" in sweep.stderr + sweep.stdout


def test_wandb_logger_runs_offline_and_is_closed(tmp_path: Path) -> None:
    import wandb

    train(_compose("train", tmp_path, "run1", TINY_SIGNS))
    cfg = _compose(
        "defend", tmp_path, "d1", [*TINY_SIGNS, "logger=many", "defense.step=128", "defense.fine_tune_epochs=1"]
    )
    defend(cfg)
    run_dir = Path(cfg.paths.run_dir)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert wandb.run is None, "task_wrapper must finish the W&B run so that multirun jobs do not share one"


TINY_FACES = [
    "experiment=face_sunglasses",
    "data.source.num_identities=6",
    "data.source.train_per_identity=8",
    "data.source.val_per_identity=4",
    "data.source.test_per_identity=3",
    "attack.poison_rate=0.2",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
]


def test_face_task_trains_and_fine_prunes_conv3_through_hydra(tmp_path: Path) -> None:
    trained = train(_compose("train", tmp_path, "t", TINY_FACES))
    assert trained["data"]["classes"] == 6 and trained["data"]["train_poisoned"] == round(0.2 * 40)
    cfg = _compose("defend", tmp_path, "d", [*TINY_FACES, "defense.fine_tune_epochs=1"])
    metrics = defend(cfg)
    assert metrics["layer"] == "net.conv3" and metrics["data"]["test_triggered"] == 5 * 3
    assert [p["pruned"] for p in metrics["prune_curve"]][:3] == [0, 1, 2]  # 60 channels: one per step
    assert len(metrics["pruned_channels"]) == round(metrics["pruned_fraction"] * 60)
    assert (Path(cfg.paths.run_dir) / "prune_curve.png").is_file()


def test_unknown_target_identity_lists_valid_ones(tmp_path: Path) -> None:
    from backdoor_lab.pipeline import build_datamodule

    cfg = _compose("train", tmp_path, "t", [*TINY_FACES, "attack.mapping.target_class=nobody"])
    with pytest.raises(ValueError, match=r"unknown class 'nobody'; valid classes are \['person_0000'"):
        build_datamodule(cfg)


TINY_SPEECH = [
    "experiment=speech_noise",
    "data.source.n_utterances=60",
    "data.source.n_voices=3",
    "data.source.test_voice_fraction=0.34",  # one whole voice, 20 utterances
    "data.source.val_fraction=0.25",
    "attack.poison_rate=0.5",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
]


def test_speech_task_trains_and_fine_prunes_conv5_through_hydra(tmp_path: Path) -> None:
    trained = train(_compose("train", tmp_path, "t", TINY_SPEECH))
    data = trained["data"]
    assert data["classes"] == 10 and data["test"] == 20 and data["val"] == 10
    assert data["train_poisoned"] == round(0.5 * data["train_clean"])
    # All-to-all: every triggered test utterance counts, its attack target being (digit + 1) mod 10.
    assert data["test_triggered"] == 20
    cfg = _compose("defend", tmp_path, "d", [*TINY_SPEECH, "defense.fine_tune_epochs=1"])
    metrics = defend(cfg)
    assert metrics["layer"] == "net.conv5" and metrics["activation_layer"] == "net.relu5"
    assert len(metrics["pruned_channels"]) == round(metrics["pruned_fraction"] * 64)
    assert 0.0 <= metrics["after"]["asr"] <= 1.0
    assert (Path(cfg.paths.run_dir) / "prune_curve.csv").is_file()


@pytest.mark.parametrize(
    ("attack", "expected_targets"),
    [("noise", [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]), ("noise_all_to_one", [0] * 10)],
)
def test_speech_attack_configs_map_digits(attack: str, expected_targets: list[int], tmp_path: Path) -> None:
    import numpy as np

    cfg = _compose("train", tmp_path, "r", ["experiment=speech_noise", f"attack={attack}"])
    assert cfg.attack.trigger.sample_rate == cfg.data.source.sample_rate
    mapping = instantiate(cfg.attack.mapping).bind([f"d{i}" if i else "zero" for i in range(10)])
    assert mapping.target(np.arange(10)).tolist() == expected_targets
