"""train: resume from the volume's checkpoint, train more epochs, save atomically.

Resuming is exact: the data order and the learning rate are pure functions of
(seed, epoch, step), and the rest of the state (weights, BatchNorm statistics,
optimizer moments, RNG) is in the checkpoint. So two one-epoch runs give the
same weights as one two-epoch run, and an epoch cut short by SIGTERM and
finished later equals an uninterrupted one (same thread count assumed: float
sums are grouped per thread; under torchrun, the same world size too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from mnist_pipeline import checkpoint, data, distributed, faults, runtime, signals
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.volume import Volume, exclusive_lock, remove_stale_temps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters. Saved in the checkpoint; a resumed run keeps the saved ones."""

    seed: int = 0
    batch_size: int = 128
    peak_lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2  # of each epoch, rising linearly from 0 to the peak
    epoch_decay: float = 0.5  # each later epoch peaks at this fraction of the previous one
    max_steps: int = 0  # batches per epoch, 0: the whole training set (a limit keeps tests fast)

    def steps_per_epoch(self, samples: int) -> int:
        """The last partial batch is dropped; the learning-rate cycle spans these steps."""
        full = samples // self.batch_size
        return min(full, self.max_steps) if self.max_steps else full


@dataclass(frozen=True)
class TrainConfig:
    root: Path
    mirror: Optional[str] = None
    epochs: int = 1
    recipe: Recipe = Recipe()
    fresh: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    save_every_s: float = 60.0  # progress saved this often mid-epoch, so a kill -9 loses at most this much; 0: never
    progress_every_s: float = 10.0  # plain progress lines when stderr is no terminal


@dataclass(frozen=True)
class TrainResult:
    epoch: int  # completed epochs, as saved
    train_loss: float  # mean over the last epoch's batches
    seconds: float
    checkpoint: Path


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


def run(config: TrainConfig) -> TrainResult:
    if config.epochs < 1:
        raise PipelineError(f"--epochs / MNIST_EPOCHS must be at least 1, got {config.epochs}")
    volume = Volume(config.root)
    world = distributed.world()  # one process, or a rank of a torchrun group
    device = runtime.setup(config.device, distributed.threads(world, config.threads))
    with distributed.lost_peers_reported(world), distributed.process_group(world, device) as device, \
            contextlib.ExitStack() as held:
        with distributed.main_first(world):  # rank 0 alone writes; the others then read what it prepared
            if world.is_main:
                held.enter_context(exclusive_lock(volume, "train"))
                remove_stale_temps(volume.model_dir)  # left by a kill -9 mid-write
                if config.fresh:
                    _move_aside(volume)
            state = _starting_point(volume, config.recipe, device)
            train_set = data.load_split(volume.data_dir, "train", config.mirror)
            # the test files too: evaluate and infer may run without network
            data.ensure(volume.data_dir, config.mirror, splits=("test",))
        return _train(volume, config, state, train_set, device, world)


class _TrainingState:
    """Everything an exact resume needs, to and from a checkpoint dict."""

    def __init__(self, recipe: Recipe, model: MnistCNN, device: torch.device):
        self.recipe, self.model = recipe, model.to(device)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.peak_lr, momentum=recipe.momentum, nesterov=True,
            weight_decay=recipe.weight_decay,
        )
        self.epoch, self.step, self.loss_sum = 0, 0, 0.0

    @classmethod
    def fresh(cls, recipe: Recipe, device: torch.device) -> "_TrainingState":
        torch.manual_seed(recipe.seed)
        return cls(recipe, MnistCNN(), device)

    @classmethod
    def restore(cls, saved: checkpoint.Checkpoint, device: torch.device) -> "_TrainingState":
        try:
            recipe = Recipe(**saved.state["train_config"])
        except TypeError as exc:
            raise saved.invalid(f"its train_config does not fit this version ({exc})") from None
        self = cls(recipe, saved.build_model(), device)
        try:
            self.optimizer.load_state_dict(saved.state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise saved.invalid(f"its optimizer state does not fit ({exc})") from None
        torch.set_rng_state(saved.state["rng"])
        self.epoch, self.step, self.loss_sum = saved.epoch, saved.state["step"], saved.state["loss_sum"]
        return self

    def snapshot(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "loss_sum": self.loss_sum,
            "model": self.model.state_dict(),
            "model_config": self.model.config,
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "train_config": dataclasses.asdict(self.recipe),
        }


def _starting_point(volume: Volume, recipe: Recipe, device: torch.device) -> _TrainingState:
    """Continue an interrupted epoch, else the checkpoint, else start from scratch."""
    saved = checkpoint.load(volume.checkpoint) if volume.checkpoint.exists() else None
    progress = _load_progress(volume, saved)
    source = progress or saved
    if source is None:
        log.info("no checkpoint at %s: training from scratch", volume.checkpoint)
        return _TrainingState.fresh(recipe, device)
    state = _TrainingState.restore(source, device)
    if state.recipe != recipe:
        kept = dataclasses.asdict(state.recipe)
        ignored = {k: v for k, v in dataclasses.asdict(recipe).items() if kept[k] != v}
        log.warning("resuming with the checkpoint's hyper-parameters; ignoring %s (--fresh starts over)", ignored)
    if progress:
        log.info("continuing epoch %d at step %d from %s", state.epoch + 1, state.step, volume.progress)
    else:
        log.info("resuming from %s (epoch %d)", volume.checkpoint, state.epoch)
    return state


def _load_progress(volume: Volume, saved: Optional[checkpoint.Checkpoint]) -> Optional[checkpoint.Checkpoint]:
    """The interrupted epoch that continues `saved`, or None. Progress that does not is set aside, never lost."""
    if not volume.progress.exists():
        return None
    try:
        progress = checkpoint.load(volume.progress)
    except PipelineError as exc:
        _set_aside(volume.progress, f"it does not load ({exc})")
        return None
    expected = saved.epoch if saved else 0
    if progress.epoch == expected:
        return progress
    relation = "an earlier" if progress.epoch < expected else "a later"
    _set_aside(volume.progress, f"it continues epoch {progress.epoch}, {relation} one than the checkpoint's "
                                f"epoch {expected}")
    return None


def _move_aside(volume: Volume) -> None:
    """--fresh: keep the old files under a dated name rather than deleting them."""
    for path in (volume.checkpoint, volume.progress):
        if path.exists():
            _set_aside(path, "--fresh starts over")


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.aside")
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise PipelineError(f"cannot move {path} aside: {exc.strerror}; check the volume") from None
    log.warning("moved %s aside to %s: %s", path.name, aside.name, why)


def _train(volume: Volume, config: TrainConfig, state: _TrainingState, train_set: data.Split,
           device: torch.device, world: distributed.World) -> TrainResult:
    recipe, model, optimizer = state.recipe, state.model, state.optimizer
    distributed.check_batch_size(recipe.batch_size, world.size)  # the checkpoint's batch size when resuming
    model = distributed.wrap(world, model)  # DDP in a group; state.model, saved, stays the plain network
    loss_fn = nn.CrossEntropyLoss()
    images = data.normalize(train_set.images).to(device)
    labels = train_set.labels.to(device)
    steps_per_epoch = recipe.steps_per_epoch(len(labels))
    target_epoch = state.epoch + config.epochs
    fault_step, fault_signal = faults.signal_at_step()
    started = time.monotonic()
    model.train()
    with signals.deferred():  # a signal is acted on at the next step boundary
        while state.epoch < target_epoch:
            order = epoch_order(recipe.seed, state.epoch, len(labels)).to(device)
            log.info("epoch %d: training from step %d of %d (batch %d, %s, %d threads)", state.epoch + 1,
                     state.step, steps_per_epoch, recipe.batch_size, device, torch.get_num_threads())
            report = _Progress(state.epoch + 1, steps_per_epoch, state.step, config.progress_every_s)
            next_save = time.monotonic() + config.save_every_s
            while state.step < steps_per_epoch:
                if state.step == fault_step:
                    os.kill(os.getpid(), fault_signal)
                if distributed.stop_agreed(world, signals.received() is not None):  # all ranks stop at one step
                    report.close()
                    if world.is_main:
                        _save_progress(volume, state)
                    distributed.barrier(world)  # the others leave once the progress is saved
                    raise signals.interrupted(
                        f"at epoch {state.epoch + 1}, step {state.step}/{steps_per_epoch}; progress saved to "
                        f"{volume.progress}: run `mnist train` again to continue")
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(recipe, state.epoch, state.step, steps_per_epoch)
                batch = order[state.step * recipe.batch_size:(state.step + 1) * recipe.batch_size]
                batch = distributed.shard(world, batch)
                loss = loss_fn(model(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state.loss_sum += distributed.average(world, loss).item()  # the same sum on every rank
                state.step += 1
                report.update(state.step, state.loss_sum / state.step)
                if (world.is_main and config.save_every_s and time.monotonic() >= next_save
                        and state.step < steps_per_epoch):
                    _save_progress(volume, state)
                    next_save = time.monotonic() + config.save_every_s
            report.close()
            _check_finite(state)
            epoch_loss = state.loss_sum / steps_per_epoch
            state.epoch, state.step, state.loss_sum = state.epoch + 1, 0, 0.0
            if world.is_main:
                checkpoint.save(volume.checkpoint, state.snapshot(), fault_point="checkpoint-before-rename")
                if volume.progress.exists():  # (a kill -9 just before leaves it stale: the next train sets it aside)
                    volume.progress.unlink()
            log.info("epoch %d done: train loss %.4f; saved %s", state.epoch, epoch_loss, volume.checkpoint)
    return TrainResult(epoch=state.epoch, train_loss=epoch_loss, seconds=time.monotonic() - started,
                       checkpoint=volume.checkpoint)


def _save_progress(volume: Volume, state: _TrainingState) -> None:
    _check_finite(state)
    checkpoint.save(volume.progress, state.snapshot(), fault_point="progress-before-rename")
    log.debug("progress saved at epoch %d, step %d", state.epoch + 1, state.step)


def _check_finite(state: _TrainingState) -> None:
    """A diverged run must not replace the last good checkpoint or progress with NaN weights."""
    weights_finite = all(bool(torch.isfinite(p).all()) for p in state.model.parameters())
    if not (math.isfinite(state.loss_sum) and weights_finite):
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

    def update(self, step: int, mean_loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 20 == 0:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}")
        elif time.monotonic() >= self.next_line:
            log.info("epoch %d: step %d/%d (%d%%), loss %.4f", self.epoch, step, self.total,
                     100 * step // self.total, mean_loss)
            self.next_line = time.monotonic() + self.every_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
