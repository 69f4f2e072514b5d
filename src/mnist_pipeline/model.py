"""The network: the one module train, evaluate and infer all import. No I/O here."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IMAGE_SIZE = 28
NUM_CLASSES = 10


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MnistCNN(nn.Module):
    """Conv-BN-ReLU stages, each halving the image with max-pool, then one linear layer.

    Small on purpose: it reaches 99% in one epoch on two CPU cores in seconds.
    The constructor's arguments are its whole config, stored in each checkpoint.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), first_kernel: int = 5):
        super().__init__()
        self.config = {"channels": list(channels), "first_kernel": first_kernel}
        stages = []
        in_channels, size = 1, IMAGE_SIZE
        for i, out_channels in enumerate(channels):
            stages += [_conv_block(in_channels, out_channels, first_kernel if i == 0 else 3), nn.MaxPool2d(2)]
            in_channels, size = out_channels, size // 2
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels * size * size, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 1, 28, 28] -> logits [N, 10]."""
        return self.classifier(torch.flatten(self.features(x), 1))
