"""Where the prune curve can cut a network: after the pruned layer, found with ``torch.fx``.

The curve of ``FinePruner`` caches the tensors that the layers after the pruned conv read and re-runs only those
layers for each mask. The cut is moved down past channel-wise layers (ReLU, pooling, the masked BatchNorm), so
that masking the cached tensor equals masking the conv; skip connections that cross the cut are cached too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

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


class CannotCutError(RuntimeError):
    """The network cannot be split at the pruned layer; the curve is measured by full re-evaluation."""


@dataclass
class NetworkSplit:
    """``head(x)`` -> the values that cross the cut; ``tail(*values)`` -> logits. ``values[cut]`` is masked."""

    head: fx.GraphModule
    tail: fx.GraphModule
    cut: int
    cut_name: str


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


def split_network(model: nn.Module, layer: str, masked: Iterable[str] = ()) -> NetworkSplit:
    """Split ``model``'s traced forward after ``layer`` (and the channel-wise layers that follow it).

    Raises ``CannotCutError`` when the forward cannot be traced or calls ``layer`` more than once, and
    ``ValueError`` when the traced forward never calls ``layer``.
    """
    try:
        traced = fx.symbolic_trace(model)
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
    tail_graph, env = fx.Graph(), {}
    for node in crossing:
        env[node] = tail_graph.placeholder(node.name)
    for node in head_nodes:  # parameters and buffers the tail reads directly
        if node.op == "get_attr" and any(u in in_tail for u in node.users):
            env[node] = tail_graph.node_copy(node, lambda a: env[a])
    for node in tail_nodes:
        env[node] = tail_graph.node_copy(node, lambda a: env[a])
    return NetworkSplit(
        head=fx.GraphModule(traced, head_graph),
        tail=fx.GraphModule(traced, tail_graph),
        cut=crossing.index(cut),
        cut_name=str(cut.target) if cut.op == "call_module" else cut.name,
    )
