"""model/eval_results.json: the test scores of one checkpoint (File says what the file holds), and the gate that
uses them. Format 1 has no format_version and also had its checkpoint's path; its first files have no mistakes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Literal, Tuple

from typing_extensions import TypedDict

from mnist_pipeline.errors import BelowThreshold, NotEvaluated, PipelineError
from mnist_pipeline.records import _json as j
from mnist_pipeline.records import checkpoint as checkpoints
from mnist_pipeline.storage.files import describe
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 2
MAX_IMAGES = j.MAX_IMAGES
FIX = "run `mnist evaluate` to write it again"
FORMAT_1_DEFAULTS = {"mistakes": [], "compute_seconds": 0.0, "device": "?", "evaluated_at": "?"}


class ScoredImage(TypedDict):
    """A test image's place and score, as evaluate's mistakes and infer's predictions give them."""

    test_index: j.Whole(0, MAX_IMAGES - 1)
    label: j.Whole(0, 9)
    predicted: j.Whole(0, 9)
    confidence: j.Fraction


class CheckpointScored(TypedDict):
    sha256: j.Sha256  # of the checkpoint file's bytes
    epoch: j.Whole(0, checkpoints.MAX_EPOCH)


PerClass = TypedDict("PerClass", {str(d): j.Fraction for d in range(10)})  # (digits are not names)


class File(TypedDict):
    """model/eval_results.json: the test scores of one checkpoint."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[FORMAT_VERSION]
    total: j.Whole(1, MAX_IMAGES)  # (checked in this order: the first field amiss is the one named)
    correct: j.Whole(0, MAX_IMAGES)
    accuracy: j.Fraction  # correct / total
    confusion_matrix: j.List(j.List(j.Whole(0, MAX_IMAGES), length=10), length=10)  # rows: the true digit
    per_class_accuracy: PerClass  # {"0": ..., "9": ...}: each row's share that is right
    mistakes: j.List(ScoredImage, MAX_IMAGES)  # the most confident mistakes, surest first
    checkpoint: CheckpointScored  # the checkpoint scored
    test_loss: j.Number(0)  # mean cross-entropy over the test images
    compute_seconds: j.Number(0)  # with device and evaluated_at: how and when
    device: j.Text(40)
    evaluated_at: j.Text(40)


@dataclass(frozen=True)
class Mistake:
    test_index: int
    label: int
    predicted: int
    confidence: float


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    test_loss: float
    correct: int
    total: int
    per_class_accuracy: Tuple[float, ...]  # digit 0 to 9
    confusion_matrix: Tuple[Tuple[int, ...], ...]
    mistakes: Tuple[Mistake, ...]
    sha256: str  # of the checkpoint scored
    epoch: int
    compute_seconds: float
    device: str
    evaluated_at: str

    def passes(self, threshold: float) -> bool:
        return self.accuracy > threshold

    def to_json(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "accuracy": self.accuracy,
            "test_loss": self.test_loss,
            "correct": self.correct,
            "total": self.total,
            "per_class_accuracy": {str(d): a for d, a in enumerate(self.per_class_accuracy)},
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "mistakes": [dataclasses.asdict(m) for m in self.mistakes],
            "checkpoint": {"sha256": self.sha256, "epoch": self.epoch},
            "compute_seconds": self.compute_seconds,
            "device": self.device,
            "evaluated_at": self.evaluated_at,
        }


def write(volume: Volume, evaluation: Evaluation) -> None:
    j.dump(volume.eval_results, evaluation.to_json(), fault_point="eval-before-rename")


def read(volume: Volume) -> Evaluation:
    """The evaluation on the volume; FileNotFoundError if there is none, PipelineError if it is malformed."""
    path = volume.eval_results
    try:
        return parse(j.load(path, "evaluation"))
    except j.Invalid as exc:
        raise j.problem(path, exc, FIX) from None


def parse(record: Any) -> Evaluation:
    """The evaluation in a file's JSON value, any format; Invalid saying what is wrong."""
    if j.version(record, FORMAT_VERSION) == 1:  # the same but for the checkpoint's `path` (unread); its first
        record = {**FORMAT_1_DEFAULTS, **record, "format_version": FORMAT_VERSION}  # files have no mistakes
    values = j.check(File, record)
    total, correct, matrix = values["total"], values["correct"], tuple(map(tuple, values["confusion_matrix"]))
    if abs(values["accuracy"] - correct / total) > 1e-9:
        raise j.Invalid(f"accuracy {values['accuracy']} is not correct / total ({correct} / {total})")
    if sum(map(sum, matrix)) != total or sum(matrix[d][d] for d in range(10)) != correct:
        raise j.Invalid("confusion_matrix does not add up to total and its diagonal to correct")
    per_class_accuracy = tuple(values["per_class_accuracy"][str(d)] for d in range(10))
    for d, share in enumerate(per_class_accuracy):
        right = matrix[d][d] / max(1, sum(matrix[d]))
        if abs(share - right) > 1e-6:  # (written rounded to 6 digits)
            raise j.Invalid(f"per_class_accuracy[{d}] is {share}, not the share confusion_matrix gives ({right:.6f})")
    mistakes = tuple(Mistake(**entry) for entry in values["mistakes"])
    for k, mistake in enumerate(mistakes):
        if mistake.label == mistake.predicted:
            raise j.Invalid(f"mistakes[{k}] predicted its own label {mistake.label}: not a mistake")
        if mistake.test_index >= total:
            raise j.Invalid(f"mistakes[{k}].test_index is {mistake.test_index}, not one of the {total} images")
    return Evaluation(
        accuracy=values["accuracy"], test_loss=values["test_loss"], correct=correct, total=total,
        per_class_accuracy=per_class_accuracy, confusion_matrix=matrix, mistakes=mistakes,
        sha256=values["checkpoint"]["sha256"], epoch=values["checkpoint"]["epoch"],
        compute_seconds=values["compute_seconds"], device=values["device"], evaluated_at=values["evaluated_at"],
    )


def evaluated(volume: Volume, threshold: float) -> Tuple[checkpoints.Checkpoint, Evaluation]:
    """The gate of infer, predict and serve: the current checkpoint with its own evaluation, above `threshold`.

    Raises NotEvaluated (saying what to run) while the checkpoint or its evaluation is missing or the
    evaluation is of another checkpoint, BelowThreshold when its accuracy does not pass, and
    PipelineError for a file that does not read.
    """
    try:
        saved = checkpoints.read(volume.checkpoint)
    except FileNotFoundError:
        raise NotEvaluated(f"no checkpoint at {describe(volume.checkpoint)} yet: run `mnist train`, "
                           f"then `mnist evaluate`") from None
    try:
        evaluation = read(volume)
    except FileNotFoundError:
        raise NotEvaluated(f"no {describe(volume.eval_results)} yet: run `mnist evaluate`") from None
    if evaluation.sha256 != saved.sha256:
        raise NotEvaluated(f"{describe(volume.eval_results)} belongs to an older checkpoint than "
                           f"{describe(volume.checkpoint)} (epoch {saved.epoch}): run `mnist evaluate`")
    if not evaluation.passes(threshold):
        raise BelowThreshold(
            f"accuracy {evaluation.accuracy:.4f} of epoch {saved.epoch} is not above the threshold {threshold}: "
            f"train more (`mnist train`, then `mnist evaluate`) or lower --threshold"
        )
    return saved, evaluation


def is_of(volume: Volume, sha256: str) -> bool:
    """Whether the volume's evaluation is a valid one of the checkpoint with this sha256."""
    try:
        return read(volume).sha256 == sha256
    except (FileNotFoundError, PipelineError):
        return False
