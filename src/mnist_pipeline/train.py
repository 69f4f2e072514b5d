"""train: resume from the volume's checkpoint, train more epochs, save atomically.

Resuming is exact: the data order and the learning rate are pure functions of
(seed, epoch, step), and the rest of the state (weights, BatchNorm statistics,
optimizer moments, RNG) is in the checkpoint. So two one-epoch runs give the
same weights as one two-epoch run, and an epoch cut short by SIGTERM and
finished later equals an uninterrupted one. Assumed: the same device type,
thread count and torch build on each run (float sums are grouped per thread
and per kernel; runtime.setup makes CUDA's kernels deterministic), and under
torchrun the same world size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_arithmetic

from mnist_pipeline import checkpoint, data, distributed, faults, history, runtime, signals
from mnist_pipeline.config import Recipe, TrainConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import IMAGE_SIZE, MnistCNN
from mnist_pipeline.volume import Volume, exclusive_lock, remove_dead_temps

log = logging.getLogger(__name__)


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
                for folder in (volume.model_dir, volume.data_dir):
                    remove_dead_temps(folder)  # left by a kill -9 mid-write, whatever their age
                if config.fresh:
                    _move_aside(volume)
            state = _starting_point(volume, config.recipe, device)
            warm_up = _start_warm_up(state)
            train_set = data.load_split(volume.data_dir, "train", config.mirror)
            # the test files too: evaluate and infer may run without network
            data.ensure(volume.data_dir, config.mirror, splits=("test",))
            _finish_warm_up(warm_up)
        return _train(volume, config, state, train_set, device, world)


def _start_warm_up(state: "_TrainingState") -> Optional[threading.Thread]:
    """On CUDA, run two throwaway steps in the background while the data is read and verified.

    A process's first CUDA step waits for cuDNN and cuBLAS to start and for each kernel to load;
    done here, that overlaps the data's reading and hashing instead of delaying the epoch.
    """
    if state.device.type != "cuda":
        return None
    thread = threading.Thread(target=warm_up_steps, args=(state.model, state.recipe), name="cuda-warm-up",
                              daemon=True)
    thread.start()
    return thread


def _finish_warm_up(thread: Optional[threading.Thread]) -> None:
    if thread is not None:
        thread.join()


def warm_up_steps(model: nn.Module, recipe: Recipe) -> None:
    """Two training steps on a copy of `model`, of one batch of zeros: the same kernels, no state touched.

    The model, the optimizer and every random generator stay as they were; on a failure the real
    first step meets the same error and reports it.
    """
    try:
        twin = copy.deepcopy(model)
        device = next(twin.parameters()).device
        optimizer = NesterovSGD(twin.parameters(), recipe)
        images = torch.zeros(recipe.batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
        labels = torch.zeros(recipe.batch_size, dtype=torch.long, device=device)
        twin.train()
        for _ in range(2):  # the optimizer's first step differs from the later ones
            loss = nn.functional.cross_entropy(twin(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - only a head start; the real step raises what matters
        log.debug("warm-up step failed: %s", exc)


class _TrainingState:
    """Everything an exact resume needs, to and from a checkpoint dict."""

    def __init__(self, recipe: Recipe, model: MnistCNN, device: torch.device):
        self.recipe, self.model, self.device = recipe, model.to(device), device
        self.optimizer = NesterovSGD(model.parameters(), recipe)
        self.epoch, self.step = 0, 0
        self.reset_loss()

    def reset_loss(self, value: float = 0.0) -> None:
        # summed on the device, in float64 as Python floats were: reading it waits for the GPU, so the
        # loop reads it only for progress lines, saves and the epoch's end
        self.loss_sum = torch.tensor(value, dtype=torch.float64, device=self.device)

    @classmethod
    def fresh(cls, recipe: Recipe, device: torch.device) -> "_TrainingState":
        torch.manual_seed(recipe.seed)  # the CPU's generator and every GPU's
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
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise saved.invalid(f"its optimizer state does not fit ({exc})") from None
        torch.set_rng_state(saved.state["rng"])
        if device.type == "cuda":
            cuda_rng = saved.state.get("cuda_rng")
            if isinstance(cuda_rng, torch.Tensor):
                torch.cuda.set_rng_state(cuda_rng, device)
            else:  # saved by a CPU run: a state derived from the seed, the same on every resume
                torch.cuda.manual_seed(recipe.seed)
        self.epoch, self.step = saved.epoch, saved.state["step"]
        self.reset_loss(saved.state["loss_sum"])
        return self

    def snapshot(self) -> Dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "loss_sum": float(self.loss_sum),
            "model": self.model.state_dict(),
            "model_config": self.model.config,
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "train_config": dataclasses.asdict(self.recipe),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state


class NesterovSGD:
    """torch.optim.SGD(nesterov=True): its arithmetic (torch.optim.sgd.sgd, the functional form) and state_dict.

    Not the class itself: torch.optim.Optimizer's methods import torch._dynamo on first use, about
    800 modules and 2 to 4 s of every train process's start (measured), far longer than a GPU's epoch.
    """

    def __init__(self, params, recipe: Recipe):
        self.params = list(params)
        self.param_groups = [{"lr": recipe.peak_lr, "momentum": recipe.momentum, "dampening": 0.0,
                              "weight_decay": recipe.weight_decay, "nesterov": True, "maximize": False,
                              "foreach": None, "differentiable": False, "fused": None}]
        self.momentum_buffers: list = [None] * len(self.params)

    def zero_grad(self) -> None:
        """As set_to_none=True."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        live = [i for i, param in enumerate(self.params) if param.grad is not None]
        buffers = [self.momentum_buffers[i] for i in live]
        sgd_arithmetic([self.params[i] for i in live], [self.params[i].grad for i in live], buffers,
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        for i, buffer in zip(live, buffers, strict=True):  # the first step creates them
            self.momentum_buffers[i] = buffer

    def state_dict(self) -> Dict[str, Any]:
        return {
            "state": {i: {"momentum_buffer": b} for i, b in enumerate(self.momentum_buffers) if b is not None},
            "param_groups": [{**self.param_groups[0], "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Raises ValueError or KeyError where `state` does not fit these parameters."""
        groups = state["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"it has {len(groups)} parameter groups, not 1 of {len(self.params)} parameters")
        position = {index: i for i, index in enumerate(groups[0]["params"])}
        buffers: list = [None] * len(self.params)
        for index, entry in state["state"].items():
            param, buffer = self.params[position[index]], entry["momentum_buffer"]
            if not isinstance(buffer, torch.Tensor) or buffer.shape != param.shape:
                raise ValueError(f"the momentum of parameter {index} does not have its shape {tuple(param.shape)}")
            buffers[position[index]] = buffer.to(device=param.device, dtype=param.dtype)
        self.momentum_buffers = buffers
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})


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
    for path in (volume.checkpoint, volume.progress, volume.history):
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
    recipe, optimizer = state.recipe, state.optimizer
    distributed.check_batch_size(recipe.batch_size, world.size)  # the checkpoint's batch size when resuming
    # uint8 on the device, each batch normalised in the step: a quarter of the bytes to copy and keep,
    # and no work for the images a step-limited run never reaches
    images = train_set.images.to(device)
    labels = train_set.labels.to(device)
    steps_per_epoch = recipe.steps_per_epoch(len(labels))
    target_epoch = state.epoch + config.epochs
    fault_step, fault_signal = faults.signal_at_step()
    started = time.monotonic()
    recorder = history.Recorder(volume, state.epoch, state.step, device)  # the curves of the report
    state.model.train()
    train_step = _step_function(state, images, labels, world)
    with signals.deferred():  # a signal is acted on at the next step boundary
        while state.epoch < target_epoch:
            order = epoch_order(recipe.seed, state.epoch, len(labels)).to(device)
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
                    if world.is_main:
                        _save_progress(volume, state, recorder)
                    distributed.barrier(world)  # the others leave once the progress is saved
                    raise signals.interrupted(
                        f"at epoch {state.epoch + 1}, step {state.step}/{steps_per_epoch}; progress saved to "
                        f"{volume.progress}: run `mnist train` again to continue")
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
            _check_finite(state)  # reads the loss: waits for the epoch's last step
            epoch_seconds = time.monotonic() - epoch_started
            epoch_loss = float(state.loss_sum) / steps_per_epoch
            recorder.end_epoch(state.epoch + 1, steps_per_epoch, epoch_loss)
            state.epoch, state.step = state.epoch + 1, 0
            state.reset_loss()
            if world.is_main:
                recorder.save(state.epoch, state.step)  # before the checkpoint: never behind it
                checkpoint.save(volume.checkpoint, state.snapshot(), fault_point="checkpoint-before-rename")
                if volume.progress.exists():  # (a kill -9 just before leaves it stale: the next train sets it aside)
                    volume.progress.unlink()
            log.info("epoch %d done in %.2f s: train loss %.4f; saved %s", state.epoch, epoch_seconds, epoch_loss,
                     volume.checkpoint)
    return TrainResult(epoch=state.epoch, train_loss=epoch_loss, seconds=time.monotonic() - started,
                       checkpoint=volume.checkpoint)


def _step_function(state: _TrainingState, images: torch.Tensor, labels: torch.Tensor,
                   world: Optional[distributed.World] = None,
                   cuda_graph: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(batch indices) -> the batch's loss, after the forward, backward and optimizer step (`images`:
    uint8, normalised a batch at a time).

    On CUDA the forward and backward are captured once as a CUDA graph and replayed each step:
    one launch for some fifty kernels, whose launching on the host otherwise takes longer than the
    GPU's work on 128 images. The same kernels in the same order, so the same results; where the
    capture fails (or without `cuda_graph`: bench/gpu_bench.py compares), eager steps instead. In a
    torchrun group, eager steps of the DistributedDataParallel wrapper, whose all-reduce a graph
    would not capture; `state.model`, saved, stays the plain network.
    """
    world = world or distributed.world()
    model, optimizer, loss_fn = distributed.wrap(world, state.model), state.optimizer, nn.CrossEntropyLoss()

    def eager(batch: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(state.model.normalize(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    if state.device.type != "cuda" or not cuda_graph or world.size > 1:
        return eager
    try:
        return _graphed_step(state, images, labels, loss_fn)
    except RuntimeError as exc:
        log.warning("could not capture the training step as a CUDA graph (%s); running it step by step",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return eager


def _graphed_step(state: _TrainingState, images: torch.Tensor, labels: torch.Tensor,
                  loss_fn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model, optimizer, device = state.model, state.optimizer, state.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # this thread's and stream's handles and workspaces exist before the capture
        warm_up_steps(model, state.recipe)
    torch.cuda.current_stream(device).wait_stream(stream)
    batch = torch.zeros(state.recipe.batch_size, dtype=torch.long, device=device)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad()  # the capture allocates the gradients; each replay rewrites them
    with torch.cuda.graph(graph, stream=stream):  # records, runs nothing: no state changes here
        loss = loss_fn(model(model.normalize(images[batch])), labels[batch])
        loss.backward()
    log.debug("training step captured as a CUDA graph")

    def replay(indices: torch.Tensor) -> torch.Tensor:
        batch.copy_(indices)
        graph.replay()
        optimizer.step()  # eager: its learning rate changes every step
        return loss.detach()

    return replay


def _save_progress(volume: Volume, state: _TrainingState, recorder: history.Recorder) -> None:
    _check_finite(state)
    recorder.save(state.epoch, state.step)  # before the progress file: never behind it
    checkpoint.save(volume.progress, state.snapshot(), fault_point="progress-before-rename")
    log.debug("progress saved at epoch %d, step %d", state.epoch + 1, state.step)


def _check_finite(state: _TrainingState) -> None:
    """A diverged run must not replace the last good checkpoint or progress with NaN weights."""
    weights_finite = bool(torch.stack([torch.isfinite(p).all() for p in state.model.parameters()]).all())
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
