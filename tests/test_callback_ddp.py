"""FinePruningCallback under DDP: each process evaluates half the batches, all end on the single-process mask.

Two CPU processes (gloo). ``strategy="ddp"`` re-runs the launching script for rank 1, so each run is this file
executed as a script in a subprocess (``python -m tests.test_callback_ddp STRATEGY CURVE OUT``); every rank writes
what it saw to ``OUT/rank{r}.json``, and under ``ddp_spawn`` the parent writes ``OUT/parent.json``.

The clean (and triggered) batches alternate all-positive / all-negative, so each rank's half alone ranks the
channels differently (rank 0 sees channel 2 at mean 1.0, rank 1 at 0.0) and measures another accuracy (0.0 or
1.0 with channel 2 pruned, against 0.5 for all): only correctly summed statistics give the single-process answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab import FinePruningCallback
from tests.test_pruning import PlainModule
from tests.trainers import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
CLEAN_SAMPLES, TRIGGERED_SAMPLES = 64, 32


def blocked_data(n: int) -> TensorDataset:
    """Batches of ``BATCH`` alike samples, alternating class 1 (input +1) and class 0 (input -1)."""
    positive = (torch.arange(n) // BATCH) % 2 == 0
    x = torch.where(positive, 1.0, -1.0).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return TensorDataset(x, positive.long())


def loader(n: int) -> DataLoader:
    return DataLoader(blocked_data(n), batch_size=BATCH)


class CountingModule(PlainModule):
    """Counts the samples its pruned conv computes (the evaluation work a process does)."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__(lr=lr)
        self.conv_samples = 0
        self.net.features[0].register_forward_hook(self._count)

    def _count(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(inputs[0], torch.Tensor):  # not a torch.fx trace
            self.conv_samples += inputs[0].shape[0]

    def val_dataloader(self):
        return loader(CLEAN_SAMPLES)


def pruning_callback(fast_curve: bool) -> FinePruningCallback:
    return FinePruningCallback(
        layer="net.features.0",
        step=1,
        full_curve=True,
        fast_curve=fast_curve,
        triggered_dataloader=loader(TRIGGERED_SAMPLES),
        progress=False,
    )


def probe_logits(module: L.LightningModule) -> list[list[float]]:
    module.eval()
    with torch.no_grad():
        return module(blocked_data(16).tensors[0]).tolist()


def record(cb: FinePruningCallback, module: CountingModule, **extra) -> dict:
    conv = module.net.features[0]
    mask = getattr(conv, "weight_mask", None)
    return {
        "pruned_channels": cb.pruned_channels,
        "prune_curve": cb.prune_curve,
        "channel_activation": cb.channel_activation,
        "triggered_activation": cb.triggered_activation,
        "weight_mask": None if mask is None else mask[:, 0, 0, 0].tolist(),
        "logits": probe_logits(module),
        **extra,
    }


class Report(L.Callback):
    """Writes what this rank saw: the samples its conv computed for pruning, and the callback's result."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pruning_samples = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: CountingModule) -> None:
        self.pruning_samples = pl_module.conv_samples  # the prune passes ran in on_fit_start, before training

    def on_fit_end(self, trainer: L.Trainer, pl_module: CountingModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, FinePruningCallback))
        result = record(cb, pl_module, pruning_samples=self.pruning_samples, world_size=trainer.world_size)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _trainer(out: Path, callbacks: list, max_epochs: int = 0, **kw) -> L.Trainer:
    return quiet_trainer(out, callbacks, max_epochs, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def main(strategy: str, curves: str, out: Path) -> None:
    """A 2-process fit per curve mode in ``curves`` ("fast", "full" or "fast,full"), each writing into ``OUT/<curve>/``
    (one epoch of fine-tuning after the prune, so that the returned weights matter).

    Under ``ddp`` the second fit reuses the processes and their group (Lightning launches once per script, as for
    a fit followed by a test): one launch for both curve modes.
    """
    for curve in curves.split(","):
        torch.manual_seed(0)
        module = CountingModule(lr=0.5)
        cb = pruning_callback(fast_curve=curve == "fast")
        folder = out / curve
        folder.mkdir(exist_ok=True)
        _trainer(folder, [cb, Report(folder)], devices=2, strategy=strategy, max_epochs=1).fit(module)
        if strategy == "ddp_spawn":  # this is the parent: what came back from rank 0
            (folder / "parent.json").write_text(json.dumps(record(cb, module)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(strategy: str, curve: str, out: Path, module: str = "tests.test_callback_ddp") -> dict[str, dict]:
    """Run ``module`` as a 2-process script (``python -m module STRATEGY CURVE OUT``); every JSON it wrote in OUT
    (and in OUT's folders, keyed ``<folder>/<name>``)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(ROOT)}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    done = subprocess.run(
        [sys.executable, "-m", module, strategy, curve, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {str(p.relative_to(out).with_suffix("")): json.loads(p.read_text()) for p in out.glob("**/*.json")}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Both curve modes under ``ddp``, from one launch of two processes."""
    return run_two_processes("ddp", "fast,full", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The reference: the same prune in one process, for both curve modes."""
    results = {}
    for curve in ("fast", "full"):
        module, cb = CountingModule(), pruning_callback(fast_curve=curve == "fast")
        _trainer(tmp_path_factory.mktemp(curve), [cb], devices=1, max_epochs=0).fit(module)
        results[curve] = record(cb, module, pruning_samples=module.conv_samples)
    return results


def test_single_process_reference_is_the_known_answer(single_process) -> None:
    for result in single_process.values():
        assert result["pruned_channels"] == [0, 1]
        assert [p["clean_acc"] for p in result["prune_curve"]] == [1.0, 1.0, 1.0, 0.5]
        assert result["channel_activation"] == pytest.approx([0.0, 0.1, 0.5, 3.0])
        assert result["weight_mask"] == [0.0, 0.0, 1.0, 1.0]


def _assert_matches_single_process(rank: dict, single: dict) -> None:
    assert rank["world_size"] == 2
    assert rank["pruned_channels"] == single["pruned_channels"]
    assert rank["weight_mask"] == single["weight_mask"]  # still installed after the fine-tuning epoch
    assert rank["prune_curve"] == single["prune_curve"]
    assert rank["channel_activation"] == single["channel_activation"]
    assert rank["triggered_activation"] == single["triggered_activation"]


@pytest.mark.parametrize("curve", ["fast", "full"])
def test_ddp_ranks_split_the_batches_and_agree_with_one_process(ddp_runs, single_process, curve) -> None:
    assert sorted(ddp_runs) == ["fast/rank0", "fast/rank1", "full/rank0", "full/rank1"]
    results = {name.split("/")[1]: value for name, value in ddp_runs.items() if name.startswith(f"{curve}/")}
    single = single_process[curve]
    for rank in results.values():
        _assert_matches_single_process(rank, single)
    if curve == "full":  # every curve point re-runs the data: exactly half of it per rank
        expected = single["pruning_samples"] // 2
    else:  # one pass over the data, half per rank, plus the cut's check on the rank's first batch (3 forwards)
        from backdoor_lab.defenses.cut_evaluation import CHECK_SAMPLES

        check = 3 * min(BATCH, CHECK_SAMPLES)
        expected = (single["pruning_samples"] - check) // 2 + check
        assert single["pruning_samples"] == CLEAN_SAMPLES + TRIGGERED_SAMPLES + check
    assert [results[r]["pruning_samples"] for r in ("rank0", "rank1")] == [expected, expected]


def test_ddp_spawn_returns_the_mask_and_the_record_to_the_parent(tmp_path, single_process) -> None:
    results = {k.split("/")[1]: v for k, v in run_two_processes("ddp_spawn", "fast", tmp_path).items()}
    assert sorted(results) == ["parent", "rank0", "rank1"]
    single = single_process["fast"]
    for rank in ("rank0", "rank1"):
        _assert_matches_single_process(results[rank], single)
    parent = results["parent"]
    for key in ("pruned_channels", "prune_curve", "channel_activation", "triggered_activation", "weight_mask"):
        assert parent[key] == single[key], key
    # The parent's model computes what rank 0's fine-tuned model computed, which the fine-tuning changed.
    assert parent["logits"] == results["rank0"]["logits"]
    assert parent["logits"] != single["logits"]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
