"""Shared fixtures: no network, no W&B traffic, tiny configs composed from the real conf/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from backdoor_lab import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n``), each worker and the processes its tests start take their share of the cores.

    Two workers that each run torch's default of one thread per core fight over every core on a small machine;
    ``OMP_NUM_THREADS`` carries the share into the ``train.py`` / DDP processes the tests start.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores_between_workers()

# Fixtures built once per worker that are expensive (trained jobs, a built wheel) or hold state the tests rely
# on in order (the README's commands run one after another in one folder). Under ``--dist loadgroup`` every test
# that uses one runs on the same worker, so it is built once and the order holds.
SHARED_FIXTURE_GROUPS = {
    "jobs": "learning_jobs",  # test_pipeline: three learning tiny jobs
    "twin_runs": "twin_runs",  # test_determinism, test_resume: two identical train.py jobs
    "interrupted_run": "twin_runs",  # test_resume compares it with the twins
    "workdir": "readme_folder",  # test_readme: defend.py reads what train.py wrote
    "installed": "installed_wheel",  # test_packaging: the built and installed wheel
    "ddp_runs": "ddp_runs",  # test_callback_ddp: one 2-process launch for both curve modes
}


# Modules whose tests start processes (10-20 s each): sent to the workers first, so that none is left for the end
# while the other worker idles. (xdist hands out the shared groups first anyway: they hold the most tests.)
SLOW_MODULES_FIRST = ("test_sweeps.py", "test_callback_ddp.py", "test_channel_masks_ddp.py", "test_reliability.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in getattr(item, "fixturenames", ())), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.path.name not in SLOW_MODULES_FIRST)  # stable: the order within stays


ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR  # the configs the package ships (conf/ at the top links there; a mutmut copy has only src/)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test renders into a per-session cache, never the user's ~/.cache."""
    monkeypatch.setenv("BACKDOOR_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only contends with the other tests on a 2-core machine.

    Modules of tiny known-answer networks use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
