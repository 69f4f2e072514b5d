"""The `mnist` commands: each is one entry in COMMANDS, its help and the function that runs it.

  stages.py    train, evaluate, infer, pipeline, report
  use.py       predict, serve
  registry.py  models, promote, rollback
  export.py    export
  feedback.py  feedback
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from mnist_pipeline.commands import export, feedback, registry, stages, use

Values = Dict[str, Any]


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace, Values], int]
    modules: tuple = ()  # imported before a signal may interrupt (torch's import is never cut short)
    interruptible: bool = True  # serve (granian) and export handle SIGTERM themselves: a graceful shutdown
    arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None  # what it takes besides settings
    trains: bool = False  # holds the volume's train lock, taken before torch loads
    group: bool = False  # may run as a torchrun group (each rank a process running it)
    needs_volume: bool = False  # reads a volume: a --root that is not a folder is an error, never created
    waits: bool = False  # waits for its input: --grace counts from the process's start

_REPORT = ("mnist_pipeline.report",)
_REGISTRY = ("mnist_pipeline.records.aliases",)
COMMANDS: Dict[str, Command] = {
    "train": Command("Resume from model/mnist_cnn.pt if present, train --epochs more epochs, save atomically.",
                     stages.train, ("mnist_pipeline.train",), trains=True, group=True),
    "evaluate": Command("Wait for a finished checkpoint, score it on the 10,000 test images, write "
                        "model/eval_results.json and the report (model/report/), keep it as a version and export "
                        "that to ONNX where onnxruntime is installed.", stages.evaluate,
                        ("mnist_pipeline.evaluate",) + _REPORT, needs_volume=True, waits=True),
    "infer": Command("Wait for the current checkpoint's evaluation; if accuracy is above --threshold, "
                     "write --count labelled test images to results/.", stages.infer, ("mnist_pipeline.infer",),
                     needs_volume=True, waits=True),
    "pipeline": Command("train, evaluate, infer in order, then the report (with infer's images).", stages.pipeline,
                        ("mnist_pipeline.train", "mnist_pipeline.evaluate", "mnist_pipeline.infer") + _REPORT,
                        trains=True, waits=True),
    "report": Command("Rebuild model/report/ (index.html and its pictures) from eval_results.json, the history "
                      "and results/.", stages.report, _REPORT),
    "predict": Command("Read the digit in each IMAGE (any image Pillow reads) with the --model version "
                       "(production), if its evaluation passes --threshold.", use.predict, ("mnist_pipeline.predict",),
                       arguments=use.predict_arguments),
    "models": Command("The versions evaluate has kept (model/versions/), with their aliases; `models log`: every "
                      "alias move; `models prune`: remove the oldest versions no alias points to.",
                      registry.models, _REGISTRY, arguments=registry.models_arguments, needs_volume=True),
    "promote": Command("Point --alias (production) at version N.", registry.promote, _REGISTRY,
                       arguments=registry.promote_arguments, needs_volume=True),
    "rollback": Command("Point --alias (production) back at the version it pointed to before.",
                        registry.rollback, _REGISTRY, needs_volume=True),
    "export": Command("Write each evaluated version's ONNX model (model/versions/N/mnist_cnn.onnx) once onnxruntime "
                      "answers as torch does on the 10,000 test images; --follow: each new version, until SIGTERM.",
                      export.export, ("mnist_pipeline.export",), interruptible=False, arguments=export.arguments,
                      needs_volume=True),
    "serve": Command("HTTP prediction API and a draw-a-digit page at http://HOST:PORT; serves the --model "
                     "version (production: follows the alias as it moves) if it passes --threshold.", use.serve,
                     ("mnist_pipeline.serve",),
                     interruptible=False),
    "feedback": Command("Review what people sent serve's POST /feedback (feedback/): list the pending samples and "
                        "draw them on a contact sheet (model/feedback_sheet.png); accept or reject ID... or --all; "
                        "delete ID... or --older-than DAYS; stats: counts by status and split.", feedback.feedback,
                        ("mnist_pipeline.records.feedback",), arguments=feedback.arguments, needs_volume=True),
}
