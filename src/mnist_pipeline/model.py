"""The network: the one module train, evaluate and infer all import. No I/O here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_SIZE = 28
NUM_CLASSES = 10


class MnistCNN(nn.Module):
    """Stages of 3x3 conv -> BatchNorm -> ReLU, each optionally followed by a 2x2 max-pool.

    The defaults (16-32-64 channels, a strided first stage, then pooling) reach
    99% in one epoch on two CPU cores in well under the reference recipe's time:
    bench/ has the figures. The constructor's arguments are its whole config,
    stored in each checkpoint so the loader rebuilds the same network.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (2, 1, 1),
                 pools: Sequence[bool] = (False, True, True)):
        super().__init__()
        if not len(channels) == len(strides) == len(pools):
            raise ValueError("channels, strides and pools need one entry per stage")
        self.config = {"channels": list(channels), "strides": list(strides), "pools": list(pools)}
        layers: list[nn.Module] = []
        in_channels, size = 1, IMAGE_SIZE
        for out_channels, stride, pool in zip(channels, strides, pools, strict=True):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),  # BN has the bias
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            size = (size - 1) // stride + 1
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * size * size, NUM_CLASSES)
        # channels-last convolutions run faster on CPU (bench/); inputs follow suit in forward()
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 1, 28, 28] -> logits [N, 10]."""
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.classifier(torch.flatten(x, 1))
