"""Reading a file from the volume (or a user's) without trusting what it is.

A path can name a FIFO (open() would block until a writer comes), a device (/dev/zero never ends) or
a sparse file of gigabytes: each kind of file has a size it may not exceed, and only a regular file
is read. The open itself never blocks (O_NONBLOCK), and fstat() checks the file that was opened, not
whatever the path names a moment later.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mnist_pipeline.errors import PipelineError

_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


class NotReadable(PipelineError):
    """The path exists but is not a regular file within its size limit, or cannot be read."""

    def __init__(self, what: str, path: os.PathLike, reason: str):
        super().__init__(f"{what} {describe(path)} {reason}")
        self.reason = reason  # what is wrong, without the file: "is a FIFO (named pipe), not a regular file"


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them.

    Raises FileNotFoundError when nothing is there (callers decide what a missing file means), and
    NotReadable naming `what` (e.g. "checkpoint") for anything else that is not a readable regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise NotReadable(what, path, f"cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS.items() if test(info.st_mode)), "not a regular file")
        raise NotReadable(what, path, f"is {kind}, not a regular file")
    with open(fd, "rb") as file:
        too_large = NotReadable(what, path, f"is larger than {limit:,} bytes, more than any {what} this program reads")
        if info.st_size > limit:
            raise too_large
        try:
            data = file.read(limit + 1)  # the size can change after fstat: never read past the limit
        except OSError as exc:
            raise NotReadable(what, path, f"cannot be read: {exc.strerror}") from None
    if len(data) > limit:
        raise too_large
    return data


def describe(path: os.PathLike) -> str:
    """A path for a message or a log line, printable whatever bytes its name holds.

    A name with bytes that are not UTF-8 decodes to surrogates, which a UTF-8 stream cannot encode:
    they are shown as backslash escapes instead.
    """
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
