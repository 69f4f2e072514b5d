"""serve: the HTTP API and the draw-a-digit page, on granian (a Rust HTTP server for ASGI apps) through its public
settings (docs/serving.md says what it does for serve). Each worker builds the app (app.py), which follows the
volume on its own (follow.py). Nothing here imports the model's runtime or prometheus-client at module level:
granian forks the workers from this process, after PROMETHEUS_MULTIPROC_DIR names their shared folder.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
from typing import Any, Callable

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.runtime import available_cpus
from mnist_pipeline.settings import ServeConfig

log = logging.getLogger(__name__)

# workers by default: one per CPU up to this; each holds a model and a decode's memory, so a big host must
# not start dozens unasked (--workers raises it)
MAX_DEFAULT_WORKERS = 4
# granian's own lines (a worker's unexpected exit) through the root logger, on stderr like ours
LOG_TO_STDERR = {"loggers": {"_granian": {"handlers": [], "propagate": True}}}
DRAIN_S = 10  # after SIGTERM, in-flight requests get this long before a worker is killed
OPEN_FILES = 65536  # the open-file limit serve asks for, as far as the hard limit allows


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT (then exit as signals.py says); PipelineError when it cannot start or its
    workers keep dying."""
    try:
        from granian import Granian
        from granian.http import HTTP1Settings
    except ImportError:
        raise PipelineError("mnist serve runs on granian, which this installation leaves out (the train, evaluate "
                            "and infer image does): use the serve image (`docker compose up serve`, Dockerfile "
                            "target serve), or `pip install granian fastapi python-multipart prometheus-client`"
                            ) from None

    count = config.workers or min(available_cpus(), MAX_DEFAULT_WORKERS)
    if config.runtime != "auto" or config.device not in ("auto", "cpu"):
        from mnist_pipeline.serve.runtimes import Runtimes

        Runtimes(config.runtime, config.device, config.threads)  # a setting that cannot work: its error, once
    if config.feedback:  # POST /feedback writes feedback/: a read-only volume is said at the start, not per sample
        from mnist_pipeline.storage.atomic import ensure_dir
        from mnist_pipeline.volume import Volume

        folder = ensure_dir(Volume(config.root).feedback_dir)
        if not os.access(folder, os.W_OK):
            raise PipelineError(f"--feedback on: {folder} is not writable; mount the volume read-write for serve "
                                f"(docs/feedback.md), or turn feedback off")
    _allow_open_files()
    port, placeholder = _reserve(config.host, config.port)
    directory = _metrics_folder()
    server = Granian("mnist_pipeline.serve.app:create_app", address=config.host, port=port, interface="asgi",
                     workers=count, backpressure=config.max_requests, respawn_failed_workers=True,
                     http1_settings=HTTP1Settings(header_read_timeout=int(config.read_timeout * 1000)),
                     workers_kill_timeout=DRAIN_S, log_level="warning", log_dictconfig=LOG_TO_STDERR)
    stopped_by: list = []
    ours = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}  # signals.py's
    server.on_startup(lambda: _started(config.host, port, count, config, stopped_by))
    try:
        server.serve(target_loader=functools.partial(_app, config), wrap_loader=False)
    except SystemExit as exc:  # granian's own end: a worker that kept dying (it logged which)
        if exc.code:
            raise PipelineError("a serve worker kept dying right after its restart (see the log above): fix "
                                "what it says; under Compose or Kubernetes serve is restarted") from None
    finally:
        placeholder.close()
        shutil.rmtree(directory, ignore_errors=True)
        for signum, handler in ours.items():
            signal.signal(signum, handler)
    if stopped_by:
        signal.raise_signal(stopped_by[0])  # recorded by signals.py: the exit code says which


def _allow_open_files() -> None:
    """Each connection is an open file: the soft limit raised as far as the hard one lets it (granian's workers
    inherit it). Beyond it, new connections wait in the listen queue until stalled ones time out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _metrics_folder() -> str:
    """A new folder for the workers' metrics, named in PROMETHEUS_MULTIPROC_DIR for them (service.Metrics)."""
    try:
        directory = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    except OSError as exc:
        raise PipelineError(f"cannot create a folder for the workers' metrics in {tempfile.gettempdir()}: "
                            f"{exc.strerror or exc}; make TMPDIR (or /tmp) writable") from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def _app(config: ServeConfig) -> Any:
    """The app, built in each worker."""
    from mnist_pipeline.faults import crash_point
    from mnist_pipeline.serve.app import create_app

    crash_point("serve-worker")

    return create_app(config)


def _reserve(host: str, port: int) -> "tuple[int, socket.socket]":
    """The port to serve on (port 0: a free one), held by a bound socket that never listens: granian's workers
    bind it beside that (SO_REUSEPORT), and nothing else takes it meanwhile. A taken port is one error line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as alone:  # (without SO_REUSEPORT: fails where anyone listens)
            alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            alone.bind(address)
            address = alone.getsockname()
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port / "
                            f"MNIST_PORT or --host / MNIST_HOST") from None
    return sock.getsockname()[1], sock


def _started(host: str, port: int, count: int, config: ServeConfig, stopped_by: list) -> None:
    """In granian's parent once it has set its signal handlers: record which signal stops it (for the exit
    code), and say where serve listens once a worker accepts connections there."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        granians = signal.getsignal(signum)
        signal.signal(signum, functools.partial(_record, granians, stopped_by))
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    threading.Thread(target=_say_when_open, args=(host, port, url, count, config), daemon=True).start()


def _record(granians: Callable, stopped_by: list, signum: int, frame: Any) -> None:
    stopped_by.append(signum)
    granians(signum, frame)


def _say_when_open(host: str, port: int, url: str, count: int, config: ServeConfig) -> None:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    while True:
        try:
            socket.create_connection((target, port), timeout=1).close()
            break
        except OSError:
            threading.Event().wait(0.05)
    log.info("listening on %s (volume %s, threshold %s, %d worker%s, pid %d)", url, config.root, config.threshold,
             count, "s" if count > 1 else "", os.getpid())

