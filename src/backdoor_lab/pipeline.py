"""What ``train.py`` and ``defend.py`` do, given a composed Hydra config.

One ``train.py`` job trains a model (or reuses an identical finished training run, matched on the full
training config) and applies every defense of ``defenses=[...]`` to it; ``defend.py`` applies them to a
given checkpoint, or to the newest training run whose training config matches. Every result folder records
what produced it. The scripts stay thin (as in lightning-hydra-template); the objects a job builds come from
``build.py``, so this file reads as the job's steps.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from backdoor_lab import config_checks
from backdoor_lab.build import (
    Evaluations,
    attack_variant,
    build_datamodule,
    build_defense,
    build_loggers,
    build_model,
    build_trainer,
    close_loggers,
    defense_config,
    defense_names,
    evaluation_key,
    job_overrides,
    now,
    output_dir,
    plain_config,
    resolved,
    save_weights,
    seed_everything,
    task_name,
    wandb_run_id,
)
from backdoor_lab.checkpoints import load_weights
from backdoor_lab.data.module import BackdoorDataModule
from backdoor_lab.defenses.base import Defense, DefenseContext
from backdoor_lab.defenses.defender_data import DefenderData
from backdoor_lab.reporting import (
    log_defense_result,
    log_run_summary,
    plot_prune_curve,
    write_curve_csv,
    write_json,
)
from backdoor_lab.runs import (
    MODEL_DEFINING,
    MODEL_FILE,
    JobRecord,
    TrainRun,
    config_differences,
    matching_train_runs,
    train_key,
    train_run_of_checkpoint,
    training_config,
)

log = logging.getLogger(__name__)


def task_wrapper(fn: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Report a user error in one line (Hydra prints it once, no traceback; a bug keeps its traceback, printed
    once by Hydra), and always close the W&B run (multirun jobs must not share one)."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> dict:
        try:
            return fn(cfg)
        except Exception as err:
            report = config_checks.as_user_error(err, fn.__name__)
            if report is None:
                raise
            raise report from err
        finally:
            wandb = sys.modules.get("wandb")  # never imported here: a job that did not use it has no run to close
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return wrapped


def refuse_used_run_dir(run_dir: Path) -> None:
    """Never write into a folder that holds results already (an earlier run's would be overwritten)."""
    for name in ("metrics.json", "job.json", "defense", MODEL_FILE):
        if (run_dir / name).exists():
            raise FileExistsError(
                f"{run_dir} holds results of an earlier run ({name}); results are never overwritten: "
                f"leave hydra.run.dir unset (a new folder per run) or point it to an empty folder"
            )


# ----------------------------------------------------------------------------- training
def train_model(cfg: DictConfig, run_dir: Path, tests: Evaluations | None = None) -> TrainRun:
    """Train (baseline or pruning-aware) in ``run_dir``; write model.safetensors, then metrics.json last.

    ``tests`` keeps the final model's test score for the defenses that test the saved weights in this job.
    """
    tests = tests or Evaluations(cfg)
    seed_everything(cfg)
    dm = build_datamodule(cfg, fit_on="poisoned")
    log.info("Data: %s", dm.summary)
    model = build_model(cfg, dm.num_classes)
    if cfg.get("compile"):  # in place, so the weights keep their names; the training's fits only, not the defenses'
        model.net.compile()
    flat = training_config(cfg)
    key = train_key(flat)
    variant = attack_variant(cfg)
    loggers = build_loggers(cfg, run_dir, "train", variant, resolved(cfg))
    record: dict[str, Any] = {}
    if cfg.get("pruning_aware"):
        attack = instantiate(cfg.pruning_aware)

        def make_trainer(callbacks: list, epochs: int, stage: str) -> L.Trainer:
            return build_trainer(cfg, run_dir / "stages" / stage, callbacks, epochs, loggers)

        record = attack.train(
            model, dm, make_trainer, poison_epochs=cfg.trainer.max_epochs, evaluate=lambda m: tests.score(m, dm)
        )
        test = record["stages"]["decoys_reinstated"]
    else:
        trainer = build_trainer(cfg, run_dir, [], cfg.trainer.max_epochs, loggers)
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        # The final model is tested; no model selection on the defender's validation split (no leakage).
        test = tests.score(model, dm)
    save_weights(model, run_dir / MODEL_FILE)
    test_pass = None
    if not cfg.get("compile"):  # the saved weights are the ones just tested (a compiled net runs other kernels)
        tests.remember(str(run_dir / MODEL_FILE))
        test_pass = tests.record(str(run_dir / MODEL_FILE), evaluation_key(cfg, dm, run_dir / MODEL_FILE))
    metrics = {
        "kind": "train",
        "task": task_name(cfg),
        "data": cfg.data.name,
        "attack": cfg.attack.name,
        "attack_variant": variant,
        "seed": cfg.seed,
        **test,
        **record,
        "data_summary": dm.summary,
        "train_key": key,
        "training_config": flat,
        "config": resolved(cfg),
        "overrides": job_overrides(),
        "checkpoint": str(run_dir / MODEL_FILE),
        "run_dir": str(run_dir),
        "wandb_run_id": wandb_run_id(loggers),
        "test_pass": test_pass,  # lets a later job on this machine reuse the pass (Evaluations.recall)
        "finished": now(),
    }
    log_run_summary(loggers, metrics)
    close_loggers(loggers)
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "Trained model: clean accuracy %.4f, attack success rate %.4f -> %s", test["clean_acc"], test["asr"], run_dir
    )
    return TrainRun(run_dir, run_dir / MODEL_FILE, metrics)


# ----------------------------------------------------------------------------- defending
def check_defenses(cfg: DictConfig, names: list[str], num_classes: int) -> list[Defense]:
    """Build every requested defense and check it against the model before any training or data work."""
    defenses = [build_defense(cfg, name) for name in names]
    model = build_model(cfg, num_classes)
    for defense in defenses:
        defense.check(model)
    return defenses


def run_defenses(
    cfg: DictConfig, defenses: list[Defense], run: TrainRun, job_dir: Path, tests: Evaluations | None = None
) -> dict[str, Any]:
    """Apply each defense to a fresh copy of ``run``'s model; each writes ``job_dir/defense/<name>/``.

    The undefended model is tested once per job (``tests``), however many defenses start from it, and not at all
    where its training run tested the same weights on the same test data, settings and machine (``reuse``).
    """
    if not defenses:
        return {}
    tests = tests or Evaluations(cfg)
    undefended = str(run.checkpoint)
    seed_everything(cfg)
    dm = build_datamodule(cfg, fit_on="defender_clean")
    defender = DefenderData.of(dm)  # all a defense is handed: the clean val split (and its triggered twin)
    reusable = cfg.get("reuse", True) and not tests.knows(undefended)
    if reusable and tests.recall(undefended, run.metrics, evaluation_key(cfg, dm, run.checkpoint)):
        log.info("The undefended model's test score is its training run's: same weights, data, settings, CPU")
    results = {}
    for defense in defenses:
        out = job_dir / "defense" / defense.name
        seed_everything(cfg)  # each defense starts from the same state, whatever ran before it
        model = build_model(cfg, dm.num_classes)
        load_weights(model, run.checkpoint)
        before = tests.score(model, dm, weights=undefended)
        log.info("Before %s: clean accuracy %.4f, ASR %.4f", defense.name, before["clean_acc"], before["asr"])
        config = {
            **resolved(cfg),
            "defense": {"name": defense.name, **plain_config(defense_config(cfg, defense.name))},
            "train_run": None if run.run_dir is None else str(run.run_dir),
            "train_wandb_run_id": run.metrics.get("wandb_run_id"),
            "checkpoint": str(run.checkpoint),
        }
        loggers = build_loggers(cfg, out, "defend", defense.name, config)
        context = DefenseContext(
            model=model,
            datamodule=defender,
            make_trainer=lambda callbacks, epochs, out=out, loggers=loggers: build_trainer(
                cfg, out, callbacks, epochs, loggers
            ),
        )
        started = time.perf_counter()
        record = defense.apply(context)
        record["wall_s"] = round(time.perf_counter() - started, 3)  # the defense's own time, for the table
        after = tests.score(model, dm, weights=None if defense.changes_model else undefended)
        log.info("After %s: clean accuracy %.4f, ASR %.4f", defense.name, after["clean_acc"], after["asr"])
        defense.export(model)
        result = write_defense_result(cfg, defense, run, out, before, after, record, config, dm, model)
        log_defense_result(loggers, result, out / "prune_curve.png" if record.get("prune_curve") else None)
        close_loggers(loggers)
        results[defense.name] = result
    return results


def write_defense_result(
    cfg: DictConfig,
    defense: Defense,
    run: TrainRun,
    out: Path,
    before: dict[str, float],
    after: dict[str, float],
    record: dict[str, Any],
    config: dict[str, Any],
    dm: BackdoorDataModule,
    model: torch.nn.Module,
) -> dict[str, Any]:
    """The defended weights, the prune curve (CSV, PNG) and metrics.json (last: its presence means done)."""
    curve = record.get("prune_curve")
    if curve:
        write_curve_csv(out / "prune_curve.csv", curve)
        plot_prune_curve(
            out / "prune_curve.png",
            curve,
            record.get("pruned_fraction"),
            title=f"{task_name(cfg)}: pruning {record.get('layer')} on clean val data",
        )
    save_weights(model, out / "defended.safetensors")
    slim = None
    if cfg.get("slim_export") and record.get("pruned_channels"):
        from backdoor_lab.defenses.slim import export_slim

        example = next(iter(dm.clean_val_dataloader()))[0][:64]
        slim = export_slim(model, record["layer"], record["pruned_channels"], example, out)
        log.info("Slim export: %d -> %d parameters (%s)", slim["params_dense"], slim["params_slim"], out / "slim.json")
    train_metrics = run.metrics
    metrics = {
        "kind": "defense",
        "defense": defense.name,
        "task": task_name(cfg),
        "data": cfg.data.name,
        "attack": cfg.attack.name,
        "attack_variant": train_metrics.get("attack_variant", attack_variant(cfg)),
        "seed": cfg.seed,
        "before": before,
        "after": after,
        **record,
        "decoy_channels": train_metrics.get("decoy_channels"),
        "slim": slim,
        "data_summary": dm.summary,
        "config": config,
        "overrides": job_overrides(),
        "train_run": None if run.run_dir is None else str(run.run_dir),
        "train_key": train_metrics.get("train_key"),
        "checkpoint": str(run.checkpoint),
        "finished": now(),
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def resolve_train_run(cfg: DictConfig) -> TrainRun:
    """The checkpoint to defend: ``ckpt_path`` (its training config must agree), else the newest matching run."""
    ours = training_config(cfg)
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser().resolve()
        if path.is_dir():
            raise IsADirectoryError(f"ckpt_path={path} is a directory; give the model file (e.g. {path / MODEL_FILE})")
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        run = train_run_of_checkpoint(path)
        if run is None:
            log.warning("%s is not inside a backdoor_lab training run: its training config cannot be checked", path)
            return TrainRun(None, path, {})
        differences = config_differences(ours, run.config, MODEL_DEFINING)
        if differences:
            raise ValueError(
                f"ckpt_path={path} was trained with other settings than this run's; pass the same overrides "
                f"(or experiment) as its training run {run.run_dir}:\n  " + "\n  ".join(differences)
            )
        trainer_diff = config_differences(ours, run.config, ("trainer",))
        if trainer_diff:
            log.warning("The checkpoint's training settings differ (recorded as such): %s", "; ".join(trainer_diff))
        return run
    search_root = Path(cfg.paths.output_dir).resolve()
    runs = matching_train_runs(search_root, train_key(ours))
    if not runs:
        raise FileNotFoundError(
            f"no finished training run under {search_root} matches this run's training config "
            f"(data, attack, model, trainer, seed); run train.py with the same overrides first, "
            f"or pass ckpt_path=/path/to/model"
        )
    log.info("Defending the newest training run whose training config matches: %s", runs[0].run_dir)
    return runs[0]


# ----------------------------------------------------------------------------- entry points
def prepare_job(cfg: DictConfig) -> tuple[Path, list[str], list[Defense]]:
    """What runs before any work: the config checks, a fresh job folder, every defense built and checked."""
    config_checks.check(cfg)
    job_dir = output_dir(cfg)
    refuse_used_run_dir(job_dir)
    names = defense_names(cfg)
    dm = build_datamodule(cfg, setup=False)  # class names only: bad settings fail before any data is built
    return job_dir, names, check_defenses(cfg, names, dm.num_classes)


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """train.py: train (or reuse an identical finished run) and apply ``defenses`` to the model."""
    job_dir, names, defenses = prepare_job(cfg)
    with JobRecord(job_dir, names, job_overrides()) as job:
        run = None
        if cfg.get("reuse", True) and not cfg.get("ckpt_path"):
            found = matching_train_runs(Path(cfg.paths.output_dir).resolve(), train_key(training_config(cfg)))
            if found:
                run = found[0]
                log.info("Reusing the identical finished training run %s", run.run_dir)
        tests = Evaluations(cfg)
        if run is None:
            run = train_model(cfg, job_dir, tests)
        job.update(train_run=run.run_dir)
        results = run_defenses(cfg, defenses, run, job_dir, tests)
    return {"train": run.metrics, "defenses": results, "objective": objective(cfg, run.metrics, results)}


@task_wrapper
def defend(cfg: DictConfig) -> dict[str, Any]:
    """defend.py: apply ``defenses`` to a checkpoint (``ckpt_path``, or the newest matching training run)."""
    if not defense_names(cfg):
        raise ValueError("defenses is empty: name at least one, e.g. defenses=[fine_pruning]")
    job_dir, names, defenses = prepare_job(cfg)
    run = resolve_train_run(cfg)
    with JobRecord(job_dir, names, job_overrides(), run.run_dir):
        results = run_defenses(cfg, defenses, run, job_dir)
    return {"train": run.metrics, "defenses": results, "objective": objective(cfg, run.metrics, results)}


def objective(cfg: DictConfig, train_metrics: dict[str, Any], results: dict[str, Any]) -> float:
    """What the job returns to a sweeper: the test ASR that survives ``objective.defense``, less any clean
    accuracy below ``objective.clean_floor`` (an attacker maximises it: a backdoor that survives the defense
    in a model still worth deploying).

    There is no defender's objective on purpose: tuning a defense on test ASR would read the test split and
    assume the defender knows the trigger. With no defense run, the trained model's own ASR is used.
    """
    spec = cfg.get("objective") or {}
    if results:
        name = spec.get("defense") or list(results)[-1]
        if name not in results:
            raise ValueError(f"objective.defense={name!r} was not run; defenses run: {list(results)}")
        measured = results[name]["after"]
    else:
        measured = train_metrics
    floor = float(spec.get("clean_floor", 0.0))
    return float(measured["asr"]) - max(0.0, floor - float(measured["clean_acc"]))
