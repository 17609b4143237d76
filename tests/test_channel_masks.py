"""``ChannelMaskCallback``, the base of the successors' callbacks, in one process: the record it writes, the model it
refuses, and the plain weights its checkpoints carry (its DDP behaviour: ``tests/test_channel_masks_ddp.py``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.defenses.channel_masks import ChannelMaskCallback, ChannelMasks, masks_record

from .trainers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedMasks(ChannelMaskCallback):
    """Masks what it was given: the life cycle of the base, without a search."""

    display_name = "FixedMasks"

    def __init__(self, masks: ChannelMasks) -> None:
        super().__init__()
        self.fixed = masks

    def find_masks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ChannelMasks:
        return self.fixed


class TwoConvs(L.LightningModule):
    def __init__(self, convs: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU()) if convs else None
        self.head = nn.Linear(4 if convs else 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.body is None:
            return self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))
        return self.head(self.body(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_masks_record_counts_per_layer_and_over_every_layers_channels() -> None:
    record = masks_record({"a": [3, 1], "b": []}, {"a": 4, "b": 4})
    assert record == {
        "masks": {"a": [1, 3], "b": []},
        "layer_channels": {"a": 4, "b": 4},
        "pruned_count": 2,
        "pruned_fraction": 0.25,
    }
    empty = masks_record({}, {})  # no layer scored: nothing pruned, and no division by zero
    assert empty["pruned_count"] == 0 and empty["pruned_fraction"] == 0.0


def test_a_model_without_a_conv_is_refused_by_name_before_any_work(tmp_path) -> None:
    with pytest.raises(
        MisconfigurationException, match=r"^FixedMasks masks conv channels, and TwoConvs has no nn.Conv2d layer$"
    ):
        quiet_trainer(tmp_path, [FixedMasks({})], epochs=1).fit(TwoConvs(convs=False))


def test_checkpoints_carry_plain_weights_of_the_masked_layers_and_leave_other_pruning_alone(tmp_path) -> None:
    torch.manual_seed(0)
    module = TwoConvs()
    prune.l1_unstructured(module.body[2], "weight", amount=0.5)  # the user's own pruning, not the callback's
    cb = FixedMasks({"body.0": [1, 2]})
    quiet_trainer(tmp_path, [cb], epochs=1).fit(module)
    assert cb.masked and cb.masks == {"body.0": [1, 2]} and cb.num_channels == {"body.0": 4}

    checkpoint = {"state_dict": module.state_dict(), "epoch": 0}
    cb.on_save_checkpoint(None, module, checkpoint)
    state = checkpoint["state_dict"]
    assert "body.0.weight" in state and "body.0.weight_orig" not in state and "body.0.weight_mask" not in state
    assert state["body.0.weight"][[1, 2]].abs().max() == 0 and state["body.0.weight"][[0, 3]].abs().min() > 0
    assert state["body.0.bias"][[1, 2]].abs().max() == 0
    assert "body.2.weight_orig" in state and "body.2.weight_mask" in state  # not the callback's to fold

    other = {"epoch": 0}  # a checkpoint without weights (weights_only=False savers may drop them): untouched
    cb.on_save_checkpoint(None, module, other)
    assert other == {"epoch": 0}
    unmasked = FixedMasks({"body.0": [1]})  # before its fit: nothing installed, the state dict is left as it is
    raw = {"state_dict": dict(module.state_dict())}
    unmasked.on_save_checkpoint(None, module, raw)
    assert "body.0.weight_orig" in raw["state_dict"]
