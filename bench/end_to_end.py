"""Time the README's main job (train.py then defend.py) for one experiment, and record it.

    python bench/end_to_end.py [experiment] [extra hydra overrides...]

Runs in a fresh cache (data generation included, as a first-time user sees it), keeps the runs under
outputs/bench/<experiment>-<time>/ (prune curves and metrics for the report), reads the two metrics.json
files, and appends a row to docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from backdoor_lab.machine import cpu_name, describe_device  # noqa: E402


def run(script: str, args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / script), *args], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    experiment = sys.argv[1] if len(sys.argv) > 1 else "signs_badnets"
    extra = sys.argv[2:]
    outputs = ROOT / "outputs" / "bench" / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BACKDOOR_LAB_CACHE": f"{tmp}/cache", "WANDB_MODE": "offline"}
        args = [f"experiment={experiment}", f"paths.output_dir={outputs}", "callbacks.progress_bar=null", *extra]
        t_train = run("train.py", args, env)
        t_defend = run("defend.py", args, env)
    trained = json.loads(next(Path(outputs, "train").glob("*/*/metrics.json")).read_text())
    defended = json.loads(next(Path(outputs, "defend").glob("*/*/defense/fine_pruning/metrics.json")).read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"{describe_device('cuda' if gpu else 'cpu')}; {os.cpu_count()} cores")
    cpu, device = cpu_name(), gpu or "no GPU"
    row = (
        f"| {date.today()} | {experiment} {' '.join(extra)} | {os.cpu_count()} cores {cpu}, {device} | "
        f"{t_train:.0f} s | "
        f"{trained['clean_acc']:.4f} / {trained['asr']:.4f} | {t_defend:.0f} s | {defended['pruned_fraction']:.3f} | "
        f"{defended['after']['clean_acc']:.4f} / {defended['after']['asr']:.4f} |"
    )
    print(row)
    append_row(ROOT / "docs" / "benchmarks.md", row)


HEADER = (
    "| date | experiment | machine | train.py | test clean acc / ASR | defend.py | pruned | after: clean acc / ASR |"
)


def append_row(path: Path, row: str) -> None:
    """The row goes at the end of the end-to-end table (the first in the file), not after the later sections."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Benchmarks\n\nEnd-to-end wall time of the main job (`bench/end_to_end.py`), data generation included."
            f"\n\n{HEADER}\n|---|---|---|---|---|---|---|---|\n"
        )
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row + "\n")
    path.write_text("".join(lines))


if __name__ == "__main__":
    main()
