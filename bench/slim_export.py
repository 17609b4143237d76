"""Slim export against the dense masked model: parameters, file size and CPU latency, per built-in network.

Each network is freshly initialised (seed 0) with as many channels of its pruned layer masked as the README's
fine-pruning runs chose (signs 236/256 conv5, speech 38/64 conv5, faces 38/60 conv3; which channels does not
change sizes, and barely the speed, so a random set of that size is masked). ``export_slim`` writes the slim
files and checks the logits; latency is then re-measured in interleaved rounds (dense, slim, dense, ...), each
the median of a few forward passes, so that load from other processes falls on both alike. Multiply-adds per
sample (torch-pruning's ``count_ops_and_params``) say what speed-up the arithmetic allows.

    python bench/slim_export.py [--threads 2] [--rounds 5] [--batches 1 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from backdoor_lab.defenses.pruning import mask_random_channels
from backdoor_lab.defenses.slim import cpu_latency_ms, export_slim, load_slim, slim_model
from backdoor_lab.machine import describe_device
from backdoor_lab.models.deepid import DeepID
from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet
from backdoor_lab.models.traffic_cnn import TrafficSignCNN

# name, network, input shape (conf/data), pruned layer, channels pruned by the README's fine-pruning runs
MODELS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], str, int]] = [
    ("signs TrafficSignCNN", lambda: TrafficSignCNN(18), (3, 32, 32), "conv5", 236),
    ("speech SpectrogramAlexNet", lambda: SpectrogramAlexNet(10, width=0.25), (1, 40, 63), "conv5", 38),
    ("faces DeepID", lambda: DeepID(100), (3, 55, 47), "conv3", 38),
]


def masked(make: Callable[[], nn.Module], layer: str, n_pruned: int) -> tuple[nn.Module, list[int]]:
    torch.manual_seed(0)
    net = make().eval()
    return net, mask_random_channels(net, layer, n_pruned)


def interleaved_latency(dense: nn.Module, slim: nn.Module, batch: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Median over rounds of each model's median forward time (ms), dense and slim measured alternately."""
    dense_ms, slim_ms = [], []
    for _ in range(rounds):
        dense_ms.append(cpu_latency_ms(dense, batch))
        slim_ms.append(cpu_latency_ms(slim, batch))
    return statistics.median(dense_ms), statistics.median(slim_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved dense/slim latency rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 512], help="batch sizes timed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_device())  # the figures are CPU ones: nothing here moves to a GPU
    latency_cols = " | ".join(f"batch {b}: dense / slim ms (speed-up)" for b in args.batches)
    print(
        f"| network (layer) | pruned | params dense / slim | file dense / slim | MACs per sample dense / slim "
        f"| max logit diff | {latency_cols} |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(args.batches))
    for name, make, shape, layer, n_pruned in MODELS:
        net, pruned = masked(make, layer, n_pruned)
        example = torch.randn(args.batches[-1], *shape, generator=torch.Generator().manual_seed(1))
        with tempfile.TemporaryDirectory() as out_dir:
            report = export_slim(net, layer, pruned, example, out_dir)
            torch.manual_seed(2)
            slim = load_slim(make(), out_dir).eval()  # the files, not the in-memory model, are what ships
        dense = slim_model(net, layer, [], example).eval()  # the same model with its masks folded: plain dense
        with torch.no_grad():
            diff = float((slim(example) - net(example)).abs().max())
        macs_dense, _ = tp.utils.count_ops_and_params(dense, example[:1])
        macs_slim, _ = tp.utils.count_ops_and_params(slim, example[:1])
        cells = []
        for size in args.batches:
            dense_ms, slim_ms = interleaved_latency(dense, slim, example[:size], args.rounds)
            cells.append(f"{dense_ms:.2f} / {slim_ms:.2f} ({dense_ms / slim_ms:.2f}x)")
        channels = len(pruned) + dict(slim.named_modules())[layer].out_channels
        print(
            f"| {name} ({layer}) | {len(pruned)}/{channels} "
            f"| {report['params_dense']:,} / {report['params_slim']:,} "
            f"({report['params_slim'] / report['params_dense']:.0%}) "
            f"| {report['bytes_dense'] / 1e6:.2f} / {report['bytes_slim'] / 1e6:.2f} MB "
            f"| {macs_dense / 1e6:.1f}M / {macs_slim / 1e6:.1f}M ({macs_slim / macs_dense:.0%}) "
            f"| {diff:.1e} | " + " | ".join(cells) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
