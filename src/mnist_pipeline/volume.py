"""The shared volume: where each file lives, how it is written, who may write.

Every file another service reads is written atomically (temp file in the same
folder, fsync, os.replace), so a reader or a kill -9 never sees half a file.
Locks are flock()s: the kernel drops them when their process dies, so a crashed
train never blocks the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, TypeVar

from mnist_pipeline.errors import Busy, PipelineError
from mnist_pipeline.faults import crash_point

T = TypeVar("T")

# Every temp file or folder this program creates is named .mnist-tmp.<pid>.<final name>.<random>
# and flock()ed by its writer until it is renamed into place: a sweeper that gets the flock knows
# the writer is dead, whatever the file's age, and nothing not named so is ever removed.
TEMP_PREFIX = ".mnist-tmp."
_TEMP_NAME = re.compile(r"^\.mnist-tmp\.[0-9]+\.")
# when this process started (cli imports this module before torch): the grace of wait_for counts from it
_STARTED = time.monotonic()


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


# folders inside the root that we write into: a symlink there would carry our writes out of the volume
_WRITTEN_INTO = ("data", "model")


def ensure_dir(path: Path) -> Path:
    if path.name in _WRITTEN_INTO and path.is_symlink():
        raise PipelineError(
            f"{path} is a symbolic link; the pipeline never writes through one: make it a real folder"
        )
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


def _claim(path: str, fd: int) -> bool:
    """flock our new temp `path` for as long as it is ours; False if a sweeper removed it before we could."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def temp_file(folder: Path, name: str) -> Tuple[int, str]:
    """A new temp file beside its final place `folder/name`, readable by every service's user.

    The caller keeps the descriptor open (it holds the flock) until the file is renamed into place.
    """
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}.{name}.", dir=folder)
        if _claim(tmp, fd):
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from a container running as another user
            return fd, tmp
        os.close(fd)


def temp_dir(folder: Path, name: str) -> Tuple[int, Path]:
    """temp_file's twin for a folder: (a descriptor holding its flock, its path)."""
    while True:
        path = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}.{name}.", dir=folder)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        if _claim(path, fd):
            os.chmod(path, 0o755)
            return fd, Path(path)
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, fault_point: Optional[str] = None) -> None:
    """Replace `path` with `data` all at once, or leave it as it was.

    `fault_point`: the MNIST_FAULT name that kills the process just before the rename (tests).
    """
    ensure_dir(path.parent)
    remove_dead_temps(path.parent)  # what a killed writer left here
    fd = tmp = None
    try:
        fd, tmp = temp_file(path.parent, path.name)
        with open(fd, "wb", closefd=False) as f:
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
        if fd is not None:
            os.close(fd)


def atomic_write_json(path: Path, value: object, fault_point: Optional[str] = None) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode(), fault_point)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where the C library, the kernel or the file system cannot: the caller falls back to two renames.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_dir(target: Path, fill: Callable[[Path], T]) -> T:
    """Fill a fresh folder with `fill(folder)`, then put it in place of `target`.

    One atomic exchange where the kernel has it. Elsewhere the old folder is first renamed aside:
    a kill -9 in between leaves no `target` for a moment, and the next call (or recover_dir) puts
    the old one back.
    """
    parent = ensure_dir(target.parent)
    fds = []
    staging = None
    try:
        recover_dir(target)
        fd, staging = temp_dir(parent, f"{target.name}.new")
        fds.append(fd)
        result = fill(staging)
        for entry in staging.iterdir():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(staging)
        if os.path.lexists(target) and _exchange(staging, target):
            crash_point("results-between-renames")  # the old folder waits under the temp name
            _fsync_dir(parent)
            _remove(staging)  # now the old folder
        else:
            old = None
            if os.path.lexists(target):
                fd, old = temp_dir(parent, f"{target.name}.old")
                fds.append(fd)
                os.replace(target, old / target.name)
                crash_point("results-between-renames")
            os.replace(staging, target)
            _fsync_dir(parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        staging = None
        return result
    except OSError as exc:
        raise _write_failed(target, exc) from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        for fd in fds:
            os.close(fd)


def recover_dir(target: Path) -> None:
    """Undo a replace_dir that a kill -9 cut between its two renames, then sweep its dead temps."""
    parent = target.parent
    if not os.path.lexists(target):
        for aside in sorted(parent.glob(f"{TEMP_PREFIX}*.{target.name}.old.*")):
            with _if_writer_dead(aside) as dead:
                if dead and os.path.lexists(aside / target.name):
                    try:
                        os.replace(aside / target.name, target)
                    except OSError as exc:
                        raise _write_failed(target, exc) from None
                    break
    remove_dead_temps(parent)


@contextlib.contextmanager
def _if_writer_dead(path: Path) -> Iterator[bool]:
    """Yield whether `path` is one of our temps whose writer has died (holding its flock meanwhile)."""
    if not _TEMP_NAME.match(path.name):
        yield False
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone, or a symlink: not ours
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:  # BlockingIOError: its writer is alive
        same = False
    try:
        yield same
    finally:
        os.close(fd)


def remove_dead_temps(folder: Path) -> None:
    """Remove the temp files and folders in `folder` whose writer has died, whatever their age.

    Only names this program creates (TEMP_PREFIX and a pid) are touched, never a user's file.
    """
    with contextlib.suppress(OSError):
        for entry in sorted(folder.glob(TEMP_PREFIX + "*")):
            with contextlib.suppress(OSError), _if_writer_dead(entry) as dead:
                if dead:
                    if stat.S_ISDIR(entry.lstat().st_mode):
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
        # O_NOFOLLOW: a symlink planted here must not make us create or overwrite a file elsewhere
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o664)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PipelineError(
                f"{path} is a symbolic link; the pipeline never writes through one: remove it (`rm {path}`)"
            ) from None
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


_HELD: Dict[str, int] = {}  # lock file -> descriptor: the exclusive locks this process holds


@contextlib.contextmanager
def exclusive_lock(volume: Volume, role: str) -> Iterator[None]:
    """Hold the `role` lock of this volume, or raise Busy naming its holder.

    Re-entrant within a process: cli takes train's lock before importing torch, train.run again.
    """
    path = volume.lock_path(role)
    key = os.path.abspath(path)
    if key in _HELD:
        yield
        return
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
        _HELD[key] = fd
        yield
    finally:
        _HELD.pop(key, None)
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


def wait_for(
    what: str,
    ready: Callable[[], Optional[T]],
    wait_s: float,
    producers_running: Callable[[], bool],
    on_timeout: Callable[[], PipelineError],
    log: Callable[[str], None],
    poll_s: float = 0.5,
    grace_s: float = 0.0,
    needs_grace: Callable[[T], bool] = lambda _value: True,
) -> T:
    """Poll `ready()` until it returns a value.

    Gives up after `wait_s` seconds, but not while a producer is still at work:
    a train that is running will deliver, one that crashed has dropped its lock.
    A value for which `needs_grace(value)` holds (work already done once) is taken only
    `grace_s` seconds after this process started: `docker compose up` starts every service
    at once, and a train starting beside us must get the time to take its lock. Once a poll
    has found nothing, what comes later is new work, taken at once.
    """
    deadline = time.monotonic() + wait_s
    graced = _STARTED + grace_s
    next_log = time.monotonic()
    told = found_nothing = False
    while True:
        value = ready()
        now = time.monotonic()
        if value is not None:
            if now >= graced or found_nothing or not needs_grace(value):
                return value
            if not told:
                log(f"{what} is already there; giving a train that may be starting {graced - now:.1f} s "
                    f"to take its lock (--grace / MNIST_GRACE)")
                told = True
            time.sleep(min(poll_s, graced - now))
            continue
        found_nothing = True
        busy = producers_running()
        if now >= deadline and not busy:
            raise on_timeout()
        if now >= next_log:
            log(f"waiting for {what}" + (" (its producer is running)" if busy else ""))
            next_log = now + 10
        time.sleep(poll_s)
