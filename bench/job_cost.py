"""The defense job against training, and both scripts' start-up, on signs, as a user runs them.

1. ``train.py experiment=signs_badnets trainer.max_epochs=1 reuse=false``: one training epoch (9,500 samples),
   a validation pass and the test evaluation: the unit.
2. ``defend.py experiment=signs_badnets ckpt_path=<a trained signs model>``: fine-pruning (rank pass, the whole
   prune curve, 20 fine-tuning epochs over the 1,440 defender samples: about three training epochs of
   arithmetic) and the test evaluations before and after. The issue's check: at most 2.5x the unit.
3. Start-up of each: seconds from the process's start to its first fit's setup (``bench/first_fit.py``).
4. The defense job's own arithmetic, in the same run: its fine-tuning steps (the fine-tune budget's epochs over the
   defender's clean samples, at its batch size and optimizer) plus one plain no-grad pass over the val and test
   splits. The steps are timed three ways: as ``defend.py`` itself ran them (``bench/first_fit.py`` times every
   epoch's steps), at ``train.py``'s training speed (its epoch of step 1), and as a plain fp32 PyTorch loop timed
   here. The issue's target: ``defend.py`` within 1.2x of it. The machine's speed drifts from minute to minute on
   a shared host, so ``--rounds N`` repeats steps 1, 2 and 4 and reports medians (the first of the three speeds is
   measured inside the job it is compared with, so it drifts least).

The data cache is warmed first, so neither pays for rendering the data. Without ``--ckpt`` a signs model is
trained first at full length (as ``python train.py`` does, ~2-3 min).

    python bench/job_cost.py [--ckpt RUN/model.safetensors] [--threads N] [--rounds 3] [extra hydra overrides...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from train_throughput import plain_steps  # noqa: E402  (bench/, beside this script)

from backdoor_lab import CONF_DIR  # noqa: E402
from backdoor_lab.build import build_datamodule, build_model  # noqa: E402
from backdoor_lab.machine import describe_device  # noqa: E402


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
    fine_tune_s, steps, _ = plain_steps(net, opt, loader, cfg.fine_tune.epochs, torch.device("cpu"))
    net.eval()
    evaluated, start = 0, time.perf_counter()
    with torch.no_grad():
        for role in ("val_clean", "val_triggered", "test_clean", "test_triggered"):
            for x, *_ in DataLoader(dm.dataset(role), batch_size=cfg.data.eval_batch_size):
                net(x)
                evaluated += len(x)
    return fine_tune_s, steps, time.perf_counter() - start, evaluated


def epochs(output: str) -> tuple[float, int]:
    """Seconds and samples of the training steps of every epoch a script's fits ran (``bench/first_fit.py``)."""
    found = re.findall(r"TRAIN_EPOCH ([0-9.]+) ([0-9]+)", output)
    return sum(float(s) for s, _ in found), sum(int(n) for _, n in found)


PLAIN_IMPORT = "import lightning.pytorch"
SCRIPTS_IMPORT = "from backdoor_lab.cli import start_script; start_script()"


def import_seconds(code: str, env: dict[str, str]) -> float:
    """Wall seconds of a fresh ``python -c <code>``, exit included: what a script pays for its imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - started


def one_round(common: list[str], ckpt: str, env: dict[str, str]) -> dict[str, float]:
    """``train.py`` for one epoch, ``defend.py`` on ``ckpt``, then the defense's arithmetic as plain PyTorch."""
    train_s, train_start, train_out = run("train.py", [*common, "trainer.max_epochs=1", "reuse=false"], env)
    defend_s, defend_start, out = run("defend.py", [*common, f"ckpt_path={ckpt}"], env)
    plain_ft_s, ft_samples, eval_s, eval_samples = arithmetic(
        [o for o in common if not o.startswith(("paths.", "+callbacks.", "callbacks."))]
    )
    import_floor_s = min(import_seconds(PLAIN_IMPORT, env) for _ in range(3))
    scripts_import_s = min(import_seconds(SCRIPTS_IMPORT, env) for _ in range(3))
    train_steps_s, train_samples = epochs(train_out)
    defend_steps_s, defend_samples = epochs(out)
    if defend_samples != ft_samples:
        raise SystemExit(f"defend.py fine-tuned on {defend_samples} samples, the plain loop on {ft_samples}")
    after = re.findall(r"After fine_pruning: clean accuracy ([0-9.]+), ASR ([0-9.]+)", out)
    return {
        "train_s": train_s,
        "train_start": train_start or 0.0,
        "defend_s": defend_s,
        "defend_start": defend_start or 0.0,
        "import_floor_s": import_floor_s,
        "scripts_import_s": scripts_import_s,
        "samples": ft_samples,
        "eval_s": eval_s,
        "eval_samples": eval_samples,
        # the fine-tuning steps at three speeds: as defend.py ran them, at train.py's, as a plain fp32 loop
        "own_s": defend_steps_s,
        "train_speed_s": ft_samples * train_steps_s / train_samples,
        "plain_s": plain_ft_s,
        "reused": float("test score is its training run's" in out),
        "after_clean": float(after[-1][0]) if after else float("nan"),
        "after_asr": float(after[-1][1]) if after else float("nan"),
    }


SPEEDS = {
    "own_s": "its own steps' speed",
    "train_speed_s": "train.py's training speed",
    "plain_s": "a plain fp32 loop's speed",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a trained signs model.safetensors (default: train one first)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the timed runs (medians are reported)")
    args, extra = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the in-process arithmetic runs at the jobs' thread count
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "BACKDOOR_LAB_CACHE": os.environ.get("BACKDOOR_LAB_CACHE", f"{tmp}/cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]),
        }
        os.environ["BACKDOOR_LAB_CACHE"] = env["BACKDOOR_LAB_CACHE"]  # the in-process arithmetic reads it too
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
            run("train.py", [*common, "reuse=false", f"paths.output_dir={tmp}/trained"], env)
            ckpt = str(next(Path(tmp, "trained", "train").rglob("model.safetensors")))
        rounds = [one_round(common, ckpt, env) for _ in range(args.rounds)]
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"{describe_device()}; {os.cpu_count()} cores")
    if importlib.util.find_spec("scipy") is not None:  # torchmetrics then imports scipy.signal: ~1 s more
        print("scipy is installed (optuna, of the `sweeps` extra, brings it; `pip install -e .[dev]` does not)")
    print(f"{len(rounds)} round(s); medians. defend.py's undefended score: ", end="")
    print("its training run's test pass" if med["reused"] else "tested in the job")
    print("\n| command | wall | start-up to the first fit | vs train.py 1 epoch |\n|---|---|---|---|")
    print(
        f"| `train.py experiment=signs_badnets trainer.max_epochs=1 reuse=false` | {med['train_s']:.1f} s "
        f"| {med['train_start']:.2f} s | 1.00x |"
    )
    print(
        f"| `defend.py experiment=signs_badnets ckpt_path=...` | {med['defend_s']:.1f} s "
        f"| {med['defend_start']:.2f} s | {statistics.median(r['defend_s'] / r['train_s'] for r in rounds):.2f}x |"
    )
    print(
        f"\nThe defense job's arithmetic: {med['samples']:.0f} fine-tuning samples, and one plain pass over val and "
        f"test ({med['eval_samples']:.0f} samples, {med['eval_s']:.1f} s). defend.py / it (per round: "
        + "; ".join(f"{r['defend_s'] / (r['own_s'] + r['eval_s']):.2f}x" for r in rounds)
        + " at its own steps' speed)"
    )
    print("\n| fine-tuning steps at | steps | arithmetic | defend.py / it | after start-up |\n|---|---|---|---|---|")
    for key, label in SPEEDS.items():
        ratio = statistics.median(r["defend_s"] / (r[key] + r["eval_s"]) for r in rounds)
        after = statistics.median((r["defend_s"] - r["defend_start"]) / (r[key] + r["eval_s"]) for r in rounds)
        rate = med["samples"] / med[key]
        print(
            f"| {label} ({rate:.0f} samples/s) | {med[key]:.1f} s | {med[key] + med['eval_s']:.1f} s "
            f"| {ratio:.2f}x | {after:.2f}x |"
        )
    beyond = statistics.median((r["defend_s"] - r["scripts_import_s"]) / (r["own_s"] + r["eval_s"]) for r in rounds)
    print(
        f"\nStart-up: a fresh `python -c '{PLAIN_IMPORT}'` takes {med['import_floor_s']:.2f} s and "
        f"`python -c '{SCRIPTS_IMPORT}'` (the scripts' import: the collector paused, the heap frozen) "
        f"{med['scripts_import_s']:.2f} s, each the least of 3 with its exit; defend.py's {med['defend_start']:.2f} s "
        "to its first fit is the latter plus the rest. "
        f"defend.py less the scripts' import, against its arithmetic at its own steps' speed: {beyond:.2f}x"
    )
    print(f"fine_pruning after: clean {med['after_clean']:.4f}, ASR {med['after_asr']:.4f}")


if __name__ == "__main__":
    main()
