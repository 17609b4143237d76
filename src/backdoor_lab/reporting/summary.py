"""Write every summary file of a folder of runs: summary.csv, summary.md, summary.png and prune_ratio.png."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from backdoor_lab.reporting.files import write_replace
from backdoor_lab.reporting.plots import plot_prune_ratio, plot_summary
from backdoor_lab.reporting.table import collect_runs, summary_csv, summary_markdown, varying_keys


class NoRunsError(FileNotFoundError):
    """The folder holds no job of this project (no job.json, no Hydra job folder)."""


def summarize(
    folder: str | Path, out_dir: str | Path | None = None, job_errors: Mapping[Path, str] | None = None
) -> Path:
    """Write summary.csv, summary.md, summary.png (and prune_ratio.png when a prune ratio varies) for every run
    under ``folder``, into ``out_dir`` (default: ``folder``); return the path of summary.md.

    Files are replaced atomically, so the summary can be rewritten after every job of a sweep.
    """
    runs = collect_runs(folder, job_errors)
    if runs.jobs == 0:
        raise NoRunsError(f"no runs under {folder}: no job.json and no Hydra job folder (.hydra/overrides.yaml)")
    out = Path(out_dir) if out_dir is not None else runs.root
    keys = varying_keys(runs)
    write_replace(out / "summary.csv", summary_csv(runs, keys))
    plot_summary(out / "summary.png", runs, keys)
    if plot_prune_ratio(out / "prune_ratio.png", runs, keys) is None:
        (out / "prune_ratio.png").unlink(missing_ok=True)  # a stale plot of an earlier summary would mislead
    return write_replace(out / "summary.md", summary_markdown(runs, keys))
