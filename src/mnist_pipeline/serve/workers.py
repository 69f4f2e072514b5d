"""Several processes that answer on one port: supervise() forks --workers of them, each running
server.serve(), and keeps that many running.

The parent binds a socket for each worker on the port (SO_REUSEPORT: the kernel spreads new
connections over them; one socket shared by all would let the first worker awake take every
connection of a burst, and keep-alive clients stay where they land), forks, and then only
supervises: it has imported neither the model's runtime nor the app, so no thread pool of theirs
is forked half-way (and the fork costs little). The first worker starts alone: a setting that cannot
work (--device cuda without a GPU, ...) is then one `error:` line and its exit code, as with one
process; the others start once it has built its app. Each worker looks at the volume once before
it takes its first connection (follow.py), so none answers "not loaded yet" beside others that
serve.

A worker that ends on its own is logged and replaced (after RESTART_DELAY_S when it lived less than
YOUNG_S: a worker that cannot start must not fork in a loop); YOUNG_ENDS in a row end serve with an
error. SIGTERM and SIGINT go to every worker; each finishes the requests it has, as uvicorn does; the
parent waits for them all, then ends as the signal says (143, 130). The workers are in a process group
of their own, so Ctrl-C in a terminal reaches them once, through the parent, and each ends with the
parent if it is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

from mnist_pipeline import signals
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.faults import crash_point
from mnist_pipeline.serve.connections import listen
from mnist_pipeline.serve.server import serve
from mnist_pipeline.settings import ServeConfig

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
YOUNG_S = 10.0
# a worker that keeps ending young ends serve: its socket would hold a share of new connections that no
# one accepts, while /readyz, answered by the others, says 200 (a supervisor restarts the whole of serve)
YOUNG_ENDS = 3
STOPS = {signal.SIGTERM, signal.SIGINT}
WATCHED = STOPS | {signal.SIGCHLD}
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
# modules the parent loads before it forks, for the workers to share: the web framework (no threads
# of their own, so fork-safe), not the model's runtime
PRELOAD = ("fastapi", "starlette.formparsers", "starlette.staticfiles", "PIL.Image", "PIL.PngImagePlugin")


class WorkerFailed(PipelineError):
    """The first worker ended before it could serve (it said why, its `error:` line, when `silent`), or a worker
    kept ending young."""

    def __init__(self, message: str, exit_code: int, silent: bool):
        super().__init__(message)
        self.exit_code, self.silent = exit_code, silent


@dataclass
class Worker:
    number: int
    pid: int
    born: float


def supervise(sock: socket.socket, config: ServeConfig, count: int) -> None:
    """`count` workers on `sock`'s port until SIGTERM or SIGINT (then this process ends as the signal says).
    A worker's socket stays with the parent: a replacement takes over the connections waiting on it."""
    sockets = [sock] + [listen(config.host, sock.getsockname()[1], shared=True) for _ in range(count - 1)]
    before = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # taken by sigtimedwait below, never lost
    try:
        directory = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        raise PipelineError(f"cannot create a folder for the workers' metrics in {tempfile.gettempdir()}: "
                            f"{exc.strerror or exc}; make TMPDIR writable, or pass --workers 1") from None
    stopped_by = None
    try:
        for module in PRELOAD:
            __import__(module)
        pool = Pool(sockets, config, directory, before)
        stopped_by = pool.run()
        if pool.failed:
            raise WorkerFailed(pool.failed, 1, silent=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    if stopped_by is not None:
        signal.raise_signal(stopped_by)  # recorded by signals.py: the exit code says which


class Pool:
    """The workers and what the parent does for them: start, replace, stop, reap."""

    def __init__(self, sockets: List[socket.socket], config: ServeConfig, directory: str, mask: "set[signal.Signals]"):
        self.sockets, self.config, self.directory, self.mask = sockets, config, directory, mask
        self.count = len(sockets)
        self.workers: Dict[int, Worker] = {}
        self.due: Dict[int, float] = {}  # worker number -> when to start it
        self.stopping: Optional[int] = signals.received()  # (a signal before the mask was set)
        self.young_ends: Dict[int, int] = {}  # worker number -> its ends in a row within YOUNG_S of its start
        self.failed = ""  # why serve stops on its own

    def run(self) -> Optional[int]:
        """Until the last worker has ended after a signal; that signal (None: the first worker failed)."""
        if self.stopping is None:
            self.first()
        if self.stopping is None:
            for number in range(2, self.count + 1):
                self.start(number)
        while self.workers or (self.stopping is None and self.due):
            self.step(self.wait())
        return self.stopping

    def first(self) -> None:
        """Worker 1, alone until it has built its app; WorkerFailed when it ends before that."""
        ready, told = os.pipe()
        try:
            worker = self.start(1, told)
            os.close(told)
            while self.stopping is None and not select.select([ready], [], [], 0.01)[0]:
                self.step(signal.sigtimedwait(STOPS, 0))  # (its end, SIGCHLD, is for the pipe to say)
            if self.stopping is not None or os.read(ready, 1):
                return
        finally:
            os.close(ready)
        _, status = os.waitpid(worker.pid, 0)
        del self.workers[worker.pid]
        code = os.waitstatus_to_exitcode(status)
        if code > 0:  # it printed its error line
            raise WorkerFailed(f"worker 1 exited with {code}", code, silent=True)
        raise WorkerFailed(f"the first serve worker ended before it could serve ({describe(code)}): see the "
                           f"log above", 1, silent=False)

    def wait(self) -> Optional[signal.struct_siginfo]:
        """The next signal, or None when a worker is due to start."""
        if self.stopping is None and self.due:
            return signal.sigtimedwait(WATCHED, max(0.0, min(self.due.values()) - time.monotonic()))
        return signal.sigwaitinfo(WATCHED)

    def step(self, info: Optional[signal.struct_siginfo]) -> None:
        if info is None:
            now = time.monotonic()
            for number in [n for n, at in self.due.items() if at <= now and self.stopping is None]:
                del self.due[number]
                self.start(number)
        elif info.si_signo in STOPS:
            if self.stopping is None:
                self.stopping = info.si_signo
                log.info("stopping %d workers (%s)", len(self.workers), signal.Signals(info.si_signo).name)
            for pid in self.workers:  # (a second signal too: uvicorn ends at once on a second SIGINT)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
        else:
            self.reap()

    def reap(self) -> None:
        from mnist_pipeline.serve import metrics

        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            metrics.forget(pid, self.directory)
            if self.stopping is None:
                lived = time.monotonic() - worker.born
                delay = RESTART_DELAY_S if lived < YOUNG_S else 0.0
                ends = self.young_ends[worker.number] = (self.young_ends.get(worker.number, 0) + 1) if delay else 0
                if ends >= YOUNG_ENDS:
                    self.give_up(f"serve worker {worker.number} ended {ends} times in a row within {YOUNG_S:g} s of "
                                 f"its start (last: {describe(os.waitstatus_to_exitcode(status))}): see the log "
                                 f"above; fix that, or pass --workers 1")
                    continue
                log.warning("worker %d (pid %d) ended (%s) after %.0f s: starting another%s", worker.number, pid,
                            describe(os.waitstatus_to_exitcode(status)), lived,
                            f" in {delay:g} s" if delay else "")
                self.due[worker.number] = time.monotonic() + delay

    def give_up(self, why: str) -> None:
        """Stop every worker, then serve (supervise raises `why`)."""
        self.failed, self.stopping = why, signal.SIGTERM
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def start(self, number: int, told: Optional[int] = None) -> Worker:
        """Fork worker `number`; it writes a byte to `told` once its app is built."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _worker(self, number, parent, told)  # never returns
        worker = self.workers[pid] = Worker(number, pid, time.monotonic())
        log.debug("worker %d: pid %d", number, pid)
        return worker


def _worker(pool: Pool, number: int, parent: int, told: Optional[int]) -> None:
    """A forked worker's life: serve until told to stop, then end the process (the parent's code is not ours)."""
    code = 1
    try:
        os.setpgid(0, 0)
        _end_with(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, pool.mask)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Prefix(f"worker {number}: "))
        from mnist_pipeline.serve import metrics

        metrics.share(pool.directory)

        def started() -> None:
            if told is not None:
                os.write(told, b".")
                os.close(told)

        for other in pool.sockets[:number - 1] + pool.sockets[number:]:
            other.close()
        crash_point(f"serve-worker-{number}")
        serve(pool.sockets[number - 1], pool.config, started)
        code = 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except SystemExit as exc:  # uvicorn's, when its start fails (it logged why)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a bug: its traceback, and the parent starts another
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _end_with(parent: int) -> None:
    """SIGTERM to this process when the parent ends, however it ends (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Prefix(logging.Filter):
    """Says which worker a log line comes from."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


def describe(code: int) -> str:
    """A process's end as waitstatus_to_exitcode gives it, in words."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
