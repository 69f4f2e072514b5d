"""model/mnist_cnn.pt and model/train_progress.pt: checkpoints, read with weights_only=True and validated.

A checkpoint is a dict of tensors and plain values only, so the safe loader reads it and a crafted
pickle cannot run code:
  format_version  int, FORMAT_VERSION
  architecture    the network's name in model.ARCHITECTURES (format 2; format 1 is always mnist_cnn)
  model_config    its constructor's arguments
  model           its state_dict
  epoch           completed epochs
  step            batches done in the epoch after `epoch` (0 in mnist_cnn.pt; more in
                  train_progress.pt, an interrupted epoch)
  loss_sum        summed batch losses of those steps
  optimizer       the optimizer's state_dict
  rng             torch's CPU generator state (dropout-free today, but any randomness added later
                  resumes exactly)
  cuda_rng        the GPU's generator state; only in checkpoints of a CUDA run
  train_config    the training hyper-parameters, seed included (the data order and learning rate
                  are pure functions of them, epoch and step)
  world_size      the processes that trained it together (format 2; resume is exact at the same)
  feedback        only where the epoch mixed in accepted feedback (train/mix.py): the frozen set's ids (sorted)
                  and digest, the share asked for and the draws made of them (`epoch`'s epoch in mnist_cnn.pt,
                  the interrupted one in train_progress.pt)
  feedback_pixels with it: the set's images, uint8 [n, 28, 28], and feedback_labels, int64 [n]: a resumed
                  epoch trains on them whatever feedback/ holds by then

torch is imported where a checkpoint is loaded or saved: the registry and the gate (versions.py,
aliases.py) import this module in serve's slim image, which has no torch, for its limits and types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Literal, Optional, get_type_hints

from typing_extensions import NotRequired, TypedDict

from mnist_pipeline import limits
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.records import _json as j
from mnist_pipeline.settings import Recipe
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.storage.files import NotReadable, describe, read_regular

FORMAT_VERSION = 2
MAX_BYTES = 256 * 1024 * 1024  # far above any network here: a larger file is not a checkpoint of ours
MAX_EPOCH = 10**6
MAX_FEEDBACK = 100_000  # accepted samples one epoch mixes in, at most: their pixels stay far below MAX_BYTES
MAX_DRAWS = limits.TRAIN_IMAGES  # the draws of a share of limits.MAX_FEEDBACK_SHARE
REQUIRED = {
    "format_version": int,
    "epoch": int,
    "step": int,
    "loss_sum": float,
    "model": dict,
    "model_config": dict,
    "optimizer": dict,
    "rng": None,  # torch.Tensor (torch is imported when a checkpoint is read)
    "train_config": dict,
}

if TYPE_CHECKING:
    from torch import nn

# the training config as a checkpoint holds it: Recipe's fields, every one of them saved
TrainConfig = TypedDict("TrainConfig", get_type_hints(Recipe))  # type: ignore[misc]


class Feedback(TypedDict):
    """The accepted feedback an epoch mixed in (its images and labels are tensors beside it)."""

    __pydantic_config__ = j.STRICT
    ids: j.List(j.Sha256, MAX_FEEDBACK)  # the samples, in id order (feedback/<id>.json)
    digest: j.Sha256  # of the ids: records.feedback.Accepted.digest
    share: j.Number(0, limits.MAX_FEEDBACK_SHARE)  # --feedback-share of the epoch
    draws: j.Whole(1, MAX_DRAWS)  # feedback examples among the epoch's, cycling through the ids


class Metadata(TypedDict):
    """The plain values of a checkpoint beside its tensors (model, optimizer, rng, cuda_rng; feedback_pixels and
    feedback_labels with feedback): its JSON Schema describes them for other tools. `read` checks them, with the
    ranges that need torch or the recipe."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[FORMAT_VERSION]
    architecture: j.Text(40)  # the network's name in model.ARCHITECTURES
    epoch: j.Whole(0, MAX_EPOCH)  # completed epochs
    step: j.Whole(0, limits.TRAIN_IMAGES + MAX_DRAWS - 1)  # batches done in the epoch after `epoch`
    loss_sum: j.Number(0)  # summed batch losses of those steps
    model_config: Dict[str, Any]  # the network's constructor arguments
    train_config: TrainConfig
    world_size: NotRequired[j.Whole(1)]  # the processes that trained it together
    feedback: NotRequired[Feedback]  # the accepted feedback the epoch mixed in, if any


# the rest of a checkpoint: what Metadata leaves out
TENSORS = ("model", "optimizer", "rng", "cuda_rng", "feedback_pixels", "feedback_labels")


@dataclass(frozen=True)
class State:
    """What a checkpoint holds, as FORMAT_VERSION has it (the module's docstring says what each is)."""

    epoch: int
    step: int
    loss_sum: float
    architecture: str
    model: Dict[str, Any]  # the network's state_dict
    model_config: Dict[str, Any]
    optimizer: Dict[str, Any]  # the optimizer's state_dict
    rng: Any  # a torch.Tensor
    train_config: Recipe  # (a dict in the file)
    world_size: Optional[int] = None  # (format 1 does not say)
    cuda_rng: Any = None  # (a CUDA run's only)
    feedback: Optional[Dict[str, Any]] = None  # Feedback (an epoch without feedback: none of the three)
    feedback_pixels: Any = None  # a torch.Tensor
    feedback_labels: Any = None  # a torch.Tensor

    def to_dict(self) -> Dict[str, Any]:
        """The dict the file holds (the fields that are set, in this order)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["train_config"] = dataclasses.asdict(self.train_config)
        return {"format_version": FORMAT_VERSION, **{k: v for k, v in values.items() if v is not None}}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str  # of the file's bytes: ties an evaluation to the exact model evaluated
    state: State  # whatever format the file was in

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def build_model(self) -> nn.Module:
        """The network with these weights, or a PipelineError if they do not fit it."""
        from mnist_pipeline import model

        try:
            network = model.build(self.state.architecture, self.state.model_config)
            network.load_state_dict(self.state.model)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise self.invalid(f"its weights do not fit this version's network ({first_line(exc)})") from None
        return network

    def invalid(self, why: str) -> PipelineError:
        return invalid(self.path, why)


def invalid(path: Path, why: str) -> PipelineError:
    return PipelineError(f"{describe(path)} is not a usable checkpoint: {why}; "
                         f"`mnist train --fresh` moves it aside and trains from scratch")


def write(path: Path, state: State, fault_point: Optional[str] = None) -> None:
    """`state` saved atomically as FORMAT_VERSION."""
    import torch

    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue(), fault_point)


def read(path: Path) -> Checkpoint:
    """Read, hash and validate `path`: the hash is of the bytes loaded. FileNotFoundError if it is missing."""
    import torch

    data = _bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle untrusted bytes is bad input
        raise invalid(path, f"it does not load safely ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise invalid(path, f"it holds a {type(state).__name__}, not a dict")
    for key, kind in REQUIRED.items():
        kind = torch.Tensor if kind is None else kind
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise invalid(path, f"its '{key}' is missing or not a {kind.__name__}")
    state = _upgrade(state)
    problem = _state_problem(state)
    if problem:
        raise invalid(path, problem)
    values = {f.name: state.get(f.name) for f in dataclasses.fields(State)}
    values["train_config"] = Recipe(**state["train_config"])
    return Checkpoint(path=path, sha256=sha256, state=State(**values))


def sha256_of(path: Path) -> str:
    """The sha256 of the checkpoint file at `path`, without loading it (no torch); FileNotFoundError if missing."""
    return hashlib.sha256(_bytes(path)).hexdigest()


def _bytes(path: Path) -> bytes:
    try:
        return read_regular(path, MAX_BYTES, "checkpoint")
    except NotReadable as exc:
        raise invalid(path, f"it {exc.reason}") from None


def _upgrade(state: Dict[str, Any]) -> Dict[str, Any]:
    """The state as FORMAT_VERSION has it. Format 1 knew one network, which it did not name; its first files
    have no max_steps (there was no step limit: every epoch whole) and a label_smoothing that was always 0."""
    if state["format_version"] == 1:
        config = {"max_steps": 0, **state["train_config"]}
        if config.get("label_smoothing") == 0.0:
            del config["label_smoothing"]
        state = {**state, "format_version": 2, "architecture": "mnist_cnn", "train_config": config}
    return state


def _state_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the plain values of a checkpoint (the weights are checked by build_model)."""
    import torch

    from mnist_pipeline import model

    if state["format_version"] != FORMAT_VERSION:
        return f"format_version {state['format_version']} is not one this version reads (1 to {FORMAT_VERSION})"
    if "first_kernel" in state["model_config"]:  # format 1's very first network: other layers, other names
        return "its network is the first release's (a model_config with first_kernel), which this version cannot build"
    if state.get("architecture") not in model.ARCHITECTURES:
        return (f"its architecture {str(state.get('architecture'))[:40]!r} is not one this version knows "
                f"({', '.join(model.ARCHITECTURES)})")
    if not (0 <= state["epoch"] <= MAX_EPOCH and state["step"] >= 0):
        return f"its epoch {state['epoch']} or step {state['step']} is negative or out of range"
    world_size = state.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        return f"its world_size {str(world_size)[:20]!r} is not a number of processes"
    if not (math.isfinite(state["loss_sum"]) and state["loss_sum"] >= 0):
        return f"its loss_sum {state['loss_sum']} is not a finite sum of losses (0 or more)"
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
    try:
        recipe = Recipe(**state["train_config"])
    except TypeError as exc:
        return f"its train_config does not fit this version ({exc})"
    problem = _feedback_problem(state)
    if problem:
        return problem
    # an epoch's examples: MNIST's, and as many again as it drew from feedback
    steps = recipe.steps_per_epoch(limits.TRAIN_IMAGES + (state["feedback"]["draws"] if state.get("feedback") else 0))
    if state["step"] >= steps:  # (a progress file's step is within its epoch; a checkpoint's is 0)
        return (f"its step {state['step']} is past the end of an epoch, {steps} steps at its batch size "
                f"{state['train_config']['batch_size']}")
    return None


def _feedback_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the feedback set a checkpoint holds (each image must still hash to its id), if any."""
    import torch

    from mnist_pipeline.contract import IMAGE_SIZE, NUM_CLASSES
    from mnist_pipeline.records import feedback

    present = [key for key in ("feedback", "feedback_pixels", "feedback_labels") if state.get(key) is not None]
    if not present:
        return None
    if len(present) < 3:
        return f"it has {', '.join(present)} without the rest of feedback, feedback_pixels and feedback_labels"
    try:
        record = j.check(Feedback, state["feedback"])
    except j.Invalid as exc:
        return f"its feedback record is not valid: {exc}"
    ids, pixels, labels = record["ids"], state["feedback_pixels"], state["feedback_labels"]
    n = len(ids)
    if not (_dense(pixels) and pixels.dtype == torch.uint8 and tuple(pixels.shape) == (n, IMAGE_SIZE, IMAGE_SIZE)):
        return f"its feedback_pixels are not {n} images of {IMAGE_SIZE}x{IMAGE_SIZE} uint8 pixels"
    if not (_dense(labels) and labels.dtype == torch.int64 and tuple(labels.shape) == (n,)
            and bool(((labels >= 0) & (labels < NUM_CLASSES)).all())):
        return f"its feedback_labels are not {n} digits (int64)"
    if n == 0 or list(ids) != sorted(set(ids)):
        return "its feedback ids are not one or more distinct ids in order"
    kept = feedback.Accepted(ids=tuple(ids), pixels=pixels.contiguous().numpy().tobytes(),
                             labels=tuple(labels.tolist()))
    if kept.digest != record["digest"]:
        return "its feedback digest is not that of its ids"
    size = IMAGE_SIZE * IMAGE_SIZE
    for i, sid in enumerate(ids):
        if feedback.sample_id(kept.pixels[i * size:(i + 1) * size], kept.labels[i]) != sid:
            return f"its feedback sample {sid[:12]}'s image and label do not hash to its id"
    return None


def _dense(value: Any) -> bool:
    """A plain CPU tensor: the safe loader also gives sparse, quantized and meta ones, on which reading values fails."""
    import torch

    return (isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == "cpu"
            and not value.is_quantized)
