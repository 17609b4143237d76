"""The fp32 CPU step with and without the two changes that keep every bit: the library ``MaxPool2d`` and the kept heap.

``backdoor_lab.models.pooling.MaxPool2d`` runs PyTorch's channels-last max-pool kernel on NCHW tensors (the NCHW
kernel is scalar code), and ``backdoor_lab.cli.keep_freed_memory`` (every ``train.py``/``defend.py`` job) stops glibc
from handing a step's freed blocks back to the kernel, to be faulted in again by the next step. For each built-in
task whose network pools in NCHW (signs, speech; DeepID runs channels-last throughout), at its real size (its
config's network, poisoned training set, batch size and optimizer), four variants run, each in a process of its own
(malloc's settings are per process), in an order that rotates every round:

* ``nn.MaxPool2d``, glibc's default malloc: the code as it was (the baseline, 1.00x);
* the library ``MaxPool2d``, default malloc;
* ``nn.MaxPool2d``, freed memory kept;
* both: what ``train.py`` and ``defend.py`` run now.

Each measures ``--steps`` fp32 training steps (ms per step, with the process's minor page faults and system time per
step), one no-grad pass over the val split (as validation, the test pass and the prune curve run) and ``--anp``
iterations of ANP's mask search. All start from the same weights, batches and generator; the run fails unless
every variant ends on the same weights and logits, bit for bit. Prints the device.

    python bench/fp32_step.py [--rounds 3] [--steps 10] [--anp 5] [--threads 1] [--only speech_noise]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from backdoor_lab.cli import keep_freed_memory  # noqa: E402
from backdoor_lab.machine import describe_device  # noqa: E402
from backdoor_lab.models.pooling import with_torch_pools  # noqa: E402

TASKS = ["signs_badnets", "speech_noise"]
VARIANTS = {  # name: (library pool, kept heap)
    "nn.MaxPool2d, default malloc": (False, False),
    "library MaxPool2d": (True, False),
    "freed memory kept": (False, True),
    "both (train.py now)": (True, True),
}
MEASURES = ("train step", "eval pass", "ANP iteration")


def usage() -> tuple[int, float]:
    now = resource.getrusage(resource.RUSAGE_SELF)
    return now.ru_minflt, now.ru_stime


def child(task: str, variant: str, steps: int, anp: int, seed: int) -> dict:
    """One variant's measurements in this process (its malloc set first, as a script's job does)."""
    library_pool, kept = VARIANTS[variant]
    if kept:
        assert keep_freed_memory(), "glibc's mallopt is not available here"
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from train_throughput import config

    from backdoor_lab.build import build_datamodule, build_model
    from backdoor_lab.defenses.anp import optimize_masks
    from backdoor_lab.defenses.defender_data import DefenderData
    from backdoor_lab.defenses.successor_settings import ANPSettings

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(task, Path(tmp), [])
        dm = build_datamodule(cfg, fit_on="poisoned")
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, dm.num_classes).net
    if not library_pool:
        with_torch_pools(net)
    x_all, y_all = dm.dataset(dm.fit_on).tensors[:2]
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    batches = [(x_all[i], y_all[i]) for i in order[: (steps + 2) * cfg.data.batch_size].split(cfg.data.batch_size)]
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    torch.manual_seed(seed)  # dropout
    net.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    for x, y in batches[:2]:  # warm: oneDNN's primitives, the heap
        step(x, y)
    faults, system = usage()
    start = time.perf_counter()
    for x, y in batches[2:]:
        step(x, y)
    train_s = (time.perf_counter() - start) / steps
    faults_after, system_after = usage()
    loader = DefenderData.of(dm).clean_val_dataloader()
    net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([net(batch[0]) for batch in loader])
    eval_s = time.perf_counter() - start
    digest = hashlib.sha256(logits.numpy().tobytes())
    for value in net.state_dict().values():
        digest.update(value.numpy().tobytes())
    result = {
        "train step": train_s,
        "eval pass": eval_s,
        "faults": (faults_after - faults) / steps,
        "system_ms": (system_after - system) / steps * 1e3,
        "digest": digest.hexdigest(),
    }
    if anp:
        start = time.perf_counter()
        optimize_masks(net, loader, ANPSettings(iterations=anp), generator=torch.Generator().manual_seed(seed))
        result["ANP iteration"] = (time.perf_counter() - start) / anp
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant and round")
    parser.add_argument("--anp", type=int, default=5, help="ANP iterations per variant and round (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the paper sweep's jobs: 1)")
    parser.add_argument("--only", choices=TASKS, action="append")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        task, variant, seed = args.child
        print(json.dumps(child(task, variant, args.steps, args.anp, int(seed))))
        return
    print(describe_device())
    measures = MEASURES if args.anp else MEASURES[:2]
    names = list(VARIANTS)
    print(
        "\n| task | variant | train step | vs baseline | page faults, system time per step | eval pass | vs baseline"
        + (" | ANP iteration | vs baseline |" if args.anp else " |")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.anp else ""))
    for task in args.only or TASKS:
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rnd in range(args.rounds):
            digests = set()
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                command = [sys.executable, __file__, "--child", task, name, str(rnd)]
                command += ["--steps", str(args.steps), "--anp", str(args.anp), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append(result)
                digests.add(result["digest"])
            if len(digests) != 1:
                raise SystemExit(f"{task}: the variants ended round {rnd} on different weights or logits")
        base = {m: statistics.median(r[m] for r in runs[names[0]]) for m in measures}
        for name in names:
            cells = []
            for m in measures:
                value = statistics.median(r[m] for r in runs[name])
                spread = f"{min(r[m] for r in runs[name]) * 1e3:.0f}-{max(r[m] for r in runs[name]) * 1e3:.0f}"
                cells.append(f"{value * 1e3:.0f} ms ({spread}) | {base[m] / value:.2f}x")
                if m == "train step":
                    faults = statistics.median(r["faults"] for r in runs[name])
                    system = statistics.median(r["system_ms"] for r in runs[name])
                    cells.append(f"{faults:,.0f}, {system:.0f} ms")
            print(f"| {task} | {name} | " + " | ".join(cells) + " |", flush=True)
    print(
        f"\nmedians of {args.rounds} rounds (range in brackets); every variant ended every round on the same "
        "weights and logits, bit for bit"
    )


if __name__ == "__main__":
    main()
