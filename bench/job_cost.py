"""The defense job against training, and both scripts' start-up, on signs, as a user runs them.

1. ``train.py experiment=signs_badnets trainer.max_epochs=1 reuse=false``: one training epoch (9,500 samples),
   a validation pass and the test evaluation: the unit.
2. ``defend.py experiment=signs_badnets ckpt_path=<a trained signs model>``: fine-pruning (rank pass, the whole
   prune curve, 20 fine-tuning epochs over the 1,440 defender samples: about three training epochs of
   arithmetic) and the test evaluations before and after. The issue's check: at most 2.5x the unit.
3. Start-up of each: seconds from the process's start to its first fit's setup (``bench/first_fit.py``).
4. The defense job's own arithmetic, in the same run: its fine-tuning steps (the fine-tune budget's epochs over the
   defender's clean samples, at its batch size and optimizer) at the framework's training speed (``train.py``'s
   epoch of step 1, timed by ``bench/first_fit.py``) and, stricter, as a plain fp32 PyTorch loop (timed here), plus
   one plain pass over the val and test splits. The issue's target: ``defend.py`` within 1.2x of it.

The data cache is warmed first, so neither pays for rendering the data. Without ``--ckpt`` a signs model is
trained first at full length (as ``python train.py`` does, ~2-3 min).

    python bench/job_cost.py [--ckpt RUN/model.safetensors] [--threads N] [extra hydra overrides...]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from backdoor_lab import CONF_DIR  # noqa: E402
from backdoor_lab.build import build_datamodule, build_model  # noqa: E402


def run(script: str, overrides: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """Wall seconds of ``script`` with ``overrides``, its start-up (to its first fit's setup), its output."""
    env = {**env, "BENCH_T0": repr(time.time())}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], env=env, cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = re.search(r"FIRST_FIT ([0-9.]+)", proc.stdout + proc.stderr)
    return wall, float(found.group(1)) if found else None, proc.stdout + proc.stderr


def arithmetic(overrides: list[str]) -> tuple[float, int, float, int]:
    """The defense job's arithmetic as plain PyTorch: (seconds and samples of its fine-tuning steps as a plain fp32
    loop, seconds and samples of one no-grad pass over the val and test splits, clean and triggered)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("defend", overrides=overrides)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg, fit_on="defender_clean")
    net = build_model(cfg, dm.num_classes).net
    opt = instantiate(cfg.fine_tune.optimizer)(params=net.parameters())
    loader = DataLoader(dm.dataset("defender_clean"), batch_size=cfg.data.batch_size, shuffle=True)
    net.train()
    steps, start = 0, time.perf_counter()
    for _ in range(cfg.fine_tune.epochs):
        for x, y, *_ in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += len(y)
    fine_tune_s = time.perf_counter() - start
    net.eval()
    evaluated, start = 0, time.perf_counter()
    with torch.no_grad():
        for role in ("val_clean", "val_triggered", "test_clean", "test_triggered"):
            for x, *_ in DataLoader(dm.dataset(role), batch_size=cfg.data.eval_batch_size):
                net(x)
                evaluated += len(x)
    return fine_tune_s, steps, time.perf_counter() - start, evaluated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a trained signs model.safetensors (default: train one first)")
    parser.add_argument("--threads", type=int, default=None)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "BACKDOOR_LAB_CACHE": os.environ.get("BACKDOOR_LAB_CACHE", f"{tmp}/cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]),
        }
        common = [
            "experiment=signs_badnets",
            f"paths.output_dir={tmp}/out",
            "callbacks.progress_bar=null",
            "+callbacks.first_fit._target_=first_fit.FirstFit",
            *([f"threads={args.threads}"] if args.threads else []),
            *extra,
        ]
        warm = [*common, "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "reuse=false"]
        run("train.py", warm, env)  # renders (or reads) the data cache: not timed
        ckpt = args.ckpt
        if ckpt is None:
            run("train.py", [*common, "reuse=false"], env)
            ckpt = str(next(Path(tmp, "out", "train").rglob("model.safetensors")))
        train_s, train_start, train_out = run("train.py", [*common, "trainer.max_epochs=1", "reuse=false"], env)
        defend_s, defend_start, out = run("defend.py", [*common, f"ckpt_path={ckpt}"], env)
        os.environ["BACKDOOR_LAB_CACHE"] = env["BACKDOOR_LAB_CACHE"]
        plain_ft_s, ft_samples, eval_s, eval_samples = arithmetic(
            [o for o in common if not o.startswith(("paths.", "+callbacks.", "callbacks."))]
        )
    threads = args.threads or torch.get_num_threads()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {threads} torch threads; torch {torch.__version__}")
    print(f"train.py trainer.max_epochs=1 reuse=false: {train_s:.1f} s (start-up to the first fit: {train_start} s)")
    print(f"defend.py (fine_pruning):                  {defend_s:.1f} s (start-up to the first fit: {defend_start} s)")
    print(f"defend.py / one training epoch: {defend_s / train_s:.2f}x (the issue's check: <= 2.5x)")
    print("\n| command | wall | start-up to the first fit | vs train.py 1 epoch |\n|---|---|---|---|")
    train_cmd = "`train.py experiment=signs_badnets trainer.max_epochs=1 reuse=false`"
    print(f"| {train_cmd} | {train_s:.1f} s | {train_start} s | 1.00x |")
    ratio = defend_s / train_s
    defend_cmd = "`defend.py experiment=signs_badnets ckpt_path=...`"
    print(f"| {defend_cmd} | {defend_s:.1f} s | {defend_start} s | {ratio:.2f}x |")
    epoch_s, epoch_samples = map(float, re.findall(r"TRAIN_EPOCH ([0-9.]+) ([0-9]+)", train_out)[-1])
    framework_ft_s = ft_samples / (epoch_samples / epoch_s)
    print(
        f"\nThe defense job's arithmetic: {ft_samples} fine-tuning samples at the framework's training speed "
        f"({epoch_samples / epoch_s:.0f} samples/s, train.py's epoch) {framework_ft_s:.1f} s, as a plain fp32 loop "
        f"{plain_ft_s:.1f} s ({ft_samples / plain_ft_s:.0f} samples/s); one plain pass over val and test "
        f"({eval_samples} samples) {eval_s:.1f} s"
    )
    print("\n| arithmetic at | arithmetic | defend.py / it | after start-up |\n|---|---|---|---|")
    speeds = (("the framework's training speed", framework_ft_s), ("the plain loop's speed", plain_ft_s))
    for label, fine_tune_s in speeds:
        work = fine_tune_s + eval_s
        after_start = (defend_s - (defend_start or 0.0)) / work
        print(f"| {label} | {work:.1f} s | {defend_s / work:.2f}x | {after_start:.2f}x |")
    reused = "test score is its training run's" in out
    print(f"defend.py's undefended score: {'its training run' + chr(39) + 's test pass' if reused else 'tested'}")
    after = re.findall(r"After fine_pruning: clean accuracy ([0-9.]+), ASR ([0-9.]+)", out)
    if after:
        print(f"fine_pruning after: clean {after[-1][0]}, ASR {after[-1][1]}")


if __name__ == "__main__":
    main()
