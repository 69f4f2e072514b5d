"""Training history: model/history.jsonl, one JSON record a line, for the report's curves.

  {"kind": "step", "epoch": 1, "step": 10, "loss": 0.53, "lr": 0.08}
      the mean train loss of the batches since the epoch's previous point and the learning rate of
      the last of them; `epoch` is the epoch being trained (from 1), `step` the batches done in it
  {"kind": "epoch", "epoch": 1, "steps": 468, "train_loss": 0.21}
      an epoch finished (its mean train loss)
  {"kind": "eval", "epoch": 1, "accuracy": 0.9909, "test_loss": 0.03, "sha256": "..."}
      added by evaluate: the test scores of the checkpoint after that epoch
  {"kind": "window", "epoch": 1, "step": 17, "loss_sum": 1.23, "count": 7}
      saved with an interrupted epoch: the batches already summed towards its next point

train writes the file (atomically) just before each checkpoint or progress file, so the history
always reaches at least as far as the point the next train resumes from. That train drops whatever
lies past its starting point and records it again; resume is bit-exact, so the curve ends up the
same as an uninterrupted run's, without gaps or duplicates.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List

import torch

from mnist_pipeline.volume import Volume, atomic_write_bytes, brief_lock

log = logging.getLogger(__name__)

EVERY = 10  # steps between points: 47 points per full epoch, one loss read (a GPU sync) per 10 steps
TRAIN_KINDS = ("step", "epoch")
FIELDS = {  # the numbers each kind of record holds (beside its epoch)
    "step": ("step", "loss", "lr"),
    "epoch": ("steps", "train_loss"),
    "eval": ("accuracy", "test_loss"),
    "window": ("step", "loss_sum", "count"),
}
LOCK = "history"  # train and evaluate both rewrite the file


def read(volume: Volume) -> List[Dict[str, Any]]:
    """The records in the file, in order; an unreadable line is skipped with a warning."""
    try:
        text = volume.history.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s (%s): starting a new history", volume.history, exc.strerror)
        return []
    records, bad = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
            fields = FIELDS[record["kind"]] + ("epoch",)
            if not all(isinstance(record[f], (int, float)) and not isinstance(record[f], bool) for f in fields):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        records.append(record)
    if bad:
        log.warning("skipped %d unreadable line(s) of %s", bad, volume.history)
    return records


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
            kind, at = record.get("kind"), (record["epoch"], record.get("step", 0))
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
            evaluations = [r for r in read(self.volume) if r.get("kind") == "eval" and r["epoch"] <= epoch]
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
        records = [r for r in read(volume) if not (r.get("kind") == "eval" and r["epoch"] == epoch)]
        _write(volume, records + [record])


def summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The report's view: points with a running step count `x`, epoch ends, test scores by epoch."""
    epochs = {r["epoch"]: r for r in records if r.get("kind") == "epoch"}
    evaluations = {r["epoch"]: r for r in records if r.get("kind") == "eval"}
    points = sorted((r for r in records if r.get("kind") == "step"), key=lambda r: (r["epoch"], r["step"]))
    offsets: Dict[int, int] = {}  # steps of all earlier epochs
    total = 0
    for epoch in range(1, max([p["epoch"] for p in points] + list(epochs) + [0]) + 1):
        offsets[epoch] = total
        total += epochs[epoch]["steps"] if epoch in epochs else max(
            [p["step"] for p in points if p["epoch"] == epoch] + [0])
    return {
        "points": [{**p, "x": offsets[p["epoch"]] + p["step"]} for p in points],
        "epochs": [{**epochs[e], "x": offsets[e] + epochs[e]["steps"], "eval": evaluations.get(e)}
                   for e in sorted(epochs)],
        "evaluations": evaluations,
    }

