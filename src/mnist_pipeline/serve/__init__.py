"""serve: the HTTP API and the draw-a-digit page.

The model and its preprocessing come from model.py and preprocess.py, the gated model that follows
the volume from follow.py. Nothing here writes to the volume. Every error is a 4xx (or a 503: busy,
retry) with a JSON {"error": ...}; the process keeps serving whatever a client sends.

--workers N processes answer on the one port (workers.py), each with the app and its own watcher
of the volume; /metrics sums them (metrics.py). What a client may cost is bounded in each, since the
port is open to anyone:
- memory: an upload is at most MAX_BODY_BYTES, all uploads held at once at most UPLOADS_BYTES (bodies.py), an
  image's decoded pixels at most preprocess.MAX_DECODED_BYTES, and at most --max-decodes images are
  decoded at once (one at a time per request); --max-waiting requests may wait for a decode, more get
  a 503 with Retry-After;
- connections: at most --max-connections (the one idle the longest makes room for a new one), each
  closed when a request's head or body stops arriving for --read-timeout seconds, or when it sits
  idle after an answer for --keep-alive seconds (connections.Guard, and http.Front's receive);
- logs: a message that repeats is logged at most once a second (OncePerSecond).

  app.py          the routes
  bodies.py       a request's body, read within bounds, parsed into images
  budget.py       what requests may hold at once: the limits, decode slots, upload bytes
  http.py         the edge every answer passes: JSON errors, security headers, counts, body timeouts
  connections.py  the socket and uvicorn's protocol with a head timeout and a connection cap
  follow.py       the gated model, kept current as the volume changes
  runtimes.py     the model's runtime (torch or onnxruntime) and the model it loads
  metrics.py      /metrics, summed over the workers
  server.py       one process's server: the app under uvicorn
  workers.py      the parent that runs several servers on one port

Nothing here imports the model's runtime or the web framework at module level: the parent of
several workers forks them before any of that loads.
"""

from __future__ import annotations

import logging

from mnist_pipeline.runtime import available_cpus
from mnist_pipeline.serve.connections import listen
from mnist_pipeline.settings import ServeConfig

log = logging.getLogger(__name__)


def run(config: ServeConfig) -> None:
    from mnist_pipeline.serve import server, workers

    count = config.workers or available_cpus()
    sock = listen(config.host, config.port, shared=count > 1)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (volume %s, threshold %s, %d worker%s)", host, port, config.root,
             config.threshold, count, "s" if count > 1 else "")
    if count == 1:
        server.serve(sock, config)
    else:
        workers.supervise(sock, config, count)
