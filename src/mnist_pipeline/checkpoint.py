"""Checkpoints: saved atomically, loaded with weights_only=True and validated.

A checkpoint is a dict of tensors and plain values only, so the safe loader
reads it and a crafted pickle cannot run code:
  format_version  int, FORMAT_VERSION
  epoch           completed epochs
  step            batches done in the epoch after `epoch` (0 in mnist_cnn.pt;
                  more in train_progress.pt, an interrupted epoch)
  loss_sum        summed batch losses of those steps
  model           the model's state_dict
  model_config    MnistCNN's constructor arguments
  optimizer       the optimizer's state_dict
  rng             torch's CPU generator state (dropout-free today, but any
                  randomness added later resumes exactly)
  cuda_rng        the GPU's generator state; only in checkpoints of a CUDA run
  train_config    the training hyper-parameters, seed included (the data order
                  and learning rate are pure functions of them, epoch and step)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.volume import atomic_write_bytes

FORMAT_VERSION = 1
REQUIRED = {
    "format_version": int,
    "epoch": int,
    "step": int,
    "loss_sum": float,
    "model": dict,
    "model_config": dict,
    "optimizer": dict,
    "rng": torch.Tensor,
    "train_config": dict,
}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str  # of the file's bytes: ties eval results to the exact model evaluated
    state: Dict[str, Any]

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    def build_model(self) -> MnistCNN:
        """The network with these weights, or a PipelineError if they do not fit it."""
        try:
            model = MnistCNN(**self.state["model_config"])
            model.load_state_dict(self.state["model"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise self.invalid(f"its weights do not fit this version's network ({_first_line(exc)})") from None
        return model

    def invalid(self, why: str) -> PipelineError:
        return PipelineError(
            f"{self.path} is not a usable checkpoint: {why}; "
            f"`mnist train --fresh` moves it aside and trains from scratch"
        )


def save(path: Path, state: Dict[str, Any], fault_point: Optional[str] = None) -> None:
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), fault_point)


def load(path: Path) -> Checkpoint:
    """Read, hash and validate `path`. The file is read once, so the hash is of what was loaded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}") from None
    checkpoint = Checkpoint(path=path, sha256=hashlib.sha256(data).hexdigest(), state={})
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle untrusted bytes is bad input
        raise checkpoint.invalid(f"it does not load safely ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise checkpoint.invalid(f"it holds a {type(state).__name__}, not a dict")
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise checkpoint.invalid(f"its '{key}' is missing or not a {kind.__name__}")
    if state["format_version"] != FORMAT_VERSION:
        raise checkpoint.invalid(
            f"format_version {state['format_version']} is not {FORMAT_VERSION}, the one this version reads"
        )
    return Checkpoint(path=path, sha256=checkpoint.sha256, state=state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."
