"""``python -m backdoor_lab.reporting <folder>``: the results table of any folder of runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from backdoor_lab.reporting.summary import NoRunsError, summarize


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backdoor_lab.reporting",
        description="Summarize every run under FOLDER (a multirun sweep, outputs/, any mix): writes summary.csv, "
        "summary.md, summary.png and, when a prune ratio varies, prune_ratio.png; prints summary.md. Failed or "
        "incomplete jobs are listed in the table.",
    )
    parser.add_argument("folder", type=Path, help="folder searched recursively for job folders (job.json, .hydra/)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here instead of into FOLDER")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    try:
        path = summarize(args.folder, out_dir=args.out)
    except NoRunsError as err:
        parser.error(str(err))
    sys.stdout.write(path.read_text())
    print(f"\nWritten: {path} (and summary.csv, summary.png beside it)")
    return 0
