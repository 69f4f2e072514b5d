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
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from mnist_pipeline import limits
from mnist_pipeline.errors import BelowThreshold, NotEvaluated, PipelineError
from mnist_pipeline.errors import first_line as _first_line
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.volume import Volume, atomic_write_bytes

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
    problem = _state_problem(state)
    if problem:
        raise checkpoint.invalid(problem)
    return Checkpoint(path=path, sha256=checkpoint.sha256, state=state)


def evaluated(volume: Volume, threshold: float) -> Tuple[Checkpoint, Dict[str, Any]]:
    """The gate of infer, predict and serve: the current checkpoint with its own evaluation, above `threshold`.

    Raises NotEvaluated (saying what to run) while the checkpoint or its evaluation is missing or
    the evaluation is of an older checkpoint, BelowThreshold when its accuracy does not pass, and
    PipelineError for a checkpoint that does not load.
    """
    if not volume.checkpoint.exists():
        raise NotEvaluated(f"no checkpoint at {volume.checkpoint} yet: run `mnist train`, then `mnist evaluate`")
    saved = load(volume.checkpoint)
    try:
        evaluation = json.loads(volume.eval_results.read_text())
        evaluated_sha256 = evaluation["checkpoint"]["sha256"]
        accuracy = float(evaluation["accuracy"])
    except FileNotFoundError:
        raise NotEvaluated(f"no {volume.eval_results} yet: run `mnist evaluate`") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise NotEvaluated(f"{volume.eval_results} is unreadable: run `mnist evaluate` to write it again") from None
    if evaluated_sha256 != saved.sha256:
        raise NotEvaluated(
            f"{volume.eval_results} belongs to an older checkpoint than {volume.checkpoint} "
            f"(epoch {saved.epoch}): run `mnist evaluate`"
        )
    if not accuracy > threshold:
        raise BelowThreshold(
            f"accuracy {accuracy:.4f} of epoch {saved.epoch} is not above the threshold {threshold}: "
            f"train more (`mnist train`, then `mnist evaluate`) or lower --threshold"
        )
    return saved, evaluation


def _state_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the plain values of a checkpoint (the weights are checked by build_model)."""
    if state["epoch"] < 0 or state["step"] < 0:
        return f"its epoch {state['epoch']} or step {state['step']} is negative"
    if not math.isfinite(state["loss_sum"]):
        return f"its loss_sum {state['loss_sum']} is not finite"
    rng, expected = state["rng"], torch.get_rng_state()
    if rng.dtype != expected.dtype or rng.shape != expected.shape:
        return f"its rng is a {rng.dtype} tensor of shape {list(rng.shape)}, not torch's CPU generator state"
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and not (isinstance(cuda_rng, torch.Tensor) and cuda_rng.dtype == torch.uint8
                                     and cuda_rng.dim() == 1):
        return "its cuda_rng is not a GPU generator state (a 1-D uint8 tensor)"
    try:
        limits.check_train_config(state["train_config"])
    except ValueError as exc:
        return str(exc)
    return None
