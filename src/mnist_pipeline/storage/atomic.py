"""Atomic writes: a reader or a kill -9 never sees half a file.

Every file another service reads is written to a temp file in the same folder, fsynced, then put in
place with os.replace; a folder (results/, model/report/) is filled aside and swapped in whole.
Every temp file or folder is named .mnist-tmp.<pid>.<final name>.<random> and flock()ed by its writer
until it is renamed into place: a sweeper that gets the flock knows the writer is dead, whatever the
file's age, and nothing not named so is ever removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, TypeVar

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.faults import crash_point

T = TypeVar("T")

TEMP_PREFIX = ".mnist-tmp."
_TEMP_NAME = re.compile(r"^\.mnist-tmp\.[0-9]+\.")


# folders inside the root that we write into: a symlink there would carry our writes out of the volume
_WRITTEN_INTO = ("data", "model", "feedback")


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(path: Path, exc: OSError) -> PipelineError:
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
        fsync_dir(path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if fd is not None:
            os.close(fd)


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
        fsync_dir(staging)
        while not _put_in_place(staging, target, fds):
            pass  # another writer's folder appeared at `target` after the look: replace that one
        staging = None
        return result
    except OSError as exc:
        raise write_failed(target, exc) from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        for fd in fds:
            os.close(fd)


def _put_in_place(staging: Path, target: Path, fds: list) -> bool:
    """replace_dir's last step; False when `target` was absent at the look but present at the rename."""
    parent = target.parent
    if os.path.lexists(target) and _exchange(staging, target):
        crash_point("results-between-renames")  # the old folder waits under the temp name
        fsync_dir(parent)
        _remove(staging)  # now the old folder
        return True
    old = None
    if os.path.lexists(target):
        fd, old = temp_dir(parent, f"{target.name}.old")
        fds.append(fd)
        os.replace(target, old / target.name)
        crash_point("results-between-renames")
    try:
        os.replace(staging, target)
    except OSError as exc:
        if old is None and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


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
                        raise write_failed(target, exc) from None
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
