"""``backdoor_lab.models.pooling.MaxPool2d``: PyTorch's channels-last kernel on NCHW tensors, the same bits.

Every comparison is bitwise (the float32 words, so that -0.0 and NaN payloads count), forward and backward, against
``nn.MaxPool2d`` on the same input: ties, signed zeros, NaN and infinities included, and a network trained through
either pool ends on the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from backdoor_lab.defenses.network_split import split_network
from backdoor_lab.models.pooling import MaxPool2d, with_torch_pools
from backdoor_lab.models.spectrogram_alexnet import SpectrogramAlexNet
from backdoor_lab.models.traffic_cnn import TrafficSignCNN

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOWS = {
    "2x2 (the models')": {"kernel_size": 2},
    "3x3 stride 2, overlapping": {"kernel_size": 3, "stride": 2},
    "padding, ceil_mode": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    "dilation, rectangular": {"kernel_size": (2, 3), "stride": (1, 2), "dilation": 2},
}


def words(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(torch.int32)


def awkward_input(shape: tuple[int, ...], kind: str, seed: int = 0) -> Tensor:
    """Values where the window's choice matters: many ties, both zeros, NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "relu":
        return x.relu()
    if kind == "ties":
        return torch.round(x * 2) / 2
    x = torch.round(x)
    for value, share in ((-0.0, 0.2), (float("nan"), 0.05), (float("-inf"), 0.05), (float("inf"), 0.05)):
        x[torch.rand(shape, generator=g) < share] = value
    return x


class PoolInputs(TorchDispatchMode):
    """Records the memory format of every max-pool kernel's input."""

    def __init__(self) -> None:
        super().__init__()
        self.formats: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "max_pool2d" in func.__name__ and "backward" not in func.__name__:
            self.formats.append("cl" if args[0].is_contiguous(memory_format=torch.channels_last) else "nchw")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
@pytest.mark.parametrize("kind", ["relu", "ties", "special"])
@pytest.mark.parametrize("shape", [(4, 6, 17, 23), (3, 5, 8, 8), (2, 1, 9, 7)])
def test_the_outputs_and_input_gradients_are_nn_maxpool2ds_bit_for_bit(window, kind, shape) -> None:
    x = awkward_input(shape, kind)
    ours, theirs = MaxPool2d(**window), nn.MaxPool2d(**window)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with PoolInputs() as seen:
        out = ours(x_ours)
    assert seen.formats == ["cl"] and type(out.grad_fn).__name__ == "_ChannelsLastMaxPoolBackward"
    expected = theirs(x_theirs)
    assert out.is_contiguous() and torch.equal(words(out), words(expected))
    grad = awkward_input(tuple(out.shape), "ties", seed=1)
    grad[torch.rand(grad.shape, generator=torch.Generator().manual_seed(2)) < 0.2] = -0.0
    out.backward(grad)
    expected.backward(grad)
    assert x_ours.grad.is_contiguous() and torch.equal(words(x_ours.grad), words(x_theirs.grad))
    with torch.no_grad():
        with PoolInputs() as seen:
            evaluated = ours(x)
        assert torch.equal(words(evaluated), words(theirs(x)))
    assert seen.formats == ["cl"]


@pytest.mark.parametrize(
    "case",
    [
        "channels-last input",
        "return_indices",
        "unbatched (3-d) input",
        "integer input",
    ],
)
def test_inputs_the_fast_path_does_not_take_go_through_nn_maxpool2d(case: str) -> None:
    x = awkward_input((2, 3, 8, 10), "ties")
    pool, reference = MaxPool2d(2), nn.MaxPool2d(2)
    if case == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "return_indices":
        pool, reference = MaxPool2d(2, return_indices=True), nn.MaxPool2d(2, return_indices=True)
    elif case == "unbatched (3-d) input":
        x = x[0]
    else:
        x = (x * 4).long()
    with PoolInputs() as seen:
        got = pool(x)
    expected = reference(x)
    if case == "return_indices":
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    else:
        assert torch.equal(got, expected) and got.stride() == expected.stride()
    assert seen.formats == (["cl"] if case == "channels-last input" else ["nchw"])  # nn.MaxPool2d's own call


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (TrafficSignCNN(5, channels=(8, 8, 8, 8, 16), hidden=16), (16, 3, 32, 32)),
        (SpectrogramAlexNet(4, width=0.125), (16, 1, 40, 63)),
    ],
    ids=["signs", "speech"],
)
def test_a_network_trains_to_the_same_weights_through_either_pool(net: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    ours, theirs = net, with_torch_pools(copy.deepcopy(net))
    initial = copy.deepcopy(net.state_dict())
    assert any(isinstance(m, MaxPool2d) for m in ours.modules())
    assert not any(isinstance(m, MaxPool2d) for m in theirs.modules())
    data = torch.randn((5, *shape), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (5, shape[0]), generator=torch.Generator().manual_seed(2))
    for model in (ours, theirs):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(3)  # the same dropout draws
        for x, y in zip(data, labels, strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(words(a), words(b)), name
    assert not torch.equal(ours.conv1.weight, initial["conv1.weight"])  # the steps trained it


def test_tracing_records_the_pool_the_prune_curve_cuts_past() -> None:
    """User code that traces a model sees ``F.max_pool2d``; the prune curve's cut keeps the module whole."""
    net = TrafficSignCNN(5, channels=(8, 8, 8, 8, 16), hidden=16).eval()
    traced = fx.symbolic_trace(net)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(traced(x), net(x))
    assert [n.op for n in traced.graph.nodes if n.target is F.max_pool2d] == ["call_function"] * 3
    assert "pool" not in [n.target for n in traced.graph.nodes]  # traced through, as torch.nn's own
    split = split_network(SpectrogramAlexNet(4, width=0.125).eval(), "conv2")
    assert split.cut_name == "pool2"  # conv2 -> relu2 -> pool2: the cut moves past the library's pool module
