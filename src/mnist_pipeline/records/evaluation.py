"""model/eval_results.json: the test scores of one checkpoint (File says what the file holds), and the gate that
uses them. Format 1 has no format_version and also had its checkpoint's path; its first files have no mistakes.
Format 3 adds the scores on the accepted held-out feedback (records/feedback.py); an evaluation without any is
written as format 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

from typing_extensions import NotRequired, TypedDict

from mnist_pipeline.errors import BelowThreshold, NotEvaluated, PipelineError
from mnist_pipeline.records import _json as j
from mnist_pipeline.records import checkpoint as checkpoints
from mnist_pipeline.storage.files import describe
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 3
WITHOUT_FEEDBACK = 2  # the format of an evaluation without a feedback block
MAX_IMAGES = j.MAX_IMAGES
MAX_SAMPLES = 10**9  # held-out feedback samples
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


class FeedbackScored(TypedDict):
    """A held-out feedback sample the model got wrong: its id (feedback/<id>.png is its image) and score."""

    id: j.Sha256
    label: j.Whole(0, 9)
    predicted: j.Whole(0, 9)
    confidence: j.Fraction


class FeedbackBlock(TypedDict):
    """The scores on the accepted held-out feedback samples (format 3 only)."""

    digest: j.Sha256  # of the set scored (records/feedback.Accepted.digest): equal digests, equal sets
    total: j.Whole(1, MAX_SAMPLES)
    correct: j.Whole(0, MAX_SAMPLES)
    accuracy: j.Fraction  # correct / total
    confusion_matrix: j.List(j.List(j.Whole(0, MAX_SAMPLES), length=10), length=10)  # rows: the true digit
    mistakes: j.List(FeedbackScored, MAX_IMAGES)  # the most confident mistakes, surest first


PerClass = TypedDict("PerClass", {str(d): j.Fraction for d in range(10)})  # (digits are not names)


class File(TypedDict):
    """model/eval_results.json: the test scores of one checkpoint."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[WITHOUT_FEEDBACK, FORMAT_VERSION]
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
    feedback: NotRequired[FeedbackBlock]  # format 3: there, format 2: absent


@dataclass(frozen=True)
class Mistake:
    test_index: int
    label: int
    predicted: int
    confidence: float


@dataclass(frozen=True)
class FeedbackMistake:
    id: str
    label: int
    predicted: int
    confidence: float


@dataclass(frozen=True)
class FeedbackFigures:
    """How many of the accepted held-out feedback set `digest` names a checkpoint reads right: what promotion
    compares and a version keeps."""

    digest: str
    total: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def to_json(self) -> Dict[str, Any]:
        return {"digest": self.digest, "total": self.total, "correct": self.correct, "accuracy": self.accuracy}

    @classmethod
    def parse(cls, values: Dict[str, Any], at: str = "feedback.") -> "FeedbackFigures":
        """From checked values; Invalid when accuracy is not correct / total."""
        total, correct = values["total"], values["correct"]
        if correct > total or abs(values["accuracy"] - correct / total) > 1e-9:
            raise j.Invalid(f"{at}accuracy {values['accuracy']} is not correct / total ({correct} / {total})")
        return cls(digest=values["digest"], total=total, correct=correct)


@dataclass(frozen=True)
class FeedbackScores:
    """How a checkpoint reads the accepted held-out feedback: the figures, the confusion, the mistakes."""

    figures: FeedbackFigures
    confusion_matrix: Tuple[Tuple[int, ...], ...]  # rows: the true digit
    mistakes: Tuple[FeedbackMistake, ...]  # the most confident first

    def to_json(self) -> Dict[str, Any]:
        return {**self.figures.to_json(), "confusion_matrix": [list(row) for row in self.confusion_matrix],
                "mistakes": [dataclasses.asdict(m) for m in self.mistakes]}


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
    feedback: Optional[FeedbackScores] = None  # None: no accepted held-out feedback when it was scored

    def passes(self, threshold: float) -> bool:
        return self.accuracy > threshold

    def to_json(self) -> Dict[str, Any]:
        record = {
            "format_version": FORMAT_VERSION if self.feedback else WITHOUT_FEEDBACK,
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
        if self.feedback:
            record["feedback"] = self.feedback.to_json()
        return record


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
    found = j.version(record, FORMAT_VERSION)
    if found == 1:  # the same as format 2 but for the checkpoint's `path` (unread); its first files have no mistakes
        record = {**FORMAT_1_DEFAULTS, **record, "format_version": WITHOUT_FEEDBACK}
    if found < FORMAT_VERSION and "feedback" in record:
        raise j.Invalid(f"it has feedback scores, which format {found} does not have: its format_version is 3")
    values = j.check(File, record)
    if found == FORMAT_VERSION and "feedback" not in values:
        raise j.Invalid("it has no 'feedback' (format 3 has it; an evaluation without feedback is format 2)")
    total, correct, matrix = values["total"], values["correct"], tuple(map(tuple, values["confusion_matrix"]))
    _check_counts(values["accuracy"], correct, total, matrix, "")
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
        feedback=_feedback(values["feedback"]) if "feedback" in values else None,
    )


def _feedback(values: Dict[str, Any]) -> FeedbackScores:
    figures = FeedbackFigures.parse(values)
    total, correct, matrix = figures.total, figures.correct, tuple(map(tuple, values["confusion_matrix"]))
    _check_counts(values["accuracy"], correct, total, matrix, "feedback.")
    mistakes = tuple(FeedbackMistake(**entry) for entry in values["mistakes"])
    for k, mistake in enumerate(mistakes):
        if mistake.label == mistake.predicted:
            raise j.Invalid(f"feedback.mistakes[{k}] predicted its own label {mistake.label}: not a mistake")
    if len(mistakes) > total - correct:
        raise j.Invalid(f"feedback.mistakes lists {len(mistakes)}, more than the {total - correct} wrong")
    return FeedbackScores(figures=figures, confusion_matrix=matrix, mistakes=mistakes)


def _check_counts(accuracy: float, correct: int, total: int, matrix: Tuple[Tuple[int, ...], ...], at: str) -> None:
    if abs(accuracy - correct / total) > 1e-9:
        raise j.Invalid(f"{at}accuracy {accuracy} is not correct / total ({correct} / {total})")
    if sum(map(sum, matrix)) != total or sum(matrix[d][d] for d in range(10)) != correct:
        raise j.Invalid(f"{at}confusion_matrix does not add up to total and its diagonal to correct")


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
