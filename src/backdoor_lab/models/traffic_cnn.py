"""A ZF/AlexNet-style traffic-sign CNN with a wide last conv layer, the layer Fine-Pruning prunes.

The paper's traffic-sign network is Faster-RCNN on ZF net, whose conv5 has 256 channels; this classifier
keeps that width in ``conv5`` on small crops so the pruned layer has the spare capacity in which a
backdoor can sit in channels that clean inputs leave dormant.
"""

from __future__ import annotations

from torch import Tensor, nn

from backdoor_lab.models.pooling import MaxPool2d


class TrafficSignCNN(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: tuple[int, int, int, int, int] = (32, 64, 96, 128, 256),
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        self.relu = nn.ReLU(inplace=False)
        self.pool = MaxPool2d(2)
        self.pool5 = nn.AdaptiveMaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c5 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # 16x16 for 32x32 input
        x = self.pool(self.relu(self.conv2(x)))  # 8x8
        x = self.pool(self.relu(self.conv3(x)))  # 4x4
        x = self.relu(self.conv4(x))
        x = self.relu(self.conv5(x))
        return self.classifier(self.pool5(x))
