"""Waiting for another service's output on the volume."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

from mnist_pipeline.errors import PipelineError

T = TypeVar("T")


def wait_for(
    what: str,
    ready: Callable[[], Optional[T]],
    wait_s: float,
    producers_running: Callable[[], bool],
    on_timeout: Callable[[], PipelineError],
    log: Callable[[str], None],
    poll_s: float = 0.5,
    grace_s: float = 0.0,
    started: float = 0.0,
    needs_grace: Callable[[T], bool] = lambda _value: True,
) -> T:
    """Poll `ready()` until it returns a value.

    Gives up after `wait_s` seconds, but not while a producer is still at work:
    a train that is running will deliver, one that crashed has dropped its lock.
    A value for which `needs_grace(value)` holds (work already done once) is taken only
    `grace_s` seconds after `started` (the command's start, time.monotonic()): `docker compose up`
    starts every service at once, and a train starting beside us must get the time to take its
    lock. Once a poll has found nothing, what comes later is new work, taken at once.
    """
    deadline = time.monotonic() + wait_s
    graced = started + grace_s
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
