"""Training samples per second: the framework's fit against a plain fp32 PyTorch loop, in one run, per task.

For each built-in task, at its real size (model, poisoned training set, batch size and optimizer of its config):

* ``plain fp32 loop``: what a user would write by hand: ``DataLoader(TensorDataset, shuffle=True)``, the model's
  own network with PyTorch's ``nn.MaxPool2d`` (``with_torch_pools``: what a hand-written network has), the config's
  optimizer, ``loss.backward(); opt.step()``; nothing else (no validation, no logging).
  This is the baseline (1.00x).
* ``framework fp32``: ``train.py``'s own Trainer (``build_trainer``: callbacks, checkpointing, a validation pass
  every epoch) fitting the task's ``BackdoorClassifier``, as the default run does.
* ``framework speed=fast``: the same with ``speed=fast`` (channels-last convs, and bf16 autocast where the hardware
  runs it: a GPU, a CPU with AMX or AVX-512 BF16; fp32 on other CPUs, ``backdoor_lab.machine.fast_precision``).
* ``plain bf16+channels-last loop`` (``fp32+channels-last`` where speed=fast keeps fp32): the plain loop with the
  same switches, to show what they give alone. ``--bf16`` adds the bf16 loop where speed=fast does not use it, to
  measure what emulated bf16 costs.

Each row trains ``--epochs`` epochs (the first batch's start-up included, as a user waits for it) and reports
samples per second = epochs x training samples / wall time. The device and the CPU's bf16 support are printed,
so the figures can be re-taken on a GPU (``--accelerator gpu``).

    python bench/train_throughput.py [--epochs 2] [--threads N] [--only signs_badnets] [--markdown] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from backdoor_lab import CONF_DIR  # noqa: E402
from backdoor_lab.build import build_datamodule, build_model, build_trainer  # noqa: E402
from backdoor_lab.machine import describe_device  # noqa: E402
from backdoor_lab.models.pooling import with_torch_pools  # noqa: E402

TASKS = ["signs_badnets", "speech_noise", "face_sunglasses"]


def config(experiment: str, root: Path, extra: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "callbacks.progress_bar=null", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root)
        cfg.paths.run_dir = str(root / "run")
    return cfg


def plain_loop(
    cfg: DictConfig,
    epochs: int,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    compiled: bool = False,
) -> tuple[float, int, list[float]]:
    """The hand-written fp32 loop (or with bf16 autocast, channels-last, ``torch.compile``).

    Returns (wall seconds, samples trained, each epoch's seconds): a compiled loop pays its compilation in the
    first epoch, so the later epochs show its steady speed.
    """
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg, fit_on="poisoned")
    net = with_torch_pools(build_model(cfg, dm.num_classes).net).to(device)  # the pools a hand-written net has
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        net.compile()  # in place: the module keeps its names (and state_dict keys)
    opt = instantiate(cfg.model.optimizer)(params=net.parameters())
    loader = DataLoader(dm.dataset(dm.fit_on), batch_size=cfg.data.batch_size, shuffle=True)
    return plain_steps(net, opt, loader, epochs, device, bf16, channels_last)


def plain_steps(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
) -> tuple[float, int, list[float]]:
    """``epochs`` of ``loss.backward(); opt.step()`` over ``loader`` and nothing else: (wall seconds, samples
    trained, each epoch's seconds). ``bf16``: bf16 autocast; ``channels_last``: channels-last inputs."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    net.train()
    samples = 0
    start = time.perf_counter()
    epoch_walls = []
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_walls.append(time.perf_counter() - epoch_start)
    return time.perf_counter() - start, samples, epoch_walls


def framework_fit(cfg: DictConfig, epochs: int) -> tuple[float, int, list[float]]:
    """``train.py``'s Trainer and model, fit for ``epochs`` (validation every epoch, as configured)."""
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg, fit_on="poisoned")
    model = build_model(cfg, dm.num_classes)
    trainer = build_trainer(cfg, Path(cfg.paths.run_dir), [], epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start, epochs * len(dm.dataset(dm.fit_on)), []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", choices=TASKS, action="append")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--markdown", action="store_true", help="print the rows as a docs/benchmarks.md table")
    parser.add_argument("--compile", action="store_true", help="add speed=fast's plain loop under torch.compile")
    parser.add_argument("--bf16", action="store_true", help="add the plain bf16 loop where speed=fast keeps fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    trainer_extra = ["trainer=gpu"] if args.accelerator == "gpu" else []
    print(describe_device(device))
    rows = []
    for task in args.only or TASKS:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fp32 = config(task, root, trainer_extra)
            fast = config(task, root, [*trainer_extra, "speed=fast"])
            build_datamodule(fp32, fit_on="poisoned")  # data built (or read from the cache) before any timing
            fast_bf16 = "bf16" in str(fast.trainer.precision)
            kind = "bf16" if fast_bf16 else "fp32"
            results = {
                "plain fp32 loop": plain_loop(fp32, args.epochs, device),
                f"plain {kind}+channels-last loop": plain_loop(fp32, args.epochs, device, fast_bf16, True),
            }
            if args.bf16 and not fast_bf16:
                results["plain bf16+channels-last loop"] = plain_loop(fp32, args.epochs, device, True, True)
            if args.compile:
                results[f"plain {kind}+channels-last+compile loop"] = plain_loop(
                    fp32, args.epochs, device, fast_bf16, True, True
                )
            results["framework fp32"] = framework_fit(fp32, args.epochs)
            results[f"framework speed=fast ({kind})"] = framework_fit(fast, args.epochs)
        plain_s, n, _ = results["plain fp32 loop"]
        base = n / plain_s
        for label, (wall, samples, epoch_walls) in results.items():
            rate = samples / wall
            rows.append((task, label, rate, rate / base, wall))
            epochs = f"; epochs {', '.join(f'{w:.1f}' for w in epoch_walls)} s" if epoch_walls else ""
            line = f"{task:16s} {label:38s} {rate:8.0f} samples/s  {rate / base:5.2f}x  ({wall:.1f} s{epochs})"
            print(line, flush=True)
    if args.markdown:
        print("\n| task | loop | samples/s | vs plain fp32 | wall |\n|---|---|---|---|---|")
        for task, label, rate, ratio, wall in rows:
            print(f"| {task} | {label} | {rate:.0f} | {ratio:.2f}x | {wall:.1f} s |")


if __name__ == "__main__":
    main()
