"""FinePruningCallback under Lightning's settings: precision, batch hooks, checkpoints both ways, clean data."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab import FinePruningCallback
from tests.test_pruning import PlainModule, known_data
from tests.trainers import quiet_trainer

_trainer = quiet_trainer


class DictBatchModule(PlainModule):
    """Yields dict batches with keys the callback cannot read; ``on_after_batch_transfer`` makes them tuples."""

    def train_dataloader(self):
        return DataLoader([{"pixels": x, "cls": y} for x, y in known_data()], batch_size=16)

    def val_dataloader(self):
        return self.train_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch["pixels"], batch["cls"]


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
def test_prunes_the_same_channels_under_every_precision_through_the_batch_hooks(tmp_path, precision) -> None:
    module = DictBatchModule(lr=0.1)
    cb = FinePruningCallback(layer="net.features.0", step=1, full_curve=True)
    _trainer(tmp_path, [cb], epochs=1, precision=precision).fit(module)
    assert cb.pruned_channels == [0, 1]
    assert [p["clean_acc"] for p in cb.prune_curve] == pytest.approx([1.0, 1.0, 1.0, 0.5])
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.net.features[0].weight_orig.dtype == expected_dtype
    assert module.net.features[0].bias[:2].abs().max() == 0  # masks held through the fine-tuning epoch


class CheckpointedModule(PlainModule):
    """Logs val/acc (for ModelCheckpoint) and test/acc (to read back what a checkpoint holds)."""

    def _acc(self, batch) -> torch.Tensor:
        x, y = batch
        return (self(x).argmax(1) == y).float().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self._acc(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/acc", self._acc(batch))

    def test_dataloader(self):
        return self.val_dataloader()


def test_test_and_validate_from_best_and_last_checkpoints_on_the_live_and_a_fresh_model(tmp_path) -> None:
    module = CheckpointedModule(lr=0.1)
    cb = FinePruningCallback(prune_ratio=0.5, step=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/acc", mode="max", save_last=True)
    trainer = _trainer(tmp_path, [cb, ckpt], epochs=2, enable_checkpointing=True)
    trainer.fit(module)
    for which in ("best", "last"):
        (result,) = trainer.test(module, ckpt_path=which, verbose=False)
        assert result["test/acc"] == 1.0
        assert module.net.features[0].bias_mask.tolist() == [0.0, 0.0, 1.0, 1.0], "the live model stays pruned"
        (result,) = trainer.validate(module, ckpt_path=which, verbose=False)
        assert result["val/acc"] == 1.0

    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    fresh = CheckpointedModule()
    fresh.load_state_dict(state, strict=True)  # plain weights: an unpruned copy loads them as they are
    x = known_data().tensors[0]
    module.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))
    assert fresh.net.features[0].bias[:2].abs().max() == 0


def test_loading_unpruned_weights_into_the_pruned_model_changes_weights_not_the_mask() -> None:
    module = PlainModule()
    dense = PlainModule().state_dict()
    from backdoor_lab.masks import set_channel_mask

    set_channel_mask([module.net.features[0]], torch.tensor([False, True, True, True]))
    dense["net.features.0.bias"] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    module.load_state_dict(dense, strict=True)
    conv = module.net.features[0]
    assert conv.bias_orig.tolist() == [5.0, 6.0, 7.0, 8.0]
    assert conv.bias_mask.tolist() == [0.0, 1.0, 1.0, 1.0]


class NoConv(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_validate_test_and_predict_never_fail_because_of_the_callback(tmp_path) -> None:
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = _trainer(tmp_path, [FinePruningCallback(layer="no.such.conv")])
    assert "val/loss" in trainer.validate(NoConv(), loader, verbose=False)[0]
    assert "val/loss" in trainer.test(NoConv(), loader, verbose=False)[0]
    assert len(trainer.predict(NoConv(), loader)) == 2
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        trainer.fit(NoConv(), loader)


class NoVal(PlainModule):
    val_dataloader = None


def flipped_loader() -> DataLoader:
    x, y = known_data().tensors
    return DataLoader(TensorDataset(x, 1 - y), batch_size=16)


def test_fit_val_dataloaders_are_the_clean_data(tmp_path) -> None:
    cb = FinePruningCallback(step=1, full_curve=True)
    _trainer(tmp_path, [cb]).fit(NoVal(), val_dataloaders=flipped_loader())
    assert cb.prune_curve[0]["clean_acc"] == 0.0  # read from the loader given to fit, not anywhere else
    assert cb.prune_curve[3]["clean_acc"] == 0.5


def test_several_val_loaders_need_an_index_and_the_index_picks_one(tmp_path) -> None:
    loaders = [flipped_loader(), DataLoader(known_data(), batch_size=16)]
    with pytest.raises(MisconfigurationException, match=r"2 dataloaders \(\[0, 1\]\).*clean_dataloader_idx"):
        _trainer(tmp_path, [FinePruningCallback(step=1)]).fit(NoVal(), val_dataloaders=loaders)
    cb = FinePruningCallback(step=1, clean_dataloader_idx=1)
    _trainer(tmp_path, [cb]).fit(NoVal(), val_dataloaders=loaders)
    assert cb.prune_curve[0]["clean_acc"] == 1.0 and cb.pruned_channels == [0, 1]
    cb = FinePruningCallback(step=1, clean_dataloader_idx="clean")
    _trainer(tmp_path, [cb]).fit(NoVal(), val_dataloaders={"flipped": loaders[0], "clean": loaders[1]})
    assert cb.prune_curve[0]["clean_acc"] == 1.0
    with pytest.raises(MisconfigurationException, match="not one of"):
        _trainer(tmp_path, [FinePruningCallback(clean_dataloader_idx=5)]).fit(NoVal(), val_dataloaders=loaders)


def test_no_clean_data_is_the_callbacks_own_error(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="FinePruningCallback needs clean validation data"):
        _trainer(tmp_path, [FinePruningCallback()]).fit(NoVal())


class RecordingLogger(Logger):
    """Keeps what the callback logs: metric dicts with their steps, and tables (as W&B's logger takes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict, int | None]] = []
        self.tables: list[tuple[str, list[str], list[list]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_table(self, key: str, columns: list[str], data: list[list]) -> None:
        self.tables.append((key, columns, data))


def logged_trainer(tmp_path, callback: FinePruningCallback, logger: Logger) -> L.Trainer:
    return L.Trainer(
        max_epochs=0,
        callbacks=[callback],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_the_pruning_result_is_logged_to_every_logger_with_the_whole_curve(tmp_path) -> None:
    triggered = DataLoader(TensorDataset(torch.full((16, 1, 2, 2), 2.0), torch.ones(16).long(), torch.zeros(16).long()))
    cb = FinePruningCallback(layer="net.features.0", triggered_dataloader=triggered, progress=False)
    logger = RecordingLogger()
    logged_trainer(tmp_path, cb, logger).fit(PlainModule())
    assert cb.pruned_channels == [0, 1] and cb.pruned_fraction == 0.5
    pruned = [m for m, _ in logger.metrics if "prune/pruned_fraction" in m]
    assert pruned == [
        {
            "prune/pruned_fraction": 0.5,
            "prune/val_clean_acc_before": 1.0,
            "prune/val_clean_acc_after": 1.0,
            "prune/val_asr_before": 1.0,
            "prune/val_asr_after": 1.0,
        }
    ]
    assert logger.tables == [
        (
            "prune_curve",
            ["pruned", "fraction", "clean_acc", "asr"],
            [[p["pruned"], p["fraction"], p["clean_acc"], p["asr"]] for p in cb.prune_curve],
        )
    ]
    assert [p["pruned"] for p in cb.prune_curve] == [0, 1, 2, 3]
    # Without triggered data there is no ASR to log.
    quiet = FinePruningCallback(layer="net.features.0", triggered_dataloader=None, progress=False)
    logger = RecordingLogger()
    logged_trainer(tmp_path, quiet, logger).fit(PlainModule())
    logged = [m for m, _ in logger.metrics if "prune/pruned_fraction" in m]
    assert logged == [
        {"prune/pruned_fraction": 0.5, "prune/val_clean_acc_before": 1.0, "prune/val_clean_acc_after": 1.0}
    ]


def test_the_callbacks_settings_key_its_state_and_only_a_fit_resolves_its_layer(tmp_path) -> None:
    cb = FinePruningCallback(layer="net.features.0", prune_ratio=0.5)
    assert cb.state_key == "FinePruningCallback{'layer': 'net.features.0', 'prune_ratio': 0.5}"
    assert cb.pruned_fraction == 0.0 and cb.pruned is False and cb.pruned_channels == [] and cb.prune_curve == []
    assert cb.progress is True and cb.fast_curve is True and cb.rectify is True and cb.full_curve is False
    wrong = FinePruningCallback(layer="nope")
    wrong.setup(None, PlainModule(), "validate")  # validate, test and predict never resolve the layer
    assert wrong.layer_name is None
    with pytest.raises(ValueError, match="layer 'nope' is not in PlainModule"):
        _trainer(tmp_path, [wrong]).fit(PlainModule())
    bad_rank = FinePruningCallback(layer="net.features.0", activation_layer="net.nope")
    with pytest.raises(MisconfigurationException, match=r"^activation_layer 'net.nope' is not in the model$"):
        _trainer(tmp_path, [bad_rank]).fit(PlainModule())


def test_a_spawned_fits_state_without_its_trainer_warns_and_leaves_the_model_unmasked() -> None:
    cb = FinePruningCallback(layer="net.features.0")
    state = {
        **cb.state_dict(),
        "layer_name": "net.features.0",
        "num_channels": 4,
        "pruned_channels": [0],
        "pruned": True,
    }
    with pytest.warns(RuntimeWarning, match=r"call callback.apply_mask\(model\) before training it further"):
        cb._take_over(state)
    assert cb.pruned_channels == [0] and cb.pruned_fraction == 0.25
    module = PlainModule()
    cb.apply_mask(module)
    assert module.net.features[0].weight_mask.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    cb.remove_reparametrization(module)
    assert not hasattr(module.net.features[0], "weight_mask") and module.net.features[0].weight[0].abs().sum() == 0
