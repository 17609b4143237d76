"""``trainer=gpu`` on a CUDA device: the main job and every defense, unchanged, with bf16 autocast and pinned
batches. Skipped, saying why, where no CUDA device is present (CI and the 2-core machines have none)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from backdoor_lab.pipeline import build_datamodule, train

from .test_pipeline import compose_run

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: trainer=gpu is checked where one is present"
)


def test_the_main_job_and_every_defense_run_on_the_gpu(tmp_path: Path) -> None:
    cfg = compose_run(
        "train", tmp_path, "gpu", ["debug=tiny", "trainer=gpu", "defenses=[none,fine_pruning,anp,nad,clp]"]
    )
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert build_datamodule(cfg, setup=False).pin_memory
    result = train(cfg)
    for name, record in result["defenses"].items():
        assert all(math.isfinite(record["after"][k]) for k in ("clean_acc", "asr")), name
    job = Path(cfg.paths.run_dir)
    assert json.loads((job / "metrics.json").read_text())["config"]["trainer"]["accelerator"] == "gpu"


def test_compile_trains_on_the_gpu(tmp_path: Path) -> None:
    """``compile=true`` with inductor on the GPU (on the CPU it does not pay: docs/benchmarks.md)."""
    overrides = ["debug=tiny", "trainer=gpu", "compile=true", "defenses=[fine_pruning]"]
    cfg = compose_run("train", tmp_path, "gpu", overrides)
    result = train(cfg)
    assert math.isfinite(result["train"]["clean_acc"]) and result["defenses"]["fine_pruning"]["pruned_channels"]
