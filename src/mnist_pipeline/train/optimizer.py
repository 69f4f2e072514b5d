"""The training arithmetic that resume depends on: the learning-rate schedule and the data order (the optimizer:
sgd.py)."""

from __future__ import annotations

import math

import torch

from mnist_pipeline.settings import Recipe


def learning_rate(recipe: Recipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """One cycle per epoch: linear warm-up to the peak, cosine down to 0; later epochs peak lower."""
    peak = recipe.peak_lr * recipe.epoch_decay**epoch
    progress = step / steps_per_epoch
    if progress < recipe.warmup_fraction:
        return peak * progress / recipe.warmup_fraction
    rest = (progress - recipe.warmup_fraction) / (1 - recipe.warmup_fraction)
    return peak * 0.5 * (1 + math.cos(math.pi * rest))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled sample order of `epoch`, the same on every run and every resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)
