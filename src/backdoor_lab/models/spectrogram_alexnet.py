"""AlexNet-style CNN for spectrograms: the speech task's network in Fine-Pruning (Liu et al., RAID 2018).

The original (Caffe) network reads 3x512x512 spectrogram images: conv1 96@11x11/4, pool, conv2 256@5x5, pool,
conv3 384@3x3, conv4 384@3x3, conv5 256@3x3, pool5, fc 256, fc 128 (dropout 0.5), fc 10; conv5 is the layer
the defense prunes. Our log-mel inputs are far smaller (1x40x63 by default), so conv1 is a 5x5 kernel at
stride 1 and the pooling after conv5 is adaptive (any spectrogram size works); the layer sequence and the
channel proportions are kept. ``width=1.0`` gives the original channel counts (conv5 = 256, for GPU runs);
the default ``width=0.25`` (24, 64, 96, 96, 64) trains on a 2-core CPU in minutes, and its 64 conv5
channels are still far more than ten digits need: the spare capacity where a backdoor can hide.

No normalisation by default, like the original (its LRN is left out). ``batch_norm=True`` adds BatchNorm
after conv1..conv4 (never after conv5, because masking a conv5 output channel must make that channel exactly
zero after its ReLU ``relu5``, which a BatchNorm shift would undo). It trains faster and learns the trigger
more strongly, but in our runs it also moved the backdoor into conv5 channels that clean speech uses, where
fine-pruning cannot reach it (README, "Measured results").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from backdoor_lab.models.pooling import MaxPool2d

ORIGINAL_CHANNELS = (96, 256, 384, 384, 256)
ORIGINAL_HIDDEN = (256, 128)


def scaled_channels(width: float) -> tuple[int, ...]:
    """The original conv channel counts times ``width``, each at least 1."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return tuple(max(1, int(round(c * width))) for c in ORIGINAL_CHANNELS)


class SpectrogramAlexNet(nn.Module):
    """conv1..conv5 (each followed by ReLU), two pools, adaptive pool5, fc6, fc7 (dropout), classifier.

    Args:
        num_classes: output classes.
        in_channels: spectrogram channels (1 for log-mel).
        width: multiplier on the original channel counts (96, 256, 384, 384, 256); 1.0 is the original.
        channels: explicit five conv channel counts; overrides ``width``.
        hidden: sizes of the two hidden fully-connected layers (original 256, 128).
        dropout: dropout after each hidden fully-connected layer.
        pool5_size: output size of the adaptive max pooling after conv5; fixes fc6's input size for any
            spectrogram shape.
        conv1_stride: stride of conv1 (the original's 11x11 conv1 has stride 4 on 512x512 images).
        batch_norm: BatchNorm after conv1..conv4 (never after conv5, whose channels the defense masks).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: float = 0.25,
        channels: Sequence[int] | None = None,
        hidden: Sequence[int] = ORIGINAL_HIDDEN,
        dropout: float = 0.5,
        pool5_size: Sequence[int] = (3, 3),
        conv1_stride: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        chans = tuple(int(c) for c in channels) if channels is not None else scaled_channels(width)
        if len(chans) != 5 or min(chans) < 1:
            raise ValueError(f"channels must be five positive counts (conv1..conv5), got {chans}")
        if len(hidden) != 2:
            raise ValueError(f"hidden must hold two fully-connected sizes, got {tuple(hidden)}")
        c1, c2, c3, c4, c5 = chans
        self.channels = chans
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, stride=conv1_stride, padding=2)
        self.norm1 = nn.BatchNorm2d(c1) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.norm2 = nn.BatchNorm2d(c2) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)
        self.norm3 = nn.BatchNorm2d(c3) if batch_norm else nn.Identity()
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1)
        self.norm4 = nn.BatchNorm2d(c4) if batch_norm else nn.Identity()
        self.relu4 = nn.ReLU(inplace=True)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1)
        # Not in-place: hooks on relu5 (pruning statistics, masks) see a tensor of their own.
        self.relu5 = nn.ReLU()
        self.pool5 = nn.AdaptiveMaxPool2d(tuple(pool5_size))
        pooled = c5 * int(pool5_size[0]) * int(pool5_size[1])
        self.fc6 = nn.Linear(pooled, int(hidden[0]))
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(int(hidden[0]), int(hidden[1]))
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.classifier = nn.Linear(int(hidden[1]), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """conv1..conv5 with their ReLUs and pools: the (N, conv5 channels, H, W) map the defense prunes."""
        x = self.pool1(self.relu1(self.norm1(self.conv1(x))))
        x = self.pool2(self.relu2(self.norm2(self.conv2(x))))
        x = self.relu3(self.norm3(self.conv3(x)))
        x = self.relu4(self.norm4(self.conv4(x)))
        return self.relu5(self.conv5(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool5(self.features(x)), 1)
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.classifier(x)
