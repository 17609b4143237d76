"""The multi-layer mask callbacks (ANP, CLP and their base) under DDP: every process ends on rank 0's masks.

Two CPU processes (gloo), run as in tests/test_callback_ddp.py: this file executed as a script in a subprocess
(``python -m tests.test_channel_masks_ddp OUT``), each rank writing what it ended with to ``OUT/rank{r}.json``.
A callback whose search answers differently on each rank shows that the answer is agreed, not computed twice;
ANP's own search then runs end to end under ``strategy="ddp"``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from backdoor_lab.defenses import ANPCallback, ANPSettings
from backdoor_lab.defenses.channel_masks import ChannelMaskCallback, ChannelMasks
from tests.test_callback_ddp import _trainer, run_two_processes
from tests.test_pruning import PlainModule

LAYER = "net.features.0"


class RankDependentSearch(ChannelMaskCallback):
    """Each rank's search masks its own rank's channel: only a broadcast makes the ranks agree."""

    def find_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ChannelMasks:
        return {LAYER: [trainer.global_rank]}


class Report(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        search = next(c for c in trainer.callbacks if isinstance(c, RankDependentSearch))
        anp = next(c for c in trainer.callbacks if isinstance(c, ANPCallback))
        conv = pl_module.net.features[0]
        report = {
            "search_masks": search.masks,
            "anp_masks": anp.masks,
            "weight_mask": conv.weight_mask[:, 0, 0, 0].tolist(),
            "world_size": trainer.world_size,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main(out: Path) -> None:
    torch.manual_seed(0)
    callbacks = [RankDependentSearch(), ANPCallback(ANPSettings(iterations=5, batch_size=8), progress=False)]
    _trainer(out, [*callbacks, Report(out)], devices=2, strategy="ddp", max_epochs=1).fit(PlainModule(lr=0.1))


def test_every_rank_ends_on_rank_zeros_masks(tmp_path: Path) -> None:
    results = run_two_processes_here(tmp_path)
    assert sorted(results) == ["rank0", "rank1"]
    for rank in results.values():
        assert rank["world_size"] == 2
        assert rank["search_masks"] == {LAYER: [0]}  # rank 1's own answer was [1]
        assert rank["weight_mask"][0] == 0.0 and rank["weight_mask"][1] == 1.0  # installed, kept through the epoch
    assert results["rank0"]["anp_masks"] == results["rank1"]["anp_masks"]
    assert set(results["rank0"]["anp_masks"]) == {LAYER}


def run_two_processes_here(out: Path) -> dict[str, dict]:
    return run_two_processes("ddp", "unused", out, module="tests.test_channel_masks_ddp")


if __name__ == "__main__":
    main(Path(sys.argv[-1]))
