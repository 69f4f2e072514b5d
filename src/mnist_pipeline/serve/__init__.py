"""serve: the HTTP API and the draw-a-digit page.

The model and its preprocessing come from model.py and preprocess.py, the gated model that follows
the volume from follow.py. Nothing here writes to the volume. Every error is a 4xx (or a 503: busy,
retry) with a JSON {"error": ...}; the process keeps serving whatever a client sends.

What a client may cost is bounded, since the port is open to anyone:
- memory: an upload is at most MAX_BODY_BYTES, all uploads held at once at most UPLOADS_BYTES (app.py), an
  image's decoded pixels at most preprocess.MAX_DECODED_BYTES, and at most --max-decodes images are
  decoded at once (one at a time per request); --max-waiting requests may wait for a decode, more get
  a 503 with Retry-After;
- connections: at most --max-connections (the one idle the longest makes room for a new one), each
  closed when a request's head or body stops arriving for --read-timeout seconds, or when it sits
  idle after an answer for --keep-alive seconds (connections.Guard, and http.Front's receive);
- logs: a message that repeats is logged at most once a second (OncePerSecond).

  app.py          the routes
  budget.py       what requests may hold at once: the limits, decode slots, upload bytes
  http.py         the edge every answer passes: JSON errors, security headers, counts, body timeouts
  connections.py  the socket and uvicorn's protocol with a head timeout and a connection cap
  follow.py       the gated model, kept current as the volume changes
"""

from __future__ import annotations

import logging

from mnist_pipeline.serve.app import create_app
from mnist_pipeline.serve.budget import Limits
from mnist_pipeline.serve.connections import (BACKLOG, OncePerSecond, allow_open_files, give_back_freed_memory,
                                              guarded, listen)
from mnist_pipeline.settings import ServeConfig

log = logging.getLogger(__name__)


def run(config: ServeConfig) -> None:
    import uvicorn

    give_back_freed_memory()

    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    limits = allow_open_files(Limits.of(config))
    app = create_app(config)
    log.info("listening on http://%s:%d (volume %s, threshold %s)", host, port, config.root, config.threshold)
    server = uvicorn.Server(uvicorn.Config(
        app, http=guarded(limits), loop="asyncio", backlog=BACKLOG,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
        log_level="warning", access_log=False, lifespan="on"))
    flood = OncePerSecond()
    for name in ("uvicorn.error", "asyncio", "mnist_pipeline.serve.app", "mnist_pipeline.serve.connections"):
        logging.getLogger(name).addFilter(flood)
    server.run(sockets=[sock])
