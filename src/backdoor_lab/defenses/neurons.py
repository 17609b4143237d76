"""ANP's neurons: a mask and a bounded multiplicative perturbation on every conv channel, through forward hooks.

``MaskedNeurons`` puts them on any network without rewriting its modules: at the BatchNorm that follows a conv
where there is one (as the reference's ``NoisyBatchNorm2d``), else at the conv's output. A unit's output with bias
``b`` becomes ``(out - b) * (m + delta) + b * (1 + delta_b)`` perturbed and ``(out - b) * m + b`` not. The search
that drives them (``optimize_masks``) and the defense around it are in ``anp.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from backdoor_lab.defenses.channel_masks import conv_units
from backdoor_lab.defenses.pruning import model_device

MaskValues = dict[str, list[float]]  # conv layer name -> the optimised mask of each output channel


class _Unit:
    """One conv's channels: mask, perturbation, and the forward hook that applies them to ``module``'s output.

    ``module`` is the BatchNorm2d after the conv (its shift ``beta`` is the bias ``b``) or the conv itself (its
    bias, zero if none), so ``out - b`` is the part the mask scales and ``b`` the part ``delta_b`` perturbs.
    """

    def __init__(self, name: str, module: nn.Module, channels: int, device: torch.device) -> None:
        self.name = name
        self.module = module
        self.mask = torch.ones(channels, device=device, requires_grad=True)
        self.noise = torch.zeros(channels, device=device)
        self.noise_bias = torch.zeros(channels, device=device)
        self.perturbed = False
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        bias = getattr(module, "bias", None)
        b = torch.zeros((), dtype=out.dtype, device=out.device) if bias is None else bias.detach().to(out.dtype)
        b = b.view(shape) if b.dim() else b
        if self.perturbed:
            scale, shift = self.mask + self.noise, 1 + self.noise_bias
            return (out - b) * scale.to(out.dtype).view(shape) + b * shift.to(out.dtype).view(shape)
        return (out - b) * self.mask.to(out.dtype).view(shape) + b


class MaskedNeurons:
    """Masks and perturbations on every conv channel of ``model`` through forward hooks; ``close()`` removes them.

    Perturbs the BatchNorm2d that follows a conv where there is one (``conv_units``), else the conv's output.
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        device = device or model_device(model)
        self.units = [
            _Unit(name, conv if bn is None else bn, conv.out_channels, device) for name, conv, bn in conv_units(model)
        ]

    @property
    def masks(self) -> list[Tensor]:
        return [u.mask for u in self.units]

    @property
    def noises(self) -> list[Tensor]:
        return [t for u in self.units for t in (u.noise, u.noise_bias)]

    def perturb(self, on: bool) -> None:
        for unit in self.units:
            unit.perturbed = on

    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """A random start in [-eps, eps], drawn on the CPU (the same draw on every device) in one piece."""
        noises = self.noises
        draw = torch.rand(sum(t.numel() for t in noises), generator=generator) * (2 * eps) - eps
        draw = draw.to(noises[0].device) if noises else draw
        for tensor, part in zip(noises, draw.split([t.numel() for t in noises]), strict=True):
            tensor.copy_(part)

    def ascend(self, loss_fn: Callable[[], Tensor], step: float, eps: float) -> None:
        """One signed step of the perturbation up the loss (the worst case), clipped to [-eps, eps]."""
        noises = self.noises
        for t in noises:
            t.requires_grad_(True)
        try:
            grads = torch.autograd.grad(loss_fn(), noises, allow_unused=True)
        finally:
            for t in noises:
                t.requires_grad_(False)
        with torch.no_grad():
            for t, g in zip(noises, grads, strict=True):
                if g is not None:
                    t.add_(torch.sign(g), alpha=step).clamp_(-eps, eps)

    def values(self) -> MaskValues:
        return {u.name: [float(v) for v in u.mask.detach().cpu()] for u in self.units}

    def close(self) -> None:
        for unit in self.units:
            unit.handle.remove()
