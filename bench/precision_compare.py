"""Clean accuracy and ASR under ``speed=fast`` next to fp32's spread over seeds, from committed records.

    python bench/precision_compare.py docs/results/paper_sweep docs/results/speed_fast_train
    python bench/precision_compare.py --defenses docs/results/paper_sweep docs/results/paper_sweep_speed_fast_seed0
    python bench/precision_compare.py --identical docs/results/defenses_sweep docs/results/paper_sweep_exact_seed0

The first form reads every ``<task>-baseline-seed<N>/train_metrics.json`` of both folders (the first fp32, the
second ``speed=fast``) and prints, per task: mean ± sample std (n) of each, the fp32 range over seeds, and whether
the fast mean lies within fp32's mean ± 2 std (within one seed's spread). ``--defenses`` does the same for every
cell of the paper table (task, attack, defense: the test split after the defense) from both ``summary.csv``, and
prints the fast sweep's span of wall time (first job started to last job finished, from its ``job.json``).
``--identical`` asks whether the second folder's cells are bit for bit the first's at the same seeds (the
after-defense clean accuracy and ASR as written to ``summary.csv``), for a switch meant to change no number
(``speed=exact``), and prints the second sweep's span and its jobs' summed time.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from datetime import datetime
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


def table_cells(folder: Path) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """(task, attack variant, defense) -> after-defense clean % and ASR % over the folder's seeds."""
    out: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with (folder / "summary.csv").open() as f:
        for row in csv.DictReader(f):
            for key in ("after_clean_acc", "after_asr"):
                out[(row["task"], row["attack_variant"], row["defense"])][key].append(100 * float(row[key]))
    return out


def sweep_span(folder: Path) -> float:
    """Seconds from the first job's start to the last job's end."""
    jobs = [json.loads(p.read_text()) for p in folder.glob("*/job.json")]
    started = min(datetime.fromisoformat(j["started"]) for j in jobs)
    finished = max(datetime.fromisoformat(j["finished"]) for j in jobs)
    return (finished - started).total_seconds()


def seed_cells(folder: Path) -> dict[tuple[str, str, str, str], tuple[str, str]]:
    """(task, attack variant, defense, seed) -> after-defense clean accuracy and ASR, as written."""
    with (folder / "summary.csv").open() as f:
        return {
            (r["task"], r["attack_variant"], r["defense"], r["seed"]): (r["after_clean_acc"], r["after_asr"])
            for r in csv.DictReader(f)
        }


def compare_identical(reference_folder: Path, folder: Path) -> tuple[int, int]:
    """Print every cell of ``folder`` that differs from ``reference_folder``'s; (identical, compared)."""
    reference, cells = seed_cells(reference_folder), seed_cells(folder)
    missing = sorted(set(cells) - set(reference))
    if missing:
        raise SystemExit(f"{reference_folder} has no cell {missing[0]} (and {len(missing) - 1} more)")
    same = 0
    for key in sorted(cells):
        if cells[key] == reference[key]:
            same += 1
        else:
            print(f"differs: {key}: {cells[key]} against {reference[key]}")
    jobs = sum(json.loads(p.read_text())["wall_s"] for p in folder.glob("*/job.json"))
    span = sweep_span(folder)
    print(f"{same} of {len(cells)} cells identical (clean accuracy and ASR each)")
    print(f"the sweep spanned {span:.0f} s, its jobs {jobs:.0f} s")
    return same, len(cells)


def compare_defenses(fp32_folder: Path, fast_folder: Path) -> None:
    fp32, fast = table_cells(fp32_folder), table_cells(fast_folder)
    print("| task | attack | defense | clean %: fp32 | speed=fast | within | ASR %: fp32 | speed=fast | within |")
    print("|---|---|---|---|---|---|---|---|---|")
    outside = total = 0
    for key in sorted(fast):
        cells = []
        for metric in ("after_clean_acc", "after_asr"):
            ref, new = fp32[key][metric], fast[key][metric]
            mean, std = statistics.mean(ref), statistics.stdev(ref) if len(ref) > 1 else 0.0
            inside = abs(statistics.mean(new) - mean) <= 2 * std
            outside, total = outside + (not inside), total + 1
            cells += [cell(ref), cell(new), "yes" if inside else "**no**"]
        print("| " + " | ".join([*key, *cells]) + " |")
    span = sweep_span(fast_folder)
    print(f"\n{total - outside} of {total} cells within fp32 mean ± 2 std; its jobs spanned {span:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--identical", action="store_true", help="are the second folder's cells bit for bit the first's")
    mode.add_argument("--defenses", action="store_true", help="every cell of the paper table against fp32's spread")
    parser.add_argument("reference", type=Path, help="the fp32 records (a sweep folder of docs/results/)")
    parser.add_argument("other", type=Path, help="the records to compare with them")
    args = parser.parse_args()
    for folder in (args.reference, args.other):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder of records (e.g. docs/results/paper_sweep)")
    if args.identical:
        compare_identical(args.reference, args.other)
        return
    if args.defenses:
        compare_defenses(args.reference, args.other)
        return
    fp32, fast = read(args.reference), read(args.other)
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
