"""model/history.jsonl: the training history, one JSON record a line, for the report's curves.

  {"kind": "step", "epoch": 1, "step": 10, "loss": 0.53, "lr": 0.08}
      the mean train loss of the batches since the epoch's previous point and the learning rate of
      the last of them; `epoch` is the epoch being trained (from 1), `step` the batches done in it
  {"kind": "epoch", "epoch": 1, "steps": 468, "train_loss": 0.21}
      an epoch finished (its mean train loss)
  {"kind": "eval", "epoch": 1, "accuracy": 0.9909, "test_loss": 0.03, "sha256": "..."}
      added by evaluate: the test scores of the checkpoint after that epoch
  {"kind": "window", "epoch": 1, "step": 17, "loss_sum": 1.23, "count": 7}
      saved with an interrupted epoch: the batches already summed towards its next point

Each line stands alone: one that does not parse or is out of range is skipped with one warning for
the file, and never stops train (which writes the file anew from the lines it kept). No format
version: a record is a line, and each kind's fields are checked as they are read.

train writes the file (atomically) just before each checkpoint or progress file, so the history
always reaches at least as far as the point the next train resumes from. That train drops whatever
lies past its starting point and records it again; resume is bit-exact, so the curve ends up the
same as an uninterrupted run's, without gaps or duplicates.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List

import torch

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records.checkpoint import MAX_EPOCH
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.storage.files import describe, read_regular
from mnist_pipeline.storage.locks import brief_lock
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

TRAIN_KINDS = ("step", "epoch")  # what train writes (evaluate adds "eval")
EVERY = 10  # steps between points: 47 points per full epoch, one loss read (a GPU sync) per 10 steps
MAX_BYTES = 64 * 1024 * 1024  # some 700,000 lines: a file larger than that is set aside, not read
MAX_STEP = 60_000  # batches in an epoch: the training images at batch size 1
LOCK = "history"  # train and evaluate both rewrite the file
# the fields of each kind of record beside its epoch, with their range; int fields must be whole numbers
FIELDS = {
    "step": {"step": (int, 1, MAX_STEP), "loss": (float, 0, math.inf), "lr": (float, 0, math.inf)},
    "epoch": {"steps": (int, 1, MAX_STEP), "train_loss": (float, 0, math.inf)},
    "eval": {"accuracy": (float, 0, 1), "test_loss": (float, 0, math.inf)},
    "window": {"step": (int, 0, MAX_STEP), "loss_sum": (float, 0, math.inf), "count": (int, 0, EVERY)},
}


def read(volume: Volume, quiet: bool = False) -> List[Dict[str, Any]]:
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


def _parse(line: str) -> Any:
    """The record on `line` with only its known fields, or None if it is not a valid one."""
    try:
        record = json.loads(line, parse_constant=lambda name: None)
        kind = record["kind"]
        fields = FIELDS[kind]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    clean = {"kind": kind}
    for name, (kind_of, low, high) in {"epoch": (int, 1, MAX_EPOCH), **fields}.items():
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if kind_of is int and not isinstance(value, int) or not (low <= value <= high):
            return None  # (NaN fails the range too)
        clean[name] = value
    if kind == "eval":
        if not isinstance(record.get("sha256"), str) or len(record["sha256"]) > 64:
            return None
        clean["sha256"] = record["sha256"]
    return clean


def set_aside_unreadable(volume: Volume, set_aside) -> None:
    """train's side: a history file that cannot be read as one is moved aside (never lost) before a new one."""
    try:
        read_regular(volume.history, MAX_BYTES, "history")
    except FileNotFoundError:
        pass
    except PipelineError as exc:
        set_aside(volume.history, str(exc))


def _write(volume: Volume, records: List[Dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    atomic_write_bytes(volume.history, text.encode(), fault_point="history-before-rename")


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
        self.records: List[Dict[str, Any]] = []
        for record in read(volume):  # keep what lies up to the starting point; the rest comes again
            kind, at = record["kind"], (record["epoch"], record.get("step", 0))
            if kind == "window" and at == (epoch + 1, step):
                self.window.fill_(record["loss_sum"])
                self.count = record["count"]
            elif (kind == "epoch" and at[0] <= epoch) or (kind == "step" and at <= (epoch + 1, step)):
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
        self.records.append({"kind": "epoch", "epoch": epoch, "steps": steps, "train_loss": train_loss})

    def save(self, epoch: int, step: int) -> None:
        """Write the file, to match a checkpoint of `epoch` completed epochs and `step` batches into the next."""
        on_device = [r for r in self.records if isinstance(r.get("loss"), torch.Tensor)]  # points' sums
        if on_device:
            sums = torch.stack([r["loss"] for r in on_device]).tolist()  # one read of the device for all
            for record, loss_sum in zip(on_device, sums, strict=True):
                record["loss"] = loss_sum / record.pop("count")
        pending = [{"kind": "window", "epoch": epoch + 1, "step": step, "loss_sum": self.window.item(),
                    "count": self.count}] if self.count else []
        with brief_lock(self.volume, LOCK):
            # (quiet: the lines it skips were reported when this train began)
            evaluations = [r for r in read(self.volume, quiet=True) if r["kind"] == "eval" and r["epoch"] <= epoch]
            _write(self.volume, self.records + evaluations + pending)

    def _point(self, epoch: int, step: int) -> None:
        # the sum stays on the device until save(): a new tensor takes up the next window's sum
        self.records.append({"kind": "step", "epoch": epoch, "step": step, "loss": self.window, "count": self.count,
                             "lr": self.lr})
        self.window = torch.zeros_like(self.window)
        self.count = 0


def add_evaluation(volume: Volume, epoch: int, sha256: str, accuracy: float, test_loss: float) -> None:
    """evaluate's side: the test scores after `epoch`, replacing an earlier evaluation of that epoch."""
    record = {"kind": "eval", "epoch": epoch, "accuracy": accuracy, "test_loss": test_loss, "sha256": sha256}
    with brief_lock(volume, LOCK):
        records = [r for r in read(volume) if not (r["kind"] == "eval" and r["epoch"] == epoch)]
        _write(volume, records + [record])


def summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The report's view: points with a running step count `x`, epoch ends, test scores by epoch."""
    epochs = {r["epoch"]: r for r in records if r["kind"] == "epoch"}
    evaluations = {r["epoch"]: r for r in records if r["kind"] == "eval"}
    points = sorted((r for r in records if r["kind"] == "step"), key=lambda r: (r["epoch"], r["step"]))
    last_step: Dict[int, int] = {}
    for p in points:
        last_step[p["epoch"]] = max(last_step.get(p["epoch"], 0), p["step"])
    offsets: Dict[int, int] = {}  # steps of all earlier epochs (an epoch with no record counts none)
    total = 0
    for epoch in sorted(set(last_step) | set(epochs)):
        offsets[epoch] = total
        total += epochs[epoch]["steps"] if epoch in epochs else last_step[epoch]
    return {
        "points": [{**p, "x": offsets[p["epoch"]] + p["step"]} for p in points],
        "epochs": [{**epochs[e], "x": offsets[e] + epochs[e]["steps"], "eval": evaluations.get(e)}
                   for e in sorted(epochs)],
        "evaluations": evaluations,
    }
