"""The newest model on the volume that passes the gate, kept current while serve runs.

A thread stats model/mnist_cnn.pt and model/eval_results.json every POLL_S seconds (cheap: no
hashing) and runs the gate (records.evaluation.evaluated) only when either changed. The records read
only regular files, with O_NONBLOCK: a FIFO planted in place of a file is a reason not to serve it
(/readyz says so), never a blocked thread. A model that passes
is loaded, warmed up, then swapped in with one reference assignment: a request holds the Live
it started with, so none fails or waits for a load. A checkpoint that is unevaluated, evaluated
below the threshold or unreadable never serves; the previous good model keeps serving meanwhile.
Read-only: nothing here writes to the volume.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from torch import nn

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import IMAGE_SIZE, predict
from mnist_pipeline.records.evaluation import evaluated
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

POLL_S = 0.5


@dataclass(frozen=True)
class Live:
    """A loaded model and what it is: the checkpoint it came from and that checkpoint's evaluation."""

    model: nn.Module
    sha256: str
    epoch: int
    accuracy: float

    def predict(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 [N, 28, 28] -> probabilities [N, 10]."""
        return predict(self.model, images, device)


class Follower:
    """Keeps `live` at the newest gated model of `volume`; `problem` says why the newest is not live."""

    def __init__(self, volume: Volume, threshold: float, device: torch.device,
                 on_swap: Optional[Callable[[Live], None]] = None):
        self.volume, self.threshold, self.device, self.on_swap = volume, threshold, device, on_swap
        self.live: Optional[Live] = None
        self.problem = "starting: the model is not loaded yet"
        self._seen: Optional[Tuple[Any, ...]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bug here must not end following; it is logged
                log.exception("checking the volume for a new model failed")
            self._stop.wait(POLL_S)

    def poll(self) -> None:
        """Load and swap in the current checkpoint if its files changed since the last look and it passes the gate."""
        seen = (_stat(self.volume.checkpoint), _stat(self.volume.eval_results))
        if seen == self._seen:
            return
        self._seen = seen
        try:
            saved, evaluation = evaluated(self.volume, self.threshold)
            if self.live is not None and saved.sha256 == self.live.sha256:
                self.problem = ""
                return
            live = Live(model=saved.build_model().to(self.device), sha256=saved.sha256, epoch=saved.epoch,
                        accuracy=evaluation.accuracy)
        except PipelineError as exc:
            self.problem = str(exc)
            if self.live is not None:
                log.info("still serving epoch %d: %s", self.live.epoch, exc)
            else:
                log.info("not ready: %s", exc)
            return
        live.predict(torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), self.device)  # warm up off the hot path
        self.live, self.problem = live, ""
        log.info("serving epoch %d (sha256 %s, accuracy %.4f)", live.epoch, live.sha256[:12], live.accuracy)
        if self.on_swap is not None:
            self.on_swap(live)


def _stat(path: os.PathLike) -> Optional[Tuple[int, int, int]]:
    """What changes when a file is replaced (atomic writes give it a new inode), without reading it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
