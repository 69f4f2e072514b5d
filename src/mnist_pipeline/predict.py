"""predict: the digit in each of the user's own images, with the current checkpoint if it passes the gate."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from mnist_pipeline import checkpoint, preprocess, runtime
from mnist_pipeline.config import PredictConfig
from mnist_pipeline.model import describe, predict
from mnist_pipeline.volume import Volume


def run(config: PredictConfig) -> List[Dict[str, Any]]:
    """{file, digit, confidence, probabilities} per image in argument order; {file, error} for one that
    cannot be read. Raises NotEvaluated / BelowThreshold (exit 3) when the checkpoint fails the gate."""
    saved, _ = checkpoint.evaluated(Volume(config.root), config.threshold)
    device = runtime.setup(config.device, config.threads)
    model = saved.build_model().to(device)
    inputs, results = [], []
    for path in config.images:
        try:
            inputs.append(preprocess.from_bytes(path.read_bytes()))
            results.append({"file": str(path)})
        except OSError as exc:
            results.append({"file": str(path), "error": f"cannot read it: {exc.strerror}"})
        except preprocess.ImageError as exc:
            results.append({"file": str(path), "error": str(exc)})
    if inputs:
        probabilities = iter(predict(model, torch.stack(inputs), device))
        for result in results:
            if "error" not in result:
                result.update(describe(next(probabilities)))
    return results
