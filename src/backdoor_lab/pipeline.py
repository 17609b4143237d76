"""What ``train.py`` and ``defend.py`` do, given a composed Hydra config.

The scripts stay thin (as in lightning-hydra-template): compose, then call ``train`` or ``defend`` here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from backdoor_lab.checkpoints import load_weights, newest_checkpoint
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.defenses.callback import FinePruningCallback
from backdoor_lab.models.classifier import BackdoorClassifier
from backdoor_lab.reporting import plot_prune_curve, write_curve_csv, write_json

log = logging.getLogger(__name__)

DEFENSES = ("fine_pruning", "pruning", "fine_tuning", "none")


def task_wrapper(fn: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Log a failure, always close the W&B run (multirun jobs must not share one), and re-raise."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> dict:
        try:
            return fn(cfg)
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise
        finally:
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except ImportError:
                pass

    return wrapped


def output_dir(cfg: DictConfig) -> Path:
    """This run's folder: ``paths.run_dir`` (Hydra's output dir unless a caller sets it)."""
    return Path(cfg.paths.run_dir)


def build_datamodule(cfg: DictConfig, fit_on: str = "poisoned") -> BackdoorDataModule:
    """The task's DataModule: ``data`` gives the clean source, ``attack`` the trigger, mapping and rate."""
    attack = cfg.attack
    dm = BackdoorDataModule(
        source=instantiate(cfg.data.source),
        trigger=instantiate(attack.trigger),
        mapping=instantiate(attack.mapping),
        poison_rate=attack.poison_rate,
        poison_mode=attack.get("poison_mode", "add"),
        fit_on=fit_on,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.get("eval_batch_size", 512),
        num_workers=cfg.data.get("num_workers", 0),
        seed=cfg.seed,
    )
    dm.setup("fit")
    return dm


def build_model(cfg: DictConfig, num_classes: int, optimizer: DictConfig | None = None) -> BackdoorClassifier:
    net = instantiate(cfg.model.net, num_classes=num_classes)
    overrides = {} if optimizer is None else {"optimizer": optimizer, "scheduler": None}
    return instantiate(cfg.model, net=net, num_classes=num_classes, **overrides)


def build_trainer(cfg: DictConfig, callbacks: list | None = None, **overrides: Any) -> L.Trainer:
    callbacks = list(callbacks or [])
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is not None and "_target_" in cb_cfg:
            callbacks.append(instantiate(cb_cfg))
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None and "_target_" in lg]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def _test_metrics(trainer: L.Trainer, model: L.LightningModule, dm: BackdoorDataModule) -> dict[str, float]:
    results = trainer.test(model, datamodule=dm, verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    return {"clean_acc": float(merged["test/clean_acc"]), "asr": float(merged["test/asr"])}


def _seed(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a (backdoored) model; test it on clean and triggered test data; write metrics.json."""
    _seed(cfg)
    out = output_dir(cfg)
    dm = build_datamodule(cfg, fit_on="poisoned")
    log.info("Data: %s", dm.summary)
    model = build_model(cfg, dm.num_classes)
    trainer = build_trainer(cfg)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    # The final model is tested; no model selection on the defender's validation split (no leakage).
    test = _test_metrics(trainer, model, dm)
    metrics = {**test, "data": dm.summary, "task": f"{cfg.data.name}-{cfg.attack.name}", "seed": cfg.seed}
    write_json(out / "metrics.json", metrics)
    log.info(
        "Backdoored model: clean accuracy %.4f, attack success rate %.4f -> %s",
        test["clean_acc"],
        test["asr"],
        out / "metrics.json",
    )
    return metrics


def make_defense_callback(cfg: DictConfig) -> FinePruningCallback | None:
    """Validate the defense config before any work starts; the pruning callback when the defense prunes."""
    d = cfg.defense
    if d.method not in DEFENSES:
        raise ValueError(f"defense.method must be one of {DEFENSES}, got {d.method!r}")
    if d.fine_tune_epochs < 0:
        raise ValueError(f"defense.fine_tune_epochs must be >= 0, got {d.fine_tune_epochs}")
    callback = FinePruningCallback(
        layer=d.layer,
        prune_ratio=d.prune_ratio,
        max_accuracy_drop=d.max_accuracy_drop,
        step=d.step,
        activation_layer=d.get("activation_layer"),
        full_curve=d.full_curve,
        max_batches=d.get("max_batches"),
    )
    return callback if d.method in ("fine_pruning", "pruning") else None


def resolve_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        return path
    train_dir = Path(cfg.paths.output_dir) / "train" / f"{cfg.data.name}-{cfg.attack.name}"
    path = newest_checkpoint(train_dir)
    log.info("Defending the newest checkpoint trained on %s-%s: %s", cfg.data.name, cfg.attack.name, path)
    return path


@task_wrapper
def defend(cfg: DictConfig) -> dict[str, Any]:
    """Defend a checkpoint: test before, prune and/or fine-tune on the defender's clean data, test after."""
    callback = make_defense_callback(cfg)  # bad settings fail here, before any data is built
    ckpt = resolve_checkpoint(cfg)
    _seed(cfg)
    out = output_dir(cfg)
    d = cfg.defense
    dm = build_datamodule(cfg, fit_on="defender_clean")
    model = build_model(cfg, dm.num_classes, optimizer=d.optimizer)
    load_weights(model, ckpt)

    epochs = d.fine_tune_epochs if d.method in ("fine_pruning", "fine_tuning") else 0
    trainer = build_trainer(cfg, callbacks=[callback] if callback else [], max_epochs=epochs)
    before = _test_metrics(trainer, model, dm)
    log.info("Before %s: clean accuracy %.4f, ASR %.4f", d.method, before["clean_acc"], before["asr"])
    if d.method != "none":
        trainer.fit(model, datamodule=dm, weights_only=True)
    after = _test_metrics(trainer, model, dm)
    log.info("After %s: clean accuracy %.4f, ASR %.4f", d.method, after["clean_acc"], after["asr"])

    metrics: dict[str, Any] = {
        "method": d.method,
        "checkpoint": str(ckpt),
        "before": before,
        "after": after,
        "pruned_fraction": callback.pruned_fraction if callback else 0.0,
        "pruned_channels": callback.pruned_channels if callback else [],
        "layer": callback.layer_name if callback else d.layer,
        "activation_layer": d.get("activation_layer") or (callback.layer_name if callback else d.layer),
        "fine_tune_epochs": epochs,
        "data": dm.summary,
        "task": f"{cfg.data.name}-{cfg.attack.name}",
        "seed": cfg.seed,
    }
    if callback:
        metrics["trigger_channel_ranks"] = callback.trigger_channel_ranks()
        metrics["prune_curve"] = callback.prune_curve
        write_curve_csv(out / "prune_curve.csv", callback.prune_curve)
        plot_prune_curve(
            out / "prune_curve.png",
            callback.prune_curve,
            callback.pruned_fraction,
            title=f"{metrics['task']}: pruning {callback.layer_name} on clean val data",
        )
        callback.remove_reparametrization(model)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "defended.safetensors"))
    write_json(out / "metrics.json", metrics)
    log.info("Wrote %s", out / "metrics.json")
    return metrics


def config_summary(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
