"""Small networks shared by several test modules."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """stem -> [conv_a -> BN -> ReLU -> conv_b] + skip -> ReLU -> mean -> linear.

    The skip crosses a cut after conv_a (the fast curve must cache it); conv_a has a BatchNorm; conv_b's outputs
    are coupled to the stem's by the add (slimming must refuse them).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 12, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial statistics, so a wrongly sliced BN would show
            self.bn_a.running_mean.uniform_(-0.5, 0.5)
            self.bn_a.running_var.uniform_(0.5, 2.0)
            self.bn_a.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        out = self.conv_b(torch.relu(self.bn_a(self.conv_a(skip))))
        return self.head(torch.relu(out + skip).mean(dim=(2, 3)))


class SigmoidNet(nn.Module):
    """conv -> sigmoid -> linear on 3x6x6 inputs: a zeroed channel reaches the linear as 0.5, so slimming cannot
    remove it, and the layer reading the conv is not linear in it, so the prune curve keeps no running sums."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.conv(x)).flatten(1))


class LinearOnly(nn.Module):
    """A network with no conv layer: what every channel-pruning defense must refuse in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
