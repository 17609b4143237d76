"""Same seed, same results: train.py and defend.py run twice on CPU give identical metrics.json and weights.

Everything but the timestamp (``finished``) and the paths of the run folders must be equal, byte for byte once
serialised; the weights files must be equal byte for byte. The twin training runs are shared with
``test_resume.py`` (the uninterrupted run a resumed run must end on).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from backdoor_lab.pipeline import defend, train

from .test_pipeline import compose_run

# debug=tiny: the real configs at a tiny size; two epochs so that a run can be interrupted after the first.
TWIN = ["debug=tiny", "trainer.max_epochs=2", "defenses=[fine_pruning]", "reuse=false"]


def comparable(metrics: dict[str, Any], job_dir: Path) -> str:
    """metrics.json without its clock readings (``finished``, a defense's ``wall_s``), the job's own folder
    written as ``<job>``."""
    stripped = {k: v for k, v in metrics.items() if k not in ("finished", "wall_s")}
    return json.dumps(stripped, sort_keys=True).replace(str(job_dir), "<job>")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


_TWINS: dict[Path, tuple[Path, Path]] = {}  # per pytest session: test_resume.py imports the fixture too


@pytest.fixture(scope="session", name="twin_runs")
def twin_runs_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two train.py jobs with the same config and seed (reuse off): train, then fine-pruning.

    Built once per session even though two modules register the fixture (each registration is its own fixture).
    """
    base = tmp_path_factory.getbasetemp()
    if base not in _TWINS:
        root = tmp_path_factory.mktemp("twins")
        folders = []
        with pytest.MonkeyPatch.context() as patch:  # session scope: conftest's per-test cache is not set up yet
            patch.setenv("BACKDOOR_LAB_CACHE", str(base / "cache"))
            for name in ("first", "second"):
                cfg = compose_run("train", root, name, TWIN)
                train(cfg)
                folders.append(Path(cfg.paths.run_dir))
        _TWINS[base] = (folders[0], folders[1])
    return _TWINS[base]


def test_training_twice_gives_identical_metrics_and_weights(twin_runs: tuple[Path, Path]) -> None:
    first, second = twin_runs
    assert first != second
    assert comparable(read_json(first / "metrics.json"), first) == comparable(
        read_json(second / "metrics.json"), second
    )
    assert digest(first / "model.safetensors") == digest(second / "model.safetensors")
    # the defense applied by the same job too
    defended = [run / "defense" / "fine_pruning" for run in twin_runs]
    assert comparable(read_json(defended[0] / "metrics.json"), first) == comparable(
        read_json(defended[1] / "metrics.json"), second
    )
    assert digest(defended[0] / "defended.safetensors") == digest(defended[1] / "defended.safetensors")
    # what the comparison sees: the folder is replaced, not dropped (a path that differs otherwise would count)
    assert '"run_dir": "<job>"' in comparable(read_json(first / "metrics.json"), first)


def test_defending_twice_gives_identical_metrics_and_weights(twin_runs: tuple[Path, Path], tmp_path: Path) -> None:
    model = twin_runs[0] / "model.safetensors"
    jobs, outs = [], []
    for name in ("d1", "d2"):
        cfg = compose_run("defend", tmp_path, name, [*TWIN[:3], f"ckpt_path={model}"])
        defend(cfg)
        jobs.append(Path(cfg.paths.run_dir))
        outs.append(jobs[-1] / "defense" / "fine_pruning")
    first, second = (read_json(out / "metrics.json") for out in outs)
    assert comparable(first, jobs[0]) == comparable(second, jobs[1])
    assert first["pruned_channels"] == second["pruned_channels"] and first["prune_curve"] == second["prune_curve"]
    assert digest(outs[0] / "defended.safetensors") == digest(outs[1] / "defended.safetensors")
    # defend.py on the model equals the defense the training job applied (same data, seed, settings)
    in_job = read_json(twin_runs[0] / "defense" / "fine_pruning" / "metrics.json")
    assert (first["before"], first["after"]) == (in_job["before"], in_job["after"])
