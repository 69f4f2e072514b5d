"""model/history.jsonl: the training history, one JSON record a line, for the report's curves.

  {"kind": "step", "epoch": 1, "step": 10, "loss": 0.53, "lr": 0.08}                  Point
      the mean train loss of the batches since the epoch's previous point and the learning rate of
      the last of them; `epoch` is the epoch being trained (from 1), `step` the batches done in it
  {"kind": "epoch", "epoch": 1, "steps": 468, "train_loss": 0.21}                     EpochEnd
      an epoch finished (its mean train loss)
  {"kind": "eval", "epoch": 1, "accuracy": 0.9909, "test_loss": 0.03, "sha256": "..."} Scores
      added by evaluate: the test scores of the checkpoint after that epoch
  {"kind": "window", "epoch": 1, "step": 17, "loss_sum": 1.23, "count": 7}             Window
      saved with an interrupted epoch: the batches already summed towards its next point

Each line stands alone: one that does not parse or is out of range is skipped with one warning for
the file, and never stops train (which writes the file anew from the lines it kept). The format is a
line's: FORMAT_VERSION 1 has no field for it (every line so far); a later format adds
"format_version", and a line newer than this version reads is skipped like a bad one (and so dropped
when this version's train or evaluate next writes the file: the curve is redrawn as it trains).

train writes the file (atomically) just before each checkpoint or progress file, so the history
always reaches at least as far as the point the next train resumes from. That train drops whatever
lies past its starting point and records it again; resume is bit-exact, so the curve ends up the
same as an uninterrupted run's, without gaps or duplicates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

import torch

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import _json as j
from mnist_pipeline.records.checkpoint import MAX_EPOCH
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.storage.files import describe, read_regular
from mnist_pipeline.storage.locks import brief_lock
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EVERY = 10  # steps between points: 47 points per full epoch, one loss read (a GPU sync) per 10 steps
MAX_BYTES = 64 * 1024 * 1024  # some 700,000 lines: a file larger than that is set aside, not read
MAX_STEP = 60_000  # batches in an epoch: the training images at batch size 1
LOCK = "history"  # train and evaluate both rewrite the file


Epoch = j.Whole(1, MAX_EPOCH)  # the epoch being trained, from 1
Loss = j.Number(0)


def _kind_is_required(schema: Dict[str, Any]) -> None:
    """Each line names its kind (the classes default it, so that code builds a record without saying it)."""
    schema["required"].insert(0, "kind")


LINE = {**j.STRICT, "json_schema_extra": _kind_is_required}  # each line class's pydantic config


@dataclass(frozen=True)
class Point:
    __pydantic_config__ = LINE
    epoch: Epoch
    step: j.Whole(1, MAX_STEP)
    loss: Loss
    lr: Loss
    kind: Literal["step"] = "step"


@dataclass(frozen=True)
class EpochEnd:
    __pydantic_config__ = LINE
    epoch: Epoch
    steps: j.Whole(1, MAX_STEP)
    train_loss: Loss
    kind: Literal["epoch"] = "epoch"


@dataclass(frozen=True)
class Scores:
    __pydantic_config__ = LINE
    epoch: Epoch
    accuracy: j.Fraction
    test_loss: Loss
    sha256: j.Text(64)
    kind: Literal["eval"] = "eval"


@dataclass(frozen=True)
class Window:
    __pydantic_config__ = LINE
    epoch: Epoch
    step: j.Whole(0, MAX_STEP)
    loss_sum: Loss
    count: j.Whole(0, EVERY)
    kind: Literal["window"] = "window"


Record = Union[Point, EpochEnd, Scores, Window]
KINDS = {cls.kind: cls for cls in (Point, EpochEnd, Scores, Window)}
TRAIN_KINDS = (Point, EpochEnd)  # what train writes (evaluate adds Scores)


def to_json(record: Record) -> Dict[str, Any]:
    return {"kind": record.kind, **dataclasses.asdict(record)}  # (kind first, as the file has always had it)


def read(volume: Volume, quiet: bool = False) -> List[Record]:
    """The valid records of the file, in order; the others are skipped with one warning.

    A file that cannot be read as one (a FIFO, a folder, larger than MAX_BYTES) gives no records and
    a warning: train moves it aside before it writes a new one (see `set_aside_unreadable`).
    """
    try:
        data = read_regular(volume.history, MAX_BYTES, "history")
    except FileNotFoundError:
        return []
    except PipelineError as exc:
        log.warning("%s; its training history is left out", exc)
        return []
    records, bad = [], 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        record = _parse(line)
        if record is None:
            bad += 1
        else:
            records.append(record)
    if bad and not quiet:
        log.warning("skipped %d unreadable line(s) of %s", bad, describe(volume.history))
    return records


def _parse(line: str) -> Optional[Record]:
    """The record on `line`, or None if it is not a valid one."""
    try:
        record = json.loads(line, parse_constant=lambda name: None)
        j.version(record, FORMAT_VERSION)  # (a newer version's line is skipped too)
        return j.check(KINDS[record["kind"]], line)
    except (ValueError, KeyError, TypeError, RecursionError):  # (j.Invalid is a ValueError)
        return None


def set_aside_unreadable(volume: Volume, set_aside) -> None:
    """train's side: a history file that cannot be read as one is moved aside (never lost) before a new one."""
    try:
        read_regular(volume.history, MAX_BYTES, "history")
    except FileNotFoundError:
        pass
    except PipelineError as exc:
        set_aside(volume.history, str(exc))


def _write(volume: Volume, records: List[Record]) -> None:
    text = "".join(json.dumps(to_json(r), separators=(",", ":"), allow_nan=False) + "\n" for r in records)
    atomic_write_bytes(volume.history, text.encode(), fault_point="history-before-rename")


@dataclass
class _Pending:
    """A point whose loss sum is still on the device (read when the history is saved)."""

    epoch: int
    step: int
    loss_sum: torch.Tensor
    count: int
    lr: float


class Recorder:
    """train's side: collect points as steps go by, save them beside each checkpoint.

    Per step it only adds the loss tensor to a running sum on the device; the points' values are
    read (`.item()`, which makes the host wait for a GPU) only when the history is saved.
    """

    def __init__(self, volume: Volume, epoch: int, step: int, device: torch.device):
        """Start at `epoch` completed epochs and `step` batches into the next (train's starting point)."""
        self.volume = volume
        self.window = torch.zeros((), dtype=torch.float32, device=device)
        self.count, self.lr = 0, 0.0
        self.records: List[Union[Record, _Pending]] = []
        for record in read(volume):  # keep what lies up to the starting point; the rest comes again
            if isinstance(record, Window) and (record.epoch, record.step) == (epoch + 1, step):
                self.window.fill_(record.loss_sum)
                self.count = record.count
            elif (isinstance(record, EpochEnd) and record.epoch <= epoch) or \
                    (isinstance(record, Point) and (record.epoch, record.step) <= (epoch + 1, step)):
                self.records.append(record)
        if step % EVERY != self.count:
            log.warning("%s lacks the loss of steps before step %d: its next point averages fewer steps",
                        volume.history, step)

    def add(self, epoch: int, step: int, loss: torch.Tensor, lr: float) -> None:
        """After `step` batches of `epoch` (from 1): the last batch's loss and learning rate."""
        self.window += loss.detach().float()
        self.count += 1
        self.lr = lr
        if step % EVERY == 0:
            self._point(epoch, step)

    def end_epoch(self, epoch: int, steps: int, train_loss: float) -> None:
        if self.count:
            self._point(epoch, steps)
        self.records.append(EpochEnd(epoch=epoch, steps=steps, train_loss=train_loss))

    def save(self, epoch: int, step: int) -> None:
        """Write the file, to match a checkpoint of `epoch` completed epochs and `step` batches into the next."""
        pending = [r for r in self.records if isinstance(r, _Pending)]
        sums = torch.stack([r.loss_sum for r in pending]).tolist() if pending else []  # one read of the device
        points = {id(r): Point(r.epoch, r.step, total / r.count, r.lr) for r, total in zip(pending, sums, strict=True)}
        self.records = [points.get(id(r), r) for r in self.records]
        window = [Window(epoch + 1, step, self.window.item(), self.count)] if self.count else []
        with brief_lock(self.volume, LOCK):
            # (quiet: the lines it skips were reported when this train began)
            scores = [r for r in read(self.volume, quiet=True) if isinstance(r, Scores) and r.epoch <= epoch]
            _write(self.volume, self.records + scores + window)

    def _point(self, epoch: int, step: int) -> None:
        # the sum stays on the device until save(): a new tensor takes up the next window's sum
        self.records.append(_Pending(epoch, step, self.window, self.count, self.lr))
        self.window = torch.zeros_like(self.window)
        self.count = 0


def add_evaluation(volume: Volume, epoch: int, sha256: str, accuracy: float, test_loss: float) -> None:
    """evaluate's side: the test scores after `epoch`, replacing an earlier evaluation of that epoch."""
    with brief_lock(volume, LOCK):
        records = [r for r in read(volume) if not (isinstance(r, Scores) and r.epoch == epoch)]
        _write(volume, records + [Scores(epoch, accuracy, test_loss, sha256)])


@dataclass(frozen=True)
class Placed:
    """A point of the chart: the Point, and `x`, its step counted over all epochs."""

    point: Point
    x: int


@dataclass(frozen=True)
class EpochRow:
    """An epoch's end, where it falls on the chart (`x`), and its test scores if evaluated."""

    end: EpochEnd
    x: int
    scores: Optional[Scores]


@dataclass(frozen=True)
class Summary:
    """The report's view of the history: its points in step order, and its epochs."""

    points: List[Placed]
    epochs: List[EpochRow]


def summary(records: List[Record]) -> Summary:
    """The report's view: points with a running step count `x`, epoch ends with their test scores."""
    epochs = {r.epoch: r for r in records if isinstance(r, EpochEnd)}
    scores = {r.epoch: r for r in records if isinstance(r, Scores)}
    points = sorted((r for r in records if isinstance(r, Point)), key=lambda r: (r.epoch, r.step))
    last_step: Dict[int, int] = {}
    for p in points:
        last_step[p.epoch] = max(last_step.get(p.epoch, 0), p.step)
    offsets: Dict[int, int] = {}  # steps of all earlier epochs (an epoch with no record counts none)
    total = 0
    for epoch in sorted(set(last_step) | set(epochs)):
        offsets[epoch] = total
        total += epochs[epoch].steps if epoch in epochs else last_step[epoch]
    return Summary(points=[Placed(p, offsets[p.epoch] + p.step) for p in points],
                   epochs=[EpochRow(epochs[e], offsets[e] + epochs[e].steps, scores.get(e)) for e in sorted(epochs)])
