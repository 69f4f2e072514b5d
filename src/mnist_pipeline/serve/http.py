"""The HTTP edge every answer passes: JSON errors, security headers, the request count, body timeouts."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, Dict, List, Optional

from prometheus_client import Counter

RETRY_AFTER_S = 1
BODY_TIMEOUTS = 6  # a whole body may take this many --read-timeout: 2 MB at 35 KB/s with the default
ROUTES = ("/", "/predict", "/healthz", "/readyz", "/metrics", "/report", "/static")
# The page and the report load everything from here. The report has an inline <style> (it is one
# file that also opens from disk), and its infer images are data: URLs; nothing runs inline anywhere.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
REPORT_CSP = CSP + "; style-src 'self' 'unsafe-inline'"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]


class ClientError(Exception):
    """A request we refuse: its HTTP status, the `error` text and any headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def busy(what: str) -> ClientError:
    return ClientError(503, f"the server is busy ({what}): retry in {RETRY_AFTER_S} s",
                       {"Retry-After": str(RETRY_AFTER_S)})


class Front:
    """ASGI middleware in front of every route, for what every answer needs (cheaper than http middlewares).

    It counts each request by route and status (499: the client left before the answer, as nginx
    counts it); puts Content-Security-Policy and X-Content-Type-Options on every answer; answers a
    path with a NUL byte 404 itself; turns a plain-text error from Starlette's own responses (a bad
    Range: 416) into JSON; and ends a body that stops arriving with a 408.
    """

    def __init__(self, app, counter: Counter, read_timeout: float):
        self.app, self.counter, self.read_timeout = app, counter, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        csp = (REPORT_CSP if scope["path"].startswith("/report/") else CSP).encode()
        held: List[Any] = []  # an error answer's start and body, until it is complete

        async def send_safely(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
                message = {**message, "headers": headers + SECURITY_HEADERS + [(b"content-security-policy", csp)]}
                if status[0] >= 400 and not _is_json(headers) and scope["method"] != "HEAD":
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body"):
                    return
                start, *bodies = held
                text = b"".join(m.get("body", b"") for m in bodies).decode("utf-8", "replace").strip()
                await _send_json(send, start, text or phrase(status[0]))
                return
            await send(message)

        try:
            if "\x00" in scope["path"]:
                await _send_json(send_safely, {"status": 404}, "no such path: a path never holds a NUL byte")
                return
            await self.app(scope, self._timed(receive, scope), send_safely)
        finally:
            self.counter.labels(route_of(scope["path"]), str(status[0])).inc()

    def _timed(self, receive, scope):
        """receive(), but a body that stops arriving for read_timeout, or takes longer than BODY_TIMEOUTS
        of them in all, ends the request with a 408 (uvicorn itself would wait for ever)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUTS * self.read_timeout
        done = [scope["method"] in ("GET", "HEAD")]  # a GET body is never read: receive() then waits for a disconnect

        async def receive_in_time():
            if done[0]:
                return await receive()
            wait = min(self.read_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except asyncio.TimeoutError:
                raise ClientError(408, f"the request body stopped arriving (or took more than "
                                       f"{BODY_TIMEOUTS * self.read_timeout:g} s): send it whole, "
                                       f"without pauses of {self.read_timeout:g} s", {"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done[0] = True
            return message

        return receive_in_time


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


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
