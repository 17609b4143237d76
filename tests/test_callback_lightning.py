"""FinePruningCallback under Lightning's settings: precision, batch hooks, checkpoints both ways, clean data."""

from __future__ import annotations

import logging
import pickle
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab import FinePruningCallback
from backdoor_lab.defenses.callback import _trainer_holding
from backdoor_lab.defenses.pruner import FinePruner
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


def flipped_to_target(n: int) -> DataLoader:
    """``n`` triggered inputs (target 1, true class 0) that drive ``KnownNet``'s class channel: ASR 1 unpruned."""
    return DataLoader(TensorDataset(torch.full((n, 1, 2, 2), 2.0), torch.ones(n).long(), torch.zeros(n).long()))


def logged_trainer(tmp_path, callback: FinePruningCallback, logger: Logger) -> L.Trainer:
    return quiet_trainer(tmp_path, [callback], 0, logger=logger)


def test_the_pruning_result_is_logged_to_every_logger_with_the_whole_curve(tmp_path) -> None:
    cb = FinePruningCallback(layer="net.features.0", triggered_dataloader=flipped_to_target(16), progress=False)
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


def first_batch_all_positive() -> DataLoader:
    """``known_data`` whose first batch of 16 is all class 1: a one-batch ranking differs from the whole set's."""
    data = known_data()
    data.tensors[0][:16] = 1.0
    data.tensors[1][:16] = 1
    return DataLoader(data, batch_size=16)


@pytest.mark.parametrize(
    "settings",
    [
        {"step": 2, "full_curve": True},
        {"max_batches": 1},
        {"rectify": False, "full_curve": True},
        {"max_accuracy_drop": 0.6, "full_curve": False},
        {"prune_ratio": 0.75, "step": 3},
        {"fast_curve": False},
    ],
    ids=["step", "max_batches", "rectify", "drop", "ratio", "slow"],
)
def test_the_callbacks_settings_reach_the_pruner(tmp_path, settings: dict) -> None:
    """The callback's curve, ranking and mask equal a plain ``FinePruner``'s with the same settings."""
    cb = FinePruningCallback(layer="net.features.0", clean_dataloader=first_batch_all_positive(), **settings)
    _trainer(tmp_path, cb).fit(PlainModule())
    direct = {("fast" if k == "fast_curve" else k): v for k, v in settings.items()}
    pruner = FinePruner(PlainModule(), "net.features.0", **direct)
    assert cb.pruned_channels == pruner.run(first_batch_all_positive())
    assert cb.prune_curve == pruner.prune_curve and cb.channel_activation == pruner.channel_activation
    assert cb.step == settings.get("step") and cb.max_batches == settings.get("max_batches")


def test_the_batch_hooks_get_each_loaders_own_index(tmp_path) -> None:
    seen: list[int] = []

    class Recording(PlainModule):
        def val_dataloader(self):
            return [DataLoader(known_data(8), batch_size=8), DataLoader(known_data(), batch_size=16)]

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return None

        def on_before_batch_transfer(self, batch, dataloader_idx):
            seen.append(dataloader_idx)
            return batch

    cb = FinePruningCallback(layer="net.features.0", clean_dataloader_idx=1, triggered_dataloader=flipped_to_target(8))
    _trainer(tmp_path, cb, num_sanity_val_steps=0, limit_val_batches=0).fit(Recording())
    assert seen[:5] == [1, 1, 1, 1, 0]  # the rank pass: four clean batches (val loader 1), then the triggered one


def test_a_fixed_ratio_logs_the_before_and_after_points_and_the_message(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.callback")
    cb = FinePruningCallback(
        layer="net.features.0", prune_ratio=0.75, step=3, triggered_dataloader=flipped_to_target(16)
    )
    logger = RecordingLogger()
    logged_trainer(tmp_path, cb, logger).fit(PlainModule())
    assert [p["pruned"] for p in cb.prune_curve] == [0, 3]
    logged = [(m, step) for m, step in logger.metrics if "prune/pruned_fraction" in m]
    assert logged == [
        (
            {
                "prune/pruned_fraction": 0.75,
                "prune/val_clean_acc_before": 1.0,
                "prune/val_clean_acc_after": 0.5,
                "prune/val_asr_before": 1.0,
                "prune/val_asr_after": 0.0,
            },
            0,
        )
    ]
    ours = [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.callback"]
    assert ours == ["FinePruning: pruned 3/4 channels of net.features.0 (75.0%)"]


def test_the_state_round_trips_and_a_resumed_fit_says_so(tmp_path, caplog) -> None:
    cb = FinePruningCallback(layer="net.features.0", progress=False)
    assert cb.channel_activation == [] and cb.triggered_activation == [] and cb.num_channels == 0
    _trainer(tmp_path, cb).fit(PlainModule())
    state = cb.state_dict()
    assert sorted(state) == sorted(
        [
            "layer_name",
            "num_channels",
            "channel_activation",
            "triggered_activation",
            "pruned_channels",
            "prune_curve",
            "pruned",
        ]
    )
    again = FinePruningCallback(layer="net.features.0", progress=False)
    again.load_state_dict(state)
    assert (again.layer_name, again.num_channels, again.pruned_channels) == ("net.features.0", 4, [0, 1])
    assert again.channel_activation == cb.channel_activation and again.prune_curve == cb.prune_curve
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.callback")
    _trainer(tmp_path, again).fit(PlainModule())
    ours = [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.callback"]
    assert ours == ["FinePruning: resumed with 2 channels of net.features.0 pruned"]
    with pytest.raises(MisconfigurationException, match="max_batches"):
        FinePruningCallback(max_batches=0)


def test_a_checkpoint_folds_this_callbacks_masks_only_once_it_has_pruned() -> None:
    module = PlainModule()
    cb = FinePruningCallback(layer="net.features.0")
    other = {"other.weight_orig": torch.ones(2), "other.weight_mask": torch.tensor([1.0, 0.0])}
    untouched = {"state_dict": {**module.state_dict(), **other}}
    cb.on_save_checkpoint(None, module, untouched)  # nothing pruned yet: the checkpoint is left as it is
    assert sorted(untouched["state_dict"]) == sorted({**module.state_dict(), **other})
    cb.layer_name, cb.pruned_channels, cb.pruned = "net.features.0", [0], True
    cb.apply_mask(module)
    checkpoint = {"state_dict": {**module.state_dict(), **other}}
    cb.on_save_checkpoint(None, module, checkpoint)
    state = checkpoint["state_dict"]
    assert "net.net.features.0.weight_orig" not in state and state["net.features.0.weight"][0].abs().sum() == 0
    assert "other.weight_orig" in state and "other.weight_mask" in state  # another module's pair is not this one's


def test_the_parent_trainer_is_found_on_the_calling_frames() -> None:
    cb = FinePruningCallback(layer="net.features.0")
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    holding, stranger = L.Trainer(callbacks=[cb], **quiet), L.Trainer(**quiet)

    def inside_fit(trainer: L.Trainer) -> L.Trainer | None:  # a frame whose ``trainer`` may hold the callback
        return _trainer_holding(cb)

    assert inside_fit(holding) is holding
    assert inside_fit(stranger) is None

    class Probing(L.Trainer):  # a frame whose ``self`` is the Trainer
        def probe(self) -> L.Trainer | None:
            return _trainer_holding(cb)

    probing = Probing(callbacks=[cb], **quiet)
    assert probing.probe() is probing and Probing(**quiet).probe() is None


def test_under_a_spawn_launcher_rank_zero_sends_its_mask_home(tmp_path) -> None:
    """What a spawned worker does at teardown and the parent on unpickling its results, without spawning: the
    worker folds the mask into plain weights and adds the callback's state to the launcher's extra results; the
    parent's callback (found by its id) takes the state over and masks the parent's model again."""
    cb, bystander = FinePruningCallback(layer="net.features.0"), FinePruningCallback(layer="net.features.0")
    module = PlainModule()
    fit_trainer = _trainer(tmp_path, cb)
    fit_trainer.fit(module)
    launcher = _MultiProcessingLauncher(SimpleNamespace(), start_method="spawn")
    worker = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), local_rank=1, callback_metrics={})
    cb.teardown(worker, module, "validate")  # only a fit's teardown sends anything
    assert hasattr(module.net.features[0], "weight_mask")
    cb.teardown(worker, module, "fit")  # a rank other than 0: folds, sends nothing
    assert not hasattr(module.net.features[0], "weight_mask") and module.net.features[0].weight[:2].abs().sum() == 0
    assert sorted(launcher.get_extra_results(worker)) == ["callback_metrics_bytes"]
    worker.local_rank = 0
    cb.teardown(worker, module, "fit")
    results = launcher.get_extra_results(worker)
    assert sorted(results) == ["callback_metrics_bytes", f"fine_pruning/{cb._handoff_id}"]
    assert cb._handoff_id != bystander._handoff_id
    blob = pickle.dumps(results[f"fine_pruning/{cb._handoff_id}"])
    cb.pruned_channels = []  # the parent's callback before the results come back

    def unpickle_in_fit(trainer: L.Trainer) -> None:
        pickle.loads(blob)

    unpickle_in_fit(fit_trainer)
    assert cb.pruned_channels == [0, 1] and bystander.pruned_channels == []
    assert module.net.features[0].weight_mask.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
