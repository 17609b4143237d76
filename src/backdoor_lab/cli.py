"""Console scripts: ``backdoor-lab-train`` and ``backdoor-lab-defend`` (``train.py`` / ``defend.py`` of a checkout).

They read the configs shipped in the package, so they work from any folder after ``pip install backdoor_lab``.
Each job returns its objective to a Hydra sweeper (see ``objective`` in the config).

A script's start-up and exit are part of what its user waits for (docs/benchmarks.md). Importing Lightning
(torch, torch._dynamo, torchmetrics, torchvision) makes about a million objects that live as long as the process
and almost no garbage; Python's cyclic collector, run by allocation counts, walks them a thousand times during the
import, once in full soon after it, and again at exit: 2-2.5 s of a signs job on 2 cores, collecting nothing. So a
script imports with the collector paused, freezes what the import made (``gc.freeze``: later collections skip
it, and they still collect the job's own garbage), and freezes the rest once every atexit handler (W&B, logging)
has run, so the interpreter's teardown frees objects by reference count without walking them.
"""

from __future__ import annotations

import atexit
import gc
from types import ModuleType

import hydra
from omegaconf import DictConfig


def import_pipeline() -> ModuleType:
    """``backdoor_lab.pipeline`` (and with it Lightning), imported with the cyclic collector paused, then frozen."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        from backdoor_lab import pipeline
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    return pipeline


def start_script() -> ModuleType:
    """What a script does before Hydra: the import above, and the heap frozen after the last atexit handler."""
    atexit.register(gc.freeze)  # registered before any job's handlers, so it runs after them (atexit is LIFO)
    return import_pipeline()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_job(cfg: DictConfig) -> float:
    """Train a (backdoored) model, then apply each defense of ``defenses`` to it."""
    from backdoor_lab.pipeline import train

    return train(cfg)["objective"]


@hydra.main(version_base="1.3", config_path="conf", config_name="defend")
def defend_job(cfg: DictConfig) -> float:
    """Defend a checkpoint (``ckpt_path``, or the newest training run whose training config matches)."""
    from backdoor_lab.pipeline import defend

    return defend(cfg)["objective"]


def train_main() -> None:
    """``python train.py`` / ``backdoor-lab-train``: Hydra's command line, one job or a multirun sweep."""
    start_script()
    train_job()


def defend_main() -> None:
    """``python defend.py`` / ``backdoor-lab-defend``: Hydra's command line, one job or a multirun sweep."""
    start_script()
    defend_job()
