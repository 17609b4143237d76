"""Channel masks and their plain-weight form (``backdoor_lab.masks``): what checkpoints carry and how a live pruned
model takes them back, against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from backdoor_lab.masks import _HOOK_ATTR, fold_prune_masks, make_permanent, set_channel_mask


def conv(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    layer = nn.Conv2d(1, 3, 1, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
        if bias:
            layer.bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
    return layer


def test_fold_prune_masks_multiplies_pairs_and_keeps_everything_else() -> None:
    state = {
        "a.weight_orig": torch.tensor([2.0, 3.0]),
        "a.weight_mask": torch.tensor([1.0, 0.0]),
        "b.weight_orig": torch.tensor([5.0]),  # no mask beside it: not a pair, kept as it is
        "c.bias_mask": torch.tensor([0.0]),  # no orig beside it: kept as it is
        "d.weight": torch.tensor([7.0]),
    }
    folded = fold_prune_masks(state)
    assert sorted(folded) == ["a.weight", "b.weight_orig", "c.bias_mask", "d.weight"]
    assert folded["a.weight"].tolist() == [2.0, 0.0] and folded["b.weight_orig"].tolist() == [5.0]
    only_b = fold_prune_masks(state, prefixes=["b."])
    assert sorted(only_b) == sorted(state)  # the pair of "a." is outside the prefixes: left as it is
    assert sorted(fold_prune_masks(state, prefixes=["a."])) == sorted(folded)


def test_set_channel_mask_masks_weight_and_bias_and_rewrites_in_place() -> None:
    layer = conv()
    set_channel_mask([layer], torch.tensor([1, 0, 1]))  # any integer keep-mask is read as booleans
    assert layer.weight.flatten().tolist() == [1.0, 0.0, 3.0] and layer.bias.tolist() == [10.0, 0.0, 30.0]
    assert prune.is_pruned(layer) and hasattr(layer, _HOOK_ATTR)
    hook = getattr(layer, _HOOK_ATTR)
    set_channel_mask([layer], torch.tensor([True, True, False]))  # a rewrite: current at once, no forward
    assert layer.weight.flatten().tolist() == [1.0, 2.0, 0.0] and layer.bias.tolist() == [10.0, 20.0, 0.0]
    assert layer.weight_mask.flatten().tolist() == [1.0, 1.0, 0.0]
    assert getattr(layer, _HOOK_ATTR) is hook  # installed once
    set_channel_mask([layer], torch.ones(3, dtype=torch.bool))  # rollback is exact
    assert layer.weight.flatten().tolist() == [1.0, 2.0, 3.0] and layer.bias.tolist() == [10.0, 20.0, 30.0]


def test_set_channel_mask_without_bias_and_in_double_precision() -> None:
    layer = conv(bias=False, dtype=torch.float64)
    set_channel_mask([layer], torch.tensor([False, True, True]))
    assert layer.weight_mask.dtype == torch.float64 and not hasattr(layer, "bias_mask")
    assert layer.weight.flatten().tolist() == [0.0, 2.0, 3.0]
    bn = nn.BatchNorm2d(3)
    set_channel_mask([layer, bn], torch.tensor([True, False, True]))
    assert bn.weight.tolist() == [1.0, 0.0, 1.0] and bn.bias_mask.tolist() == [1.0, 0.0, 1.0]


def test_a_masked_module_takes_plain_weights_and_keeps_its_mask() -> None:
    layer = conv()
    set_channel_mask([layer], torch.tensor([True, False, True]))
    plain = {"weight": torch.full((3, 1, 1, 1), 5.0), "bias": torch.full((3,), 6.0)}
    layer.load_state_dict(plain)
    assert layer.weight_orig.flatten().tolist() == [5.0, 5.0, 5.0] and layer.weight_mask.flatten().tolist() == [1, 0, 1]
    layer(torch.ones(1, 1, 1, 1))  # the next forward applies the kept mask
    assert layer.weight.flatten().tolist() == [5.0, 0.0, 5.0] and layer.bias.tolist() == [6.0, 0.0, 6.0]
    # A masked state dict (orig + mask) loads as it is: its own mask wins.
    other = conv()
    set_channel_mask([other], torch.tensor([False, True, True]))
    layer.load_state_dict(other.state_dict())
    assert layer.weight_mask.flatten().tolist() == [0.0, 1.0, 1.0]
    # A plain state dict without the mask's entry gets the module's mask, not a missing key.
    fresh = conv()
    set_channel_mask([fresh], torch.tensor([True, True, False]))
    result = fresh.load_state_dict({"weight": torch.ones(3, 1, 1, 1), "bias": torch.ones(3)}, strict=True)
    assert not result.missing_keys and fresh.bias_mask.tolist() == [1.0, 1.0, 0.0]


def test_an_unmasked_module_is_not_touched_by_the_hook() -> None:
    layer = conv()
    layer.load_state_dict({"weight": torch.zeros(3, 1, 1, 1), "bias": torch.zeros(3)})
    assert not hasattr(layer, "weight_orig") and layer.weight.abs().sum() == 0


def test_make_permanent_folds_the_masks_and_removes_the_hook() -> None:
    layer, untouched = conv(), conv()
    set_channel_mask([layer], torch.tensor([True, False, True]))
    hooks = len(layer._load_state_dict_pre_hooks)
    make_permanent([layer, untouched])
    assert len(layer._load_state_dict_pre_hooks) == hooks - 1
    assert not prune.is_pruned(layer) and not hasattr(layer, _HOOK_ATTR) and not hasattr(layer, "weight_mask")
    assert layer.weight.flatten().tolist() == [1.0, 0.0, 3.0] and layer.bias.tolist() == [10.0, 0.0, 30.0]
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    with pytest.raises(RuntimeError):  # no pre-hook maps plain weights any more: a masked dict does not load
        layer.load_state_dict({"weight_orig": torch.ones(3, 1, 1, 1), "weight_mask": torch.ones(3, 1, 1, 1)})


def test_partial_plain_states_fill_only_what_they_hold() -> None:
    layer = conv()
    set_channel_mask([layer], torch.tensor([True, False, True]))
    layer.load_state_dict({"bias": torch.full((3,), 7.0)}, strict=False)  # the bias alone
    assert layer.bias_orig.tolist() == [7.0, 7.0, 7.0] and layer.weight_orig.flatten().tolist() == [1.0, 2.0, 3.0]
    layer.load_state_dict({"weight": torch.full((3, 1, 1, 1), 8.0)}, strict=False)  # the weight alone
    assert layer.weight_orig.flatten().tolist() == [8.0, 8.0, 8.0] and layer.bias_orig.tolist() == [7.0, 7.0, 7.0]
    no_bias = conv(bias=False)
    set_channel_mask([no_bias], torch.tensor([False, True, True]))
    no_bias.load_state_dict({"weight": torch.full((3, 1, 1, 1), 4.0)})  # a masked conv without a bias
    assert no_bias.weight_orig.flatten().tolist() == [4.0, 4.0, 4.0]
