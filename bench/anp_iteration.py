"""What one ANP iteration costs, in fp32 as the README's table ran it and as ``speed=fast`` runs it.

ANP is most of a defense comparison's time (docs/benchmarks.md: 85% of a four-defense signs job). Each iteration is
three forward passes and two backward passes down to the masks over one batch of 128 clean samples. For each
built-in task (its config's network, freshly initialised: the cost does not depend on the weights; the defender's
clean split) this times ``--iterations`` iterations of ``backdoor_lab.defenses.anp.optimize_masks``:

* fp32, NCHW: as ``defend.py`` runs it by default (the README's ANP rows);
* fp32, channels-last convs;
* ``speed=fast``: channels-last, and bf16 autocast where the hardware runs it (``fast_precision``; fp32 elsewhere).

The last fp32 row repeats the first, so the machine's drift during the run shows. Prints the device.

    python bench/anp_iteration.py [--iterations 30] [--threads N] [--only signs_badnets]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from train_throughput import TASKS, config  # noqa: E402

from backdoor_lab.build import build_datamodule, build_model  # noqa: E402
from backdoor_lab.defenses.anp import optimize_masks  # noqa: E402
from backdoor_lab.defenses.defender_data import DefenderData  # noqa: E402
from backdoor_lab.defenses.successor_settings import ANPSettings  # noqa: E402
from backdoor_lab.machine import describe_device, fast_precision  # noqa: E402


def seconds_per_iteration(cfg, dm, iterations: int, bf16: bool) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dm.num_classes)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    loader = DefenderData.of(dm).clean_val_dataloader()
    start = time.perf_counter()
    optimize_masks(
        model,
        loader,
        ANPSettings(iterations=iterations),
        generator=torch.Generator().manual_seed(0),
        forward_context=autocast,
    )
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", choices=TASKS, action="append")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fast_bf16 = "bf16" in fast_precision("cpu")
    print(describe_device())
    fast = f"speed=fast ({'bf16' if fast_bf16 else 'fp32'}, channels-last)"
    print(f"| task | fp32, NCHW (default) | fp32, channels-last | {fast} | fp32, NCHW again |")
    print("|---|---|---|---|---|")
    for task in args.only or TASKS:
        with tempfile.TemporaryDirectory() as tmp:
            nchw = config(task, Path(tmp), [])
            channels_last = config(task, Path(tmp), ["model.channels_last=true"])
        dm = build_datamodule(nchw, fit_on="poisoned")
        times = [
            seconds_per_iteration(cfg, dm, args.iterations, bf16)
            for cfg, bf16 in ((nchw, False), (channels_last, False), (channels_last, fast_bf16), (nchw, False))
        ]
        base = (times[0] + times[3]) / 2
        cells = " | ".join(f"{t * 1e3:.0f} ms ({base / t:.2f}x)" for t in times)
        print(f"| {task} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
