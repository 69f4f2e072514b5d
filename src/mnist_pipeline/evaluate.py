"""evaluate: wait for a finished checkpoint, score it on all 10,000 test images and on the accepted held-out
feedback (records/feedback.py) when there is some, keep it as a version."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from mnist_pipeline import data, runtime
from mnist_pipeline.records import aliases, checkpoint, evaluation, feedback, history, versions
from mnist_pipeline.records.evaluation import Evaluation, FeedbackFigures, FeedbackMistake, FeedbackScores, Mistake
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import predict, stack
from mnist_pipeline.settings import EvaluateConfig
from mnist_pipeline.storage.files import describe
from mnist_pipeline.storage.locks import is_running, shared_lock
from mnist_pipeline.storage.waiting import wait_for
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

# the data's identity: data.py checks every file against these on each read
DATA_SHA256 = hashlib.sha256("".join(data.FILES[name] for name in sorted(data.FILES)).encode()).hexdigest()
MISTAKES_KEPT = 40  # the most confident mistakes listed in eval_results.json (the report shows them)


@dataclass(frozen=True)
class Scored:
    """What evaluate hands the command layer: the evaluation it wrote, and torch's probabilities for the
    test images where it ran on the CPU (None elsewhere), the answers export's parity check compares with."""

    evaluation: Evaluation
    probabilities: Optional[torch.Tensor]


def run(config: EvaluateConfig) -> Scored:
    """Score the current checkpoint, write model/eval_results.json and the history's test scores, register
    the checkpoint as a version if it is new, move production by config.promote and prune old versions."""
    volume = Volume(config.root)
    # Announce ourselves: infer keeps waiting while an evaluate is at work.
    with shared_lock(volume, "evaluate"):
        saved = wait_for_checkpoint(volume, config.wait_s, config.grace_s, config.started)
        device = runtime.setup(config.device, config.threads)
        model = saved.build_model().to(device)
        test_set = data.load_split(volume.data_dir, "test", config.mirror)
        started = time.monotonic()
        probabilities = predict(model, test_set.images, device)
        result = _scores(probabilities, test_set, device, saved)
        heldout = feedback.accepted(volume, "heldout")
        if len(heldout):
            result = dataclasses.replace(result, feedback=score_feedback(model, heldout, device))
            log.info("held-out feedback: %d of %d samples right", result.feedback.figures.correct, len(heldout))
        result = dataclasses.replace(result, compute_seconds=round(time.monotonic() - started, 3))
        evaluation.write(volume, result)
    history.add_evaluation(volume, saved.epoch, saved.sha256, result.accuracy, result.test_loss)
    judge = production_judge(volume, heldout, device) if len(heldout) else None
    keep(volume, saved, result, config, judge)
    return Scored(result, probabilities if device.type == "cpu" else None)


def keep(volume: Volume, saved: checkpoint.Checkpoint, result: Evaluation, config: EvaluateConfig,
         judge: Optional[Callable[[versions.Version], Optional[FeedbackFigures]]] = None) -> None:
    """Register the scored checkpoint as a version, move production by the rule (`judge` scores production's
    version on the held-out feedback `result` was scored on), drop the oldest unaliased."""
    version = versions.register(volume, saved, result, DATA_SHA256)
    if version is None:
        log.info("epoch %d (sha256 %s) is a version already", saved.epoch, saved.sha256[:12])
        return
    log.info("registered version %d (epoch %d, accuracy %.4f)", version.number, version.epoch, version.accuracy)
    move, held_back = aliases.auto_promote(volume, version, config.threshold, config.promote, config.margin, judge)
    if held_back:
        log.info("%s", held_back)
    elif move is None:
        log.info("production stays at version %s (--promote %s, --threshold %s)",
                 aliases.read(volume, aliases.PRODUCTION) or "none", config.promote, config.threshold)
    gone = aliases.prune(volume, config.keep)
    if gone:
        log.info("removed versions %s (no alias points to them; --keep %d)", ", ".join(map(str, gone)), config.keep)


def wait_for_checkpoint(volume: Volume, wait_s: float, grace_s: float = 0.0,
                        started: float = 0.0) -> checkpoint.Checkpoint:
    """The checkpoint once no train is writing one: evaluate what a running train produces."""

    def ready() -> Optional[checkpoint.Checkpoint]:
        if is_running(volume, "train"):
            return None
        try:
            return checkpoint.read(volume.checkpoint)
        except FileNotFoundError:
            return None

    def timeout() -> PipelineError:
        return PipelineError(
            f"no checkpoint at {describe(volume.checkpoint)} after waiting {wait_s:g} s; "
            f"run `mnist train` first (or raise --wait / MNIST_WAIT)"
        )

    return wait_for(
        f"a finished checkpoint at {describe(volume.checkpoint)}", ready, wait_s,
        producers_running=lambda: is_running(volume, "train"), on_timeout=timeout, log=log.info,
        grace_s=grace_s, started=started, needs_grace=lambda saved: evaluation.is_of(volume, saved.sha256),
    )


def score_feedback(model: nn.Module, heldout: feedback.Accepted, device: torch.device) -> FeedbackScores:
    """How `model` reads the accepted held-out feedback: its images are preprocess's output, MNIST-like, so they
    go through the model's own normalisation as the test images do."""
    probabilities = predict(model, stack((heldout.pixels,)), device)
    labels = torch.tensor(heldout.labels, dtype=torch.int64)
    confusion, predicted, confidence, wrong = _judged(probabilities, labels)
    return FeedbackScores(
        figures=FeedbackFigures(digest=heldout.digest, total=len(heldout), correct=int(confusion.diagonal().sum())),
        confusion_matrix=tuple(tuple(row) for row in confusion.tolist()),
        mistakes=tuple(FeedbackMistake(id=heldout.ids[i], label=int(labels[i]), predicted=int(predicted[i]),
                                       confidence=round(float(confidence[i]), 6)) for i in wrong),
    )


def production_judge(volume: Volume, heldout: feedback.Accepted, device: torch.device
                     ) -> Callable[[versions.Version], Optional[FeedbackFigures]]:
    """What promotion asks of production's version: how it reads `heldout` (the figures it keeps when they are of
    this very set, else its checkpoint scored now); None when its checkpoint does not load."""

    def judge(current: versions.Version) -> Optional[FeedbackFigures]:
        if current.feedback is not None and current.feedback.digest == heldout.digest:
            return current.feedback
        try:
            _, saved, _ = versions.load(volume, current.number)  # (weights_only, hashed against version.json)
        except PipelineError as exc:
            log.warning("production's version %d is not scored on the held-out feedback (%s): promotion compares "
                        "MNIST's accuracy alone", current.number, exc)
            return None
        return score_feedback(saved.build_model().to(device), heldout, device).figures

    return judge


def score(model: nn.Module, test_set: data.Split, device: torch.device, saved: checkpoint.Checkpoint) -> Evaluation:
    """Accuracy, mean cross-entropy, per-class accuracy, the confusion matrix (rows: true digit) and
    the most confident mistakes of `saved`'s `model`."""
    return _scores(predict(model, test_set.images, device), test_set, device, saved)


def _scores(probabilities: torch.Tensor, test_set: data.Split, device: torch.device,
            saved: checkpoint.Checkpoint) -> Evaluation:
    labels = test_set.labels
    picked = probabilities[torch.arange(len(labels)), labels]
    test_loss = -torch.log(picked.clamp_min(1e-12)).mean().item()
    confusion, predicted, confidence, wrong = _judged(probabilities, labels)
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp_min(1)
    correct = int(confusion.diagonal().sum())
    return Evaluation(
        accuracy=correct / len(labels),
        test_loss=test_loss,
        correct=correct,
        total=len(labels),
        per_class_accuracy=tuple(round(float(a), 6) for a in per_class),
        confusion_matrix=tuple(tuple(row) for row in confusion.tolist()),
        mistakes=tuple(Mistake(test_index=int(i), label=int(labels[i]), predicted=int(predicted[i]),
                               confidence=round(float(confidence[i]), 6)) for i in wrong),  # most confident first
        sha256=saved.sha256,
        epoch=saved.epoch,
        compute_seconds=0.0,
        device=str(device),
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _judged(probabilities: torch.Tensor, labels: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The confusion matrix (rows: true digit), the predictions, their confidence and the MISTAKES_KEPT most
    confident mistakes' places, surest first."""
    predicted = probabilities.argmax(dim=1)
    confusion = torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
    confidence = probabilities.max(dim=1).values
    wrong = (predicted != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)][:MISTAKES_KEPT]
    return confusion, predicted, confidence, wrong
