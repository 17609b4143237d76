"""How close a training step runs to this machine's arithmetic limit, per task and precision.

The other benches compare the framework with a plain loop; this one compares a step with the hardware. For each
built-in task at its real size (its config's network with the library pools, batch size and optimizer, a batch
of its poisoned training set) and each arithmetic ``train.py`` runs:

* ``fp32``: the default and ``speed=exact`` (the README's tables): NCHW, except DeepID, which turns its input
  channels-last itself;
* ``speed=fast``: channels-last, with bf16 autocast where it chooses bf16 (a CPU with AMX or AVX-512 BF16, a GPU;
  ``backdoor_lab.machine.fast_precision``), fp32 elsewhere;

it prints the FLOPs of one training step (forward and backward, counted by ``torch.utils.flop_counter``), the
step's time (median of ``--steps``), and the rate that gives, next to the machine's own limit at the same thread
count, precision and memory order: the better of a 2048x2048 matrix product and a 3x3 convolution of 64x128x32x32
(the work oneDNN, or cuBLAS/cuDNN, runs closest to the peak), each at its fastest of 10 calls (bf16's rate at two
threads moves by 2-4x from call to call on a 2-core machine; the fastest is what the hardware can do).

On the CPU a profile of further steps splits the time into the convolutions (forward and backward, with their own
rate) and everything else (pools, ReLU, dropout, the loss, the optimizer), so the table says how much a faster
kernel could still give, and where. On a GPU, whose kernels run asynchronously to the ops that launch them, the
split is left out.

    python bench/machine_limit.py [--threads 1] [--steps 20] [--only speech_noise] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from train_throughput import TASKS, config  # noqa: E402

from backdoor_lab.build import build_datamodule, build_model  # noqa: E402
from backdoor_lab.cli import keep_freed_memory  # noqa: E402
from backdoor_lab.machine import describe_device, fast_precision  # noqa: E402


def wall_ms(work: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """The wall times of ``repeats`` calls of ``work`` in ms, after three untimed calls (oneDNN builds its primitives
    on the first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):
        work()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def reference_gflops(device: torch.device, bf16: bool, channels_last: bool) -> dict[str, float]:
    """The machine's rate at large, regular work in this precision and memory order: a matrix product and a
    3x3 convolution, GFLOP/s, each at its fastest of 10 calls (a limit: what the machine was seen to reach)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(64, 128, 32, 32, device=device, dtype=dtype)
    w = torch.randn(128, 128, 3, 3, device=device, dtype=dtype)
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    gemm_ms = min(wall_ms(lambda: a @ b, device, 10))
    conv_ms = min(wall_ms(lambda: F.conv2d(x, w, padding=1), device, 10))
    return {
        "matrix product": 2 * 2048**3 / gemm_ms / 1e6,
        "3x3 convolution": 2 * 64 * 128 * 128 * 9 * 32 * 32 / conv_ms / 1e6,
    }


def measure(task: str, device: torch.device, fast: bool, steps: int) -> dict[str, float]:
    """One task's training step in fp32 NCHW or in ``speed=fast``'s arithmetic: FLOPs, time, the profile's split."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(task, Path(tmp), [])
        dm = build_datamodule(cfg, fit_on="poisoned")
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, dm.num_classes).net.to(device)
    bf16 = fast and "bf16" in fast_precision("gpu" if device.type == "cuda" else "cpu")
    if fast:
        net = net.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    inputs, labels = dm.dataset(dm.fit_on).tensors[:2]
    x, y = inputs[: cfg.data.batch_size].to(device), labels[: cfg.data.batch_size].to(device)
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    memory_order: list[bool] = []  # DeepID turns its input channels-last in every precision
    hook = convs[-1].register_forward_pre_hook(
        lambda _, args: memory_order.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with FlopCounterMode(display=False) as counter:
        step()
    hook.remove()
    flops = counter.get_flop_counts()["Global"]
    conv_flops = sum(n for op, n in flops.items() if "convolution" in str(op))
    step_ms = statistics.median(wall_ms(step, device, steps))
    conv_share = float("nan")
    if device.type == "cpu":
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                step()
        events = profiler.key_averages()  # self times: each microsecond counted once, in the op that spent it
        conv_us = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        conv_share = conv_us / sum(e.self_cpu_time_total for e in events)
    return {
        "bf16": bf16,
        "channels_last": memory_order[0],
        "gflop": counter.get_total_flops() / 1e9,
        "step_ms": step_ms,
        "conv_ms": step_ms * conv_share,
        "conv_gflop": conv_flops / 1e9,
        "rest_ms": step_ms * (1 - conv_share),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the paper sweep's jobs: 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed (and then profiled) training steps")
    parser.add_argument("--only", choices=TASKS, action="append")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py's jobs run
    device = torch.device(args.device)
    print(describe_device(device), f"torch threads: {torch.get_num_threads()}")
    references = {}
    print(
        "\n| task | arithmetic | GFLOP/step | step | GFLOP/s | of the limit | convolutions: ms, GFLOP/s "
        "| everything else |\n|---|---|---|---|---|---|---|---|"
    )
    for task in args.only or TASKS:
        for fast in (False, True):
            row = measure(task, device, fast, args.steps)
            kind = ("bf16" if row["bf16"] else "fp32") + (", channels-last" if row["channels_last"] else ", NCHW")
            if kind not in references:
                references[kind] = reference_gflops(device, row["bf16"], row["channels_last"])
            limit = max(references[kind].values())
            rate = row["gflop"] / row["step_ms"] * 1e3
            conv_rate = row["conv_gflop"] / row["conv_ms"] * 1e3
            label = "speed=fast" if fast else "fp32 (default)"
            split = "n/a (CPU only) | n/a"
            if not math.isnan(row["conv_ms"]):  # profiled (on the CPU)
                split = (
                    f"{row['conv_ms']:.1f} ms, {conv_rate:.0f} ({conv_rate / limit:.0%}) "
                    f"| {row['rest_ms']:.1f} ms ({row['rest_ms'] / row['step_ms']:.0%})"
                )
            print(
                f"| {task} | {label}: {kind} | {row['gflop']:.2f} | {row['step_ms']:.1f} ms | {rate:.0f} "
                f"| {rate / limit:.0%} | {split} |",
                flush=True,
            )
    print("\nthe limit (GFLOP/s, the best of the two, same threads, precision and memory order):")
    for kind, rates in references.items():
        print(f"  {kind}: " + ", ".join(f"{name} {value:.0f}" for name, value in rates.items()))


if __name__ == "__main__":
    main()
