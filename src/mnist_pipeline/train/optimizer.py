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


# set apart from epoch_order's seeds (below 2**53): the feedback draws are another stream of the same seed
_DRAWS_STREAM = 1 << 62


def feedback_draws(seed: int, epoch: int, size: int, draws: int) -> torch.Tensor:
    """Which of `size` feedback samples each of `epoch`'s `draws` feedback examples is: a cycle through them in a
    seeded order, so each is drawn draws/size times, give or take one (a seeded subset when draws < size)."""
    generator = torch.Generator().manual_seed(_DRAWS_STREAM + seed * 1_000_003 + epoch)
    cycle = torch.randperm(size, generator=generator)
    return cycle.repeat(-(-draws // size))[:draws]


def mixed_order(seed: int, epoch: int, n: int, size: int = 0, draws: int = 0) -> torch.Tensor:
    """`epoch`'s examples in their shuffled order, as indices into `n` images followed by `size` feedback samples:
    each of the n once, and `draws` feedback draws. Without draws, epoch_order itself."""
    order = epoch_order(seed, epoch, n + draws)
    if not draws:
        return order
    examples = torch.cat([torch.arange(n), n + feedback_draws(seed, epoch, size, draws)])
    return examples[order]
