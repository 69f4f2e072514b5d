"""results/predictions.json: what infer labelled, beside its PNGs (each named by its predicted digit).

  format_version   FORMAT_VERSION (absent in format 1)
  checkpoint       {sha256, epoch} of the checkpoint that predicted
  accuracy         that checkpoint's evaluated accuracy; threshold: the gate it passed
  compute_seconds  the forward pass
  predictions      [{file, test_index, label, predicted, confidence}]
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

from mnist_pipeline.records import _json as j
from mnist_pipeline.records.checkpoint import MAX_EPOCH
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 2
NAME = "predictions.json"
MAX_IMAGES = 10_000
FILE_NAME = re.compile(r"^[0-9](_[0-9]+)?\.png$")  # infer's names: 7.png, 7_1.png, ...


@dataclass(frozen=True)
class Prediction:
    file: str
    test_index: int
    label: int
    predicted: int
    confidence: float


@dataclass(frozen=True)
class Predictions:
    sha256: str
    epoch: int
    accuracy: float
    threshold: float
    compute_seconds: float
    predictions: Tuple[Prediction, ...]

    def to_json(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "checkpoint": {"sha256": self.sha256, "epoch": self.epoch},
            "accuracy": self.accuracy,
            "threshold": self.threshold,
            "compute_seconds": self.compute_seconds,
            "predictions": [dataclasses.asdict(p) for p in self.predictions],
        }


def write_into(folder: Path, predictions: Predictions) -> None:
    """Into infer's staging folder, which replaces results/ as a whole (so no atomic write of its own)."""
    (folder / NAME).write_text(json.dumps(predictions.to_json(), indent=2, allow_nan=False) + "\n")


def read(volume: Volume) -> Predictions:
    """results/predictions.json; FileNotFoundError if there is none, PipelineError if it is malformed."""
    path = volume.results_dir / NAME
    try:
        return parse(j.load(path, "predictions file"))
    except j.Invalid as exc:
        raise j.problem(path, exc, "run `mnist infer` to write it again") from None


def parse(record: Dict[str, Any]) -> Predictions:
    j.version(record, FORMAT_VERSION)  # format 1 is the same without the field
    checkpoint = j.obj(j.field(record, "checkpoint"), "checkpoint")
    entries = []
    for k, entry in enumerate(j.array(j.field(record, "predictions"), "predictions", limit=MAX_IMAGES)):
        at = f"predictions[{k}]"
        p = j.obj(entry, at)
        name = j.text(j.field(p, "file", at), f"{at}.file", 40)
        if not FILE_NAME.match(name):
            raise j.Invalid(f"{at}.file {name!r} is not a name infer gives (digit.png, digit_N.png)")
        entries.append(Prediction(file=name, **j.scored_image(p, at, MAX_IMAGES)))
    if len({e.file for e in entries}) < len(entries):
        raise j.Invalid("predictions name one file twice: each image infer saves has a name of its own")
    return Predictions(
        sha256=j.sha256(j.field(checkpoint, "sha256", "checkpoint"), "checkpoint.sha256"),
        epoch=j.integer(j.field(checkpoint, "epoch", "checkpoint"), "checkpoint.epoch", 0, MAX_EPOCH),
        accuracy=j.number(j.field(record, "accuracy"), "accuracy", 0, 1),
        threshold=j.number(j.field(record, "threshold"), "threshold", 0, 1),
        compute_seconds=j.number(record.get("compute_seconds", 0.0), "compute_seconds", 0),
        predictions=tuple(entries),
    )
