"""Cost of the whole per-channel prune curve (clean + triggered) against one plain evaluation pass.

For each built-in network: one plain pass over the clean and triggered val-sized data (the unit), ``FinePruner``'s
rank pass (channel means, and the cache the curve reads) and its curve at every channel count after it, and the
old way (the whole network re-run at ~64 points, ``fast=False``), with its per-channel cost extrapolated. Beside
the times, the arithmetic of the rank pass and of the curve in plain passes (floating-point operations of matrix
products and convolutions): it does not drift with the machine's speed, as the times do, and shows what no
implementation that evaluates every sample at every count can avoid. The networks are freshly
initialised (seed 0) and read random inputs of the task's shape, labelled with the network's own answers so the
curve falls from 100%: dense activations, so no batch can skip a step (the worst case for the cache).

Trained networks have sparse maps at the cut (a channel is zero for many samples), which the curve skips
sample by sample: ``--runs`` measures the same on finished training runs (their val data and weights, as
``defend.py`` would prune them).

    python bench/prune_curve.py [--threads 2] [--skip-old] [--runs RUN_DIR ...] [--only NAME]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from backdoor_lab.defenses.pruner import FinePruner
from backdoor_lab.defenses.pruning import run_batches
from backdoor_lab.machine import describe_device
from backdoor_lab.models.deepid import DeepID
from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet
from backdoor_lab.models.traffic_cnn import TrafficSignCNN

# name, network, input shape, pruned layer, statistic layer, val samples (clean; as many triggered), as conf/
MODELS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], str, str | None, int]] = [
    ("signs TrafficSignCNN", lambda: TrafficSignCNN(18), (3, 32, 32), "conv5", None, 18 * 80),
    ("speech SpectrogramAlexNet", lambda: SpectrogramAlexNet(10), (1, 40, 63), "conv5", None, 600),
    ("faces DeepID", lambda: DeepID(100), (3, 55, 47), "conv3", "pool3", 100 * 8),
]
BATCH = 512  # conf/data/*.yaml eval_batch_size


def loaders(net: nn.Module, shape: tuple[int, ...], n: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        x = torch.randn(n, *shape, generator=gen)
        with torch.no_grad():
            y = net(x).argmax(1)
        out.append(DataLoader(TensorDataset(x, y), batch_size=BATCH))
    return out[0], out[1]


def trained(run_dir: Path) -> tuple[str, nn.Module, DataLoader, DataLoader, str, str | None]:
    """A finished training run's network, clean and triggered val loaders, pruned and ranking layers."""
    from omegaconf import OmegaConf

    from backdoor_lab.checkpoints import load_weights
    from backdoor_lab.pipeline import attack_variant, build_datamodule, build_model, task_name

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dm = build_datamodule(cfg, fit_on="defender_clean")
    model = build_model(cfg, dm.num_classes).eval()
    load_weights(model, run_dir / "model.safetensors")
    rank = None if model.rank_layer == model.prune_layer else model.rank_layer
    name = f"trained {task_name(cfg)} {attack_variant(cfg)}, seed {cfg.seed}"
    return name, model, dm.clean_val_dataloader(), dm.triggered_val_dataloader(), model.prune_layer, rank


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of ``fn``'s matrix products and convolutions (the running sums' in-place
    ``addmm_`` too): the arithmetic a pass needs, whatever the machine's speed."""

    def addmm_flops(_self_shape: tuple, a_shape: tuple, b_shape: tuple, *_: object, **__: object) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops}) as counter:
        fn()
    return float(counter.get_total_flops())


Case = tuple[str, Callable[[], nn.Module], DataLoader, DataLoader, str, str | None]


def random_cases() -> list[Case]:
    cases = []
    for name, make, shape, layer, stat, n in MODELS:
        torch.manual_seed(0)
        net = make().eval()
        clean, triggered = loaders(net, shape, n)
        cases.append((name, lambda net=net: copy.deepcopy(net), clean, triggered, layer, stat))
    return cases


def trained_cases(run_dirs: list[Path]) -> list[Case]:
    cases = []
    for run_dir in run_dirs:
        name, net, clean, triggered, layer, stat = trained(run_dir)
        cases.append((name, lambda net=net: copy.deepcopy(net), clean, triggered, layer, stat))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-old", action="store_true", help="skip the slow old-way measurement")
    parser.add_argument("--old-points", type=int, default=8, help="old way: time this many of its ~64 points")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="finished training runs to measure too")
    parser.add_argument("--skip-random", action="store_true", help="only the --runs")
    parser.add_argument("--only", default="", help="only the rows whose name contains this (e.g. DeepID, face)")
    parser.add_argument("--repeat", type=int, default=5, help="plain, rank and curve alternating: medians of this many")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_device())  # the figures are CPU ones: nothing here moves to a GPU
    print(
        "| network | channels | one plain pass | rank pass | curve after it | rank + curve: ratio (range of runs) "
        "| arithmetic, rank + curve | exact tail runs | old way (~64 points) | old, per channel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = ([] if args.skip_random else random_cases()) + trained_cases(args.runs)
    for name, make, clean, triggered, layer, stat in cases:
        if args.only not in name:
            continue
        net = make()

        def plain_pass(net: nn.Module = net, clean: DataLoader = clean, triggered: DataLoader = triggered) -> None:
            run_batches(net, clean, torch.device("cpu"))
            run_batches(net, triggered, torch.device("cpu"))

        plain_pass()  # warm-up
        plains, ranks, curves = [], [], []
        for _ in range(args.repeat):  # alternating, so that a slow spell of a shared machine hits both
            plains.append(timed(plain_pass)[0])
            pruner = FinePruner(net, layer, activation_layer=stat, step=1, full_curve=True)
            ranks.append(timed(lambda p=pruner, c=clean, t=triggered: p.rank(c, t))[0])
            curves.append(timed(pruner.measure_curve)[0])
        plain, rank, curve = (statistics.median(v) for v in (plains, ranks, curves))
        ratios = sorted((r + c) / p for p, r, c in zip(plains, ranks, curves, strict=True))
        counted = FinePruner(net, layer, activation_layer=stat, step=1, full_curve=True)
        plain_flops = flops(plain_pass)
        rank_flops = flops(lambda p=counted, c=clean, t=triggered: p.rank(c, t)) / plain_flops
        curve_flops = flops(counted.measure_curve) / plain_flops
        channels = pruner.num_channels
        fast_curve = {p["pruned"]: (p["clean_acc"], p["asr"]) for p in pruner.prune_curve}
        mode = "running sums" if pruner.incremental else "cached tail" if pruner.split else "full"
        old_cell = per_channel_cell = "-"
        if not args.skip_old:
            step = max(1, channels // 64)  # the old default: about 64 points, each a whole-network pass
            points_total = len(range(0, channels, step))
            old = FinePruner(
                make(),
                layer,
                activation_layer=stat,
                fast=False,
                step=step,
                prune_ratio=args.old_points * step / channels,
            )
            old_s, _ = timed(lambda p=old, c=clean, t=triggered: (p.rank(c, t), p.measure_curve()))
            per_point = old_s / len(old.prune_curve)
            agree = all(fast_curve[p["pruned"]] == (p["clean_acc"], p["asr"]) for p in old.prune_curve)
            old_cell = (
                f"{per_point * points_total:.1f} s ({points_total} points, {per_point * points_total / plain:.0f}x; "
                f"timed on {len(old.prune_curve)}, curves agree: {agree})"
            )
            per_channel_cell = f"~{per_point * channels:.0f} s ({per_point * channels / plain:.0f}x)"
        print(
            f"| {name} | {channels} | {plain:.2f} s | {rank:.2f} s ({rank / plain:.2f}x) | {curve:.2f} s "
            f"({curve / plain:.2f}x, {mode}) | **{(rank + curve) / plain:.2f}x** ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
            f"{rank_flops:.2f}x + {curve_flops:.2f}x | {pruner.exact_tail_runs} | {old_cell} | {per_channel_cell} |"
        )


if __name__ == "__main__":
    main()
