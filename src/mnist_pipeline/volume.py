"""The shared volume: where each file lives, how it is written, who may write.

Every file another service reads is written atomically (temp file in the same
folder, fsync, os.replace), so a reader or a kill -9 never sees half a file.
Locks are flock()s: the kernel drops them when their process dies, so a crashed
train never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, TypeVar

from mnist_pipeline.errors import Busy, PipelineError
from mnist_pipeline.faults import crash_point

T = TypeVar("T")

TEMP_PREFIX = ".tmp-"  # every temp file or folder we create starts with this


@dataclass(frozen=True)
class Volume:
    """Paths inside the volume root (MNIST_ROOT)."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def checkpoint(self) -> Path:
        """The last completed epoch: the only model evaluate and infer ever read."""
        return self.model_dir / "mnist_cnn.pt"

    @property
    def progress(self) -> Path:
        """An interrupted epoch, kept apart so the checkpoint stays a finished one."""
        return self.model_dir / "train_progress.pt"

    @property
    def eval_results(self) -> Path:
        return self.model_dir / "eval_results.json"

    @property
    def history(self) -> Path:
        """Train loss and learning rate every few steps, each epoch's summary and test accuracy."""
        return self.model_dir / "history.jsonl"

    @property
    def report_dir(self) -> Path:
        """The evaluation report (index.html and its pictures), replaced as a whole."""
        return self.model_dir / "report"

    def lock_path(self, role: str) -> Path:
        return self.model_dir / f".{role}.lock"


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"cannot create folder {path}: {exc.strerror}; check that the volume root is writable"
        ) from None
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(path: Path, exc: OSError) -> PipelineError:
    hint = {
        errno.ENOSPC: "free some space on the volume",
        errno.EDQUOT: "free some space on the volume",
        errno.EROFS: "mount the volume read-write",
        errno.EACCES: "make the volume writable for this user",
        errno.EPERM: "make the volume writable for this user",
    }.get(exc.errno, "check the volume")
    return PipelineError(f"cannot write {path}: {exc.strerror}; {hint} (the previous file is unchanged)")


def temp_file(folder: Path, name: str) -> Tuple[int, str]:
    """A new temp file beside its final place `folder/name`, readable by every service's user."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}.", dir=folder)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from a container running as another user
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes, fault_point: Optional[str] = None) -> None:
    """Replace `path` with `data` all at once, or leave it as it was.

    `fault_point`: the MNIST_FAULT name that kills the process just before the rename (tests).
    """
    ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = temp_file(path.parent, path.name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fault_point:
            crash_point(fault_point)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def replace_dir(target: Path, fill: Callable[[Path], T]) -> T:
    """Fill a fresh folder with `fill(folder)`, then put it in place of `target`.

    A folder cannot be renamed over a non-empty one, so the old one is first
    renamed aside: a kill -9 in between leaves no `target` at all (never a
    partial one), and the leftover is cleaned up by the next call.
    """
    parent = ensure_dir(target.parent)
    remove_stale_temps(parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.new.", dir=parent))
    staging.chmod(0o755)
    try:
        result = fill(staging)
        for entry in staging.iterdir():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(staging)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.old.", dir=parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    except OSError as exc:
        raise _write_failed(target, exc) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temps(folder: Path, min_age_s: float = 60.0) -> None:
    """Remove temp files a killed process left behind (old enough not to be in use)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in folder.glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if now - entry.lstat().st_mtime < min_age_s:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _holder_description(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        holder = json.loads(path.read_text() or "{}")
        if holder:
            return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    return "another process"


def _open_lock(path: Path) -> int:
    ensure_dir(path.parent)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as exc:
        raise _write_failed(path, exc) from None


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


@contextlib.contextmanager
def shared_lock(volume: Volume, role: str) -> Iterator[None]:
    """Announce a `role` at work without excluding others (readers of is_running see it)."""
    fd = _open_lock(volume.lock_path(role))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def brief_lock(volume: Volume, role: str) -> Iterator[None]:
    """Wait for and hold the `role` lock around a short read-modify-write of a shared file."""
    fd = _open_lock(volume.lock_path(role))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_running(volume: Volume, role: str) -> bool:
    """Whether any process holds the `role` lock right now."""
    path = volume.lock_path(role)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for(
    what: str,
    ready: Callable[[], Optional[T]],
    wait_s: float,
    producers_running: Callable[[], bool],
    on_timeout: Callable[[], PipelineError],
    log: Callable[[str], None],
    poll_s: float = 0.5,
) -> T:
    """Poll `ready()` until it returns a value.

    Gives up after `wait_s` seconds, but not while a producer is still at work:
    a train that is running will deliver, one that crashed has dropped its lock.
    """
    deadline = time.monotonic() + wait_s
    next_log = time.monotonic()
    while True:
        value = ready()
        if value is not None:
            return value
        now = time.monotonic()
        busy = producers_running()
        if now >= deadline and not busy:
            raise on_timeout()
        if now >= next_log:
            log(f"waiting for {what}" + (" (its producer is running)" if busy else ""))
            next_log = now + 10
        time.sleep(poll_s)
