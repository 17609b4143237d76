"""The defense job against training, and both scripts' start-up, on signs, as a user runs them.

1. ``train.py experiment=signs_badnets trainer.max_epochs=1 reuse=false``: one training epoch (9,500 samples),
   a validation pass and the test evaluation: the unit.
2. ``defend.py experiment=signs_badnets ckpt_path=<a trained signs model>``: fine-pruning (rank pass, the whole
   prune curve, 20 fine-tuning epochs over the 1,440 defender samples: about three training epochs of
   arithmetic) and the test evaluations before and after. The issue's check: at most 2.5x the unit.
3. Start-up of each: seconds from the process's start to its first fit's setup (``bench/first_fit.py``).

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

ROOT = Path(__file__).resolve().parents[1]


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
        train_s, train_start, _ = run("train.py", [*common, "trainer.max_epochs=1", "reuse=false"], env)
        defend_s, defend_start, out = run("defend.py", [*common, f"ckpt_path={ckpt}"], env)
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
    after = re.findall(r"After fine_pruning: clean accuracy ([0-9.]+), ASR ([0-9.]+)", out)
    if after:
        print(f"fine_pruning after: clean {after[-1][0]}, ASR {after[-1][1]}")


if __name__ == "__main__":
    main()
