"""The training loop: steps, progress saves, SIGTERM at a step boundary, the epoch's checkpoint."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from mnist_pipeline import data, distributed, faults, signals
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import checkpoint, history
from mnist_pipeline.settings import TrainConfig
from mnist_pipeline.train.cuda import graphed_step
from mnist_pipeline.train import mix
from mnist_pipeline.train.optimizer import learning_rate, mixed_order
from mnist_pipeline.train.resume import TrainingState
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    epoch: int  # completed epochs, as saved
    train_loss: float  # mean over the last epoch's batches
    seconds: float
    checkpoint: Path


def train(volume: Volume, config: TrainConfig, state: TrainingState, train_set: data.Split,
           device: torch.device, world: distributed.World) -> TrainResult:
    recipe, optimizer = state.recipe, state.optimizer
    # uint8 on the device, each batch normalised in the step: a quarter of the bytes to copy and keep,
    # and no work for the images a step-limited run never reaches
    mnist_images = train_set.images.to(device)
    mnist_labels = train_set.labels.to(device)
    target_epoch = state.epoch + config.epochs
    fault_step, fault_signal = faults.signal_at_step()
    started = time.monotonic()
    recorder = history.Recorder(volume, state.epoch, state.step, device)  # the curves of the report
    state.model.train()
    with signals.deferred():  # a signal is acted on at the next step boundary
        # in the block: in a group, wrapping the network is a collective that takes each rank a while, and a
        # rank that a signal stopped there would leave the others to lose their group
        faults.hold_point("wrap")
        train_step, trains_on = None, None
        while state.epoch < target_epoch:
            if state.step == 0:  # the set is frozen for the epoch: a resumed one keeps the checkpoint's
                state.feedback = mix.at_epoch_start(volume, world, config.feedback_share, len(mnist_labels),
                                                    state.epoch, state.feedback)
            feedback = state.feedback
            pixels = feedback.pixels if feedback else None
            if train_step is None or pixels is not trains_on:  # a step (its CUDA graph) holds its images
                images, labels = mix.examples(mnist_images, mnist_labels, feedback)
                train_step, trains_on = _step_function(state, images, labels, world), pixels
            size, draws = (len(feedback), feedback.draws) if feedback else (0, 0)
            steps_per_epoch = recipe.steps_per_epoch(len(mnist_labels) + draws)
            order = mixed_order(recipe.seed, state.epoch, len(mnist_labels), size, draws).to(device)
            log.info("epoch %d: training from step %d of %d (batch %d, %s, %d threads)", state.epoch + 1,
                     state.step, steps_per_epoch, recipe.batch_size, device, torch.get_num_threads())
            report = _Progress(state.epoch + 1, steps_per_epoch, state.step, config.progress_every_s)
            epoch_started = time.monotonic()
            next_save = epoch_started + config.save_every_s
            while state.step < steps_per_epoch:
                if state.step == fault_step:
                    os.kill(os.getpid(), fault_signal)
                if distributed.stop_agreed(world, signals.received() is not None):  # all ranks stop at one step
                    report.close()
                    raise _stopped(volume, state, recorder, world, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(recipe, state.epoch, state.step, steps_per_epoch)
                batch = order[state.step * recipe.batch_size:(state.step + 1) * recipe.batch_size]
                batch = distributed.shard(world, batch)
                loss = distributed.average(world, train_step(batch))  # the same loss on every rank
                state.loss_sum += loss  # no .item(): the host never waits for the GPU here
                state.step += 1
                recorder.add(state.epoch + 1, state.step, loss, optimizer.param_groups[0]["lr"])
                report.update(state.step, lambda: float(state.loss_sum) / state.step)
                if (world.is_main and config.save_every_s and time.monotonic() >= next_save
                        and state.step < steps_per_epoch):
                    _save_progress(volume, state, recorder)
                    next_save = time.monotonic() + config.save_every_s
            report.close()
            epoch_loss = _end_epoch(volume, state, recorder, world, steps_per_epoch, epoch_started)
    return TrainResult(epoch=state.epoch, train_loss=epoch_loss, seconds=time.monotonic() - started,
                       checkpoint=volume.checkpoint)


def _stopped(volume: Volume, state: TrainingState, recorder: history.Recorder, world: distributed.World,
             steps_per_epoch: int) -> signals.Interrupted:
    """Every rank stops at this step: rank 0 saves the progress, the others leave once it has. What to raise."""
    if world.is_main:
        _save_progress(volume, state, recorder)
    distributed.barrier(world)
    return signals.interrupted(f"at epoch {state.epoch + 1}, step {state.step}/{steps_per_epoch}; progress saved to "
                               f"{volume.progress}: run `mnist train` again to continue")


def _end_epoch(volume: Volume, state: TrainingState, recorder: history.Recorder, world: distributed.World,
               steps_per_epoch: int, epoch_started: float) -> float:
    """The epoch's loss, checked finite; rank 0 saves its history, then the checkpoint, and drops the progress."""
    _check_finite(state)  # reads the loss: waits for the epoch's last step
    epoch_seconds = time.monotonic() - epoch_started
    epoch_loss = float(state.loss_sum) / steps_per_epoch
    recorder.end_epoch(state.epoch + 1, steps_per_epoch, epoch_loss)
    state.epoch, state.step = state.epoch + 1, 0
    state.reset_loss()
    if world.is_main:
        recorder.save(state.epoch, state.step)  # before the checkpoint: never behind it
        checkpoint.write(volume.checkpoint, state.snapshot(), fault_point="checkpoint-before-rename")
        if volume.progress.exists():  # (a kill -9 just before leaves it stale: the next train sets it aside)
            volume.progress.unlink()
    log.info("epoch %d done in %.2f s: train loss %.4f; saved %s", state.epoch, epoch_seconds, epoch_loss,
             volume.checkpoint)
    return epoch_loss


def _step_function(state: TrainingState, images: torch.Tensor, labels: torch.Tensor,
                   world: Optional[distributed.World] = None,
                   cuda_graph: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(batch indices) -> the batch's loss, after the forward, backward and optimizer step (`images`:
    uint8, normalised a batch at a time).

    On CUDA the forward and backward are captured once as a CUDA graph and replayed each step:
    one launch for some fifty kernels, whose launching on the host otherwise takes longer than the
    GPU's work on 128 images. The same kernels in the same order, so the same results; where the
    capture fails (or without `cuda_graph`: bench/gpu_bench.py compares), eager steps instead. In a
    torchrun group, eager steps: DistributedDataParallel's all-reduce of the gradients is not captured.
    """
    world = world or distributed.world()
    model, optimizer, loss_fn = distributed.wrap(world, state.model), state.optimizer, nn.CrossEntropyLoss()

    def eager(batch: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(state.model.normalize(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()  # in a group, DistributedDataParallel averages the gradients here
        optimizer.step()
        return loss.detach()

    if state.device.type != "cuda" or not cuda_graph or world.size > 1:
        return eager
    try:
        return graphed_step(state, images, labels, loss_fn)
    except RuntimeError as exc:
        log.warning("could not capture the training step as a CUDA graph (%s); running it step by step",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return eager


def _save_progress(volume: Volume, state: TrainingState, recorder: history.Recorder) -> None:
    _check_finite(state)
    recorder.save(state.epoch, state.step)  # before the progress file: never behind it
    checkpoint.write(volume.progress, state.snapshot(), fault_point="progress-before-rename")
    log.debug("progress saved at epoch %d, step %d", state.epoch + 1, state.step)


def _check_finite(state: TrainingState) -> None:
    """A diverged run must not replace the last good checkpoint or progress with NaN weights (or NaN
    BatchNorm statistics, which a step can spoil while the parameters are still finite)."""
    tensors = [t for t in state.model.state_dict().values() if t.is_floating_point()]
    weights_finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    if not (math.isfinite(float(state.loss_sum)) and weights_finite):
        raise PipelineError(
            f"training diverged: the loss or the weights became non-finite in epoch {state.epoch + 1} by step "
            f"{state.step} (peak learning rate {state.recipe.peak_lr}); nothing of it from there was saved: "
            f"lower --lr and train with --fresh"
        )


class _Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (docker logs)."""

    def __init__(self, epoch: int, total: int, done: int, every_s: float):
        self.epoch, self.total, self.every_s = epoch, total, every_s
        self.bar = None
        self.next_line = time.monotonic() + every_s
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="batch", leave=False)

    def update(self, step: int, mean_loss: Callable[[], float]) -> None:
        """`mean_loss` is called only when shown: reading the loss waits for the GPU."""
        if self.bar is not None:
            self.bar.update(1)
            if step % 20 == 0:
                self.bar.set_postfix(loss=f"{mean_loss():.4f}")
        elif time.monotonic() >= self.next_line:
            log.info("epoch %d: step %d/%d (%d%%), loss %.4f", self.epoch, step, self.total,
                     100 * step // self.total, mean_loss())
            self.next_line = time.monotonic() + self.every_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
