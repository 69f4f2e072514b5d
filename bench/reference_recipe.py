#!/usr/bin/env python3
"""Reference baseline: the pytorch/examples MNIST recipe, timed for one bare epoch.

Self-contained on purpose (a benchmark baseline, not part of the package): it reads the
gzipped IDX files itself, keeps the data in memory as tensors (no DataLoader) and times
exactly one training epoch (the training loop only), then measures test accuracy.

Recipe (as in pytorch/examples mnist/main.py): Net = conv 1->32 3x3, ReLU, conv 32->64 3x3,
ReLU, max-pool 2, dropout 0.25, flatten, fc ->128, ReLU, dropout 0.5, fc 10, log_softmax;
Adadelta lr 1.0, batch 64, shuffled each epoch, StepLR gamma 0.7 stepped after the epoch,
inputs normalized with (0.1307, 0.3081), NLL loss.

Usage: python bench/reference_recipe.py [--mirror DIR] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = REPO_ROOT.parent / "shared" / "mnist"

MEAN, STD = 0.1307, 0.3081
BATCH_SIZE = 64
TEST_BATCH_SIZE = 1000
LR = 1.0
GAMMA = 0.7
SEED = 1


def read_idx(path: Path) -> torch.Tensor:
    """Read a gzipped IDX file into a uint8 tensor of the shape its header gives."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack_from(">" + "I" * ndim, data, 4)
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(data) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data, found {len(data) - offset}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=offset).reshape(dims)


def load_split(mirror: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(mirror / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(mirror / f"{prefix}-labels-idx1-ubyte.gz")
    x = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()
    return x, labels.long()


class Net(nn.Module):
    def __init__(self, image_size: int = 28, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        side = (image_size - 2 - 2) // 2  # two valid 3x3 convs, then a 2x2 max-pool
        self.fc1 = nn.Linear(64 * side * side, 128)  # 9216 for 28x28 inputs
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train_epoch(model, optimizer, x, y, generator) -> None:
    model.train()
    perm = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], BATCH_SIZE):
        idx = perm[start:start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = F.nll_loss(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], TEST_BATCH_SIZE):
        pred = model(x[start:start + TEST_BATCH_SIZE]).argmax(dim=1)
        correct += int((pred == y[start:start + TEST_BATCH_SIZE]).sum())
    return correct / x.shape[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR,
                        help=f"folder with the gzipped MNIST IDX files (default: {DEFAULT_MIRROR})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    x_train, y_train = load_split(args.mirror, "train")
    x_test, y_test = load_split(args.mirror, "t10k")

    model = Net(image_size=x_train.shape[-1])
    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    generator = torch.Generator().manual_seed(SEED)

    start = time.perf_counter()
    train_epoch(model, optimizer, x_train, y_train, generator)
    epoch_seconds = time.perf_counter() - start
    scheduler.step()

    acc = accuracy(model, x_test, y_test)
    print(f"reference epoch: {epoch_seconds:.1f} s, test accuracy {acc:.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"epoch_seconds": epoch_seconds, "accuracy": acc, "threads": args.threads}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
