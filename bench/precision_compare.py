"""Clean accuracy and ASR of models trained with ``speed=fast`` next to fp32's spread over seeds, from records.

    python bench/precision_compare.py docs/results/paper_sweep docs/results/speed_fast_train

Reads every ``<task>-baseline-seed<N>/train_metrics.json`` of both folders (the first fp32, the second
``speed=fast``) and prints, per task: mean ± sample std (n) of each, the fp32 range over seeds, and whether the
fast mean lies within fp32's mean ± 2 std (within one seed's spread).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def read(folder: Path) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.glob("*-baseline-seed*/train_metrics.json")):
        m = json.loads(path.read_text())
        for key in ("clean_acc", "asr"):
            out[m["task"]][key].append(100 * m[key])
    return out


def cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} ({len(values)})"


def main() -> None:
    fp32, fast = read(Path(sys.argv[1])), read(Path(sys.argv[2]))
    print("| task | metric | fp32 | fp32 range | speed=fast | within fp32 mean ± 2 std |")
    print("|---|---|---|---|---|---|")
    for task in sorted(fast):
        for key, label in (("clean_acc", "clean %"), ("asr", "ASR %")):
            ref, new = fp32[task][key], fast[task][key]
            mean, std = statistics.mean(ref), statistics.stdev(ref) if len(ref) > 1 else 0.0
            inside = abs(statistics.mean(new) - mean) <= 2 * std
            span = f"{min(ref):.2f}-{max(ref):.2f}"
            print(f"| {task} | {label} | {cell(ref)} | {span} | {cell(new)} | {'yes' if inside else 'no'} |")


if __name__ == "__main__":
    main()
