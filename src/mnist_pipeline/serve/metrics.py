"""/metrics: what serve counts, summed over its workers by prometheus-client's multiprocess mode, set up as its
documentation says: serve's parent points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start
(and before prometheus-client is imported), each worker keeps its values in files there, and /metrics,
whichever worker answers it, collects them all. Counters and histograms are summed over every worker that
ever ran; the decode gauges over the live ones; the served epoch and version are one series per live worker
(label `pid`). A worker that died leaves files behind: the next worker to start marks it dead, which drops
its live gauges (granian has no hook for a worker's end)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from mnist_pipeline.errors import PipelineError

ENV = "PROMETHEUS_MULTIPROC_DIR"


def shared_folder() -> str:
    """A new folder for the workers' values, named in ENV for them (call before prometheus_client loads)."""
    try:
        directory = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    except OSError as exc:
        raise PipelineError(f"cannot create a folder for the workers' metrics in {tempfile.gettempdir()}: "
                            f"{exc.strerror or exc}; make TMPDIR (or /tmp) writable") from None
    os.environ[ENV] = directory
    return directory


def remove_shared_folder(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mnist_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("mnist_prediction_seconds", "time to preprocess and predict one request's images",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                 registry=self.registry)
        self.epoch = Gauge("mnist_checkpoint_epoch", "epoch of the checkpoint being served (0: none yet)",
                           registry=self.registry, multiprocess_mode="liveall")
        self.version = Gauge("mnist_model_version", "version being served (0: none yet, or a volume without "
                             "a production version)", registry=self.registry, multiprocess_mode="liveall")
        self.decoding = Gauge("mnist_decodes_running", "images being decoded now", registry=self.registry,
                              multiprocess_mode="livesum")
        self.waiting = Gauge("mnist_decodes_waiting", "images waiting for a decode slot", registry=self.registry,
                             multiprocess_mode="livesum")
        self.shared = os.environ.get(ENV)
        if self.shared:
            _forget_the_dead(self.shared)

    def exposition(self) -> bytes:
        """The text /metrics answers: every worker's values (this process's alone outside serve's workers)."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.shared:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        multiprocess.MultiProcessCollector(every, path=self.shared)
        return generate_latest(every)


def _forget_the_dead(directory: str) -> None:
    """Mark dead each worker whose value files are there but whose process is gone."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for name in os.listdir(directory) if (m := re.search(r"_(\d+)\.db$", name))}
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, someone else's
            pass
