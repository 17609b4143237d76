"""ANP: D. Wu and Y. Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021
(arXiv 2110.14430).

Backdoor neurons are the ones that, perturbed a little, flip clean inputs to the attacker's class. ANP gives every
unit (here: every output channel of every ``nn.Conv2d``) a mask ``m`` in [0, 1] and a multiplicative perturbation
``delta`` bounded by ``eps``; on the defender's clean data it alternates one signed ascent step of ``delta`` on
the cross-entropy (the worst perturbation) and one SGD step of the masks on
``alpha * CE(mask only) + (1 - alpha) * CE(mask and perturbation)``. Units whose mask ends below ``threshold``
(or the ``prune_fraction`` smallest) are pruned; ANP does not fine-tune.

Follows the reference code (``csdongxian/ANP_backdoor``: ``optimize_mask_cifar.py`` and its ``NoisyBatchNorm2d``)
and BackdoorBench's port (``defense/anp``) in the formula (a unit's output with bias ``b``: ``(out - b) * (m +
delta) + b * (1 + delta_b)`` perturbed, ``(out - b) * m + b`` not), the random start of ``delta`` in [-eps, eps],
the ascent step ``eps / noise_steps`` on the gradient's sign, SGD with momentum 0.9 on the masks clamped to [0, 1],
and the defaults (eps 0.4, alpha 0.2, 2000 iterations, lr 0.2, one noise step, batch 128 drawn with replacement,
threshold 0.2; BackdoorBench's config repeats them, with batch 256).

Departs from them where they are wrong for this project or unusable on its networks:

* The units are conv channels, perturbed after the BatchNorm that follows the conv (as ``NoisyBatchNorm2d``) or,
  where none follows (as in the built-in networks by default), after the conv itself; forward hooks, so any
  network works without rewriting its modules.
* The model runs in eval mode (the reference runs ``model.train()``): BatchNorm uses and keeps its running
  statistics, and dropout is off. In train mode the mask search would update the checkpoint's statistics with
  the small clean split and optimise masks against batch statistics the deployed model never uses.
* ``delta`` is clipped to [-eps, eps] after each ascent step (the paper's constraint; the reference's random start
  plus one step of ``eps`` reaches 2 * eps).
* The decision uses only the defender's clean split and one fixed rule (mask < threshold, or the smallest
  ``prune_fraction``); the reference sweeps thresholds on the test set and BackdoorBench keeps the sweep's point
  of lowest test ASR (a leak). The triggered val loader is read only to record val ASR before and after.
* ``threshold`` prunes strictly below it (the reference's sweep prunes ``<=``; the same up to a tie).
* Pruning a unit masks its conv channel and its BatchNorm to zero with the project's channel masks
  (``channel_masks``), the same mechanics as fine-pruning; the reference zeroes the BatchNorm's weight only, which
  leaves the unit's shift ``beta`` on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from backdoor_lab.defenses.base import Defense, DefenseContext
from backdoor_lab.defenses.channel_masks import ChannelMaskCallback, ChannelMasks, masks_record
from backdoor_lab.defenses.fit_data import batch_transfer, find_clean_loader, find_triggered_loader
from backdoor_lab.defenses.methods import NO_FINE_TUNING
from backdoor_lab.defenses.neurons import MaskedNeurons, MaskValues
from backdoor_lab.defenses.pruner import BatchToXY
from backdoor_lab.defenses.pruning import conv_layer_names, model_device, move_to_device, run_batches, split_batch
from backdoor_lab.defenses.ranking import progress_bar
from backdoor_lab.defenses.successor_settings import ANPSettings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The mask search (plain PyTorch; the masked, perturbed units are in neurons.py)
# --------------------------------------------------------------------------------------------------------


def check_has_convs(model: nn.Module) -> None:
    """ANP's units are conv channels: a model without any is refused in one line, before any work."""
    if not conv_layer_names(model):
        raise ValueError(f"anp: ANP masks conv channels and {type(model).__name__} has no nn.Conv2d")


def _seed_from(generator: torch.Generator | None) -> int:
    """A seed drawn from ``generator`` or, if None, from torch's global generator (which the pipeline seeds)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def anp_loader(loader: Any, batch_size: int | None, iterations: int, generator: torch.Generator) -> Iterable:
    """``iterations`` batches of ``batch_size`` drawn with replacement from a map-style DataLoader's dataset.

    As the reference's ``RandomSampler(replacement=True)``; any other loader (or ``batch_size`` None) is used as
    given and cycled.
    """
    dataset = getattr(loader, "dataset", None)
    if batch_size is None or not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset):
        return loader
    sampler = RandomSampler(dataset, replacement=True, num_samples=iterations * batch_size, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def _cycle(loader: Iterable) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("ANP: the clean loader yields no batch")


def optimize_masks(
    model: nn.Module,
    clean_loader: Iterable,
    settings: ANPSettings,
    *,
    transfer: Callable[[Any, int], Any] | None = None,
    batch_to_xy: BatchToXY = split_batch,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    generator: torch.Generator | None = None,
    dataloader_idx: int = 0,
    progress: bool = False,
) -> MaskValues:
    """ANP's mask search on ``model`` over ``clean_loader``; returns every conv channel's final mask value.

    The model is left exactly as it was: weights frozen during the search (their ``requires_grad`` restored), eval
    mode throughout (each module's mode restored), hooks removed. Deterministic given ``generator`` (None: a seed
    from torch's global generator).
    """
    check_has_convs(model)
    seed = _seed_from(generator)
    noise_gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 1)
    device = model_device(model)
    transfer = transfer or (lambda batch, _: move_to_device(batch, device))
    batches = _cycle(anp_loader(clean_loader, settings.batch_size, settings.iterations, data_gen))

    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    # Eval mode, unlike the reference's model.train(): BatchNorm keeps (and uses) the checkpoint's running
    # statistics, which a search on the small clean split must not change; dropout is off.
    model.eval()
    for p in grads:
        p.requires_grad_(False)
    units = MaskedNeurons(model, device)
    optimizer = torch.optim.SGD(units.masks, lr=settings.mask_lr, momentum=0.9)
    report_every = max(1, settings.iterations // 4)  # the reference prints every 500 of 2000
    step = settings.eps / settings.noise_steps

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        with forward_context():
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    try:
        with torch.enable_grad(), progress_bar(progress) as bar:
            task = bar.add_task("ANP mask search", total=settings.iterations)
            total: Tensor | float = 0.0
            correct: Tensor | float = 0.0
            seen = window = 0
            for i in range(settings.iterations):
                x, y, _ = batch_to_xy(transfer(next(batches), dataloader_idx))
                if y is None:
                    raise ValueError("ANP needs labelled clean batches; batch_to_xy returned no targets")
                # Step 1: the worst perturbation within eps, from a random start (one signed step by default).
                units.reset_noise(settings.eps, noise_gen)
                units.perturb(True)
                for _ in range(settings.noise_steps):
                    units.ascend(lambda x=x, y=y: loss_of(x, y), step, settings.eps)
                # Step 2: the masks descend on alpha * natural + (1 - alpha) * robust.
                optimizer.zero_grad()
                robust = loss_of(x, y)
                units.perturb(False)
                with forward_context():
                    logits = model(x)
                natural = F.cross_entropy(logits.float(), y)
                loss = settings.alpha * natural + (1 - settings.alpha) * robust
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for mask in units.masks:
                        mask.clamp_(0.0, 1.0)
                total = total + loss.detach()  # tensors: no device sync per iteration
                correct = correct + (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                window += 1
                bar.update(task, advance=1)
                if (i + 1) % report_every == 0 or i + 1 == settings.iterations:
                    log.info(
                        "ANP: iteration %d/%d, mask loss %.4f, clean batch accuracy (masks only) %.4f",
                        i + 1,
                        settings.iterations,
                        float(total) / window,
                        float(correct) / max(seen, 1),
                    )
                    total, correct, seen, window = 0.0, 0.0, 0, 0
        return units.values()
    finally:
        units.close()
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


def choose_pruned(mask_values: Mapping[str, Sequence[float]], settings: ANPSettings) -> ChannelMasks:
    """The units ANP prunes: mask < ``threshold``, or the ``prune_fraction`` smallest (ties: layer, then index)."""
    if settings.prune_fraction is None:
        return {
            layer: [i for i, v in enumerate(values) if v < settings.threshold] for layer, values in mask_values.items()
        }
    ranked = sorted(
        (value, order, index, layer)
        for order, (layer, values) in enumerate(mask_values.items())
        for index, value in enumerate(values)
    )
    count = int(round(settings.prune_fraction * len(ranked)))
    masks: ChannelMasks = {layer: [] for layer in mask_values}
    for _, _, index, layer in ranked[:count]:
        masks[layer].append(index)
    return {layer: sorted(channels) for layer, channels in masks.items()}


def anp_masks(
    model: nn.Module, clean_loader: Iterable, settings: ANPSettings, **search: Any
) -> tuple[ChannelMasks, MaskValues]:
    """ANP on a plain PyTorch classifier: ``(pruned channels per conv, mask values per conv)``.

    ``search``: the keyword arguments of ``optimize_masks``. The masks are returned, not installed (the model is
    left as it was): ``channel_masks.apply_channel_masks(model, masks)`` installs them.
    """
    values = optimize_masks(model, clean_loader, settings, **search)
    return choose_pruned(values, settings), values


# --------------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------------


class ANPCallback(ChannelMaskCallback):
    """ANP at fit start: search the masks on clean data, prune, and let the fit (if any epochs) go on masked.

    Args:
        settings: ANP's settings (defaults: the paper's).
        clean_dataloader: the defender's clean data. None: the datamodule's ``clean_val_dataloader()``, else
            ``fit(val_dataloaders=...)``, the datamodule's or the module's ``val_dataloader()`` (``fit_data``).
        clean_dataloader_idx: which of several val dataloaders is the clean one.
        triggered_dataloader: triggered val inputs, only to record val ASR before and after (never to decide);
            None: ``datamodule.triggered_val_dataloader()`` if it exists.
        batch_to_xy: ``batch -> (inputs, targets, true labels or None)``.
        progress: a rich progress bar on a terminal (quiet in logs and CI).
    """

    display_name = "ANPCallback"

    def __init__(
        self,
        settings: ANPSettings | None = None,
        clean_dataloader: Any = None,
        clean_dataloader_idx: int | str | None = None,
        triggered_dataloader: Any = None,
        batch_to_xy: BatchToXY = split_batch,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings or ANPSettings()
        self.clean_dataloader = clean_dataloader
        self.clean_dataloader_idx = clean_dataloader_idx
        self.triggered_dataloader = triggered_dataloader
        self.batch_to_xy = batch_to_xy
        self.progress = progress
        # State beyond the masks, so that a resumed fit keeps the record.
        self.mask_values: MaskValues = {}
        self.val: dict[str, float | None] = {}

    def find_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ChannelMasks:
        clean, idx = find_clean_loader(
            trainer, pl_module, self.clean_dataloader, self.clean_dataloader_idx, self.display_name
        )
        transfer = batch_transfer(trainer, pl_module)
        # The search's seed, first: from torch's generator as the fit found it (the pipeline seeds it).
        generator = torch.Generator().manual_seed(_seed_from(None))
        self.val = self._measure(trainer, pl_module, clean, idx, "before")
        self.mask_values = optimize_masks(
            pl_module,
            clean,
            self.settings,
            transfer=transfer,
            batch_to_xy=self.batch_to_xy,
            # train_step_context: autocast under mixed precision, so the mask gradients flow as in training.
            forward_context=trainer.precision_plugin.train_step_context,
            generator=generator,
            dataloader_idx=idx,
            progress=self.progress and trainer.is_global_zero,
        )
        return choose_pruned(self.mask_values, self.settings)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fresh = not self.masked
        super().on_fit_start(trainer, pl_module)
        if not fresh:
            log.info("ANP: resumed with %d units pruned", self.record()["pruned_count"])
            return
        # The search ran on rank 0's answer; every rank records the val numbers under the installed masks.
        clean, idx = find_clean_loader(
            trainer, pl_module, self.clean_dataloader, self.clean_dataloader_idx, self.display_name
        )
        self.val.update(self._measure(trainer, pl_module, clean, idx, "after"))
        self._log_result(trainer)

    def _measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, clean: Any, idx: int, when: str
    ) -> dict[str, float | None]:
        """Val clean accuracy and ASR, for the record only (nothing here decides which units are pruned)."""
        transfer = batch_transfer(trainer, pl_module)
        context = trainer.precision_plugin.val_step_context
        triggered = find_triggered_loader(trainer, self.triggered_dataloader)
        with torch.random.fork_rng(devices=[]):  # iterating a loader draws from torch's generator
            device = model_device(pl_module)
            acc = run_batches(
                pl_module, clean, device, batch_to_xy=self.batch_to_xy, forward_context=context,
                transfer=lambda b, _: transfer(b, idx),
            ).rate  # fmt: skip
            asr = None
            if triggered is not None:
                asr = run_batches(
                    pl_module, triggered, device, batch_to_xy=self.batch_to_xy, forward_context=context,
                    transfer=transfer,
                ).rate  # fmt: skip
        return {f"clean_acc_{when}": acc, f"asr_{when}": asr}

    def _log_result(self, trainer: L.Trainer) -> None:
        record = self.record()
        log.info(
            "ANP: pruned %d of %d conv channels (%.1f%%); val clean accuracy %s -> %s, val ASR %s -> %s",
            record["pruned_count"],
            sum(self.num_channels.values()),
            100 * record["pruned_fraction"],
            self.val.get("clean_acc_before"),
            self.val.get("clean_acc_after"),
            self.val.get("asr_before"),
            self.val.get("asr_after"),
        )
        metrics = {"anp/pruned_fraction": record["pruned_fraction"]}
        metrics.update({f"anp/val_{k}": v for k, v in self.val.items() if v is not None})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mask_values": self.mask_values, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mask_values = {k: [float(v) for v in vs] for k, vs in state_dict.get("mask_values", {}).items()}
        self.val = dict(state_dict.get("val", {}))

    def record(self) -> dict[str, Any]:
        """What ANP's metrics.json records: the masks, every unit's mask value, the rule, the val numbers."""
        return {
            **masks_record(self.masks, self.num_channels),
            "mask_values": self.mask_values,
            "threshold": self.settings.threshold if self.settings.prune_fraction is None else None,
            "prune_fraction": self.settings.prune_fraction,
            "iterations": self.settings.iterations,
            "val": dict(self.val),
        }


class ANP(Defense):
    """Adversarial Neuron Pruning: mask the conv channels that a small adversarial perturbation turns malicious."""

    name = "anp"

    def __init__(self, settings: ANPSettings) -> None:
        self.settings = settings
        self.callback: ANPCallback | None = None

    def check(self, model: L.LightningModule) -> None:
        check_has_convs(model)

    def apply(self, context: DefenseContext) -> dict[str, Any]:
        self.check(context.model)
        self.callback = ANPCallback(self.settings)
        # A fit of zero epochs runs the callback's search (at fit start) and nothing else: ANP does not fine-tune.
        context.make_trainer([self.callback], 0).fit(context.model, datamodule=context.datamodule, weights_only=True)
        return {**self.callback.record(), "fine_tune": NO_FINE_TUNING}

    def export(self, model: L.LightningModule) -> None:
        if self.callback is not None:
            self.callback.remove_reparametrization(model)


__all__ = [
    "ANP",
    "ANPCallback",
    "ANPSettings",
    "MaskedNeurons",
    "anp_loader",
    "anp_masks",
    "check_has_convs",
    "choose_pruned",
    "optimize_masks",
]
