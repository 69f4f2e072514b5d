"""The connections: the listening socket, uvicorn's HTTP protocol with what a port open to anyone needs
(Guard), the open-file limit, a log that cannot flood, memory given back after large images."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import resource
import socket
import time
from typing import Dict, List, Optional, Tuple

from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.serve.budget import Limits
from mnist_pipeline.serve.http import CSP, RETRY_AFTER_S, SECURITY_HEADERS, phrase

log = logging.getLogger(__name__)

# connections asyncio accepts in one go, before any of them is seen (and the one idle longest closed);
# also the kernel's queue of connections not yet accepted
BACKLOG = 64
# open files besides the connections: two accept bursts (the second can come before the first one's
# evictions have closed their sockets), the model, the report, the interpreter's own
FD_RESERVE = 64 + 2 * BACKLOG
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt() parameters (malloc.h)


def listen(host: str, port: int, shared: bool = False) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error line. `shared`: one of
    several on the port (SO_REUSEPORT), among which the kernel spreads new connections."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        raise PipelineError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port / MNIST_PORT "
            f"or --host / MNIST_HOST"
        ) from None
    return sock


class Guard(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), with what it lacks for a port open to anyone; `limits` is set
    by guarded(). uvicorn takes a protocol class (uvicorn.Config's `http`); this one only adds to the
    connection's start, end and answers, and leaves the parsing to h11.

    - A request's head must arrive within read_timeout of the connection's start or of the previous
      answer: uvicorn itself waits for ever for a head that stops half-way. (A body that stops is
      Front's: it is read by the app.)
    - At most max_connections at once: a new one closes the connection idle the longest (no request
      in progress), or, when every one is busy, is answered 503 and closed.
    - uvicorn's own error answers (malformed HTTP) are JSON, like every other.
    """

    limits: Limits
    _order = itertools.count()  # breaks ties between connections idle since the same moment

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expiry: Optional[asyncio.TimerHandle] = None
        self._arm()
        others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(others) >= self.limits.max_connections:
            idle = [c for c in others if isinstance(c, Guard) and not c._busy()]
            if idle:
                min(idle, key=lambda c: c._idle_since).transport.close()  # (a tuple: time, then order)
                log.warning("%d connections, the most allowed (--max-connections): closed the one idle longest",
                            self.limits.max_connections)
            else:
                log.warning("%d connections, the most allowed (--max-connections), all busy: refused a new one",
                            self.limits.max_connections)
                self._answer(503, "the server has as many connections as it takes, all busy: "
                                  f"retry in {RETRY_AFTER_S} s", [(b"retry-after", str(RETRY_AFTER_S).encode())])

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._expiry is not None:
            self._expiry.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._busy():  # (a pipelined request may already be under way)
            self._arm()

    def send_400_response(self, msg: str) -> None:
        self._answer(400, "malformed HTTP request (its request line, a header, Content-Length or chunking): "
                          "fix the client")

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._idle_since = (self.loop.time(), next(self._order))
        self._expiry = self.loop.call_later(self.limits.read_timeout, self._expire)

    def _expire(self) -> None:
        if self._busy() or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came, then nothing
            self._answer(408, f"the request's head did not arrive within {self.limits.read_timeout:g} s: "
                              "send it whole, without pauses")
        else:
            self.transport.close()

    def _answer(self, status: int, error: str, headers: Optional[List[Tuple[bytes, bytes]]] = None) -> None:
        """A JSON error answer straight on the connection, which then closes (no request of it is under way)."""
        body = json.dumps({"error": error}).encode()
        lines = [f"HTTP/1.1 {status} {phrase(status)}".encode(), b"content-type: application/json",
                 b"content-length: " + str(len(body)).encode(), b"connection: close",
                 b"content-security-policy: " + CSP.encode()]
        lines += [k + b": " + v for k, v in SECURITY_HEADERS + (headers or [])]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()


def guarded(limits: Limits) -> type:
    """Guard with these limits: uvicorn builds one protocol object per connection from the class."""
    return type("Guard", (Guard,), {"limits": limits})


class OncePerSecond(logging.Filter):
    """Lets a message through at most once a second, then notes how many like it were held back.

    Messages are alike when their first lines are (asyncio's add a socket's repr below it). A flood
    of bad requests, or of accept() failures, must not fill the disk with the log.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: Dict[Tuple[str, str], float] = {}
        self.held: Dict[Tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        if now - self.last.get(key, -1.0) < 1:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        if len(self.last) > 1000:  # many different messages: forget the ones not seen for a while
            self.last = {k: t for k, t in self.last.items() if now - t < 1}
        self.last[key] = now
        held = self.held.pop(key, 0)
        if held and isinstance(record.msg, str):
            record.msg += f" ({held} more like it not logged)"
        return True


def allow_open_files(limits: Limits) -> Limits:
    """Raise this process's open-file limit to what max_connections takes, as far as the hard limit
    lets it; where it does not, fewer connections (said once)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fewer = max(1, soft - FD_RESERVE)
        log.warning("the open-file limit is %d: at most %d connections, not %d (--max-connections); "
                    "raise `ulimit -n` for more", soft, fewer, limits.max_connections)
        return dataclasses.replace(limits, max_connections=fewer)
    return limits


def give_back_freed_memory() -> None:
    """glibc's malloc: memory of a decoded image goes back to the system once freed.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), after
    which image-sized blocks come from heaps that rarely shrink, one heap per thread: RSS stays near its
    peak after a storm of large images. A fixed threshold keeps large blocks mapped (unmapped on free),
    and two arenas keep the threadpool's threads from holding one heap each. Elsewhere: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    mallopt(M_ARENA_MAX, 2)
