"""train: resume from the volume's checkpoint, train more epochs, save atomically.

Resuming is exact: the data order and the learning rate are pure functions of (seed, epoch, step)
and the epoch's frozen feedback set, and the rest of the state (weights, BatchNorm statistics,
optimizer moments, RNG, that set) is in the checkpoint. So two one-epoch runs give the same weights
as one two-epoch run, and an epoch cut short by SIGTERM and finished later equals an uninterrupted
one. Assumed: the same device type, thread count and torch build on each run (float sums are grouped
per thread and per kernel; runtime.setup makes CUDA's kernels deterministic), and under torchrun the
same world size.

  optimizer.py  the schedule, the data order
  mix.py        the accepted feedback each epoch mixes in
  sgd.py        the optimizer: torch's SGD arithmetic, an adapter
  resume.py     where training starts, the state a checkpoint holds
  cuda.py       warm-up and the CUDA graph
  loop.py       the steps and the saves
"""

from __future__ import annotations

import contextlib

from mnist_pipeline import data, distributed, runtime
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import history
from mnist_pipeline.settings import TrainConfig
from mnist_pipeline.storage.atomic import remove_dead_temps
from mnist_pipeline.storage.locks import exclusive_lock
from mnist_pipeline.train import cuda, resume
from mnist_pipeline.train.loop import TrainResult, train
from mnist_pipeline.train.optimizer import epoch_order, learning_rate
from mnist_pipeline.train.sgd import NesterovSGD
from mnist_pipeline.volume import Volume

__all__ = ["run", "TrainResult", "NesterovSGD", "epoch_order", "learning_rate"]


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
                if world.size > 1:  # in one process, cli.main holds it from before torch loads
                    held.enter_context(exclusive_lock(volume, "train"))
                for folder in (volume.model_dir, volume.data_dir):
                    remove_dead_temps(folder)  # left by a kill -9 mid-write, whatever their age
                if config.fresh:
                    resume.move_aside(volume)
                history.set_aside_unreadable(volume, resume.set_aside)
            state = resume.starting_point(volume, config.recipe, config.explicit, device, world)
            warm_up = cuda.start_warm_up(state.model, state.recipe)
            train_set = data.load_split(volume.data_dir, "train", config.mirror)
            # the test files too: evaluate and infer may run without network
            data.ensure(volume.data_dir, config.mirror, splits=("test",))
            cuda.finish_warm_up(warm_up)
            distributed.check_batch_size(state.recipe.batch_size, world.size, resumed=state.resumed)
        return train(volume, config, state, train_set, device, world)
