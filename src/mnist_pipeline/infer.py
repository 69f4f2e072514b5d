"""infer: once the current checkpoint is evaluated and passes the gate, label random test images.

results/ is replaced as a whole: it holds exactly this run's PNGs, each named
by its predicted digit, and predictions.json.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mnist_pipeline import checkpoint, data, runtime
from mnist_pipeline.config import InferConfig
from mnist_pipeline.errors import NotEvaluated, PipelineError
from mnist_pipeline.model import predict
from mnist_pipeline.volume import Volume, is_running, recover_dir, replace_dir, wait_for

log = logging.getLogger(__name__)


def run(config: InferConfig) -> Dict[str, Any]:
    volume = Volume(config.root)
    recover_dir(volume.results_dir)  # a swap of results/ that a kill -9 cut short
    saved, evaluation = wait_for_evaluation(volume, config.wait_s, config.threshold, config.grace_s)
    accuracy = evaluation["accuracy"]
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
    predictions = [
        {
            "file": name,
            "test_index": int(index),
            "label": int(test_set.labels[index]),
            "predicted": int(digit),
            "confidence": round(float(conf), 6),
        }
        for name, index, digit, conf in zip(names, indices, predicted, confidence, strict=True)
    ]
    summary = {
        "checkpoint": {"sha256": saved.sha256, "epoch": saved.epoch},
        "accuracy": accuracy,
        "threshold": config.threshold,
        "compute_seconds": compute_seconds,
        "predictions": predictions,
    }

    def fill(folder: Path) -> None:
        for name, index in zip(names, indices, strict=True):
            (folder / name).write_bytes(png_grayscale(test_set.images[index]))
        (folder / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")

    replace_dir(volume.results_dir, fill)
    return summary


def wait_for_evaluation(volume: Volume, wait_s: float,
                        threshold: float, grace_s: float = 0.0) -> Tuple[checkpoint.Checkpoint, Dict[str, Any]]:
    """The current checkpoint and its evaluation, never an older checkpoint's; BelowThreshold if it fails the gate."""
    problem = ["no checkpoint yet: run `mnist train`, then `mnist evaluate`"]

    def ready() -> Optional[Tuple[checkpoint.Checkpoint, Dict[str, Any]]]:
        try:
            return checkpoint.evaluated(volume, threshold)
        except NotEvaluated as exc:
            problem[0] = str(exc)
            return None

    def ready_unless_training() -> Optional[Tuple[checkpoint.Checkpoint, Dict[str, Any]]]:
        # a running train makes the current checkpoint an old one (`docker compose up` runs all at once)
        return None if is_running(volume, "train") else ready()

    return wait_for(
        "an evaluation of the current checkpoint", ready_unless_training, wait_s,
        producers_running=lambda: is_running(volume, "train") or is_running(volume, "evaluate"),
        on_timeout=lambda: PipelineError(f"{problem[0]} (waited {wait_s:g} s; --wait / MNIST_WAIT)"),
        log=log.info, grace_s=grace_s,
    )


def _file_names(digits: List[int]) -> List[str]:
    """7.png, then 7_1.png, 7_2.png for more sevens in the same run."""
    seen: Counter = Counter()
    names = []
    for digit in digits:
        names.append(f"{digit}.png" if seen[digit] == 0 else f"{digit}_{seen[digit]}.png")
        seen[digit] += 1
    return names


def png_grayscale(image: torch.Tensor) -> bytes:
    """An 8-bit grayscale PNG of a uint8 [H, W] tensor (the format is small enough to write by hand)."""
    height, width = image.shape
    rows = b"".join(b"\x00" + bytes(row) for row in image.tolist())  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
