"""Max pooling of NCHW tensors through PyTorch's channels-last CPU kernel: the same numbers, 3-4x faster.

On the CPU, PyTorch's max-pool kernel for NCHW tensors walks each window in scalar code: 13% of a speech-network
training step at one thread (docs/benchmarks.md), where the convolutions around it run near the core's peak. Its
channels-last kernel vectorizes over the channels. Both keep the first maximum of a window in row-major order (the
last NaN where there is one), so the outputs and the indices are the same bit for bit, and the backward is
PyTorch's own NCHW one, from those indices: a network trains to the same weights, as ``tests/test_pooling.py``
checks. Tensors already channels-last (``speed=fast``), GPU tensors, ``torch.fx`` proxies and compiled graphs take
``nn.MaxPool2d``'s own path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

Window = tuple[list[int], list[int], list[int], list[int], bool]  # kernel, stride, padding, dilation, ceil_mode


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Forward on a channels-last copy; backward through ``max_pool2d_with_indices_backward`` in NCHW."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, window: Window) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *window)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.window = window
        return out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.window, indices), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``, computed through the channels-last kernel for NCHW CPU tensors (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not _takes_the_channels_last_kernel(x):
            return super().forward(x)
        window = (
            list(_pair(self.kernel_size)),
            list(_pair(self.stride)),
            list(_pair(self.padding)),
            list(_pair(self.dilation)),
            self.ceil_mode,
        )
        if torch.is_grad_enabled() and x.requires_grad:
            return _ChannelsLastMaxPool.apply(x, window)
        kernel, stride, padding, dilation, ceil_mode = window
        return F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation, ceil_mode
        ).contiguous()


def _takes_the_channels_last_kernel(x: Tensor) -> bool:
    """A batched NCHW float tensor on the CPU, outside tracing and compilation."""
    return (
        isinstance(x, Tensor)  # not a torch.fx Proxy
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and x.dtype.is_floating_point
        and x.dim() == 4
        and x.is_contiguous()
    )


def with_torch_pools(model: nn.Module) -> nn.Module:
    """``model`` with every library ``MaxPool2d`` replaced, in place, by ``nn.MaxPool2d`` of the same window: the
    network as plain PyTorch runs it, for benchmarks that compare against a hand-written loop."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaxPool2d):
                window = (child.kernel_size, child.stride, child.padding, child.dilation)
                setattr(parent, name, nn.MaxPool2d(*window, ceil_mode=child.ceil_mode))
    return model
