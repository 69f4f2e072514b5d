"""What serve's routes share, one per worker process (app.state.service): the model that follows the volume,
the versions kept on request, what requests may hold at once and the counts /metrics gives; and the two steps
every prediction route takes: the model a request gets, and its images decoded and read by it."""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from starlette.concurrency import run_in_threadpool

from mnist_pipeline import faults, preprocess, runtime
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import feedback, versions
from mnist_pipeline.serve.follow import Follower, Kept
from mnist_pipeline.serve.http import UPLOADS_BYTES, ClientError, Limiter, Slots, Uploads, busy
from mnist_pipeline.serve.runtimes import Live, Runtimes
from mnist_pipeline.settings import ServeConfig
from mnist_pipeline.volume import Volume

DECODE_TURN_S = 0.005  # a request decodes images for this long (one image at least) before others' get a turn
# A request of small files whose images hold this many pixels in all (the page's drawing, 64 MNIST-sized
# digits) is decoded on the event loop: less CPU than a trip to the threadpool and back, and each image's cost
# is bounded by its header (its pixels) and by its bytes (what a file can make Pillow parse: PNG chunks, JPEG
# scans). Anything larger waits for a decode slot.
LOOP_PIXELS = 320 * 320
LOOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Service:
    """What the routes share, one per process (app.state.service)."""

    config: ServeConfig
    volume: Volume
    follower: Follower
    kept: Kept
    metrics: Metrics
    slots: Slots
    uploads: Uploads
    private: List[str]  # the volume's path as messages may spell it: answers leave it out
    feedback_limiter: Limiter  # POST /feedback's token buckets (serve/feedback.py), and its view of feedback/'s size
    feedback_pending: feedback.Pending

    @classmethod
    def of(cls, config: ServeConfig) -> "Service":
        volume = Volume(config.root)
        runtimes = Runtimes(config.runtime, config.device, config.threads)
        metrics = Metrics()

        def swapped(live: Live) -> None:
            metrics.epoch.set(live.epoch)
            metrics.version.set(live.version or 0)

        return cls(config=config, volume=volume, metrics=metrics,
                   follower=Follower(volume, config.threshold, runtimes, on_swap=swapped, model=config.model),
                   kept=Kept(volume, config.threshold, runtimes),
                   slots=Slots(config.max_decodes or runtime.available_cpus(), config.max_waiting, metrics),
                   uploads=Uploads(UPLOADS_BYTES), private=_private_paths(volume.root),
                   feedback_limiter=Limiter(config.feedback_rate, config.feedback_rate / 60),
                   feedback_pending=feedback.Pending(volume))

    def public(self, message: str) -> str:
        """`message` with the volume's path taken out: `--root /x` goes, /x/model/... becomes model/..."""
        for path in self.private:
            message = message.replace(f" --root {path}", "").replace(path + "/", "").replace(path, "the volume")
        return message


async def model_for(service: Service, number: Optional[int], refused: int = 409) -> Live:
    """The model a request gets: version `number`, else the one serving now (kept for the whole request,
    whatever swaps in later). ClientError: 404 for a version not kept, `refused` for one that cannot serve
    (below the threshold, corrupt), 503 while none can or a load is under way."""
    if number is not None:
        if not 0 < number <= versions.MAX_VERSION:
            raise ClientError(400, f"version {number} is not a version number: GET /models lists them")
        try:
            return await run_in_threadpool(service.kept.get, number)
        except PipelineError as exc:
            if isinstance(exc, Kept.Refused):
                raise busy(str(exc)) from None
            raise ClientError(404 if isinstance(exc, versions.NoSuchVersion) else refused,
                              service.public(str(exc))) from None
    live = service.follower.live or await run_in_threadpool(service.follower.current)
    if live is None:
        raise ClientError(503, f"no model to serve yet: {service.public(service.follower.problem)}")
    return live


async def decode_and_predict(service: Service, live: Live, images: List[bytes], what: Optional[str] = None,
                             keep: Optional[Dict[int, bytes]] = None) -> Any:
    """`images` (encoded files) made MNIST-like and read by `live`: probabilities [N, 10]. Small images are done
    right here, on the event loop (`_on_the_loop`); the rest take the service's slots, a few images a turn in the
    threadpool, so a request of many holds one decoded image at a time. `what`: how an error names the image
    ("{what} 3: ..."); by default "file N", and only among several. `keep`: given, it receives each image's
    28x28 pixels by its place (what the model read)."""
    named = what or ("file" if len(images) > 1 else "")
    inputs: List[bytes] = []
    if sum(len(data) for data in images) <= LOOP_BYTES:
        _on_the_loop(images, inputs, named)
    answers = live.predict(inputs) if len(inputs) == len(images) else None
    while answers is None:
        async with service.slots.slot(newcomer=not inputs):
            answers = await run_in_threadpool(_decode_turn, images, inputs, live, named)
    if keep is not None:
        keep.update(enumerate(inputs))
    return answers


def version_header(live: Live) -> Dict[str, str]:
    return {"X-Model-Version": str(live.version)} if live.version is not None else {}


def _private_paths(root: Path) -> List[str]:
    """The volume's path as messages may spell it, longest first: answers say model/..., not where the volume is."""
    spellings = {str(root), str(root.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        spellings.add(str(root.resolve()))
    return sorted((s for s in spellings if s not in (".", "")), key=len, reverse=True)


def _on_the_loop(images: List[bytes], inputs: List[bytes], named: str) -> None:
    """`images` decoded into `inputs` while each stays cheap by its header (LOOP_PIXELS in all, no JPEG of several
    scans); the first that is not, and those after it, are left to the threadpool."""
    pixels = 0
    for number, data in enumerate(images):
        opened = _image(preprocess.opened, data, named, number)
        pixels += opened.width * opened.height
        if pixels > LOOP_PIXELS or preprocess.scans(opened, data) > 1:
            return
        faults.hold_point("decode")
        inputs.append(_image(preprocess.from_bytes, opened, named, number))


def _decode_turn(images: List[bytes], inputs: List[bytes], live: Live, named: str) -> Optional[Any]:
    """The next of `images` decoded into `inputs` for DECODE_TURN_S (one at least), each one's bytes dropped once
    done with; once all are, their probabilities, in the same turn (None until then). A request of many small
    images takes a few trips to the threadpool, not one per image (nor one more to predict); one of large images
    still lets other requests' images in between its own."""
    began = time.perf_counter()
    while len(inputs) < len(images):
        number = len(inputs)
        faults.hold_point("decode")
        inputs.append(_image(preprocess.from_bytes, images[number], named, number))
        images[number] = b""
        if len(inputs) < len(images) and time.perf_counter() - began > DECODE_TURN_S:
            return None
    return live.predict(inputs)


def _image(step: Callable[[Any], Any], data: Any, named: str, number: int) -> Any:
    """`step` (a preprocess function) of image `number`; its ImageError as a 400 naming the image among several."""
    try:
        return step(data)
    except preprocess.ImageError as exc:
        raise ClientError(400, f"{named} {number + 1}: {exc}" if named else str(exc)) from None


class Metrics:
    """What /metrics gives, summed over the workers by prometheus-client's multiprocess mode: serve's parent
    names a fresh folder in PROMETHEUS_MULTIPROC_DIR before the workers start, each keeps its values in files
    there, and whichever answers /metrics collects them all. The served epoch and version are one series per
    live worker (label `pid`); the next worker to start marks a dead one's files dead, which drops them
    (granian has no hook for a worker's end)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

        registry = CollectorRegistry()  # (not the global one: /metrics reads the shared folder, not a registry)
        self.requests = Counter("mnist_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.latency = Histogram("mnist_prediction_seconds", "time to preprocess and predict one request's images",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                 registry=registry)
        self.epoch = Gauge("mnist_checkpoint_epoch", "epoch of the checkpoint being served (0: none yet)",
                           registry=registry, multiprocess_mode="liveall")
        self.version = Gauge("mnist_model_version", "version being served (0: none yet, or a volume without "
                             "a production version)", registry=registry, multiprocess_mode="liveall")
        self.decoding = Gauge("mnist_decodes_running", "images being decoded now", registry=registry,
                              multiprocess_mode="livesum")
        self.waiting = Gauge("mnist_decodes_waiting", "images waiting for a decode slot", registry=registry,
                             multiprocess_mode="livesum")
        # a dead worker's pid, from its value files' names (`..._<pid>.db`: docs/development.md)
        shared = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        pids = {int(m.group(1)) for name in os.listdir(shared) if (m := re.search(r"_(\d+)\.db$", name))}
        for pid in pids - {os.getpid()}:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, shared)
            except PermissionError:  # alive, someone else's
                pass

    @staticmethod
    def exposition() -> bytes:
        """The text /metrics answers: every worker's values."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        every = CollectorRegistry()
        multiprocess.MultiProcessCollector(every)  # (the folder PROMETHEUS_MULTIPROC_DIR names)
        return generate_latest(every)
