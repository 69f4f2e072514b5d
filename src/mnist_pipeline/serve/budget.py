"""What requests may hold at once: decode slots with a bounded queue, the bytes of uploads, and each client's
feedback samples a minute. Beyond them a request gets 503 (feedback: 429) with Retry-After, never more memory."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Tuple

from mnist_pipeline.serve.http import busy

UPLOADS_BYTES = 128 * 1024 * 1024  # all request bodies (and their parsed files) held at once
MAX_CLIENTS = 10_000  # POST /feedback's buckets kept per worker; beyond, the least recently seen go first


class Slots:
    """At most `running` images decoded at once; at most `waiting` requests wait their turn, more are refused.

    A request takes a slot for each of its images in turn, so a 64-file request holds one decoded
    image at a time and lets other requests' images in between its own.
    """

    def __init__(self, running: int, waiting: int, decoding: Any, queued: Any):
        self.semaphore, self.max_waiting = asyncio.Semaphore(running), waiting
        self.decoding, self.queued = decoding, queued  # the metrics of what runs and what waits
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, newcomer: bool) -> AsyncIterator[None]:
        """A decode slot; a `newcomer` (a request's first image) gets 503 when the queue is full."""
        if newcomer and self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise busy(f"{self.waiting} requests already wait for one of the image decoders")
        self.waiting += 1
        self.queued.set(self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.queued.set(self.waiting)
        self.decoding.inc()
        try:
            yield
        finally:
            self.decoding.dec()
            self.semaphore.release()


class Uploads:
    """The bytes of request bodies (and their parsed copies) held at once, at most `limit`: a 503 beyond."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """take(n) for each piece a request holds; all of it is given back when the request ends."""
        taken = [0]

        def take(size: int) -> None:
            if self.held + size > self.limit:
                raise busy("too many uploads at once")
            self.held += size
            taken[0] += size

        try:
            yield take
        finally:
            self.held -= taken[0]


class Limiter:
    """A token bucket per client address: `rate` samples a minute, as many at once."""

    def __init__(self, rate: int):
        self.capacity, self.per_s = float(rate), rate / 60.0
        self.buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()  # address -> (tokens, when)

    def take(self, client: str, now: Optional[float] = None) -> Optional[int]:
        """None when `client` may send one more now (a token taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, when = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - when) * self.per_s)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.per_s))
        self.buckets[client] = (tokens - 1, now)
        while len(self.buckets) > MAX_CLIENTS:  # the least recently seen first
            self.buckets.popitem(last=False)
        return None
