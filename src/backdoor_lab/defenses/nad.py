"""NAD: Neural Attention Distillation (Y. Li, X. Lyu, N. Koren, L. Lyu, B. Li, X. Ma, ICLR 2021, arXiv 2101.05930).

The defender fine-tunes a copy of the backdoored model on its small clean split (the *teacher*), then fine-tunes
the backdoored model itself (the *student*) on the same clean split with cross-entropy plus an attention
distillation term that pulls the student's attention maps at a few named layers toward the teacher's::

    loss = CE(student(x), y) + sum_i beta_i * mean((A_s_i(x) - A_t_i(x)) ** 2)
    A(f) = normalize(mean_over_channels(|f| ** p).flatten())        (attention transfer, Zagoruyko & Komodakis)

Where this follows the reference code (``bboylyg/NAD``: ``at.py``, ``main.py``, ``config.py``) and BackdoorBench
(``defense/nad/nad.py``, ``config.yaml``): the attention map and its MSE (``at.py``: sum of ``|f|^p`` over channels,
divided by its spatial L2 norm; the mean here differs by a constant factor that the normalization removes, and the
norm's epsilon is ``F.normalize``'s 1e-12 instead of 1e-6); ``p = 2``; one weight per layer, 500 / 1000 / 1000 for
the low / middle / high layer (``config.py`` beta1..3, BackdoorBench's ``config.yaml``); the teacher is the
backdoored model fine-tuned on the clean split (README: "5~10 epochs"; BackdoorBench ``te_epochs``), frozen and in
eval mode; the student trains in train mode and the teacher's features are detached.

Where it departs, and why:

* The student's fine-tuning uses the shared ``fine_tune`` budget (epochs, optimizer, schedule) of ``fine_tuning``
  and ``fine_pruning``, not NAD's own (20 epochs of SGD lr 0.1 with step decay), so that the table compares
  defenses on one budget. The teacher is fine-tuned with the same budget's optimizer at a constant learning rate
  (BackdoorBench also builds the teacher's optimizer from the student's settings); the budget's scheduler is not
  used, since its length is the student's epochs, not the teacher's.
* The teacher is fine-tuned on the defender's clean split only, reshuffled each epoch from a forked generator (the
  student's random stream is untouched), and nothing is measured on test data (the reference and BackdoorBench
  evaluate on the test split every epoch and save a "best" student chosen by test accuracy: a leak not repeated).
* The record's attention distances are measured on the defender's clean split, in eval mode, before and after.
* The layers are named, read with forward hooks, not taken from ``children()[:-k]`` of the network (BackdoorBench
  re-runs truncated ``nn.Sequential`` copies of the network for every layer and every batch, and an older revision
  of its ``train_step`` called ``.detach()`` on the attention loss, which turned NAD into plain fine-tuning).
* No data augmentation (the reference's README fine-tunes its teacher "with data augmentation techniques"): the
  defender's split is used as the pipeline hands it over, as for the other fine-tuning defenses.
* The betas are the reference's, but their effect scales with the learning rate and the maps' sizes: with a large
  ``beta * lr`` the term overshoots (seen on tiny nets here), so a new model/budget pair deserves a look at the
  logged ``nad/attention_loss``.

``NADCallback`` is the Lightning form, usable in any plain fit; ``NAD`` is the plug-in defense built from
``conf/defense/nad.yaml`` (settings from the root ``nad`` node, ``conf/nad/default.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from backdoor_lab.defenses.attention import attention_loss, captured_features, check_layers, layer_distance
from backdoor_lab.defenses.base import Defense, DefenseContext, FineTuneBudget
from backdoor_lab.defenses.fit_data import batch_transfer, find_clean_loader
from backdoor_lab.defenses.methods import fine_tune
from backdoor_lab.defenses.pruner import BatchToXY
from backdoor_lab.defenses.pruning import split_batch
from backdoor_lab.defenses.successor_settings import NADSettings, check_nad_settings, real_number
from backdoor_lab.defenses.teacher import (
    OptimizerFactory,
    fine_tuned_copy,
    frozen_copy,
    reshuffled,
    rng_devices,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Lightning callback
# --------------------------------------------------------------------------------------------------------------


class NADCallback(Callback):
    """Neural Attention Distillation in a Lightning fit: the fit's loss gains NAD's attention term.

    At the start of training the callback makes the teacher (the one given, or a deep copy of the module fine-tuned
    on the defender's clean data for ``teacher_epochs``), freezes it, and wraps the module's ``training_step`` so
    that it returns ``loss + attention_loss(student features, teacher features)``: the term is part of the loss
    Lightning backpropagates, so precision plugins, gradient accumulation and DDP treat it as the module's own.
    The student's features are read with forward hooks during its own forward; the teacher runs on the same
    batch inputs under ``no_grad``. The wrap is removed when training ends.

    Args:
        layers: modules whose outputs are distilled (``named_modules`` names of the LightningModule).
        betas: one weight per layer.
        p: the power of ``|f|`` in the attention map.
        teacher: a ready teacher (same layer names); None = fine-tune a copy of the module.
        teacher_epochs: passes over the clean data to fine-tune the teacher (ignored with ``teacher``).
        teacher_optimizer: partial taking ``params`` for the teacher (None: the module's ``configure_optimizers``).
        teacher_batch_size: batch size of the teacher's fine-tuning (None: the clean dataloader's).
        clean_dataloader: the defender's clean data (None: ``datamodule.clean_val_dataloader()``, then the val
            dataloaders, as ``FinePruningCallback`` finds them).
        clean_dataloader_idx: which of several val dataloaders is clean.
        batch_to_xy: ``batch -> (inputs, targets, true_labels or None)``; the inputs are what the teacher sees.
        measure: measure the attention distance on the clean data before and after the student's training.
    """

    def __init__(
        self,
        layers: Sequence[str],
        betas: Sequence[float],
        p: float = 2.0,
        teacher: nn.Module | None = None,
        teacher_epochs: int = 10,
        teacher_optimizer: OptimizerFactory | None = None,
        teacher_batch_size: int | None = None,
        clean_dataloader: Any = None,
        clean_dataloader_idx: int | str | None = None,
        batch_to_xy: BatchToXY = split_batch,
        measure: bool = True,
    ) -> None:
        layers, betas = list(layers), [float(b) if real_number(b) else b for b in betas]
        check_nad_settings(
            layers, betas, p, None if teacher is not None else teacher_epochs, error=MisconfigurationException
        )
        if teacher_batch_size is not None and (isinstance(teacher_batch_size, bool) or teacher_batch_size < 1):
            raise MisconfigurationException(f"teacher_batch_size must be >= 1, got {teacher_batch_size!r}")
        self.layers = layers
        self.betas = betas
        self.p = float(p)
        self.teacher = teacher
        self.teacher_epochs = 0 if teacher is not None else teacher_epochs
        self.teacher_optimizer = teacher_optimizer
        self.teacher_batch_size = teacher_batch_size
        self.clean_dataloader = clean_dataloader
        self.clean_dataloader_idx = clean_dataloader_idx
        self.batch_to_xy = batch_to_xy
        self.measure = measure
        # State, saved in checkpoints: a resumed fit distils from the same teacher and keeps its record.
        self.teacher_state: dict[str, Tensor] | None = None
        self.teacher_record: dict[str, Any] = {"given": teacher is not None, "epochs": 0, "steps": 0, "samples": 0}
        self.distance: dict[str, dict[str, float] | None] = {"before": None, "after": None}
        self.loss_first: float | None = None
        self.loss_last: float | None = None
        self.loss_epoch_mean: list[float] = []
        # Per-run bookkeeping (not state).
        self._teacher: nn.Module | None = None
        self._had_own = False
        self._student_step: Callable[..., Any] | None = None
        self._wrapped: nn.Module | None = None
        self._first: Tensor | None = None
        self._last: Tensor | None = None
        self._epoch_sum: Tensor | None = None
        self._epoch_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=tuple(self.layers))

    @property
    def settings(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "betas": list(self.betas), "p": self.p}

    def attention_loss_record(self) -> dict[str, Any]:
        """The distillation term as the fit logged it: first and last step, mean of each epoch."""
        self._sync_loss_record()
        return {"first": self.loss_first, "last": self.loss_last, "epoch_mean": list(self.loss_epoch_mean)}

    # ----------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate/test/predict never distil: any model runs with the callback attached
            return
        check_layers(pl_module, self.layers, "NADCallback layers", MisconfigurationException)
        if self.teacher is not None:
            if self.teacher is pl_module:
                raise MisconfigurationException(
                    "NADCallback's teacher is the student itself: pass a fine-tuned copy, or no teacher"
                )
            check_layers(self.teacher, self.layers, "NADCallback layers (in the teacher)", MisconfigurationException)
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "NADCallback adds its attention term to the loss training_step returns, which needs automatic "
                "optimization; with manual optimization add attention_loss(...) to your own loss"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not at fit start: callback states are restored by now under every strategy (some restore after
        # setup), so a resumed fit finds its saved teacher instead of fine-tuning another.
        with torch.random.fork_rng(devices=rng_devices(pl_module)):  # the student's shuffles stay as they were
            self._install_teacher(trainer, pl_module)
            if self.measure and self.distance["before"] is None:
                self.distance["before"] = self.measure_distance(trainer, pl_module)
        self._wrap(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_sum is not None and self._epoch_steps:
            self.loss_epoch_mean.append(float(self._epoch_sum) / self._epoch_steps)
        self._epoch_sum, self._epoch_steps = None, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap()
        self._sync_loss_record()
        if self.measure and self._teacher is not None:
            with torch.random.fork_rng(devices=rng_devices(pl_module)):
                self.distance["after"] = self.measure_distance(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unwrap()

    def state_dict(self) -> dict[str, Any]:
        self._sync_loss_record()
        return {
            "settings": self.settings,
            "teacher_state": self.teacher_state,
            "teacher_record": dict(self.teacher_record),
            "distance": dict(self.distance),
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "loss_epoch_mean": list(self.loss_epoch_mean),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings")
        if saved is not None and saved != self.settings:
            raise MisconfigurationException(
                f"NADCallback: the checkpoint was written with {saved}, this callback has {self.settings}; "
                "resume with the same layers, betas and p"
            )
        for key in ("teacher_state", "teacher_record", "distance", "loss_first", "loss_last", "loss_epoch_mean"):
            if key in state_dict:
                setattr(self, key, state_dict[key])

    # ----------------------------------------------------------------------------------------- the teacher
    @property
    def teacher_module(self) -> nn.Module | None:
        """The frozen teacher of the current (or last) fit."""
        return self._teacher

    def _install_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher_state is not None:  # resumed (or a second fit): the saved teacher, not a new one
            teacher = frozen_copy(pl_module, trainer)
            teacher.load_state_dict(self.teacher_state)
            log.info("NAD: distilling from the teacher saved in the checkpoint")
        elif self.teacher is not None:
            teacher = trainer.precision_plugin.convert_module(self.teacher).to(pl_module.device)
        else:
            teacher = self.fine_tune_teacher(trainer, pl_module)
        if trainer.world_size > 1:  # every process distils from rank 0's teacher
            state = trainer.strategy.broadcast(teacher.state_dict(), src=0)
            teacher.load_state_dict(state)
        teacher.eval()
        teacher.requires_grad_(False)
        self._teacher = teacher
        self.teacher_state = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}

    def fine_tune_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """A copy of the module fine-tuned on the clean data with cross-entropy: NAD's teacher (``teacher.py``)."""
        clean, clean_idx = find_clean_loader(
            trainer, pl_module, self.clean_dataloader, self.clean_dataloader_idx, "NADCallback"
        )
        transfer = batch_transfer(trainer, pl_module)
        teacher, self.teacher_record = fine_tuned_copy(
            trainer,
            pl_module,
            reshuffled(clean, self.teacher_batch_size),
            epochs=self.teacher_epochs,
            transfer=lambda batch: transfer(batch, clean_idx),
            batch_to_xy=self.batch_to_xy,
            optimizer=self.teacher_optimizer,
        )
        log.info(
            "NAD: teacher fine-tuned for %d epochs (%d steps) on the clean data",
            self.teacher_epochs,
            self.teacher_record["steps"],
        )
        return teacher

    # ----------------------------------------------------------------------------------------- distillation
    def _wrap(self, pl_module: L.LightningModule) -> None:
        """Make the module's ``training_step`` return its loss plus the attention term."""
        if self._wrapped is not None:
            return
        self._had_own = "training_step" in vars(pl_module)
        student_step = pl_module.training_step
        teacher = self._teacher
        assert teacher is not None

        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs["batch"]
            x = self.batch_to_xy(batch)[0]
            with captured_features(pl_module, self.layers) as student_features:
                out = student_step(*args, **kwargs)
            student = student_features()
            with torch.no_grad(), captured_features(teacher, self.layers) as teacher_features:
                teacher(x)
            term = attention_loss(student, teacher_features(), self.betas, self.p)
            self._note(term.detach())
            pl_module.log("nad/attention_loss", term.detach(), batch_size=len(x))
            return _add_to_loss(out, term)

        self._student_step = student_step
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        module, self._wrapped = self._wrapped, None
        if module is None:
            return
        if self._had_own:
            module.training_step = self._student_step  # type: ignore[method-assign]
        else:
            del module.training_step
        self._student_step = None

    def _note(self, term: Tensor) -> None:
        if self._first is None:
            self._first = term
        self._last = term
        self._epoch_sum = term if self._epoch_sum is None else self._epoch_sum + term
        self._epoch_steps += 1

    def _sync_loss_record(self) -> None:
        if self._first is not None:
            self.loss_first = float(self._first) if self.loss_first is None else self.loss_first
            self._first = None
        if self._last is not None:
            self.loss_last = float(self._last)
            self._last = None

    @torch.no_grad()
    def measure_distance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Mean attention distance per layer (unweighted) and the weighted total, on the clean data, eval mode."""
        teacher = self._teacher
        assert teacher is not None
        clean, clean_idx = find_clean_loader(
            trainer, pl_module, self.clean_dataloader, self.clean_dataloader_idx, "NADCallback"
        )
        transfer = batch_transfer(trainer, pl_module)
        sums = torch.zeros(len(self.layers), dtype=torch.float64)
        count = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in clean:
                x = self.batch_to_xy(transfer(batch, clean_idx))[0]
                with trainer.precision_plugin.val_step_context():
                    with captured_features(pl_module, self.layers) as student:
                        pl_module(x)
                    with captured_features(teacher, self.layers) as taught:
                        teacher(x)
                    for i, (s, t) in enumerate(zip(student(), taught(), strict=True)):
                        sums[i] += float(layer_distance(s, t, self.p)) * len(x)
                count += len(x)
        finally:
            pl_module.train(was_training)
        per_layer = {name: float(sums[i]) / max(count, 1) for i, name in enumerate(self.layers)}
        weighted = sum(beta * per_layer[name] for name, beta in zip(self.layers, self.betas, strict=True))
        return {**per_layer, "weighted": weighted}


def _add_to_loss(out: Any, term: Tensor) -> Any:
    """``training_step``'s output with ``term`` added to its loss (a Tensor, or a dict's ``"loss"``)."""
    if isinstance(out, Tensor):
        return out + term
    if isinstance(out, dict) and "loss" in out:
        return {**out, "loss": out["loss"] + term}
    if out is None:  # the step skipped the batch: so does the distillation
        return out
    raise MisconfigurationException(
        f"NADCallback: training_step returned a {type(out).__name__}; it adds its term to a loss Tensor or to "
        "a dict's 'loss'"
    )


# --------------------------------------------------------------------------------------------------------------
# The plug-in defense
# --------------------------------------------------------------------------------------------------------------


class NAD(Defense):
    """NAD: fine-tune a teacher on the defender's clean split, then fine-tune the model with attention distillation.

    The student's fine-tuning is ``fine_tune(context, budget)``, exactly as ``fine_tuning``'s, plus the callback.
    """

    name = "nad"

    def __init__(self, settings: NADSettings, fine_tune: FineTuneBudget) -> None:
        self.settings = settings
        self.budget = fine_tune
        self.callback: NADCallback | None = None

    def check(self, model: L.LightningModule) -> None:
        layers = self.settings.layers_for(model)
        if not layers:
            raise ValueError(
                f"nad.layers is empty and {type(model).__name__} names no attention_layers: NAD needs the conv "
                "stages whose attention it distils; set model.attention_layers in conf/model/<name>.yaml or "
                "nad.layers=[...]"
            )
        if len(self.settings.betas) != len(layers):
            raise ValueError(
                f"nad.betas must have one weight per layer in nad.layers: {len(layers)} layers {layers}, "
                f"{len(self.settings.betas)} betas"
            )
        check_layers(model, layers, "nad.layers")

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        self.check(context.model)
        layers = self.settings.layers_for(context.model)
        self.callback = NADCallback(
            layers=layers,
            betas=self.settings.betas,
            p=self.settings.p,
            teacher_epochs=self.settings.teacher_epochs,
            teacher_optimizer=self.budget.optimizer,  # the student's optimizer, at a constant learning rate
            teacher_batch_size=getattr(context.datamodule, "batch_size", None),
        )
        record = fine_tune(context, self.budget, callbacks=[self.callback])
        callback = self.callback
        return {
            "pruned_channels": [],
            "pruned_fraction": 0.0,
            "fine_tune": record,
            "teacher": dict(callback.teacher_record),
            "attention_layers": list(layers),
            "betas": list(self.settings.betas),
            "p": self.settings.p,
            "attention_loss": callback.attention_loss_record(),
            "attention_distance": dict(callback.distance),
        }
