"""Where training starts: an interrupted epoch, else the checkpoint, else scratch; and the state an exact
resume needs, to and from a checkpoint."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mnist_pipeline import model
from mnist_pipeline.distributed import World
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import checkpoint
from mnist_pipeline.settings import RECIPE_FIELDS, Recipe
from mnist_pipeline.storage.files import describe
from mnist_pipeline.train.mix import Mix
from mnist_pipeline.train.sgd import NesterovSGD
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)


class TrainingState:
    """Everything an exact resume needs, to and from a checkpoint dict."""

    def __init__(self, recipe: Recipe, network: nn.Module, device: torch.device):
        self.recipe, self.model, self.device = recipe, network.to(device), device
        self.optimizer = NesterovSGD(network.parameters(), recipe)
        self.epoch, self.step = 0, 0
        self.resumed = False  # True when the recipe came from a checkpoint
        self.world_size = 1  # the processes training together
        self.feedback: Optional[Mix] = None  # the accepted feedback the current (or last finished) epoch mixes in
        self.reset_loss()

    def reset_loss(self, value: float = 0.0) -> None:
        # summed on the device, in float64 as Python floats were: reading it waits for the GPU, so the
        # loop reads it only for progress lines, saves and the epoch's end
        self.loss_sum = torch.tensor(value, dtype=torch.float64, device=self.device)

    @classmethod
    def fresh(cls, recipe: Recipe, device: torch.device) -> "TrainingState":
        torch.manual_seed(recipe.seed)  # the CPU's generator and every GPU's
        return cls(recipe, model.build(model.DEFAULT_ARCHITECTURE, {}), device)

    @classmethod
    def restore(cls, saved: checkpoint.Checkpoint, device: torch.device) -> "TrainingState":
        self = cls(saved.state.train_config, saved.build_model(), device)
        try:
            self.optimizer.load_state_dict(saved.state.optimizer)
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise saved.invalid(f"its optimizer state does not fit ({exc})") from None
        torch.set_rng_state(saved.state.rng)
        if device.type == "cuda":
            if saved.state.cuda_rng is not None:
                torch.cuda.set_rng_state(saved.state.cuda_rng, device)
            else:  # saved by a CPU run: a state derived from the seed, the same on every resume
                torch.cuda.manual_seed(self.recipe.seed)
        self.epoch, self.step = saved.epoch, saved.state.step
        self.feedback = Mix.restored(saved.state)
        self.resumed = True
        self.reset_loss(saved.state.loss_sum)
        return self

    def snapshot(self) -> checkpoint.State:
        return checkpoint.State(
            epoch=self.epoch,
            step=self.step,
            loss_sum=float(self.loss_sum),
            architecture=model.architecture_of(self.model),
            model=self.model.state_dict(),
            model_config=self.model.config,
            optimizer=self.optimizer.state_dict(),
            rng=torch.get_rng_state(),
            train_config=self.recipe,
            world_size=self.world_size,
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            **(self.feedback.saved() if self.feedback is not None else {}),
        )


def starting_point(volume: Volume, recipe: Recipe, explicit: frozenset, device: torch.device,
                   world: World) -> TrainingState:
    """Continue an interrupted epoch, else the checkpoint, else start from scratch.

    `explicit`: the Recipe fields the user set; a resumed run keeps the checkpoint's and says (once per
    group) which of those it ignores, and that a different world size makes the epoch a different one.
    """
    try:
        saved = checkpoint.read(volume.checkpoint)
    except FileNotFoundError:
        saved = None
    progress = _load_progress(volume, saved)
    source = progress or saved
    if source is None:
        log.info("no checkpoint at %s: training from scratch", describe(volume.checkpoint))
        state = TrainingState.fresh(recipe, device)
    else:
        state = TrainingState.restore(source, device)
        if world.is_main:
            _tell_what_differs(state.recipe, recipe, explicit, source.state.world_size, world.size)
        if progress:
            log.info("continuing epoch %d at step %d from %s", state.epoch + 1, state.step, describe(volume.progress))
            if state.feedback is not None and state.step and world.is_main:
                log.info("feedback: epoch %d goes on with the %d accepted samples it began with (share %g); what "
                         "was reviewed since takes effect at the next epoch", state.epoch + 1, len(state.feedback),
                         state.feedback.share)
        else:
            log.info("resuming from %s (epoch %d)", describe(volume.checkpoint), state.epoch)
    state.world_size = world.size
    return state


def _tell_what_differs(kept: Recipe, asked: Recipe, explicit: frozenset, saved_world: Optional[int],
                       world_size: int) -> None:
    flags = {field: "--" + name.replace("_", "-") for name, field in RECIPE_FIELDS.items()}
    ignored = [f"{flags[k]} {getattr(asked, k)} (the checkpoint's: {getattr(kept, k)})"
               for k in sorted(explicit) if getattr(kept, k) != getattr(asked, k)]
    if ignored:
        log.warning("resuming with the checkpoint's hyper-parameters; ignoring %s (--fresh starts over)",
                    ", ".join(ignored))
    if saved_world is not None and saved_world != world_size:  # (format 1 does not say)
        log.warning("resuming training of %d process(es) with %d: the epoch will not be bit-identical to an "
                    "uninterrupted run (BatchNorm normalises each process's slice of the batch)", saved_world,
                    world_size)


def _load_progress(volume: Volume, saved: Optional[checkpoint.Checkpoint]) -> Optional[checkpoint.Checkpoint]:
    """The interrupted epoch that continues `saved`, or None. Progress that does not is set aside, never lost."""
    if not os.path.lexists(volume.progress):
        return None
    try:
        progress = checkpoint.read(volume.progress)
    except PipelineError as exc:
        set_aside(volume.progress, f"it does not load ({exc})")
        return None
    expected = saved.epoch if saved else 0
    if progress.epoch == expected:
        return progress
    relation = "an earlier" if progress.epoch < expected else "a later"
    set_aside(volume.progress, f"it continues epoch {progress.epoch}, {relation} one than the checkpoint's "
                                f"epoch {expected}")
    return None


def move_aside(volume: Volume) -> None:
    """--fresh: keep the old files under a dated name rather than deleting them."""
    for path in (volume.checkpoint, volume.progress, volume.history):
        if path.exists():
            set_aside(path, "--fresh starts over")


def set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.aside")
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise PipelineError(f"cannot move {path} aside: {exc.strerror}; check the volume") from None
    log.warning("moved %s aside to %s: %s", path.name, aside.name, why)
