"""The JSON Schema of each file format on the volume, generated from its record module's declaration.

docs/schemas/ holds them for people who read the volume with their own tools; tests/test_schemas.py
checks that they equal what this module generates and that the files a real run writes validate.

    python -m mnist_pipeline.records.schemas docs/schemas     # write them again after changing a record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from mnist_pipeline.records import _json as j
from mnist_pipeline.records import aliases, checkpoint, evaluation, feedback, history, predictions, versions

# docs/schemas/<name>: (the files it describes, inside the volume, and their declaration)
FORMATS: Dict[str, Tuple[str, Any]] = {
    "checkpoint.schema.json": ("model/mnist_cnn.pt, model/train_progress.pt and model/versions/<N>/mnist_cnn.pt: "
                               "their plain values", checkpoint.Metadata),
    "eval_results.schema.json": ("model/eval_results.json and model/versions/<N>/eval_results.json",
                                 evaluation.File),
    "history.schema.json": ("model/history.jsonl: each line", history.Record),
    "predictions.schema.json": ("results/predictions.json", predictions.File),
    "version.schema.json": ("model/versions/<N>/version.json", versions.File),
    "counter.schema.json": ("model/versions/counter.json", versions.Counter),
    "alias.schema.json": ("model/aliases/<name>.json", aliases.File),
    "alias-log.schema.json": ("model/aliases/log.jsonl: each line", aliases.Line),
    "feedback.schema.json": ("feedback/<id>.json", feedback.File),
}


def schema(name: str) -> Dict[str, Any]:
    """docs/schemas/`name` as the code declares it now."""
    files, shape = FORMATS[name]
    generated = j.adapter(shape).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **generated, "title": files}


def text(name: str) -> str:
    return json.dumps(schema(name), indent=2) + "\n"


def main(folder: str) -> None:
    for name in FORMATS:
        (Path(folder) / name).write_text(text(name))


if __name__ == "__main__":
    main(sys.argv[1])
