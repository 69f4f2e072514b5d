"""The networks, by name, and their input contract: the one module every torch stage imports. No I/O here.

The contract (contract.py, which needs no torch): uint8 images [N, 28, 28] (white ink on black, as in
MNIST), normalised with the model's own mean and std (part of its config, so they travel in the
checkpoint). A user's own image becomes such an image in preprocess.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mnist_pipeline.contract import IMAGE_SIZE, MEAN, NUM_CLASSES, STD  # noqa: F401 (the contract, here too)

# small enough that a batch's activations stay in a CPU's caches: a larger one runs slower per image
PREDICT_BATCH = 256


def normalize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], as the model expects."""
    # in place on one copy: the same arithmetic as out of place, one allocation instead of four
    return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std).unsqueeze(1)


class MnistCNN(nn.Module):
    """Stages of 3x3 conv -> BatchNorm -> ReLU, each optionally followed by a 2x2 max-pool.

    The defaults (16-32-64 channels, a strided first stage, then pooling) reach
    99% in one epoch on two CPU cores in a fraction of the reference recipe's time
    (docs/performance.md). The constructor's arguments are its whole config,
    stored in each checkpoint so the loader rebuilds the same network.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (2, 1, 1),
                 pools: Sequence[bool] = (False, True, True), mean: float = MEAN, std: float = STD):
        super().__init__()
        if not len(channels) == len(strides) == len(pools):
            raise ValueError("channels, strides and pools need one entry per stage")
        self.config = {"channels": list(channels), "strides": list(strides), "pools": list(pools),
                       "mean": float(mean), "std": float(std)}
        self.mean, self.std = float(mean), float(std)
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
        # channels-last convolutions run faster on CPU (docs/performance.md); inputs follow suit in forward()
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 1, 28, 28] -> logits [N, 10]."""
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.classifier(torch.flatten(x, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 28, 28] -> this model's input, with the normalisation it was trained with."""
        return normalize(images, self.mean, self.std)


# A checkpoint names its architecture and the constructor's arguments; `build` makes the network back.
# A second architecture is one more class with a `config` dict of its arguments, and one entry here.
ARCHITECTURES = {"mnist_cnn": MnistCNN}
DEFAULT_ARCHITECTURE = "mnist_cnn"


def build(architecture: str, config: dict) -> nn.Module:
    """The network `architecture` with constructor arguments `config`; ValueError or TypeError if they do not fit."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**config)


def architecture_of(model: nn.Module) -> str:
    return next(name for name, cls in ARCHITECTURES.items() if type(model) is cls)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images [N, 28, 28] -> class probabilities [N, 10], in batches."""
    model.eval()
    chunks = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = model.normalize(images[start:start + PREDICT_BATCH]).to(device)
        chunks.append(torch.softmax(model(batch).float(), dim=1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, NUM_CLASSES)


def stack(images: Sequence[bytes]) -> torch.Tensor:
    """Images as preprocess.py gives them (IMAGE_BYTES each) -> uint8 [N, 28, 28]."""
    return torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
