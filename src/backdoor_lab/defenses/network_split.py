"""Where the prune curve can cut a network: after the pruned layer, found with ``torch.fx``.

The curve of ``FinePruner`` caches the tensors that the layers after the pruned conv read and re-runs only those
layers for each mask. The cut is moved down past channel-wise layers (ReLU, pooling, the masked BatchNorm), so
that masking the cached tensor equals masking the conv; skip connections that cross the cut are cached too.

Where every reader of the cut value is linear in it (a ``Conv2d``, or a ``Linear`` over the flattened map), the
tail is split once more into those readers and the ``rest``: a pruned channel then moves the readers' outputs by
one term each (``LinearReader.subtract``), and only the rest is re-run per mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from backdoor_lab.models.pooling import MaxPool2d

# Layers whose output channel c depends only on input channel c and maps an all-zero channel to zero: a mask
# applied after them equals a mask applied before them.
CHANNELWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
CHANNELWISE_FUNCTIONS = (
    F.relu,
    torch.relu,
    F.max_pool2d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
)
CHANNELWISE_METHODS = ("relu", "contiguous")


class _LayerTracer(fx.Tracer):
    """``fx.symbolic_trace``'s tracer, keeping this library's ``MaxPool2d`` whole as it keeps ``torch.nn``'s layers:
    the tail re-runs it through its fast CPU path, and the cut sees a max-pool module."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, MaxPool2d) or super().is_leaf_module(module, qualified_name)


class CannotCutError(RuntimeError):
    """The network cannot be split at the pruned layer; the curve is measured by full re-evaluation."""


# A reader's per-channel maps (one channel's values -> the reader's flattened output) are kept as float64
# matrices when all of them together have at most this many entries (64 MiB); larger readers compute each term
# from the weight instead (a float64 convolution, or a slice of the Linear weight).
MATRIX_LIMIT = 1 << 23


@dataclass
class LinearReader:
    """A layer right after the cut that is linear in the cut value: a ``Conv2d``, or a ``Linear`` over its flatten.

    The curve keeps its output as a float64 running sum, flattened per sample; masking channels subtracts their
    term. Each channel's term is one matrix product with its map (built once and kept): on CPU about half the cost
    of the float64 convolution it replaces, and fused with the subtraction.
    """

    module: nn.Conv2d | nn.Linear
    _maps: dict[int, Tensor] | None = field(default=None, init=False, repr=False)

    def output(self, cut: Tensor) -> Tensor:
        """The layer's own output on the cut value, as the tail computes it."""
        return self.module(cut if isinstance(self.module, nn.Conv2d) else cut.flatten(1))

    def contribution(self, part: Tensor, channels: list[int]) -> Tensor:
        """What ``part`` = ``cut[:, channels]`` adds to the flattened output (float64): masking them subtracts this."""
        part = part.double()
        maps = self._channel_maps(part.shape[2:], channels)
        if maps is not None:
            return part.reshape(part.shape[0], -1) @ maps
        m, weight = self.module, self.module.weight.detach()
        if isinstance(m, nn.Conv2d):
            return F.conv2d(part, weight[:, channels].double(), None, m.stride, m.padding, m.dilation).flatten(1)
        per_channel = weight.view(weight.shape[0], -1, part[0, 0].numel())[:, channels].double()
        return part.reshape(part.shape[0], -1) @ per_channel.reshape(weight.shape[0], -1).T

    def subtract(self, total: Tensor, part: Tensor, channels: list[int], rows: Tensor | None = None) -> None:
        """``total`` (samples, flattened output; float64) minus the term of ``part`` = ``cut[rows][:, channels]``,
        in place: in every row, or only in ``rows``."""
        if rows is not None:
            total.index_add_(0, rows, self.contribution(part, channels), alpha=-1)
            return
        maps = self._channel_maps(part.shape[2:], channels)
        if maps is None:
            total.sub_(self.contribution(part, channels))
        else:
            total.addmm_(part.double().reshape(part.shape[0], -1), maps, alpha=-1)

    def _channel_maps(self, spatial: torch.Size, channels: list[int]) -> Tensor | None:
        """The stacked float64 maps of ``channels`` (rows: channel, then position); None when too large."""
        if self._maps is None:
            self._maps = self._build_maps(spatial)
        if not self._maps:
            return None
        return self._maps[channels[0]] if len(channels) == 1 else torch.cat([self._maps[c] for c in channels])

    def _build_maps(self, spatial: torch.Size) -> dict[int, Tensor]:
        m, positions = self.module, spatial.numel()
        weight = m.weight.detach()
        if isinstance(m, nn.Linear):
            if weight.numel() > MATRIX_LIMIT:
                return {}
            # flatten(1) puts channel c's positions at [c * positions, (c + 1) * positions) of the input
            rows = weight.double().T.contiguous()
            return {c: rows[c * positions : (c + 1) * positions] for c in range(weight.shape[1] // positions)}
        probe = torch.zeros(1, 1, *spatial, dtype=torch.float64, device=weight.device)
        out = F.conv2d(probe, weight[:, :1].double(), None, m.stride, m.padding, m.dilation).numel()
        if m.in_channels * positions * out > MATRIX_LIMIT:
            return {}
        # each channel's conv of every one-hot map: each entry is one weight, exactly
        basis = torch.eye(positions, dtype=torch.float64, device=weight.device).view(positions, 1, *spatial)
        kernels = weight.double()
        return {
            c: F.conv2d(basis, kernels[:, c : c + 1], None, m.stride, m.padding, m.dilation).flatten(1)
            for c in range(m.in_channels)
        }


@dataclass
class NetworkSplit:
    """``head(x)`` -> the values that cross the cut; ``tail(*values)`` -> logits. ``values[cut]`` is masked.

    ``readers`` and ``rest`` (None where some reader of the cut is not linear in it): ``rest(*others, *outputs)``
    gives the tail's logits from the other crossing values (``values`` without ``values[cut]``) and each
    reader's output (its module's own output shape).
    """

    head: fx.GraphModule
    tail: fx.GraphModule
    cut: int
    cut_name: str
    readers: list[LinearReader] | None = None
    rest: fx.GraphModule | None = None


def _is_channelwise(node: fx.Node, modules: dict[str, nn.Module], masked: set[str], source: fx.Node) -> bool:
    if not node.args or node.args[0] is not source:
        return False
    others = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(a, fx.Node) for a in others):
        return False
    if node.op == "call_module":
        return node.target in masked or isinstance(modules.get(node.target), CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNELWISE_METHODS


def split_network(
    model: nn.Module, layer: str, masked: Iterable[str] = (), observed: Iterable[str] = ()
) -> NetworkSplit:
    """Split ``model``'s traced forward after ``layer`` (and the channel-wise layers that follow it).

    In the head, a ReLU feeding a max pool runs after the pool instead (the same values, a quarter of the ReLU's
    work), except around the ``observed`` modules, whose outputs someone reads through a hook.

    Raises ``CannotCutError`` when the forward cannot be traced or calls ``layer`` more than once, and
    ``ValueError`` when the traced forward never calls ``layer``.
    """
    try:
        traced = fx.GraphModule(model, _LayerTracer().trace(model), type(model).__name__)
    except Exception as err:  # noqa: BLE001 - any tracing failure means the same thing: no cut, full re-evaluation
        raise CannotCutError(
            f"torch.fx cannot trace {type(model).__name__}.forward ({type(err).__name__}: {err})"
        ) from err
    nodes = list(traced.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise ValueError(
            f"layer {layer!r} is not reached by {type(model).__name__}.forward; prune a layer the forward uses "
            f"(modules called: {[n.target for n in nodes if n.op == 'call_module']})"
        )
    if len(calls) > 1:
        raise CannotCutError(f"{layer!r} is called {len(calls)} times in one forward")
    modules = dict(traced.named_modules())
    masked = set(masked) | {layer}
    cut = calls[0]
    while len(cut.users) == 1 and _is_channelwise(next(iter(cut.users)), modules, masked, cut):
        cut = next(iter(cut.users))
    position = nodes.index(cut)
    head_nodes, tail_nodes = nodes[: position + 1], nodes[position + 1 :]
    in_tail = set(tail_nodes)
    crossing = [n for n in head_nodes if n.op != "get_attr" and any(u in in_tail for u in n.users)]
    if cut not in crossing:
        raise CannotCutError(f"nothing after {cut.name} reads it")

    head_graph, env = fx.Graph(), {}
    for node in head_nodes:
        env[node] = head_graph.node_copy(node, lambda a: env[a])
    head_graph.output(tuple(env[n] for n in crossing))
    _pool_before_relu(head_graph, modules, set(observed))
    tail_graph, env = fx.Graph(), {}
    for node in crossing:
        env[node] = tail_graph.placeholder(node.name)
    for node in head_nodes:  # parameters and buffers the tail reads directly
        if node.op == "get_attr" and any(u in in_tail for u in node.users):
            env[node] = tail_graph.node_copy(node, lambda a: env[a])
    for node in tail_nodes:
        env[node] = tail_graph.node_copy(node, lambda a: env[a])
    tail = fx.GraphModule(traced, tail_graph)
    split = NetworkSplit(
        head=fx.GraphModule(traced, head_graph),
        tail=tail,
        cut=crossing.index(cut),
        cut_name=str(cut.target) if cut.op == "call_module" else cut.name,
    )
    split.readers, split.rest = _split_linear_readers(tail, crossing.index(cut))
    return split


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def _is_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d) and not m.return_indices
    return node.op == "call_function" and node.target in (F.max_pool2d, F.adaptive_max_pool2d)


def _pool_before_relu(graph: fx.Graph, modules: dict[str, nn.Module], observed: set[str]) -> None:
    """Rewrite ``pool(relu(x))`` as ``relu(pool(x))``: max and ReLU commute (both monotone), exactly."""
    for relu in list(graph.nodes):
        if not _is_relu(relu, modules) or len(relu.users) != 1 or len(relu.args) != 1:
            continue
        pool, source = next(iter(relu.users)), relu.args[0]
        if not (_is_max_pool(pool, modules) and pool.args and pool.args[0] is relu and len(source.users) == 1):
            continue
        if {relu.target, pool.target} & observed or any(a is relu for a in [*pool.args[1:], *pool.kwargs.values()]):
            continue
        pool.args = (source, *pool.args[1:])
        with graph.inserting_after(pool):
            after = graph.node_copy(relu, lambda _, pool=pool: pool)
        pool.replace_all_uses_with(after, delete_user_cb=lambda user, after=after: user is not after)
        graph.erase_node(relu)
    graph.lint()


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``x.flatten(1)``, ``torch.flatten(x, 1)`` or ``nn.Flatten()``: (N, C, H, W) -> (N, C*H*W)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) not in {("call_method", "flatten"), ("call_function", torch.flatten)}:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _split_linear_readers(
    tail: fx.GraphModule, cut_index: int
) -> tuple[list[LinearReader] | None, fx.GraphModule | None]:
    """The tail's readers of the cut, when all are linear in it, and the graph of the rest; else (None, None)."""
    modules = dict(tail.named_modules())
    placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
    cut = placeholders[cut_index]
    readers: list[fx.Node] = []
    skipped: set[fx.Node] = {cut}
    for user in cut.users:
        node, flattened = user, False
        if _is_flatten(node, modules):
            if len(node.users) != 1:
                return None, None
            skipped.add(node)
            node, flattened = next(iter(node.users)), True
        module = modules.get(node.target) if node.op == "call_module" else None
        linear = isinstance(module, nn.Linear) and flattened
        conv = (
            isinstance(module, nn.Conv2d)
            and not flattened
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not (linear or conv) or len(node.args) != 1 or node.kwargs:
            return None, None
        readers.append(node)
    if not readers:
        return None, None
    graph, env = fx.Graph(), {}
    for node in placeholders:
        if node is not cut:
            env[node] = graph.placeholder(node.name)
    for node in readers:
        env[node] = graph.placeholder(f"{node.name}_output")
    for node in tail.graph.nodes:
        if node.op != "placeholder" and node not in skipped and node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    return [LinearReader(modules[n.target]) for n in readers], fx.GraphModule(tail, graph)
