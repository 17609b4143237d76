"""Reporting: result files (atomic writes), prune curves, the results table of a folder of runs, W&B dashboards.

``python -m backdoor_lab.reporting <folder>`` writes and prints the table of any folder of runs. The names below
are imported on first use: a light submodule (``files``, the atomic writers the data cache uses) does not pull in
matplotlib, W&B and Lightning's loggers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "CURVE_COLUMNS": "curves",
    "plot_prune_curve": "curves",
    "write_curve_csv": "curves",
    "write_json": "files",
    "write_new": "files",
    "write_replace": "files",
    "NoRunsError": "summary",
    "summarize": "summary",
    "SweepSummary": "sweep",
    "collect_runs": "table",
    "log_config": "wandb",
    "log_defense_result": "wandb",
    "log_run_summary": "wandb",
    "wandb_run_settings": "wandb",
}

if TYPE_CHECKING:
    from backdoor_lab.reporting.curves import CURVE_COLUMNS, plot_prune_curve, write_curve_csv
    from backdoor_lab.reporting.files import write_json, write_new, write_replace
    from backdoor_lab.reporting.summary import NoRunsError, summarize
    from backdoor_lab.reporting.sweep import SweepSummary
    from backdoor_lab.reporting.table import collect_runs
    from backdoor_lab.reporting.wandb import log_config, log_defense_result, log_run_summary, wandb_run_settings


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CURVE_COLUMNS",
    "NoRunsError",
    "SweepSummary",
    "collect_runs",
    "log_config",
    "log_defense_result",
    "log_run_summary",
    "plot_prune_curve",
    "summarize",
    "wandb_run_settings",
    "write_curve_csv",
    "write_json",
    "write_new",
    "write_replace",
]
