"""The model serve answers with, kept current while serve runs: the version --model names.

--model production (or another alias) follows the alias: a thread stats its file (and, while
production is unset, model/mnist_cnn.pt and model/eval_results.json, served as before versions) every
POLL_S seconds (cheap: no hashing) and runs the gate (records.aliases.gated) only when one changed.
--model N pins version N, which never changes. The records read
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
from collections import OrderedDict
from typing import Any, Callable, Optional, Tuple, Union

import torch

from torch import nn

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import IMAGE_SIZE, predict
from mnist_pipeline.records import versions
from mnist_pipeline.records.aliases import gated
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
    version: Optional[int] = None  # None: the current checkpoint of a volume with no production version yet

    def describe(self) -> dict:
        """The `checkpoint` object of serve's answers."""
        return {"sha256": self.sha256, "epoch": self.epoch,
                **({"version": self.version} if self.version is not None else {})}

    def predict(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 [N, 28, 28] -> probabilities [N, 10]."""
        return predict(self.model, images, device)


class Follower:
    """Keeps `live` at the gated version `model` names; `problem` says why that one is not live."""

    def __init__(self, volume: Volume, threshold: float, device: torch.device,
                 on_swap: Optional[Callable[[Live], None]] = None, model: Union[str, int] = "production"):
        self.volume, self.threshold, self.device, self.on_swap = volume, threshold, device, on_swap
        self.model = model
        self.live: Optional[Live] = None
        self.problem = "starting: the model is not loaded yet"
        self._seen: Optional[Tuple[Any, ...]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-checkpoint", daemon=True)

    def start(self) -> None:
        """The first look at the volume, here, then a thread that keeps looking."""
        self._look()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._look()

    def _look(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - a bug here must not end following; it is logged
            log.exception("checking the volume for a new model failed")

    def poll(self) -> None:
        """Load and swap in the model --model names if its files changed since the last look and it passes the gate."""
        if isinstance(self.model, int):
            seen: Tuple[Any, ...] = (_stat(self.volume.version_dir(self.model) / versions.METADATA),)
        else:
            seen = (_stat(self.volume.alias_path(self.model)), _stat(self.volume.checkpoint),
                    _stat(self.volume.eval_results))
        if seen == self._seen:
            return
        self._seen = seen
        try:
            live = load(self.volume, self.model, self.threshold, self.device, self.live)
            if live is self.live:
                self.problem = ""
                return
        except PipelineError as exc:
            self.problem = str(exc)
            if self.live is not None:
                log.info("still serving epoch %d: %s", self.live.epoch, exc)
            else:
                log.info("not ready: %s", exc)
            return
        self.live, self.problem = live, ""
        log.info("serving %sepoch %d (sha256 %s, accuracy %.4f)", f"version {live.version}, " if live.version else "",
                 live.epoch, live.sha256[:12], live.accuracy)
        if self.on_swap is not None:
            self.on_swap(live)


def load(volume: Volume, model: Union[str, int], threshold: float, device: torch.device,
         current: Optional[Live] = None) -> Live:
    """The gated model `model` names, loaded and warmed up; `current` itself if it is that one already."""
    version, saved, evaluation = gated(volume, model, threshold)
    number = version.number if version is not None else None
    if current is not None and (current.sha256, current.version) == (saved.sha256, number):
        return current
    live = Live(model=saved.build_model().to(device), sha256=saved.sha256, epoch=saved.epoch,
                accuracy=evaluation.accuracy, version=number)
    live.predict(torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), device)  # warm up off the hot path
    return live


class Kept:
    """Versions asked for by number (POST /predict?version=N): at most `size` loaded, the least recently used
    dropped. Loads happen one at a time, on the caller's thread."""

    def __init__(self, volume: Volume, threshold: float, device: torch.device, size: int = 3):
        self.volume, self.threshold, self.device, self.size = volume, threshold, device, size
        self._loaded: "OrderedDict[int, Live]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, number: int) -> Live:
        """Version `number`, gated; PipelineError (versions.NoSuchVersion for one not kept) when it cannot serve."""
        with self._lock:
            live = self._loaded.get(number)
            if live is None or not self.volume.version_dir(number).is_dir():  # (pruned since)
                self._loaded.pop(number, None)
                live = load(self.volume, number, self.threshold, self.device)
            self._loaded[number] = live
            self._loaded.move_to_end(number)
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
            return live


def _stat(path: os.PathLike) -> Optional[Tuple[int, int, int]]:
    """What changes when a file is replaced (atomic writes give it a new inode), without reading it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
