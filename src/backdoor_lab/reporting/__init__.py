"""Reporting: result files (atomic writes), prune curves, the results table of a folder of runs, W&B dashboards.

``python -m backdoor_lab.reporting <folder>`` writes and prints the table of any folder of runs.
"""

from backdoor_lab.reporting.curves import CURVE_COLUMNS, plot_prune_curve, write_curve_csv
from backdoor_lab.reporting.files import write_json, write_new, write_replace
from backdoor_lab.reporting.summary import NoRunsError, summarize
from backdoor_lab.reporting.sweep import SweepSummary
from backdoor_lab.reporting.table import collect_runs
from backdoor_lab.reporting.wandb import log_config, log_defense_result, log_run_summary, wandb_run_settings

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
