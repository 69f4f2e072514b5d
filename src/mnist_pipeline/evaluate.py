"""evaluate: wait for a finished checkpoint, score it on all 10,000 test images."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional

import torch

from mnist_pipeline import checkpoint, data, history, report, runtime
from mnist_pipeline.config import EvaluateConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import MnistCNN, predict
from mnist_pipeline.volume import Volume, atomic_write_json, is_running, shared_lock, wait_for

log = logging.getLogger(__name__)

MISTAKES_KEPT = 40  # the most confident mistakes listed in eval_results.json (the report shows them)


def run(config: EvaluateConfig) -> Dict[str, Any]:
    """Write model/eval_results.json for the current checkpoint and return its content."""
    volume = Volume(config.root)
    # Announce ourselves: infer keeps waiting while an evaluate is at work.
    with shared_lock(volume, "evaluate"):
        saved = wait_for_checkpoint(volume, config.wait_s, config.grace_s)
        device = runtime.setup(config.device, config.threads)
        model = saved.build_model().to(device)
        test_set = data.load_split(volume.data_dir, "test", config.mirror)
        started = time.monotonic()
        scores = score(model, test_set, device)
        results = {
            **scores,
            "checkpoint": {"path": str(saved.path), "sha256": saved.sha256, "epoch": saved.epoch},
            "compute_seconds": round(time.monotonic() - started, 3),
            "device": str(device),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(volume.eval_results, results, fault_point="eval-before-rename")
    try:
        history.add_evaluation(volume, saved.epoch, saved.sha256, results["accuracy"], results["test_loss"])
        report.build(volume, config.mirror)
    except PipelineError as exc:
        raise PipelineError(f"{volume.eval_results} is written, but not the report: {exc}; "
                            f"`mnist report` tries again") from None
    return results


def wait_for_checkpoint(volume: Volume, wait_s: float, grace_s: float = 0.0) -> checkpoint.Checkpoint:
    """The checkpoint once no train is writing one: evaluate what a running train produces."""

    def ready() -> Optional[checkpoint.Checkpoint]:
        if is_running(volume, "train") or not volume.checkpoint.exists():
            return None
        return checkpoint.load(volume.checkpoint)

    def timeout() -> PipelineError:
        return PipelineError(
            f"no checkpoint at {volume.checkpoint} after waiting {wait_s:g} s; "
            f"run `mnist train` first (or raise --wait / MNIST_WAIT)"
        )

    def evaluated(saved: checkpoint.Checkpoint) -> bool:
        try:
            return json.loads(volume.eval_results.read_text())["checkpoint"]["sha256"] == saved.sha256
        except (OSError, ValueError, KeyError, TypeError):
            return False

    return wait_for(
        f"a finished checkpoint at {volume.checkpoint}", ready, wait_s,
        producers_running=lambda: is_running(volume, "train"), on_timeout=timeout, log=log.info,
        grace_s=grace_s, needs_grace=evaluated,
    )


def score(model: MnistCNN, test_set: data.Split, device: torch.device) -> Dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class accuracy, the confusion matrix (rows: true digit) and
    the most confident mistakes."""
    probabilities = predict(model, test_set.images, device)
    labels = test_set.labels
    predicted = probabilities.argmax(dim=1)
    picked = probabilities[torch.arange(len(labels)), labels]
    test_loss = -torch.log(picked.clamp_min(1e-12)).mean().item()
    confusion = torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp_min(1)
    correct = int(confusion.diagonal().sum())
    confidence = probabilities.max(dim=1).values
    wrong = (predicted != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)][:MISTAKES_KEPT]
    return {
        "accuracy": correct / len(labels),
        "test_loss": test_loss,
        "correct": correct,
        "total": len(labels),
        "per_class_accuracy": {str(d): round(float(a), 6) for d, a in enumerate(per_class)},
        "confusion_matrix": confusion.tolist(),
        "mistakes": [  # the most confident first
            {"test_index": int(i), "label": int(labels[i]), "predicted": int(predicted[i]),
             "confidence": round(float(confidence[i]), 6)}
            for i in wrong
        ],
    }
