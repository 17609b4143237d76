"""Where a defense callback finds the defender's clean data inside a Lightning fit, and how it moves batches.

Shared by every defense callback (``FinePruningCallback``, ``ANPCallback``, ``NADCallback``), so that all of
them read clean data from the same places, in the same order, with the same errors, and move batches the way
Lightning's own evaluation loop does (precision input conversion, the batch-transfer hooks, the strategy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

Transfer = Callable[[Any, int], Any]


def find_clean_loader(
    trainer: L.Trainer, pl_module: L.LightningModule, given: Any, index: int | str | None, who: str
) -> tuple[Any, int]:
    """The defender's clean data and its dataloader index for the batch hooks.

    ``given`` (the callback's ``clean_dataloader``) first; then the datamodule's ``clean_val_dataloader()``;
    then ``fit(val_dataloaders=...)``, the datamodule's and the module's ``val_dataloader()``, where ``index``
    picks the clean one of several. ``who`` names the callback in errors.
    """
    if given is not None:
        return given, 0
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "clean_val_dataloader"):
        return dm.clean_val_dataloader(), 0
    # fit(val_dataloaders=...) is where Lightning's own validation reads from (a private attribute, the
    # same one its loops use); otherwise the datamodule's, then the module's val_dataloader().
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    given_to_fit = getattr(source, "instance", None)
    if given_to_fit is not None and not isinstance(given_to_fit, L.LightningModule | L.LightningDataModule):
        return pick_clean(given_to_fit, "fit(val_dataloaders=...)", index, who)
    for owner, what in ((dm, "the datamodule's val_dataloader()"), (pl_module, "the module's val_dataloader()")):
        if owner is not None and is_overridden("val_dataloader", owner):
            return pick_clean(owner.val_dataloader(), what, index, who)
    raise MisconfigurationException(
        f"{who} needs clean validation data and found none: pass {who}(clean_dataloader=...), or "
        f"fit(model, val_dataloaders=...), or give the datamodule a clean_val_dataloader() or val_dataloader(), "
        f"or the LightningModule a val_dataloader()"
    )


def pick_clean(loaders: Any, what: str, index: int | str | None, who: str) -> tuple[Any, int]:
    """The clean one among ``loaders``: the only one, or ``index``; never a silent first pick."""
    if isinstance(loaders, dict):
        keys = list(loaders)
    elif isinstance(loaders, list | tuple):
        keys = list(range(len(loaders)))
    else:
        if index not in (None, 0):
            raise MisconfigurationException(f"clean_dataloader_idx={index!r}, but {what} gives a single dataloader")
        return loaders, 0
    if not keys:
        raise MisconfigurationException(f"{what} gives no dataloader; {who} needs clean data")
    if index is None:
        if len(keys) > 1:
            raise MisconfigurationException(
                f"{what} gives {len(keys)} dataloaders ({keys}): pass {who}(clean_dataloader_idx=...) "
                f"with the one that holds clean data, or clean_dataloader=..."
            )
        choice = keys[0]
    elif index in keys:
        choice = index
    else:
        raise MisconfigurationException(f"clean_dataloader_idx={index!r} is not one of {what}'s dataloaders {keys}")
    return loaders[choice], keys.index(choice)


def find_triggered_loader(trainer: L.Trainer, given: Any) -> Any:
    """Triggered inputs for curves and records only (never to decide): ``given``, else the datamodule's."""
    if given is not None:
        return given
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "triggered_val_dataloader"):
        return dm.triggered_val_dataloader()
    return None


def batch_transfer(trainer: L.Trainer, pl_module: L.LightningModule) -> Transfer:
    """``(batch, dataloader_idx) -> batch`` on the module's device, as Lightning's evaluation loop moves it.

    The loop's own sequence (lightning.pytorch.loops.evaluation_loop): the precision plugin's input conversion,
    the module's/datamodule's ``on_before_batch_transfer``, then the strategy's ``batch_to_device`` (with
    ``transfer_batch_to_device`` and ``on_after_batch_transfer``).
    """
    strategy, precision = trainer.strategy, trainer.precision_plugin

    def transfer(batch: Any, dataloader_idx: int) -> Any:
        batch = precision.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
        return strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)

    return transfer
