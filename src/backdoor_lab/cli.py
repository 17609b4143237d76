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

A training step allocates and frees tens of MB of activations and gradients. glibc's malloc hands blocks above its
(adaptive) mmap threshold back to the kernel when they are freed and trims the heap's free top, so the next step
gets fresh pages that the kernel zero-fills on first touch: about 12,000 page faults and 15-25 ms of system time per
fp32 speech step at one thread (docs/benchmarks.md). Each job therefore asks malloc to keep freed memory for the
next step (``keep_freed_memory``), in whichever process runs it (a launcher may start its own); a callback in your
own project leaves your allocator alone.
"""

from __future__ import annotations

import atexit
import ctypes
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


# glibc's mallopt parameters (malloc.h) and the values set: blocks up to 32 MiB (glibc's ceiling for the mmap
# threshold on 64-bit) come from the heap, and up to 1 GiB of free heap top is kept instead of trimmed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_BLOCK, KEPT_TOP = 32 << 20, 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed tensor memory for the next step instead of returning it to the kernel.

    The numbers cannot move: only where a block's pages come from changes. The process keeps its peak heap (what
    one step of the job needs at most). Returns whether it applied: False off glibc (macOS, musl), where nothing
    changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no process handle (Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_TOP))


def start_script() -> ModuleType:
    """What a script does before Hydra: the import above, and the heap frozen after the last atexit handler."""
    atexit.register(gc.freeze)  # registered before any job's handlers, so it runs after them (atexit is LIFO)
    return import_pipeline()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_job(cfg: DictConfig) -> float:
    """Train a (backdoored) model, then apply each defense of ``defenses`` to it."""
    keep_freed_memory()  # in the job: a launcher (joblib, submitit) may run it in a process of its own
    from backdoor_lab.pipeline import train

    return train(cfg)["objective"]


@hydra.main(version_base="1.3", config_path="conf", config_name="defend")
def defend_job(cfg: DictConfig) -> float:
    """Defend a checkpoint (``ckpt_path``, or the newest training run whose training config matches)."""
    keep_freed_memory()
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
