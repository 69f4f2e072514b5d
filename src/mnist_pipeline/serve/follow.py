"""The model serve answers with, kept current while serve runs: the version --model names (docs/serving.md,
"Following the volume"). A thread stats the files that say which model that is every POLL_S seconds (cheap: no
hashing) and runs the gate only when one changed. A model that passes is loaded and warmed up, then swapped in
with one reference assignment: a request holds the Live it started with, so none fails or waits for a load. The
records read only regular files, with O_NONBLOCK: a FIFO planted in place of a file is a reason not to serve it
(/readyz says so), never a blocked thread. Read-only: nothing here writes to the volume.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional, Tuple, Union

from mnist_pipeline import faults
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import aliases, versions
from mnist_pipeline.serve.http import Limiter
from mnist_pipeline.serve.runtimes import Live, Runtimes
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

POLL_S = 0.5


class Follower:
    """Keeps `live` at the gated version `model` names; `problem` says why that one is not live."""

    def __init__(self, volume: Volume, threshold: float, runtimes: Runtimes,
                 on_swap: Optional[Callable[[Live], None]] = None, model: Union[str, int] = "production"):
        self.volume, self.threshold, self.runtimes, self.on_swap = volume, threshold, runtimes, on_swap
        self.model = model
        self.live: Optional[Live] = None
        self.problem = "starting: the model is not loaded yet"
        self._seen: Optional[Tuple[Any, ...]] = None
        self._alias: Tuple[Any, Optional[int]] = (None, None)  # the alias file's stat when read, its version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-checkpoint", daemon=True)
        self._looking = threading.Lock()  # one look at a time: the thread's, or a request's (current())

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
        with self._looking:
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bug here must not end following; it is logged
                log.exception("checking the volume for a new model failed")

    def current(self) -> Optional[Live]:
        """The live model; while there is none, after a look at the volume now. With several workers another
        one may already serve (and say ready for) what this one's next poll would find: a request to this one
        must not be refused meanwhile."""
        if self.live is None:
            self._look()
        return self.live

    def poll(self) -> None:
        """Load and swap in the model --model names if its files changed since the last look and it passes the gate."""
        if isinstance(self.model, int):
            number: Optional[int] = self.model
            seen: Tuple[Any, ...] = (_stat(self.volume.version_dir(number) / versions.METADATA),)
        else:
            seen = (_stat(self.volume.alias_path(self.model)), _stat(self.volume.checkpoint),
                    _stat(self.volume.eval_results))
            number = self._aliased(seen[0])
        seen += (_stat(self.volume.exported(number)) if number is not None else None,)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            live = self.runtimes.load(self.volume, self.model, self.threshold, self.live)
        except PipelineError as exc:
            self.problem = str(exc)
            if self.live is not None:
                log.info("still serving epoch %d: %s", self.live.epoch, exc)
            else:
                log.info("not ready: %s", exc)
            return
        self.problem = ""
        if live is self.live:
            return
        self.live = live
        log.info("serving %sepoch %d (sha256 %s, accuracy %.4f) with %s",
                 f"version {live.version}, " if live.version else "", live.epoch, live.sha256[:12], live.accuracy,
                 live.runtime)
        if self.on_swap is not None:
            self.on_swap(live)

    def _aliased(self, stat: Any) -> Optional[int]:
        """The version the alias points to, read again only when its file changed (None: unset or unreadable)."""
        if self._alias[0] != stat:
            try:
                number = aliases.read(self.volume, self.model) if stat is not None else None
            except PipelineError:
                number = None  # the gate says what is wrong with it
            self._alias = (stat, number)
        return self._alias[1]


class Kept:
    """Versions asked for by number (POST /predict?version=N): at most `size` loaded, the least recently used
    dropped. One load at a time, and at most LOADS_PER_S of them a second after a burst of `size`: a request
    for a version not loaded while that is spent is Refused (503 with Retry-After), so a client cycling through
    versions cannot make every request wait for a load, nor keep a CPU loading models."""

    LOADS_PER_S = 2.0

    class Refused(PipelineError):
        """Not now: a load is under way, or the loads' rate is spent (503 with Retry-After)."""

    def __init__(self, volume: Volume, threshold: float, runtimes: Runtimes, size: int = 3):
        self.volume, self.threshold, self.runtimes, self.size = volume, threshold, runtimes, size
        self._loaded: "OrderedDict[int, Live]" = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._loading = threading.Lock()  # a load
        self._loads = Limiter(size, self.LOADS_PER_S)

    def get(self, number: int) -> Live:
        """Version `number`, gated; PipelineError (versions.NoSuchVersion for one not kept) when it cannot serve."""
        live = self._cached(number)
        if live is not None:
            return live
        versions.kept(self.volume, number)  # a version not kept costs a look, never a load (nor a token)
        if not self._loading.acquire(blocking=False):
            raise Kept.Refused(f"another version is loading: retry version {number} in 1 s")
        try:
            live = self._cached(number)  # (loaded by the request that held the lock)
            if live is not None:
                return live
            if self._loads.take() is not None:  # (a load that fails costs as much)
                raise Kept.Refused(f"versions are loading too often: retry version {number} in 1 s")
            faults.hold_point("version-load")
            live = self.runtimes.load(self.volume, number, self.threshold)
            with self._lock:
                self._loaded[number] = live
                while len(self._loaded) > self.size:
                    self._loaded.popitem(last=False)
            return live
        finally:
            self._loading.release()

    def _cached(self, number: int) -> Optional[Live]:
        with self._lock:
            live = self._loaded.get(number)
            if live is not None and self.volume.version_dir(number).is_dir():  # (not pruned since)
                self._loaded.move_to_end(number)
                return live
            self._loaded.pop(number, None)
            return None


def _stat(path: os.PathLike) -> Optional[Tuple[int, int, int]]:
    """What changes when a file is replaced (atomic writes give it a new inode), without reading it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
