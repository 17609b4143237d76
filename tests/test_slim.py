"""Slim export: pruned channels physically removed, logits unchanged, saved and loaded without pickle."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from backdoor_lab.checkpoints import CheckpointError
from backdoor_lab.defenses.pruning import (
    fold_prune_masks,
    mask_channels,
    mask_random_channels,
    masked_modules,
    set_channel_mask,
)
from backdoor_lab.defenses.slim import SLIM_META, SLIM_WEIGHTS, export_slim, load_slim, slim_model
from backdoor_lab.models.classifier import BackdoorClassifier
from backdoor_lab.models.deepid import DeepID
from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet
from backdoor_lab.models.traffic_cnn import TrafficSignCNN

from .nets import Residual, SigmoidNet

REPORT_KEYS = {"params_dense", "params_slim", "bytes_dense", "bytes_slim", "latency_ms_dense", "latency_ms_slim"}

# name: (net factory, pruned layer, input shape from its conf, channels pruned (README), readers of the layer:
# (module, input features per channel of the layer))
BUILT_IN: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, ...], int, list[tuple[str, int]]]] = {
    "signs": (lambda: TrafficSignCNN(num_classes=43), "conv5", (3, 32, 32), 236, [("classifier.1", 4)]),
    "speech": (lambda: SpectrogramAlexNet(num_classes=10, width=0.25), "conv5", (1, 40, 63), 38, [("fc6", 9)]),
    "faces": (lambda: DeepID(num_classes=20), "conv3", (3, 55, 47), 38, [("conv4", 1), ("fc_pool3", 20)]),
}


def masked_net(name: str, seed: int = 0) -> tuple[nn.Module, list[int], torch.Tensor]:
    """A built-in net with random weights, some channels of its pruned layer masked the project's way."""
    factory, layer, shape, n_pruned, _ = BUILT_IN[name]
    torch.manual_seed(seed)
    net = factory().eval()
    pruned = mask_random_channels(net, layer, n_pruned, seed)
    return net, pruned, torch.randn(2, *shape)


def classifier(net: nn.Module) -> BackdoorClassifier:
    """The LightningModule the pipeline exports (parameter names under ``net.``)."""
    return BackdoorClassifier(net=net, num_classes=2, optimizer=torch.optim.SGD).eval()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_slim_logits_equal_masked_dense(name: str) -> None:
    net, pruned, x = masked_net(name)
    layer = BUILT_IN[name][1]
    with torch.no_grad():
        dense = net(x)
    slim = slim_model(net, layer, pruned, x).eval()
    with torch.no_grad():
        out = slim(x)
    # float32: only the summation order differs (the removed terms were exact zeros)
    assert torch.allclose(out, dense, rtol=0, atol=1e-6), (out - dense).abs().max()
    conv = dict(slim.named_modules())[layer]
    assert conv.out_channels == conv.weight.shape[0] == dict(net.named_modules())[layer].out_channels - len(pruned)
    # the input model is untouched: still dense and masked
    assert dict(net.named_modules())[layer].weight_orig.shape[0] == conv.out_channels + len(pruned)


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_slim_logits_equal_in_float64(name: str) -> None:
    """In float64 the summation-order noise vanishes: the removed weights contributed nothing."""
    net, pruned, x = masked_net(name, seed=1)
    net, x = net.double(), x.double()
    with torch.no_grad():
        dense = net(x)
        out = slim_model(net, BUILT_IN[name][1], pruned, x)(x)
    assert torch.allclose(out, dense, rtol=0, atol=1e-12), (out - dense).abs().max()


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_param_count_drops_by_exactly_the_removed_weights(name: str) -> None:
    net, pruned, x = masked_net(name)
    _, layer, _, _, readers = BUILT_IN[name]
    modules = dict(net.named_modules())
    conv = modules[layer]
    per_channel = conv.weight_orig[0].numel() + 1  # its filter and its bias
    for reader_name, features in readers:
        reader = modules[reader_name]
        kernel = reader.weight.shape[2:].numel() if isinstance(reader, nn.Conv2d) else 1
        per_channel += reader.weight.shape[0] * features * kernel  # reader biases stay: one per output
    slim = slim_model(net, layer, pruned, x)
    assert param_count(net) - param_count(slim) == len(pruned) * per_channel
    slim_modules = dict(slim.named_modules())
    for reader_name, features in readers:
        reader = slim_modules[reader_name]
        width = reader.in_channels if isinstance(reader, nn.Conv2d) else reader.in_features
        dense_width = modules[reader_name].weight.shape[1]
        assert width == reader.weight.shape[1] == dense_width - len(pruned) * features


def test_slim_keeps_the_right_weights() -> None:
    """The kept filters and the reader's columns are the dense ones, in order (not just the right count)."""
    net, pruned, x = masked_net("signs")
    slim = slim_model(net, "conv5", pruned, x)
    kept = sorted(set(range(256)) - set(pruned))
    assert torch.equal(slim.conv5.weight, net.conv5.weight_orig[kept])
    assert torch.equal(slim.conv5.bias, net.conv5.bias_orig[kept])
    # the Linear after flatten reads 2x2 pooled features per channel, channel-major
    columns = [4 * c + i for c in kept for i in range(4)]
    assert torch.equal(slim.classifier[1].weight, net.classifier[1].weight[:, columns])


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_export_and_load_round_trip(name: str, tmp_path: Path) -> None:
    factory, layer, _, _, _ = BUILT_IN[name]
    net, pruned, x = masked_net(name)
    model = classifier(net)
    report = export_slim(model, f"net.{layer}", pruned, x, tmp_path)
    assert set(report) == REPORT_KEYS

    meta = json.loads((tmp_path / SLIM_META).read_text())
    channels = dict(net.named_modules())[layer].weight_orig.shape[0]
    assert meta["layer"] == f"net.{layer}"
    assert meta["kept_channels"] == sorted(set(range(channels)) - set(pruned))
    assert meta["params_dense"] == report["params_dense"] == param_count(model)
    assert meta["params_slim"] == report["params_slim"] < report["params_dense"]
    assert report["bytes_slim"] == (tmp_path / SLIM_WEIGHTS).stat().st_size < report["bytes_dense"]
    save_file(fold_prune_masks(model.state_dict()), str(tmp_path / "dense.safetensors"))  # as the pipeline does
    assert report["bytes_dense"] == (tmp_path / "dense.safetensors").stat().st_size
    state = load_file(str(tmp_path / SLIM_WEIGHTS))
    assert state[f"net.{layer}.weight"].shape[0] == len(meta["kept_channels"])
    assert not any(k.endswith(("_orig", "_mask")) for k in state)

    torch.manual_seed(123)  # a fresh stock model with other weights: everything must come from the files
    loaded = load_slim(classifier(factory()), tmp_path).eval()
    assert param_count(loaded) == report["params_slim"]
    with torch.no_grad():
        expected = slim_model(model, f"net.{layer}", pruned, x)(x)
        assert torch.equal(loaded(x), expected)
        assert torch.allclose(loaded(x), model(x), rtol=0, atol=1e-6)


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    net, pruned, x = masked_net("faces")
    export_slim(net, "conv3", pruned, x, tmp_path)
    with pytest.raises(FileExistsError, match="slim.safetensors exists already"):
        export_slim(net, "conv3", pruned, x, tmp_path)


def masked_residual(layer: str, pruned: list[int]) -> tuple[Residual, torch.Tensor]:
    torch.manual_seed(0)
    net = Residual().eval()
    mask_channels(net, layer, pruned)
    return net, torch.randn(4, 3, 10, 10)


def test_batchnorm_after_the_layer_is_slimmed_with_it(tmp_path: Path) -> None:
    pruned = [1, 4, 5, 9]
    net, x = masked_residual("conv_a", pruned)
    kept = [c for c in range(12) if c not in pruned]
    running_mean = net.bn_a.running_mean.clone()
    with torch.no_grad():
        dense = net(x)
    slim = slim_model(net, "conv_a", pruned, x)
    assert slim.bn_a.num_features == 8
    assert torch.equal(slim.bn_a.running_mean, running_mean[kept])
    assert slim.conv_b.in_channels == 8
    with torch.no_grad():
        assert torch.allclose(slim(x), dense, rtol=0, atol=1e-6)
    export_slim(net, "conv_a", pruned, x, tmp_path)
    loaded = load_slim(Residual(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))


def test_training_mode_and_frozen_parameters_are_kept() -> None:
    net, pruned, x = masked_net("signs")
    net.train()
    net.conv1.weight.requires_grad_(False)
    slim = slim_model(net, "conv5", pruned, x)
    assert slim.training and net.training
    assert not slim.conv1.weight.requires_grad
    assert slim.conv5.weight.requires_grad


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("layer", "channels", "message"),
    [
        ("relu", [0], "'relu' is a ReLU, not a Conv2d"),
        ("conv9", [0], "'conv9' is not in TrafficSignCNN"),
        ("conv5", [3, 256], r"\[256\] are out of range for 'conv5', which has 256 output channels"),
        ("conv5", [-1], r"\[-1\] are out of range"),
        ("conv5", [7, 7], r"\[7\] of 'conv5' are given more than once"),
        ("conv5", list(range(256)), "all 256 channels of 'conv5' are pruned"),
    ],
)
def test_bad_request_is_named(layer: str, channels: list[int], message: str) -> None:
    net, _, x = masked_net("signs")
    with pytest.raises(ValueError, match=message):
        slim_model(net, layer, channels, x)


def test_channels_that_are_not_zero_are_refused() -> None:
    net, pruned, x = masked_net("signs")
    live = sorted(set(range(256)) - set(pruned))[:2]
    with pytest.raises(
        ValueError, match=re.escape(f"channels {live} of 'conv5' are listed as pruned but are not zero")
    ):
        slim_model(net, "conv5", sorted(pruned[:3] + live), x)


def test_channels_coupled_by_a_residual_add_are_refused() -> None:
    net, x = masked_residual("conv_b", [2, 3])
    with pytest.raises(ValueError, match=r"coupled to the outputs of \['stem'\]"):
        slim_model(net, "conv_b", [2, 3], x)


def test_channels_made_non_zero_after_the_layer_are_refused() -> None:
    torch.manual_seed(0)
    net = SigmoidNet().eval()
    keep = torch.tensor([True, False, True, True, False, True])
    set_channel_mask([m for _, m in masked_modules(net, "conv")], keep)
    with pytest.raises(ValueError, match="removing 2 channels of 'conv' changed the logits"):
        slim_model(net, "conv", [1, 4], torch.randn(2, 3, 6, 6))


def test_layer_not_reached_by_forward_is_refused() -> None:
    net, pruned, x = masked_net("signs")
    net.unused = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match="'unused' is not reached by the forward pass"):
        slim_model(net, "unused", [0], x)


def test_load_into_another_width_is_refused(tmp_path: Path) -> None:
    net, pruned, x = masked_net("speech")
    export_slim(net, "conv5", pruned, x, tmp_path)
    with pytest.raises(ValueError, match="'conv5' of SpectrogramAlexNet has 128 output channels.*one with 64"):
        load_slim(SpectrogramAlexNet(num_classes=10, width=0.5), tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        load_slim(SpectrogramAlexNet(num_classes=12, width=0.25), tmp_path / SLIM_WEIGHTS)


def test_load_without_description_is_refused(tmp_path: Path) -> None:
    net, pruned, x = masked_net("speech")
    export_slim(net, "conv5", pruned, x, tmp_path)
    (tmp_path / SLIM_META).unlink()
    with pytest.raises(FileNotFoundError, match="slim.json is missing"):
        load_slim(SpectrogramAlexNet(num_classes=10), tmp_path)
