"""Accepted feedback in training (docs/feedback.md#training): each epoch mixes in the accepted `train` samples of
feedback/ as they are at its start, at --feedback-share of its examples.

The set is frozen for the epoch: read at its first step and kept in the checkpoint, images and labels included,
so an epoch resumed mid-way trains on what it began with, whatever was accepted, rejected or deleted since. A
changed set (or share) takes effect at the next epoch, which says so in one line. Without accepted samples (or at
share 0) an epoch is MNIST alone, in epoch_order.

Under torchrun rank 0 reads the set and the others receive it, so every rank trains on one set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from mnist_pipeline import distributed
from mnist_pipeline.contract import IMAGE_SIZE
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import checkpoint
from mnist_pipeline.records import feedback as records
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mix:
    """The accepted feedback one epoch trains on."""

    ids: Tuple[str, ...]  # in id order (under torchrun, rank 0's only: the others neither log nor save)
    digest: str  # records.feedback.Accepted.digest
    pixels: torch.Tensor  # uint8 [n, 28, 28]
    labels: torch.Tensor  # int64 [n]
    share: float  # --feedback-share asked for
    draws: int  # the epoch's feedback examples

    def __len__(self) -> int:
        return len(self.labels)

    def same_as(self, other: Optional["Mix"]) -> bool:
        return other is not None and (self.digest, self.share, self.draws) == (other.digest, other.share, other.draws)

    def saved(self) -> Dict[str, Any]:
        """The checkpoint's fields (checkpoint.State's feedback, feedback_pixels, feedback_labels)."""
        return {"feedback": {"ids": list(self.ids), "digest": self.digest, "share": self.share, "draws": self.draws},
                "feedback_pixels": self.pixels, "feedback_labels": self.labels}

    @classmethod
    def restored(cls, state: checkpoint.State) -> Optional["Mix"]:
        """The set a checkpoint's epoch trained on (checked by checkpoint.read), or None."""
        if state.feedback is None:
            return None
        record = state.feedback
        return cls(ids=tuple(record["ids"]), digest=record["digest"], pixels=state.feedback_pixels,
                   labels=state.feedback_labels, share=record["share"], draws=record["draws"])


def draws_for(share: float, images: int) -> int:
    """Feedback examples that make `share` of an epoch of `images` MNIST images and them."""
    return round(share / (1 - share) * images)


def at_epoch_start(volume: Volume, world: distributed.World, share: float, images: int, epoch: int,
                   previous: Optional[Mix]) -> Optional[Mix]:
    """The set epoch `epoch` (0-based) trains on: the accepted train samples now, or None (none, or share 0).
    `previous`: the set the last epoch trained on (the checkpoint's), kept when nothing changed; a change is told."""
    if share == 0:
        mix = None
    elif world.size == 1:
        mix = _read(volume, share, images)
        if mix is not None and mix.same_as(previous):
            mix = previous  # the same tensors: the step function is kept
    else:  # (`previous` itself when rank 0 finds it unchanged: the other ranks know the set by its tensors only)
        mix = _shared(volume, world, share, images, previous)
    if world.is_main:
        _tell(epoch + 1, mix, previous)
    return mix


def examples(images: torch.Tensor, labels: torch.Tensor, mix: Optional[Mix]) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST's images and labels (on the device), followed by the set's: what mixed_order's indices point into."""
    if mix is None:
        return images, labels
    return (torch.cat([images, mix.pixels.to(images.device)]), torch.cat([labels, mix.labels.to(labels.device)]))


def _read(volume: Volume, share: float, images: int) -> Optional[Mix]:
    accepted = records.accepted(volume, "train")  # a malformed sample: an error naming its file and the fix
    if not accepted:
        return None
    if len(accepted) > checkpoint.MAX_FEEDBACK:
        raise PipelineError(f"{volume.feedback_dir} has {len(accepted)} accepted train samples, more than the "
                            f"{checkpoint.MAX_FEEDBACK} an epoch mixes in: reject or delete some (`mnist feedback`), "
                            f"or train with --feedback-share 0")
    n = len(accepted)
    pixels = torch.frombuffer(bytearray(accepted.pixels), dtype=torch.uint8).view(n, IMAGE_SIZE, IMAGE_SIZE)
    return Mix(ids=accepted.ids, digest=accepted.digest, pixels=pixels,
               labels=torch.tensor(accepted.labels, dtype=torch.int64), share=share, draws=draws_for(share, images))


def _shared(volume: Volume, world: distributed.World, share: float, images: int,
            previous: Optional[Mix]) -> Optional[Mix]:
    """Rank 0's read, on every rank: its size, whether it is `previous`, then its images and labels if not."""
    mix = None
    with distributed.main_first(world):  # a read that fails stops the other ranks too, quietly: rank 0 says why
        if world.is_main:
            mix = _read(volume, share, images)
    header = torch.zeros(3, dtype=torch.int64)  # samples, draws, whether it is `previous`
    if mix is not None:
        header[:] = torch.tensor([len(mix), mix.draws, int(mix.same_as(previous))])
    distributed.broadcast(world, header)
    count, draws, unchanged = header.tolist()
    if count == 0:
        return None
    if unchanged:
        return previous
    if not world.is_main:
        mix = Mix(ids=(), digest="", pixels=torch.empty(count, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8),
                  labels=torch.empty(count, dtype=torch.int64), share=share, draws=draws)
    distributed.broadcast(world, mix.pixels)
    distributed.broadcast(world, mix.labels)
    return mix


def _tell(epoch: int, mix: Optional[Mix], previous: Optional[Mix]) -> None:
    """One line where the epoch's set differs from the last epoch's (or is the first)."""
    if mix is previous or (mix is not None and mix.same_as(previous)):
        return
    if mix is None:
        log.info("feedback: epoch %d mixes in no accepted samples (was %d at share %g)", epoch, len(previous),
                 previous.share)
        return
    was = "the first epoch with feedback" if previous is None else f"was {len(previous)} at share {previous.share:g}"
    log.info("feedback: epoch %d mixes in %d accepted samples at share %g, %d draws (%s)", epoch, len(mix),
             mix.share, mix.draws, was)
