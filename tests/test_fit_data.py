"""Where a defense callback finds its clean data, with known answers (``defenses/fit_data.py``): which source wins,
the dataloader index handed to the batch hooks, and the one-line errors that name the source. Fast unit tests
against the mutants the Lightning tests let survive (docs/testing.md)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from backdoor_lab.defenses.fit_data import batch_transfer, find_clean_loader, pick_clean

WHO = "SomeCallback"


def test_pick_clean_returns_the_loader_and_its_position() -> None:
    a, b, c = object(), object(), object()
    assert pick_clean(a, "x", None, WHO) == (a, 0) and pick_clean(a, "x", 0, WHO) == (a, 0)
    assert pick_clean([a], "x", None, WHO) == (a, 0)
    assert pick_clean([a, b, c], "x", 2, WHO) == (c, 2) and pick_clean((a, b), "x", 1, WHO) == (b, 1)
    assert pick_clean({"clean": a, "bad": b}, "x", "bad", WHO) == (b, 1)
    assert pick_clean({"clean": a}, "x", None, WHO) == (a, 0)


@pytest.mark.parametrize(
    "loaders, index, message",
    [
        ("single", 1, r"^clean_dataloader_idx=1, but the datamodule's val_dataloader\(\) gives a single dataloader$"),
        ([], None, r"^the datamodule's val_dataloader\(\) gives no dataloader; SomeCallback needs clean data$"),
        (
            ["a", "b"],
            None,
            r"^the datamodule's val_dataloader\(\) gives 2 dataloaders \(\[0, 1\]\): pass "
            r"SomeCallback\(clean_dataloader_idx=\.\.\.\) with the one that holds clean data, "
            r"or clean_dataloader=\.\.\.$",
        ),
        (["a"], 3, r"^clean_dataloader_idx=3 is not one of the datamodule's val_dataloader\(\)'s dataloaders \[0\]$"),
    ],
)
def test_pick_clean_refuses_in_one_line_naming_the_source(loaders: object, index: object, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        pick_clean(loaders, "the datamodule's val_dataloader()", index, WHO)


def _trainer(datamodule: object = None, given_to_fit: object = None) -> SimpleNamespace:
    source = SimpleNamespace(instance=given_to_fit)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(val_loop=SimpleNamespace(_data_source=source)))
    return SimpleNamespace(datamodule=datamodule, fit_loop=loop)


class Module(L.LightningModule):
    pass


def test_find_clean_loader_takes_the_sources_in_order() -> None:
    given, clean, fit_val, dm_val = object(), object(), object(), object()

    class WithClean(L.LightningDataModule):
        def clean_val_dataloader(self) -> object:
            return clean

        def val_dataloader(self) -> object:
            return dm_val

    class OnlyVal(L.LightningDataModule):
        def val_dataloader(self) -> list:
            return [object(), dm_val]

    class ModuleWithVal(L.LightningModule):
        def val_dataloader(self) -> object:
            return dm_val

    assert find_clean_loader(_trainer(WithClean()), Module(), given, None, WHO) == (given, 0)
    assert find_clean_loader(_trainer(WithClean(), [fit_val]), Module(), None, None, WHO) == (clean, 0)
    assert find_clean_loader(_trainer(None, [object(), fit_val]), Module(), None, 1, WHO) == (fit_val, 1)
    assert find_clean_loader(_trainer(OnlyVal()), Module(), None, 1, WHO) == (dm_val, 1)
    assert find_clean_loader(_trainer(None), ModuleWithVal(), None, None, WHO) == (dm_val, 0)
    with pytest.raises(
        MisconfigurationException,
        match=r"^fit\(val_dataloaders=\.\.\.\) gives 2 dataloaders \(\[0, 1\]\): pass SomeCallback\(clean_",
    ):
        find_clean_loader(_trainer(None, [object(), fit_val]), Module(), None, None, WHO)
    with pytest.raises(
        MisconfigurationException,
        match=r"^the datamodule's val_dataloader\(\) gives 2 dataloaders \(\[0, 1\]\): pass SomeCallback\(",
    ):
        find_clean_loader(_trainer(OnlyVal()), Module(), None, None, WHO)
    with pytest.raises(
        MisconfigurationException, match=r"^the module's val_dataloader\(\) gives 2 dataloaders .* Some"
    ):
        find_clean_loader(
            _trainer(None), type("Two", (Module,), {"val_dataloader": lambda self: [1, 2]})(), None, None, WHO
        )
    with pytest.raises(
        MisconfigurationException, match=r"^SomeCallback needs clean validation data and found none: pass"
    ):
        find_clean_loader(_trainer(None), Module(), None, None, WHO)


def test_batch_transfer_runs_lightnings_steps_in_order_with_the_loaders_index() -> None:
    """Precision's input conversion, then the module's before-transfer hook, then the strategy's move, each
    handed the dataloader index (a module's hooks may treat the clean and triggered loaders differently)."""
    calls: list[tuple] = []
    precision = SimpleNamespace(convert_input=lambda b: calls.append(("convert", b)) or b + ["converted"])
    strategy = SimpleNamespace(
        batch_to_device=lambda b, dataloader_idx: calls.append(("move", b, dataloader_idx)) or b + ["moved"]
    )
    module = SimpleNamespace(
        _on_before_batch_transfer=lambda b, dataloader_idx: (
            calls.append(("before", b, dataloader_idx)) or b + ["before"]
        )
    )
    transfer = batch_transfer(SimpleNamespace(strategy=strategy, precision_plugin=precision), module)
    assert transfer(["x"], 3) == ["x", "converted", "before", "moved"]
    assert calls == [
        ("convert", ["x"]),
        ("before", ["x", "converted"], 3),
        ("move", ["x", "converted", "before"], 3),
    ]
