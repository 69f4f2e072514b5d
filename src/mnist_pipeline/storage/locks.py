"""Who may write: flock()s on files in model/, which the kernel drops when their process dies, so a
crashed train never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import ContextManager, Iterator

from mnist_pipeline.errors import Busy, PipelineError
from mnist_pipeline.storage.atomic import ensure_dir, write_failed
from mnist_pipeline.storage.files import read_regular
from mnist_pipeline.volume import Volume


def _holder_description(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError, PipelineError):
        holder = json.loads(read_regular(path, 4096, "lock file") or "{}")
        if holder:
            return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    return "another process"


def _open_lock(path: Path) -> int:
    ensure_dir(path.parent)
    try:
        # O_NOFOLLOW: a symlink planted here must not make us create or overwrite a file elsewhere
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o664)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PipelineError(
                f"{path} is a symbolic link; the pipeline never writes through one: remove it (`rm {path}`)"
            ) from None
        raise write_failed(path, exc) from None


def _try_flock(fd: int, kind: int, patience_s: float) -> bool:
    # Patience, because is_running() probes hold the lock for a moment.
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


@contextlib.contextmanager
def exclusive_lock(volume: Volume, role: str) -> Iterator[None]:
    """Hold the `role` lock of this volume, or raise Busy naming its holder."""
    path = volume.lock_path(role)
    fd = _open_lock(path)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX, patience_s=2.0):
            raise Busy(
                f"another {role} is running on {volume.root} ({_holder_description(path)}); "
                f"wait for it to finish (a crashed one releases its lock by itself)"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def shared_lock(volume: Volume, role: str) -> ContextManager[None]:
    """Announce a `role` at work without excluding others (readers of is_running see it)."""
    return _held(volume, role, fcntl.LOCK_SH)


def brief_lock(volume: Volume, role: str) -> ContextManager[None]:
    """Wait for and hold the `role` lock around a short read-modify-write of a shared file."""
    return _held(volume, role, fcntl.LOCK_EX)


@contextlib.contextmanager
def _held(volume: Volume, role: str, kind: int) -> Iterator[None]:
    fd = _open_lock(volume.lock_path(role))
    try:
        fcntl.flock(fd, kind)  # waits for it
        yield
    finally:
        os.close(fd)


def is_running(volume: Volume, role: str) -> bool:
    """Whether any process holds the `role` lock right now."""
    path = volume.lock_path(role)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
