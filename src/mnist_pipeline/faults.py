"""Fault points for crash tests: `MNIST_FAULT` makes the process signal itself at a named point.

Tests stop a process at an exact moment this way instead of racing the clock with signals sent
from outside. Unset (always, outside tests) each check is one dictionary lookup.

  <point>               SIGKILL at `point`, as a power cut or `kill -9` would
  sigterm:<point>       SIGTERM at `point`, as `docker stop` would
  <signal>-at-step:N    train sends itself sigterm, sigint or sigkill just before step N of an epoch

Under torchrun every rank inherits MNIST_FAULT; MNIST_FAULT_RANK=R arms it in rank R alone, and
only in the group's first start, so a group that torchrun --max-restarts starts again runs clean.

  hold:<point>:<file>   wait at `point` until <file> exists, having created <file>.held (a
                        moment held still for a test to act in; the process lives on)
  break:<point>         the code at `point` goes wrong in the way it names, for the check that
                        must catch it (the process lives on)

Points: <file>-before-rename (the new copy written, not yet in place: checkpoint, progress, data,
eval, feedback-image (a sample's PNG), feedback (its JSON, created or reviewed), ...: see the callers of
crash_point and atomic_write_bytes), results-between-renames, exit,
serve-worker (each of serve's workers as it builds its app);
hold points: decode (serve, each image, in its decode slot), version-load (serve, loading a version asked
for by number), follows (a torchrun rank that stops because
rank 0 did, once rank 0 may have exited); break points: export-weights (the first weight written into an
ONNX model is off by 1, which its parity check must refuse).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional, Tuple

ENV = "MNIST_FAULT"
RANK_ENV = "MNIST_FAULT_RANK"
AT_STEP = {"sigterm-at-step:": signal.SIGTERM, "sigint-at-step:": signal.SIGINT, "sigkill-at-step:": signal.SIGKILL}


def crash_point(point: str) -> None:
    """SIGKILL this process if MNIST_FAULT=`point`; SIGTERM it if MNIST_FAULT=sigterm:`point`."""
    fault = _fault()
    if fault == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"sigterm:{point}":
        os.kill(os.getpid(), signal.SIGTERM)


def hold_point(point: str) -> None:
    """With MNIST_FAULT=hold:`point`:FILE, create FILE.held and wait until FILE exists."""
    fault = _fault() or ""
    prefix = f"hold:{point}:"
    if not fault.startswith(prefix):
        return
    release = fault[len(prefix):]
    with open(release + ".held", "a"):
        pass
    while not os.path.exists(release):
        time.sleep(0.01)


def broken(point: str) -> bool:
    """Whether MNIST_FAULT=break:`point`."""
    return _fault() == f"break:{point}"


def signal_at_step() -> Tuple[Optional[int], Optional[int]]:
    """(step, signal) of MNIST_FAULT=<signal>-at-step:N, else (None, None)."""
    fault = _fault() or ""
    for prefix, signum in AT_STEP.items():
        if fault.startswith(prefix):
            return int(fault[len(prefix):]), signum
    return None, None


def _fault() -> Optional[str]:
    only_rank = os.environ.get(RANK_ENV)
    if only_rank is not None and (only_rank != os.environ.get("RANK", "0")
                                  or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return None
    return os.environ.get(ENV)
