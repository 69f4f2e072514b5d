"""The HTTP edge (Front, the ASGI middleware every answer passes), a request's images, and what requests may hold
at once: beyond a bound a request gets a 4xx, or a 503 (feedback: 429) with Retry-After, never more memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple

from fastapi import Request
from starlette.datastructures import UploadFile

RETRY_AFTER_S = 1
BODY_TIMEOUTS = 6  # a whole body may take this many --read-timeout: 2 MB at 35 KB/s with the default
MAX_BODY_BYTES = 16 * 1024 * 1024  # several images in one multipart request
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_FILES = 64
UPLOADS_BYTES = 128 * 1024 * 1024  # all request bodies (and their parsed files) held at once
MAX_CLIENTS = 10_000  # POST /feedback's buckets kept per worker; beyond, the least recently seen go first
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read to its end before the 413
ROUTES = ("/", "/predict", "/feedback", "/healthz", "/readyz", "/metrics", "/models", "/report", "/static", "/docs",
          "/openapi.json", "/v2")
# The page and the report load everything from here. The report has an inline <style> (it is one
# file that also opens from disk), and its infer images are data: URLs; nothing runs inline anywhere.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
REPORT_CSP = CSP + "; style-src 'self' 'unsafe-inline'"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")  # a client's X-Request-ID echoed; anything else replaced
access = logging.getLogger("mnist_pipeline.serve.access")
log = logging.getLogger(__name__)


class ClientError(Exception):
    """A request we refuse: its HTTP status, the `error` text and any headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def busy(what: str) -> ClientError:
    return ClientError(503, f"the server is busy ({what}): retry in {RETRY_AFTER_S} s",
                       {"Retry-After": str(RETRY_AFTER_S)})


class Front:
    """In front of every route. It puts Content-Security-Policy, X-Content-Type-Options and X-Request-ID on every
    answer; answers a path with a NUL byte 404 itself; turns a plain-text error (a bad Range: 416) into JSON;
    counts each request by route and status (499: no answer was begun) and logs it when asked; and ends a body
    over MAX_BODY_BYTES (413), one that stops arriving (408), or one the process cannot hold now (503). granian
    itself times out a stalled head but not a body."""

    def __init__(self, app, counter: Any, read_timeout: float, uploads: Any, access_log: bool):
        self.app, self.counter, self.read_timeout = app, counter, read_timeout
        self.uploads, self.access_log = uploads, access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [499]
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id" and REQUEST_ID.fullmatch(v)), None)
        rid = rid or uuid.uuid4().hex.encode()
        extra = SECURITY_HEADERS + [(b"x-request-id", rid), (b"content-security-policy",
                                    (REPORT_CSP if scope["path"].startswith("/report/") else CSP).encode())]
        held: List[Any] = []  # an error answer's start and body, until it is complete

        async def send_safely(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
                message = {**message, "headers": headers + extra}
                if status[0] >= 400 and not _is_json(headers) and scope["method"] != "HEAD":
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body"):
                    return
                start, *bodies = held
                text = b"".join(m.get("body", b"") for m in bodies).decode("utf-8", "replace").strip()
                await _send_json(send, start, text or HTTPStatus(status[0]).phrase)
                return
            await send(message)

        try:
            with self.uploads.account() as take:
                if "\x00" in scope["path"]:
                    await _send_json(send_safely, {"status": 404}, "no such path: a path never holds a NUL byte")
                    return
                await self.app(scope, self._bounded(receive, scope, take), send_safely)
        except Exception:  # noqa: BLE001 - a bug: its traceback in the log once; the client gets JSON all the same
            log.exception("%s %s failed", scope["method"], scope["path"].encode("unicode_escape").decode())
            if status[0] == 499:  # (no answer begun)
                await _send_json(send_safely, {"status": 500}, "internal error; see the server log")
        finally:
            self.counter.labels(route_of(scope["path"]), str(status[0])).inc()
            if self.access_log:  # (the path escaped: a %0a in it must not start a line of its own)
                client = (scope.get("client") or ("-",))[0]
                access.info("%s %s %s %d %.1fms %s", client, scope["method"],
                            scope["path"].encode("unicode_escape").decode(), status[0],
                            (time.perf_counter() - started) * 1000, rid.decode())

    def _bounded(self, receive, scope, take):
        """receive(), within bounds: a body that stops arriving for read_timeout, or takes longer than BODY_TIMEOUTS
        of them in all, ends the request with a 408; one over MAX_BODY_BYTES with a 413, once read to its end (up
        to DRAIN_BYTES) so that the client, still sending, reads the answer; each chunk counts against the
        process's upload budget (503 beyond)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUTS * self.read_timeout
        done = [scope["method"] in ("GET", "HEAD")]  # a GET body is never read: receive() then waits for a disconnect
        size = [0]

        async def next_message():
            wait = min(self.read_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except asyncio.TimeoutError:
                raise ClientError(408, f"the request body stopped arriving (or took more than "
                                       f"{BODY_TIMEOUTS * self.read_timeout:g} s): send it whole, "
                                       f"without pauses of {self.read_timeout:g} s", {"Connection": "close"}) from None
            done[0] = message["type"] != "http.request" or not message.get("more_body", False)
            size[0] += len(message.get("body", b""))
            return message

        async def receive_in_bounds():
            if done[0]:
                return await receive()
            message = await next_message()
            if size[0] > MAX_BODY_BYTES:
                while not done[0] and size[0] <= DRAIN_BYTES:
                    await next_message()
                raise ClientError(413, f"the request is over {MAX_BODY_BYTES // 2**20} MB: send fewer or smaller "
                                       f"images", {"Connection": "close"})
            take(len(message.get("body", b"")))
            return message

        return receive_in_bounds


class Slots:
    """At most `running` decode turns at once (service.decode_and_predict); at most `waiting` requests wait for
    one, more are refused."""

    def __init__(self, running: int, waiting: int, metrics: Any):  # (service.Metrics)
        self.semaphore, self.max_waiting, self.metrics = asyncio.Semaphore(running), waiting, metrics
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, newcomer: bool) -> AsyncIterator[None]:
        """A decode slot; a `newcomer` (a request's first image) gets 503 when the queue is full."""
        if newcomer and self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise busy(f"{self.waiting} requests already wait for one of the image decoders")
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.set(self.waiting)
        self.metrics.decoding.inc()
        try:
            yield
        finally:
            self.metrics.decoding.dec()
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
    """A token bucket per client: `per_s` tokens a second, at most `capacity` at once."""

    def __init__(self, capacity: float, per_s: float):
        self.capacity, self.per_s = float(capacity), per_s
        self.buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()  # client -> (tokens, when)

    def take(self, client: str = "") -> Optional[int]:
        """None when `client` may send one more now (a token taken), else the seconds until it may."""
        now = time.monotonic()
        tokens, when = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - when) * self.per_s)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.per_s))
        self.buckets[client] = (tokens - 1, now)
        while len(self.buckets) > MAX_CLIENTS:  # the least recently seen first
            self.buckets.popitem(last=False)
        return None


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


async def _send_json(send, start: Dict[str, Any], error: str) -> None:
    """An error answer as JSON {"error": ...}, keeping the original answer's other headers (Content-Range)."""
    body = json.dumps({"error": error}).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": start["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_of(path: str) -> str:
    """A bounded label for the metrics: the route a path belongs to."""
    for route in ROUTES[1:]:
        if path == route or path.startswith(route + "/"):
            return route
    return "/" if path == "/" else "other"


async def images(request: Request) -> List[bytes]:
    """The request's images, each at most MAX_IMAGE_BYTES, at most MAX_FILES of them."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/"):
        chunks, size = [], 0
        async for chunk in request.stream():  # (to its end: past the limit, counted, not kept)
            size += len(chunk)
            if size <= MAX_IMAGE_BYTES:
                chunks.append(chunk)
        if size > MAX_IMAGE_BYTES:
            raise ClientError(413, f"the image is over {MAX_IMAGE_BYTES // 2**20} MB: send a smaller image")
        if not size:
            raise ClientError(400, "the request body is empty: send an image")
        return [b"".join(chunks)]
    if kind != "multipart/form-data":
        raise ClientError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                               f"with the image in the field `file`, or the image itself as image/png, image/jpeg, ...")
    # (a malformed body, or more than MAX_FILES files: Starlette's 400 saying which)
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=MAX_IMAGE_BYTES) as form:
        files = [value for key, value in form.multi_items() if key == "file"]
        if not files:
            raise ClientError(400, "no `file` field: send each image as a multipart field named `file`")
        if not all(isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the `file` field holds text, not a file: upload the image as a file")
        images = []
        for number, upload in enumerate(files, 1):
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ClientError(413, f"file {number} is over {MAX_IMAGE_BYTES // 2**20} MB: send a smaller image")
            if not data:
                raise ClientError(400, f"file {number} is empty: send an image")
            images.append(data)
        return images

