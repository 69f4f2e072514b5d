"""Each stage's settings: one frozen dataclass per stage, built at the CLI edge. Every default is written
here, once: cli.py reads its flags' defaults from these fields, the README table and the Compose file
are checked against the flags (tests/test_cli.py).

No torch here: the CLI builds its parser and answers `--help` and usage errors before torch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

DEFAULT_ROOT = Path("mnist-volume")  # beside where you run it, named after the Compose volume
NPROC_PER_NODE = 1  # train's processes: one, no torchrun

# defaults that several stages share (None, where a field has it, means "not set")
DEVICE = "auto"  # CUDA when torch sees a GPU
WAIT_S = 30.0  # for the input, longer while its producer still runs
GRACE_S = 5.0  # see volume.wait_for
THRESHOLD = 0.95  # the gate: accuracy a checkpoint must exceed to be used


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters. Saved in the checkpoint; a resumed run keeps the saved ones."""

    seed: int = 0
    # the same on every device: 256 and 512 lose accuracy in one epoch (README, Speed and size); a GPU
    # makes 128 fast by replaying each step's kernels as one CUDA graph instead
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
    device: str = DEVICE
    threads: Optional[int] = None
    save_every_s: float = 60.0  # progress saved this often mid-epoch, so a kill -9 loses at most this much; 0: never
    progress_every_s: float = 10.0  # plain progress lines when stderr is no terminal


@dataclass(frozen=True)
class EvaluateConfig:
    root: Path
    mirror: Optional[str] = None
    wait_s: float = WAIT_S
    grace_s: float = GRACE_S
    device: str = DEVICE
    threads: Optional[int] = None


@dataclass(frozen=True)
class InferConfig:
    root: Path
    mirror: Optional[str] = None
    wait_s: float = WAIT_S
    grace_s: float = GRACE_S
    threshold: float = THRESHOLD
    count: int = 5
    seed: Optional[int] = None  # None: a different pick every run
    device: str = DEVICE
    threads: Optional[int] = None


@dataclass(frozen=True)
class ReportConfig:
    root: Path
    mirror: Optional[str] = None


@dataclass(frozen=True)
class PredictConfig:
    root: Path
    images: Tuple[Path, ...]
    threshold: float = THRESHOLD
    device: str = DEVICE
    threads: Optional[int] = None


@dataclass(frozen=True)
class ServeConfig:
    root: Path
    threshold: float = THRESHOLD
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = DEVICE
    threads: Optional[int] = None  # None: one per request (serve.py)
    # what a client may hold (serve.py's docstring): connections at once, the first to go when full
    # being the one idle longest; images decoded at once (None: the CPUs this process may use) and
    # requests waiting for that (more: 503); seconds a request's head or body may stall, and an idle
    # connection may stay open after an answer
    max_connections: int = 1000
    max_decodes: Optional[int] = None
    max_waiting: int = 64
    read_timeout: float = 10.0
    keep_alive: float = 5.0


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of dataclass `config` (the CLI's flags take theirs from here)."""
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is dataclasses.MISSING:
                raise TypeError(f"{config.__name__}.{name} has no default")
            return field.default
    raise TypeError(f"{config.__name__} has no field {name!r}")
