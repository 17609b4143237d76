"""The LightningModule that trains and evaluates any classification network on a backdoor task."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from backdoor_lab.metrics import AttackSuccessRate

CLEAN, TRIGGERED = 0, 1  # dataloader order of BackdoorDataModule's val/test loaders


class BackdoorClassifier(L.LightningModule):
    """Cross-entropy training; logs clean accuracy and attack success rate for val and test.

    Args:
        net: any ``nn.Module`` mapping inputs to logits (built by Hydra from ``model.net``).
        num_classes: size of the label space.
        optimizer: a partial (Hydra ``_partial_: true``) taking the parameters.
        scheduler: optional partial taking the optimizer (stepped per epoch).
        prune_layer: the conv layer Fine-Pruning prunes (``net.conv5``); the model knows its own, so a
            defense config interpolates it instead of every experiment repeating it.
        rank_layer: the module whose output ranks that layer's channels (``net.pool3`` for DeepID, as the
            original); None = ``prune_layer`` itself.
        attention_layers: the modules whose outputs NAD distils as attention maps (its paper's last three
            blocks: here the last three conv stages, read after their ReLU where it is a module of its own).
        channels_last: conv weights and 4-d inputs in channels-last memory order, which oneDNN (CPU) and cuDNN run
            faster, above all under bf16 autocast (docs/benchmarks.md); the same arithmetic up to float rounding.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        prune_layer: str | None = None,
        rank_layer: str | None = None,
        attention_layers: list[str] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # attention_layers arrives as an OmegaConf list, which a weights-only checkpoint load refuses to unpickle
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "attention_layers"])
        self.net = net
        self.prune_layer = prune_layer
        self.rank_layer = rank_layer or prune_layer
        self.attention_layers = list(attention_layers or [])
        self.channels_last = bool(channels_last)
        if self.channels_last:  # parameters keep this order through load_state_dict (copy_ keeps the strides)
            self.net.to(memory_format=torch.channels_last)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_asr = AttackSuccessRate()
        self.test_asr = AttackSuccessRate()

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # a Python bool: torch.fx traces through it (the cached prune curve)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, ...], dataloader_idx: int, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        if dataloader_idx == CLEAN:
            acc = self.val_acc if stage == "val" else self.test_acc
            acc(logits, y)
            self.log(f"{stage}/clean_acc", acc, prog_bar=True, add_dataloader_idx=False)
            self.log(f"{stage}/loss", self.loss(logits, y), add_dataloader_idx=False)
        else:
            asr = self.val_asr if stage == "val" else self.test_asr
            asr(logits, y, batch[2] if len(batch) > 2 else None)
            self.log(f"{stage}/asr", asr, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}
