"""What feeding the batches costs: one epoch of each task's loaders, per-sample collation against gathered batches.

For each built-in task (its real poisoned training set and its val/test splits, from the data cache), the time to
iterate, with no model, every batch of:

* the training loader (the config's batch size, shuffled) and the evaluation loaders (clean and triggered val and
  test, ``eval_batch_size``), as ``DataLoader(TensorDataset)`` makes them: ``__getitem__`` per sample, then
  ``torch.stack`` per tensor (the baseline);
* the same loaders as the framework makes them (``backdoor_lab.data.tensor_loader``): one gather per tensor.

Each figure is the median of ``--repeat`` epochs, the two alternated; the batches of both are checked equal (the
same shuffle, the same values). Set against an epoch's training time (``bench/train_throughput.py``) it gives the
share of an epoch the data takes. The device is printed; with ``--accelerator gpu`` each batch is also copied to
the GPU (pinned memory, non-blocking), as the Trainer does.

    python bench/data_loading.py [--repeat 5] [--threads N] [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from train_throughput import TASKS, config  # noqa: E402

from backdoor_lab.build import build_datamodule  # noqa: E402
from backdoor_lab.data.tensor_loader import tensor_loader  # noqa: E402
from backdoor_lab.machine import describe_device  # noqa: E402

EVAL_ROLES = ("val_clean", "val_triggered", "test_clean", "test_triggered")


def epoch_seconds(loaders: list[DataLoader], device: torch.device) -> float:
    """One pass over every loader's batches (copied to ``device`` off the CPU), wall seconds."""
    start = time.perf_counter()
    for loader in loaders:
        for batch in loader:
            if device.type == "cuda":
                batch = [t.to(device, non_blocking=True) for t in batch]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def same_batches(a: DataLoader, b: DataLoader) -> bool:
    state = torch.get_rng_state()
    first = [list(batch) for batch in a]
    torch.set_rng_state(state)
    second = [list(batch) for batch in b]
    return len(first) == len(second) and all(
        len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y, strict=True))
        for x, y in zip(first, second, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    pin = device.type == "cuda"
    print(f"{describe_device(device)}; median of {args.repeat} epochs")
    print("| task | loaders | batches | per-sample collation | gathered | ratio | batches equal |")
    print("|---|---|---|---|---|---|---|")
    for task in TASKS:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(task, Path(tmp), [])
        dm = build_datamodule(cfg, fit_on="poisoned")
        groups = {
            f"train (batch {dm.batch_size}, shuffled)": [(dm.dataset("poisoned"), dm.batch_size, True)],
            f"val + test (batch {dm.eval_batch_size})": [
                (dm.dataset(role), dm.eval_batch_size, False) for role in EVAL_ROLES
            ],
        }
        for label, specs in groups.items():
            plain = [DataLoader(d, batch_size=b, shuffle=s, pin_memory=pin) for d, b, s in specs]
            gathered = [tensor_loader(d, b, s, pin_memory=pin) for d, b, s in specs]
            equal = all(same_batches(p, g) for p, g in zip(plain, gathered, strict=True))
            times = {"plain": [], "gathered": []}
            for _ in range(args.repeat):  # alternated, so a drift of the machine's speed hits both alike
                times["plain"].append(epoch_seconds(plain, device))
                times["gathered"].append(epoch_seconds(gathered, device))
            slow, fast = (statistics.median(times[k]) for k in ("plain", "gathered"))
            count = sum(len(loader) for loader in plain)
            print(
                f"| {task} | {label} | {count} | {slow * 1e3:.1f} ms | {fast * 1e3:.1f} ms | {slow / fast:.1f}x "
                f"| {'yes' if equal else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
