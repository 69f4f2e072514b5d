"""/metrics: what serve counts, summed over its worker processes when it runs several.

prometheus-client's multiprocess mode: each worker keeps its values in files of its own under
PROMETHEUS_MULTIPROC_DIR (a private folder the parent process creates and removes), and /metrics,
whichever worker answers it, reads them all. Counters and histograms are summed over every worker
that ever ran, the ones that died and were replaced included; the decode gauges are summed over
the live workers; the served epoch and version are one series per live worker (label `pid`), so
that a switch shows worker by worker. Without the variable (one worker) the values live in memory.
"""

from __future__ import annotations

import os
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

ENV = "PROMETHEUS_MULTIPROC_DIR"


def share(directory: str) -> None:
    """Values of the metrics this process creates from now on live in files under `directory`.

    prometheus-client picks where values live when it is first imported; a process that imported it
    before the variable was set (a parent that preloads it, the tests' fork server) picks again here.
    """
    os.environ[ENV] = directory
    values.ValueClass = values.get_value_class()


def forget(pid: int, directory: str) -> None:
    """A dead worker's gauges stop counting (its counts stay in the sums)."""
    multiprocess.mark_process_dead(pid, directory)


class Metrics:
    def __init__(self) -> None:
        self.shared: Optional[str] = os.environ.get(ENV)
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

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's values, or every worker's."""
        if self.shared is None:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        multiprocess.MultiProcessCollector(every, path=self.shared)
        return generate_latest(every)
