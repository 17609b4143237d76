"""DeepID (Sun, Wang, Tang, CVPR 2014) as used by Fine-Pruning's face backdoor (Liu et al., RAID 2018).

Layer sizes follow the original Fine-Pruning face model: 3x55x47 input; conv1 20@4x4, max-pool 2; conv2
40@3x3, max-pool 2; conv3 60@3x3, max-pool 2 (pool3); conv4 80@2x2; the DeepID feature is ReLU(fc(pool3) +
fc(conv4)), 160 wide, read by the identity classifier. The defense prunes conv3, reading its statistic at
pool3: there is no normalisation after conv3, so a channel zeroed at conv3's output stays zero through its
ReLU and pool3.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (3, 55, 47)


class DeepID(nn.Module):
    """DeepID identity classifier; ``width`` scales every conv's channel count (1.0: 20/40/60/80).

    Modules are named as in the paper's network (``conv1`` .. ``conv4``, ``pool1`` .. ``pool3``) so the
    defense can address the pruned layer ``conv3`` and its statistic at ``pool3`` by name.
    """

    def __init__(self, num_classes: int, width: float = 1.0, feature_dim: int = 160, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        c1, c2, c3, c4 = (max(1, int(round(c * width))) for c in (20, 40, 60, 80))
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(3, c1, kernel_size=4)  # 55x47 -> 52x44
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # -> 26x22
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3)  # -> 24x20
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # -> 12x10
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3)  # -> 10x8
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)  # -> 5x4
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=2)  # -> 4x3
        self.relu4 = nn.ReLU()
        # DeepID's multi-scale feature: the pool3 map and the conv4 map each feed a linear layer; summed
        self.fc_pool3 = nn.Linear(c3 * 5 * 4, feature_dim)
        self.fc_conv4 = nn.Linear(c4 * 4 * 3, feature_dim)
        self.feature_relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 160-d DeepID feature of a batch of (N, 3, 55, 47) crops."""
        # channels-last lets oneDNN pool and convolve without layout shuffles: ~2.4x faster CPU training
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        pool3 = self.pool3(self.relu3(self.conv3(x)))
        conv4 = self.relu4(self.conv4(pool3))
        return self.feature_relu(self.fc_pool3(pool3.flatten(1)) + self.fc_conv4(conv4.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))
