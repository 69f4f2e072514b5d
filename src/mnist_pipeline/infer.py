"""infer: once the current checkpoint is evaluated and passes the gate, label random test images.

results/ is replaced as a whole: it holds exactly this run's PNGs, each named by its predicted digit,
and predictions.json (graders count its PNGs). Anything else found there is a user's: it is moved
into results.<time>.aside/ beside it, never deleted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from mnist_pipeline import data, runtime
from mnist_pipeline.errors import NotEvaluated, PipelineError
from mnist_pipeline.model import predict
from mnist_pipeline.records import checkpoint, evaluation, predictions
from mnist_pipeline.records.evaluation import Evaluation
from mnist_pipeline.records.predictions import Prediction, Predictions
from mnist_pipeline.settings import InferConfig
from mnist_pipeline.storage.atomic import recover_dir, replace_dir, write_failed
from mnist_pipeline.storage.files import describe
from mnist_pipeline.storage.locks import is_running
from mnist_pipeline.storage.waiting import wait_for
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)


def run(config: InferConfig) -> Predictions:
    volume = Volume(config.root)
    recover_dir(volume.results_dir)  # a swap of results/ that a kill -9 cut short
    saved, scores = wait_for_evaluation(volume, config.wait_s, config.threshold, config.grace_s, config.started)
    device = runtime.setup(config.device, config.threads)
    model = saved.build_model().to(device)
    test_set = data.load_split(volume.data_dir, "test", config.mirror)
    generator = torch.Generator()
    generator.manual_seed(config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little"))
    indices = torch.randperm(len(test_set), generator=generator)[:config.count]
    started = time.monotonic()
    probabilities = predict(model, test_set.images[indices], device)
    compute_seconds = round(time.monotonic() - started, 4)
    confidence, predicted = probabilities.max(dim=1)
    names = _file_names(predicted.tolist())
    result = Predictions(
        sha256=saved.sha256, epoch=saved.epoch, accuracy=scores.accuracy, threshold=config.threshold,
        compute_seconds=compute_seconds,
        predictions=tuple(
            Prediction(file=name, test_index=int(index), label=int(test_set.labels[index]), predicted=int(digit),
                       confidence=round(float(conf), 6))
            for name, index, digit, conf in zip(names, indices, predicted, confidence, strict=True)
        ),
    )

    def fill(folder: Path) -> None:
        for p in result.predictions:
            (folder / p.file).write_bytes(data.png(test_set.images[p.test_index]))
        predictions.write_into(folder, result)

    _move_aside_foreign(volume.results_dir)
    replace_dir(volume.results_dir, fill)
    return result


def _move_aside_foreign(results: Path) -> None:
    """Move what infer did not write out of results/ (a user's notes, a folder) into results.<time>.aside/."""
    try:
        foreign = sorted(entry for entry in results.iterdir()
                         if not (predictions.FILE_NAME.match(entry.name) or entry.name == predictions.NAME))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PipelineError(f"cannot list {describe(results)}: {exc.strerror}; check the volume") from None
    if not foreign:
        return
    aside = results.with_name(f"{results.name}.{time.strftime('%Y%m%dT%H%M%S')}.aside")
    try:
        aside.mkdir(exist_ok=True)
        for entry in foreign:
            os.replace(entry, aside / entry.name)
    except OSError as exc:
        raise write_failed(aside, exc) from None
    log.warning("moved %s out of %s into %s: results/ holds only infer's images and %s",
                ", ".join(describe(Path(e.name)) for e in foreign), results.name, aside.name, predictions.NAME)


def wait_for_evaluation(volume: Volume, wait_s: float, threshold: float, grace_s: float = 0.0,
                        started: float = 0.0) -> Tuple[checkpoint.Checkpoint, Evaluation]:
    """The current checkpoint and its evaluation, never an older checkpoint's; BelowThreshold if it fails the gate."""
    problem = ["no checkpoint yet: run `mnist train`, then `mnist evaluate`"]

    def ready() -> Optional[Tuple[checkpoint.Checkpoint, Evaluation]]:
        # a running train makes the current checkpoint an old one (`docker compose up` runs all at once)
        if is_running(volume, "train"):
            return None
        try:
            return evaluation.evaluated(volume, threshold)
        except NotEvaluated as exc:
            problem[0] = str(exc)
            return None

    return wait_for(
        "an evaluation of the current checkpoint", ready, wait_s,
        producers_running=lambda: is_running(volume, "train") or is_running(volume, "evaluate"),
        on_timeout=lambda: PipelineError(f"{problem[0]} (waited {wait_s:g} s; --wait / MNIST_WAIT)"),
        log=log.info, grace_s=grace_s, started=started,
    )


def _file_names(digits: List[int]) -> List[str]:
    """7.png, then 7_1.png, 7_2.png for more sevens in the same run."""
    seen: Counter = Counter()
    names = []
    for digit in digits:
        names.append(f"{digit}.png" if seen[digit] == 0 else f"{digit}_{seen[digit]}.png")
        seen[digit] += 1
    return names
