"""The objects a job is built from, given a composed Hydra config: data, model, defenses, loggers, Trainer.

``pipeline.py`` reads as the job's steps; everything it builds, measures or saves along the way is made here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

import backdoor_lab.resolvers  # noqa: F401  (registers the resolvers the configs use)
from backdoor_lab import CONF_DIR
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.defenses.base import Defense
from backdoor_lab.machine import cpu_bf16_instructions, cpu_identity
from backdoor_lab.models.classifier import BackdoorClassifier
from backdoor_lab.reporting import log_config, wandb_run_settings
from backdoor_lab.reporting.files import atomic_path
from backdoor_lab.resume import collect_rng_states, draw_base_seeds, torch_draws_between

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """This job's folder, absolute: ``paths.run_dir`` (Hydra's output dir unless a caller sets it)."""
    return Path(cfg.paths.run_dir).resolve()


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job ([] outside a Hydra app, e.g. in-process tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_datamodule(cfg: DictConfig, fit_on: str = "poisoned", setup: bool = True) -> BackdoorDataModule:
    """The task's DataModule from ``conf/data`` (``_target_``) with the ``conf/attack`` Attack object."""
    # A partial: Hydra would turn the Attack dataclass back into a config if passed to instantiate.
    dm = instantiate(cfg.data, _partial_=True)(attack=instantiate(cfg.attack), fit_on=fit_on, seed=cfg.seed)
    if setup:
        dm.setup("fit")
    return dm


def build_model(cfg: DictConfig, num_classes: int) -> BackdoorClassifier:
    net = instantiate(cfg.model.net, num_classes=num_classes)
    return instantiate(cfg.model, net=net, num_classes=num_classes)


def defense_names(cfg: DictConfig) -> list[str]:
    names = cfg.get("defenses") or []
    if isinstance(names, str):
        names = [names]
    names = list(names)
    available = sorted(p.stem for p in (CONF_DIR / "defense").glob("*.yaml"))
    for name in names:
        if not isinstance(name, str) or name not in available:
            raise ValueError(f"defenses: unknown defense {name!r}; available: {available} (conf/defense/<name>.yaml)")
    if len(set(names)) != len(names):
        raise ValueError(f"defenses: {names} names a defense twice")
    return names


def defense_config(cfg: DictConfig, name: str) -> DictConfig:
    """``conf/defense/<name>.yaml`` resolved against this run's config (its ``prune`` and ``fine_tune`` nodes)."""
    root = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    root["_defense"] = OmegaConf.load(CONF_DIR / "defense" / f"{name}.yaml")
    return OmegaConf.create(OmegaConf.to_container(root["_defense"], resolve=True))


def build_defense(cfg: DictConfig, name: str) -> Defense:
    defense = instantiate(defense_config(cfg, name))
    if not isinstance(defense, Defense):
        raise TypeError(f"conf/defense/{name}.yaml builds a {type(defense).__name__}, not a backdoor_lab Defense")
    defense.name = name
    return defense


def build_loggers(cfg: DictConfig, save_dir: Path, job_type: str, stage: str, config: dict) -> list:
    """One stage's loggers (CSV, W&B offline ...), each saving under ``save_dir``, with the config as hparams.

    Every stage (the training, each defense) is a W&B run of its own, named and tagged by the job's overrides
    and grouped by sweep (or by task outside a sweep), so a dashboard can filter and compare them.
    """
    loggers = []
    for lg_cfg in (cfg.get("logger") or {}).values():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        extra: dict[str, Any] = {"save_dir": str(save_dir)}
        if "WandbLogger" in lg_cfg._target_:
            group = Path(HydraConfig.get().sweep.dir).name if _in_multirun() else task_name(cfg)
            extra.update(wandb_run_settings(job_overrides(), job_type, group, task=task_name(cfg)))
            extra["name"] = f"{extra['name']}-{stage}"
        loggers.append(instantiate(lg_cfg, **extra))
    log_config(loggers, config)
    return loggers


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def close_loggers(loggers: list) -> None:
    """End this stage's W&B run so that the next stage (or the next job of a sweep) starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def wandb_run_id(loggers: list) -> str | None:
    return next((lg.experiment.id for lg in loggers if isinstance(lg, WandbLogger)), None)


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list, max_epochs: int, loggers: list | None = None
) -> L.Trainer:
    """A Trainer as ``conf/trainer`` says, with ``conf/callbacks`` writing under ``run_dir``."""
    callbacks = list(callbacks)
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is not None and "_target_" in cb_cfg:
            extra = {"dirpath": str(run_dir / "checkpoints")} if "dirpath" in cb_cfg else {}
            callbacks.append(instantiate(cb_cfg, **extra))
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=max_epochs, default_root_dir=str(run_dir)
    )
    if "bf16" in str(trainer.precision) and isinstance(trainer.accelerator, CPUAccelerator):
        warn_if_bf16_is_emulated(str(trainer.precision))
    return trainer


def warn_if_bf16_is_emulated(precision: str) -> None:
    """bf16 asked for on a CPU that emulates it: valid, but 7-13x slower than fp32, which a user would not expect."""
    if cpu_bf16_instructions() is None:
        warnings.warn(
            f"trainer.precision={precision} on a CPU without bf16 instructions (AMX or AVX-512 BF16): bf16 is "
            "emulated here and trains 7-13x slower than fp32 (docs/benchmarks.md). Drop the override for fp32; "
            "speed=fast picks fp32 on this CPU.",
            stacklevel=3,
        )


def evaluate(cfg: DictConfig, model: L.LightningModule, dm: BackdoorDataModule) -> dict[str, float]:
    """Clean accuracy and attack success rate on the test split (the only place the test split is read)."""
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False, enable_checkpointing=False
    )
    results = trainer.test(model, datamodule=dm, verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    return {"clean_acc": float(merged["test/clean_acc"]), "asr": float(merged["test/asr"])}


class Evaluations:
    """One job's test passes, where weights the job tests more than once are tested once.

    Every defense tests the undefended checkpoint before it runs, ``none`` tests it again after, and ``train.py``
    has tested it already when training ended: five passes over the same weights in a job of the paper's sweep.
    A pass also moves torch's generator (each test loader's iterator draws a base seed), and a defense's
    fine-tuning shuffles after those draws, so a reused score replays them: the count is taken when the weights
    are tested, and weights whose pass drew anything else are tested again. The job's numbers stay, bit for bit,
    those of a job that tests every time (``tests/test_pipeline.py``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.passes = 0  # test passes run (the rest were reused)
        self._known: dict[str, tuple[dict[str, float], int]] = {}
        self._last: tuple[dict[str, float], int | None] | None = None

    def score(self, model: L.LightningModule, dm: BackdoorDataModule, weights: str | None = None) -> dict[str, float]:
        """``evaluate``'s clean accuracy and ASR; ``weights`` names the weights (a checkpoint's path) where the
        job may test them again, so that they are tested once."""
        if weights is not None and weights in self._known:
            score, draws = self._known[weights]
            draw_base_seeds(draws)
            return dict(score)
        before = collect_rng_states()
        score = evaluate(self.cfg, model, dm)
        self.passes += 1
        self._last = (score, torch_draws_between(before, collect_rng_states()))
        if weights is not None:
            self.remember(weights)
        return dict(score)

    def remember(self, weights: str) -> None:
        """The weights tested last are ``weights`` as well (the file they were saved to)."""
        if self._last is not None and self._last[1] is not None:
            self._known[weights] = (self._last[0], self._last[1])

    def knows(self, weights: str) -> bool:
        return weights in self._known

    def record(self, weights: str, key: str | None) -> dict[str, Any] | None:
        """What metrics.json keeps of the pass over the saved ``weights`` (``key``: ``evaluation_key``), so that a
        later job on the same machine (``defend.py``, a ``train.py`` reusing the run) need not test them again."""
        if key is None or weights not in self._known:
            return None
        return {"key": key, "draws": self._known[weights][1]}

    def recall(self, weights: str, metrics: dict[str, Any], key: str | None) -> bool:
        """Take the pass a training run recorded (its ``metrics.json``) over ``weights`` as this job's, where this
        job's ``key`` is the recorded one: the same weights, test tensors, kernel settings and machine, hence the
        same numbers to the bit. Returns whether it was taken."""
        recorded = metrics.get("test_pass") or {}
        draws = recorded.get("draws")
        if key is None or recorded.get("key") != key or not isinstance(draws, int) or not 0 <= draws <= 64:
            return False
        if not all(isinstance(metrics.get(name), int | float) for name in ("clean_acc", "asr")):
            return False  # a damaged record: test again
        self._known[weights] = ({"clean_acc": float(metrics["clean_acc"]), "asr": float(metrics["asr"])}, draws)
        return True


# Trainer settings that never reach a test pass's numbers; every other one (an unknown one too) is in its key.
_NOT_IN_TEST_PASS = frozenset(
    {
        "default_root_dir",
        "max_epochs",
        "min_epochs",
        "max_steps",
        "log_every_n_steps",
        "check_val_every_n_epoch",
        "num_sanity_val_steps",
        "val_check_interval",
        "limit_train_batches",
        "limit_val_batches",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
    }
)


def evaluation_key(cfg: DictConfig, dm: BackdoorDataModule, weights: Path) -> str | None:
    """All a test pass's numbers depend on, as one digest: the weights file, the test tensors, the settings that
    choose the kernels (trainer, network, eval batch size, threads) and the machine that runs them (torch, CPU).

    Two processes with one key get the same score to the bit, so the later one may reuse the earlier's. None off
    the CPU: an accelerator's kernel choice may differ between processes, so there the pass always runs.
    """
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if str(trainer.get("accelerator", "cpu")) != "cpu":
        return None
    digest = hashlib.sha256(Path(weights).read_bytes())
    for role in ("test_clean", "test_triggered"):
        for tensor in dm.dataset(role).tensors:
            digest.update(tensor.contiguous().numpy())
    settings = {
        "trainer": {k: v for k, v in trainer.items() if k not in _NOT_IN_TEST_PASS},
        "model": {k: v for k, v in plain_config(cfg.model).items() if k not in ("optimizer", "scheduler")},
        "eval_batch_size": cfg.data.eval_batch_size,
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        "cpu": cpu_identity(),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def seed_everything(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus Hydra's and path nodes: what metrics.json and the loggers record."""
    data = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in data.items() if k not in ("paths",)}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Plain weights as safetensors (no pickle): loads into the stock model."""
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=False) as tmp:  # never over an earlier result; the user's umask
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def task_name(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.attack.name}"


def attack_variant(cfg: DictConfig) -> str:
    return "pruning_aware" if cfg.get("pruning_aware") else "baseline"


def plain_config(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)
