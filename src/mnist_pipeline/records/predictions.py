"""results/predictions.json: what infer labelled, beside its PNGs (each named by its predicted digit). Format 1 has
no format_version.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Tuple

from typing_extensions import TypedDict

from mnist_pipeline.records import _json as j
from mnist_pipeline.records.evaluation import CheckpointScored, ScoredImage
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 2
NAME = "predictions.json"
MAX_IMAGES = j.MAX_IMAGES
FILE_NAME = re.compile(r"^[0-9](_[0-9]+)?\.png$")  # infer's names: 7.png, 7_1.png, ...


class Entry(ScoredImage):
    file: j.Text(40, j.Pattern(FILE_NAME.pattern, "a name infer gives (digit.png, digit_N.png)"))


class File(TypedDict):
    """results/predictions.json: what infer labelled, beside its PNGs."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[FORMAT_VERSION]
    checkpoint: CheckpointScored  # the checkpoint that predicted
    accuracy: j.Fraction  # its evaluated accuracy
    threshold: j.Fraction  # the gate it passed
    compute_seconds: j.Number(0)
    predictions: j.List(Entry, MAX_IMAGES)


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


def parse(record: Any) -> Predictions:
    if j.version(record, FORMAT_VERSION) == 1:  # the same without the field
        record = {"compute_seconds": 0.0, **record, "format_version": FORMAT_VERSION}
    values = j.check(File, record)
    entries = tuple(Prediction(**entry) for entry in values["predictions"])
    if len({e.file for e in entries}) < len(entries):
        raise j.Invalid("predictions name one file twice: each image infer saves has a name of its own")
    return Predictions(sha256=values["checkpoint"]["sha256"], epoch=values["checkpoint"]["epoch"],
                       accuracy=values["accuracy"], threshold=values["threshold"],
                       compute_seconds=values["compute_seconds"], predictions=entries)
