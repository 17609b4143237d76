"""Copy a sweep's records (never its weights) into a folder to commit, and summarize them there.

    python bench/export_records.py outputs/train/multirun-<...> docs/results/defenses_sweep

Per job, into ``<task>-<attack variant>-seed<N>/`` (``-job<K>`` added where a sweep varies another setting):
``job.json``, the training run's ``metrics.json`` as
``train_metrics.json``, every defense's ``defense/<name>/metrics.json``, and the prune curves (csv, png). Then
``summary.{md,csv,png}`` are written from the copies alone (``python -m backdoor_lab.reporting <folder>`` does the
same again), so every figure of the README traces to a committed file: the tables through
``python -m backdoor_lab.reporting.side_by_side <folder>/summary.csv``, the channel ranks and curves through the
per-defense records.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from backdoor_lab.reporting.summary import summarize

RECORDS = ("metrics.json", "prune_curve.csv", "prune_curve.png")


def export(sweep: Path, out: Path) -> list[Path]:
    """Copy every finished job of ``sweep`` into ``out``; returns the job folders written."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; records are never overwritten: choose a new folder")
    written = []
    for job_file in sorted(sweep.glob("*/job.json")):
        job_dir = job_file.parent
        job = json.loads(job_file.read_text())
        defenses = sorted((job_dir / "defense").glob("*/metrics.json"))
        if job.get("status") != "done" or not defenses:
            print(f"skipped {job_dir}: {job.get('status')}, {len(defenses)} defense records")
            continue
        first = json.loads(defenses[0].read_text())
        dest = out / f"{first['task']}-{first['attack_variant']}-seed{first['seed']}"
        if dest.exists():  # jobs of one task, attack and seed that differ in another override
            dest = dest.with_name(f"{dest.name}-job{job_dir.name}")
        dest.mkdir(parents=True)
        shutil.copy2(job_file, dest / "job.json")
        train = Path(job.get("train_run") or job_dir) / "metrics.json"
        shutil.copy2(train, dest / "train_metrics.json")
        for record in defenses:
            target = dest / "defense" / record.parent.name
            target.mkdir(parents=True)
            for name in RECORDS:
                if (record.parent / name).is_file():
                    shutil.copy2(record.parent / name, target / name)
        written.append(dest)
    summarize(out)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder (outputs/train/multirun-...)")
    parser.add_argument("out", type=Path, help="a new folder, e.g. docs/results/defenses_sweep")
    args = parser.parse_args()
    for folder in export(args.sweep, args.out):
        print(folder)
    print(f"summary: {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
