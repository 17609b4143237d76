"""Exact resume: a run stopped after any epoch, resumed from its ``checkpoints/last.ckpt``, ends on the same numbers
and the same weights as the run that was never stopped.

``last.ckpt`` is written at the end of every epoch, and it carries the random generators' states
(``backdoor_lab.resume.RngStateCheckpoint``): the resumed run shuffles as the uninterrupted one would have. The
default tests stop a run in-process (an exception at the start of its second epoch); the slow test kills a real
``train.py`` with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from backdoor_lab.pipeline import train

from .conftest import ROOT
from .test_determinism import TWIN, digest, read_json, twin_runs_fixture  # noqa: F401 (the shared `twin_runs`)
from .test_pipeline import compose_run


class Interrupted(Exception):
    """Stands for the run being killed."""


class InterruptAt(L.Callback):
    """Stops a fit at the start of epoch ``epoch`` (after the previous epoch's checkpoint was written)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"stopped at the start of epoch {self.epoch}")


INTERRUPT = ["+callbacks.interrupt._target_=tests.test_resume.InterruptAt", "+callbacks.interrupt.epoch=1"]


@pytest.fixture(scope="session")  # session: its tests share one xdist worker (conftest), not one module
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.py job (the twins' config) stopped at the start of its second epoch."""
    root = tmp_path_factory.mktemp("interrupted")
    cfg = compose_run("train", root, "stopped", [*TWIN, *INTERRUPT])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BACKDOOR_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        with pytest.raises(Interrupted):
            train(cfg)
    return Path(cfg.paths.run_dir)


def test_last_ckpt_is_written_at_the_end_of_every_epoch(interrupted_run: Path) -> None:
    last = interrupted_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] > 0  # epoch 0 finished, epoch 1 never ran
    assert set(checkpoint["rng_states"]) >= {"torch", "numpy", "python"}
    assert not (interrupted_run / "metrics.json").exists()
    assert read_json(interrupted_run / "job.json")["status"] == "failed"


def test_resumed_run_ends_on_the_uninterrupted_runs_numbers_and_weights(
    interrupted_run: Path, twin_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    uninterrupted = twin_runs[0]
    last = interrupted_run / "checkpoints" / "last.ckpt"
    # reuse stays on: the twins are identical finished runs, yet a resumed run must train, not reuse one
    cfg = compose_run("train", tmp_path, "resumed", [*TWIN[:3], f"ckpt_path={last}"])
    train(cfg)
    resumed = Path(cfg.paths.run_dir)
    metrics, expected = read_json(resumed / "metrics.json"), read_json(uninterrupted / "metrics.json")
    assert metrics["run_dir"] == str(resumed)
    assert (metrics["clean_acc"], metrics["asr"]) == (expected["clean_acc"], expected["asr"])
    assert metrics["train_key"] == expected["train_key"]  # the same training, so later jobs may reuse it
    assert digest(resumed / "model.safetensors") == digest(uninterrupted / "model.safetensors")
    defended = read_json(resumed / "defense" / "fine_pruning" / "metrics.json")
    reference = read_json(uninterrupted / "defense" / "fine_pruning" / "metrics.json")
    for key in ("before", "after", "pruned_channels", "prune_curve"):
        assert defended[key] == reference[key], key


def test_without_the_generators_states_a_resumed_run_ends_elsewhere(
    interrupted_run: Path, twin_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """What the RNG-state callback is for (and that the test above can fail): the shuffle order differs."""
    last = interrupted_run / "checkpoints" / "last.ckpt"
    overrides = ["debug=tiny", "trainer.max_epochs=2", "callbacks.rng_states=null", f"ckpt_path={last}"]
    cfg = compose_run("train", tmp_path, "resumed", overrides)
    train(cfg)
    assert digest(Path(cfg.paths.run_dir) / "model.safetensors") != digest(twin_runs[0] / "model.safetensors")


@pytest.mark.slow
def test_sigkilled_train_py_resumes_to_the_uninterrupted_result(
    twin_runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``train.py`` killed with SIGKILL as soon as epoch 0's last.ckpt appears, resumed from it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    killed = tmp_path / "killed"
    overrides = [o for o in TWIN if not o.startswith("defenses=")]
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={killed}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = killed / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no last.ckpt after 300 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()  # it was killed before it finished
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    cfg = compose_run("train", tmp_path, "resumed", [*TWIN[:3], f"ckpt_path={last}"])
    train(cfg)
    resumed, uninterrupted = Path(cfg.paths.run_dir), twin_runs[0]
    metrics, expected = read_json(resumed / "metrics.json"), read_json(uninterrupted / "metrics.json")
    assert (metrics["clean_acc"], metrics["asr"]) == (expected["clean_acc"], expected["asr"])
    assert digest(resumed / "model.safetensors") == digest(uninterrupted / "model.safetensors")
