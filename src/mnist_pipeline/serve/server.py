"""One process's server: the app under uvicorn on a listening socket until SIGTERM or SIGINT. uvicorn and
the app load when serve() runs, not at import: workers.py imports this before it forks."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Callable, Iterator

from mnist_pipeline import signals
from mnist_pipeline.serve.connections import BACKLOG, OncePerSecond, allow_open_files, give_back_freed_memory, guarded
from mnist_pipeline.settings import ServeConfig


def serve(sock: socket.socket, config: ServeConfig, started: Callable[[], None] = lambda: None) -> None:
    """The app on `sock` in this process until SIGTERM or SIGINT; `started` once the app is built."""
    import uvicorn

    from mnist_pipeline.serve.app import create_app
    from mnist_pipeline.serve.budget import Limits

    class Server(uvicorn.Server):
        """uvicorn's server, stopping also for a signal that came before it listened for them (signals.py
        records one from the process's start), so a worker stopped while it starts does stop."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                early = signals.received()
                if early is not None:
                    self.handle_exit(early, None)
                yield

    give_back_freed_memory()
    limits = allow_open_files(Limits.of(config))
    app = create_app(config)
    server = Server(uvicorn.Config(
        app, http=guarded(limits), loop="asyncio", backlog=BACKLOG,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
        log_level="warning", access_log=False, lifespan="on"))
    flood = OncePerSecond()
    for name in ("uvicorn.error", "asyncio", "mnist_pipeline.serve.app", "mnist_pipeline.serve.connections"):
        logging.getLogger(name).addFilter(flood)
    started()
    server.run(sockets=[sock])
