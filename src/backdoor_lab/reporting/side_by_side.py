"""Every defense side by side: the README's table (task x attack rows, one column per defense) and the defense times.

Built from summary.csv rows (``summary_csv`` writes them; a committed ``docs/results/<sweep>/summary.csv`` reads
back into the same rows), so that a figure in the README is recomputed from its committed record by one command,
``python -m backdoor_lab.reporting <folder> --side-by-side``, and a test can compare the two.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from backdoor_lab.reporting.table import DEFENSE_LABELS, format_duration

Row = Mapping[str, str | float | int | None]


def read_summary_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a summary.csv (every value a string, empty where nothing was recorded)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _floats(values: Iterable[object]) -> list[float]:
    out = []
    for v in values:
        if v in (None, ""):
            continue
        number = float(v)  # type: ignore[arg-type]
        if not math.isnan(number):
            out.append(number)
    return out


def _mean_std(values: Sequence[float]) -> str:
    """``98.50 ± 0.50`` in percent (sample std); one value has no std."""
    percent = [100 * v for v in values]
    mean = statistics.fmean(percent)
    return f"{mean:.2f}" if len(percent) == 1 else f"{mean:.2f} ± {statistics.stdev(percent):.2f}"


def _order(names: Iterable[str]) -> list[str]:
    known = list(DEFENSE_LABELS)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def defense_table(rows: Sequence[Row]) -> str:
    """``| task | attack | Initial | ... |``; a cell is clean / ASR after the defense, % mean ± std (n)."""
    cells: dict[tuple[str, str], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[(str(row["task"]), str(row["attack_variant"]))][str(row["defense"])].append(row)
    defenses = _order(str(row["defense"]) for row in rows)
    lines = [
        "| task | attack | " + " | ".join(DEFENSE_LABELS.get(d, d) for d in defenses) + " |",
        "|---|---|" + "---|" * len(defenses),
    ]
    for (task, variant), by_defense in sorted(cells.items()):
        out = []
        for defense in defenses:
            found = by_defense.get(defense, [])
            clean = _floats(r["after_clean_acc"] for r in found)
            asr = _floats(r["after_asr"] for r in found)
            out.append(f"{_mean_std(clean)} / {_mean_std(asr)} ({len(found)})" if clean and asr else "–")
        lines.append(f"| {task} | {variant} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def defense_times(rows: Sequence[Row]) -> str:
    """``| defense | <task> ... |``: each defense's own wall time, mean over seeds and attack variants."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["defense"] != "none":  # the Initial row measures, it does not defend
            times[str(row["defense"])][str(row["task"])].extend(_floats([row.get("wall_s")]))
    tasks = sorted({str(row["task"]) for row in rows})
    lines = ["| defense | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for defense in _order(times):
        spent = [times[defense].get(t) for t in tasks]
        lines.append(
            f"| {DEFENSE_LABELS.get(defense, defense)} | "
            + " | ".join(format_duration(statistics.fmean(s)) if s else "–" for s in spent)
            + " |"
        )
    return "\n".join(lines) + "\n"


def of_seeds(rows: Sequence[Row], seeds: Iterable[str | int] | None) -> list[Row]:
    """The rows of ``seeds`` only (None: all): times measured on an idle machine next to accuracies of every seed."""
    if seeds is None:
        return list(rows)
    wanted = {str(s) for s in seeds}
    return [row for row in rows if str(row.get("seed")) in wanted]


def side_by_side(rows: Sequence[Row]) -> str:
    """Both tables, as summary.md and the README show them."""
    return defense_table(rows) + "\nEach defense's own time (mean over seeds and attacks):\n\n" + defense_times(rows)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m backdoor_lab.reporting.side_by_side",
        description="Print the README's table (every defense side by side) and the defense times, recomputed "
        "from a summary.csv (a sweep folder's, or a committed docs/results/<sweep>/summary.csv).",
    )
    parser.add_argument("summary_csv", type=Path, help="a summary.csv written by python -m backdoor_lab.reporting")
    parser.add_argument(
        "--seeds", type=lambda text: text.split(","), default=None, help="only these seeds: 0 or 0,1 (default: all)"
    )
    args = parser.parse_args(argv)
    if not args.summary_csv.is_file():
        parser.error(f"{args.summary_csv} is not a file; run python -m backdoor_lab.reporting <folder> first")
    rows = of_seeds(read_summary_csv(args.summary_csv), args.seeds)
    if not rows:
        parser.error(f"{args.summary_csv} has no rows of seeds {','.join(args.seeds)}")
    print(side_by_side(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
