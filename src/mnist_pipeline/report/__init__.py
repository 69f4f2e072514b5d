"""model/report/: the evaluation report, a pure rendering of the records handed to it.

  index.html            one page, no outside references (opens from the file system or `serve`)
  confusion_matrix.png  pictures.py
  mistakes.png          pictures.py
  training.svg          chart.py (the same drawing is inline in the page)
  feedback_confusion.png, feedback_mistakes.png
                        pictures.py: the held-out feedback's, when the evaluation scored some (FEEDBACK_FILES)

The command layer hands it the records (those its command made, the others read from the volume) and
calls `write` once per command; nothing here reads the volume. The folder is replaced as a whole, so
nothing is ever read back or upgraded: FORMAT_VERSION, in index.html's
<meta name="mnist-report-format">, says which layout a folder holds.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from mnist_pipeline import data
from mnist_pipeline.records import history
from mnist_pipeline.records.aliases import Move
from mnist_pipeline.records.evaluation import Evaluation
from mnist_pipeline.records.predictions import Predictions
from mnist_pipeline.report.chart import training_svg
from mnist_pipeline.report.page import feedback_section, page, versions_section
from mnist_pipeline.report.pictures import (confusion_image, feedback_confusion_image, feedback_mistakes_image,
                                            mistakes_image)
from mnist_pipeline.storage.atomic import replace_dir
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 1
FILES = ("index.html", "confusion_matrix.png", "mistakes.png", "training.svg")
FEEDBACK_FILES = ("feedback_confusion.png", "feedback_mistakes.png")  # besides, with held-out feedback scores


def write(volume: Volume, evaluation: Evaluation, records: List[history.Record], test_images: torch.Tensor,
          predictions: Optional[Predictions], versions: Optional[List[Dict[str, Any]]] = None,
          moves: Sequence[Move] = (), feedback_images: Mapping[str, bytes] = {}) -> Path:
    """Replace model/report/ with the report of `evaluation`, the history `records`, infer's `predictions`
    (None: infer has not run) and the `versions` kept (aliases.catalogue) with the alias `moves`, and the
    held-out feedback scores' section when `evaluation` has them, its mistakes drawn from `feedback_images`
    (pixels by sample id); returns index.html's path."""
    summary = history.summary(records)
    # infer's images are test images: drawn from them, the report reads nothing in results/
    pictures = {p.file: "data:image/png;base64," + base64.b64encode(data.png(test_images[p.test_index])).decode()
                for p in (predictions.predictions if predictions else ())}

    def fill(folder: Path) -> None:
        # zlib's default level: optimize=True tries every level, several times the work for a few per cent
        confusion_image(evaluation).save(folder / "confusion_matrix.png")
        mistakes_image(evaluation, test_images).save(folder / "mistakes.png")
        chart = training_svg(summary)
        (folder / "training.svg").write_text(chart)
        inline = chart.replace(' xmlns="http://www.w3.org/2000/svg"', "", 1)  # HTML needs no namespace URL
        listed = versions_section(versions, moves) if versions is not None else ""
        if evaluation.feedback:
            feedback_confusion_image(evaluation.feedback).save(folder / "feedback_confusion.png")
            feedback_mistakes_image(evaluation.feedback, feedback_images).save(folder / "feedback_mistakes.png")
        html = page(evaluation, summary, inline, predictions, pictures, listed, FORMAT_VERSION,
                    feedback_section(evaluation))
        (folder / "index.html").write_text(html)

    replace_dir(volume.report_dir, fill)
    return volume.report_dir / "index.html"
