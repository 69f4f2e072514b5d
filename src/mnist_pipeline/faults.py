"""Fault points for crash tests: `MNIST_FAULT=<point>` makes the process kill itself there.

Tests crash a process at an exact moment this way instead of racing the clock with signals
sent from outside. Unset (always, outside tests) every check is one dictionary lookup.

  <name>-before-rename   SIGKILL after a file's temp copy is written, before it replaces the old one
                         (checkpoint, progress, data, eval, history, ...: see the callers)
  results-between-renames SIGKILL in the middle of swapping results/ for the new folder
  sigterm-at-step:N      train sends itself SIGTERM just before step N of an epoch (0-based)
"""

from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "MNIST_FAULT"
SIGTERM_AT_STEP = "sigterm-at-step:"


def crash_point(point: str) -> None:
    """SIGKILL this process, as a power cut or `kill -9` would, if MNIST_FAULT names `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def sigterm_step() -> Optional[int]:
    """N of MNIST_FAULT=sigterm-at-step:N, else None."""
    value = os.environ.get(ENV, "")
    if value.startswith(SIGTERM_AT_STEP):
        return int(value[len(SIGTERM_AT_STEP):])
    return None
