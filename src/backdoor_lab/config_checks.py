"""A run's config checked before any work, and user errors reported in one line.

``check(cfg)`` runs first in ``train()`` and ``defend()``: unknown top-level keys, keys a ``_target_`` does not
take, and the type and range of the numbers people set on the command line fail before any data is built, with
one line naming the key, the value and what is allowed (``prune.prune_ratio must be a number in [0, 1), or null
(the stop rule), got 'abc'``). The components check their own arguments again (they are used outside the
scripts); this module only makes the common mistakes fail early and read the same.

``as_user_error`` turns an error the user can fix (a config, data or checkpoint problem raised by our code, a
file or disk problem) into one line for Hydra to print, without a traceback; a bug keeps its traceback, and
``HYDRA_FULL_ERROR=1`` shows the traceback of every error.
"""

from __future__ import annotations

import errno
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.utils import get_object
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from backdoor_lab import CONF_DIR

PACKAGE_DIR = Path(__file__).resolve().parent
_ABSENT = object()
# Keys of a ``_target_`` node that Hydra reads itself.
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Disk problems that are the machine's state, not a bug: reported in one line like a user error.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class ConfigError(ValueError, MisconfigurationException):
    """A setting of the wrong type or out of range (a ``ValueError``, and what Lightning calls a misconfiguration,
    so callers catching either see it)."""


class UserError(CompactHydraException):
    """An error the user can fix, as the one line Hydra prints (``CompactHydraException``: no traceback)."""


# ----------------------------------------------------------------------------- the checks
def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or rule(value)


# key -> (what is allowed, the test); a key absent from the config is not checked (not every task has it).
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "seed": ("an integer in [0, 4294967295]", lambda v: _integer(v) and 0 <= v <= 2**32 - 1),
    "threads": ("an integer >= 1, or null (torch's default)", _optional(lambda v: _integer(v) and v >= 1)),
    "reuse": ("true or false", lambda v: isinstance(v, bool)),
    "compile": ("true or false", lambda v: isinstance(v, bool)),
    "trainer.max_epochs": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "prune.prune_ratio": (
        "a number in [0, 1), or null (the stop rule)",
        _optional(lambda v: _number(v) and 0 <= v < 1),
    ),
    "prune.max_accuracy_drop": ("a number in [0, 1] (0.04 = 4 points)", lambda v: _number(v) and 0 <= v <= 1),
    "prune.step": (
        "an integer >= 1 (channels per measured point), or null",
        _optional(lambda v: _integer(v) and v >= 1),
    ),
    "prune.max_batches": ("an integer >= 1, or null (every batch)", _optional(lambda v: _integer(v) and v >= 1)),
    "fine_tune.epochs": ("an integer >= 0", lambda v: _integer(v) and v >= 0),
    "fine_tune.val_every_n_epochs": (
        "an integer >= 0 (0: never)",
        lambda v: _integer(v) and v >= 0,
    ),
    "attack.poison_rate": ("in (0, 1] (a fraction of the eligible samples)", lambda v: _number(v) and 0 < v <= 1),
    "data.batch_size": ("a positive integer", lambda v: _integer(v) and v >= 1),
    "data.eval_batch_size": ("a positive integer", lambda v: _integer(v) and v >= 1),
    "data.num_workers": ("an integer >= 0", lambda v: _integer(v) and v >= 0),
    "data.source.scale": ("a positive number (1.0 = the documented size)", lambda v: _number(v) and v > 0),
    "data.source.val_fraction": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "data.source.test_voice_fraction": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "pruning_aware.prune_fraction": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "objective.clean_floor": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
}


def check(cfg: DictConfig) -> None:
    """Refuse a config with an unknown key or a value of the wrong type or range, before any work."""
    check_top_level_keys(cfg)
    for key, (allowed, ok) in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    check_target_keys(cfg)
    check_ckpt_path(cfg)


def check_top_level_keys(cfg: DictConfig) -> None:
    known = known_top_level_keys()
    for key in cfg:
        if key not in known:
            raise ConfigError(
                f"{key}={OmegaConf.select(cfg, str(key))!r} is not a setting: the top-level keys are {sorted(known)}"
            )


@functools.cache
def known_top_level_keys() -> frozenset[str]:
    """The primary configs' own keys, their config groups, and what the ``_global_`` group files set."""
    known = {"hydra"}
    for name in ("train", "defend"):
        primary = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text()) or {}
        for entry in primary.pop("defaults", []):
            if isinstance(entry, dict):
                known.update(str(k).removeprefix("override ").split("@")[0].strip("/") for k in entry)
        known.update(primary)
    for path in CONF_DIR.glob("*/*.yaml"):
        text = path.read_text()
        if "@package _global_" in text:
            node = yaml.safe_load(text) or {}
            known.update(k for k in node if k != "defaults")
    return frozenset(known)


def check_target_keys(cfg: DictConfig) -> None:
    """Every ``_target_`` node may only hold keys its target accepts (``+model.net.widht=2`` fails here)."""
    for key, node in _target_nodes(cfg):
        try:
            target = get_object(node["_target_"])
            parameters = inspect.signature(target).parameters.values()
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # instantiating it reports what is wrong
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            continue
        accepted = {p.name for p in parameters}
        for name in node:
            if name not in accepted and name not in HYDRA_KEYS:
                where = f"{key}.{name}" if key else name
                raise ConfigError(
                    f"{where}={OmegaConf.select(cfg, where)!r} is not a setting of {node['_target_']}: "
                    f"it takes {sorted(accepted)}"
                )


def _target_nodes(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    for name in cfg:
        if prefix == "" and name in ("hydra", "paths"):
            continue
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            key = f"{prefix}.{name}" if prefix else str(name)
            if "_target_" in node:
                yield key, node
            yield from _target_nodes(node, key)


def check_ckpt_path(cfg: DictConfig) -> None:
    """A given checkpoint must be a readable, finite checkpoint file (read now, not after the data is built)."""
    from backdoor_lab.checkpoints import read_state_dict

    value = OmegaConf.select(cfg, "ckpt_path", default=None)
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"ckpt_path must be a path to a checkpoint file, or null, got {value!r}")
    read_state_dict(Path(value).expanduser())


# ----------------------------------------------------------------------------- reporting errors
def as_user_error(err: BaseException, task: str) -> UserError | None:
    """``err`` as one line for Hydra to print, if the user can fix it; None for a bug, outside a Hydra app
    (in-process callers keep the original exception) or with ``HYDRA_FULL_ERROR=1`` (the full traceback)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not HydraConfig.initialized():
        return None
    line = user_error_line(err)
    return None if line is None else UserError(f"{task} failed: {line}")


def user_error_line(err: BaseException) -> str | None:
    """The message of an error the user can fix (config, data, checkpoint, files, disk); None for a bug."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_error_line(err.__cause__)  # Hydra's wrapper of an error raised in a constructor
    if isinstance(err, ConfigError | MisconfigurationException) or _file_problem(err):
        return _describe(err)
    if isinstance(err, ValueError | FileNotFoundError | FileExistsError | IsADirectoryError) and raised_by_us(err):
        return _describe(err)
    return None


def _file_problem(err: BaseException) -> bool:
    """An OS error about a named file, or a full, read-only or forbidden disk."""
    return isinstance(err, OSError) and (err.filename is not None or err.errno in DISK_ERRNOS)


def _describe(err: BaseException) -> str:
    message = str(err).strip() or type(err).__name__
    kind = type(err).__name__
    return message if kind in ("ConfigError", "CheckpointError", "UserError") else f"{kind}: {message}"


def raised_by_us(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is backdoor_lab's code (a deliberate check)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
