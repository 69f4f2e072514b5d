"""SIGTERM and SIGINT, handled from the start of `mnist` until the process exits.

`docker stop` sends SIGTERM; Ctrl-C sends SIGINT. The first one either raises Interrupted where
the program is (every file on the volume is written atomically, so that loses nothing), or, inside
`deferred()`, is only recorded: for torch's import, and for train's loop, which polls `received()`
and saves its progress at the next step boundary. Later signals are only recorded, so a second
`docker stop` cannot break the shutdown that the first one began. The exit code is 128 + the
signal's number (143, 130) whenever one arrived, even after the work was done: nothing is lost then.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator, Optional

from mnist_pipeline.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: Optional[int] = None
_raising = False


def install() -> None:
    """Handle SIGTERM and SIGINT from now on, recording only until `interruptible()`."""
    global _received, _raising
    _received, _raising = None, False
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def _handle(signum: int, _frame: object) -> None:
    global _received
    if _received is not None:
        return
    _received = signum
    if _raising:
        raise interrupted()


def received() -> Optional[int]:
    """The first signal that arrived, or None."""
    return _received


def interrupted(detail: str = "") -> Interrupted:
    name = signal.Signals(_received or signal.SIGTERM).name
    return Interrupted(f"stopped by {name}" + (f" {detail}" if detail else ""), _received or signal.SIGTERM)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A signal raises Interrupted at once inside; one recorded before is acted on on entry."""
    global _raising
    if _received is not None:
        raise interrupted()
    _raising = True
    try:
        yield
    finally:
        _raising = False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals are only recorded inside: the caller polls `received()` at safe points."""
    global _raising
    before, _raising = _raising, False
    try:
        yield
    finally:
        _raising = before
