"""`mnist` (or torchrun) in a process of its own, forked from a server that has already imported torch.

A new interpreter spends about 1.5 s importing torch before `mnist` does anything; a fork of this
server starts in a fraction of that (bench/suite_bench.py measures the suite). The server itself never
runs a torch operation, so each child starts torch's thread pools as a new process would (a fork of
a process that has used them hangs in them). What a child runs is what `python -m mnist_pipeline`
runs: cli.script() (or torchrun's main), with its own argv, environment, stdout and stderr, and its
own exit (a SIGKILL fault kills the child, nothing else). torchrun's ranks are new interpreters still:
its agent starts them.

What a fork cannot show, the tests keep fresh interpreters for (conftest.run_mnist(fresh=True)):
anything about the start itself, such as the train lock taken before torch loads, or --grace, which
counts from the process's start (the server's, in a fork).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
from multiprocessing import reduction
from typing import Dict, List, Optional, Tuple

_SERVER = multiprocessing.get_context("forkserver")
# cli first, as in `python -m mnist_pipeline`: it sets OMP_WAIT_POLICY before torch loads OpenMP
_SERVER.set_forkserver_preload(["mnist_pipeline.cli", "torch", "torch.distributed.run", __name__])
MNIST = "mnist_pipeline"


class _Fd:
    """A file descriptor handed to the forked child (the server passes it over its socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(duplicate) -> int:
    return duplicate.detach()


def _main(module: str, argv: List[str], env: Dict[str, str], stdout: int, stderr: int) -> None:
    """The child: become `python -m MODULE ARGV` with this environment and these outputs, and run it."""
    os.environ.clear()
    os.environ.update(env)
    for fd, target in ((stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.argv = [module, *argv]
    if module == MNIST:
        from mnist_pipeline import cli

        cli.script()  # what mnist_pipeline/__main__.py runs; it ends the process with os._exit
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # SystemExit: the child's exit code


class Process:
    """A forked `python -m MODULE` (`mnist` unless told), with the part of subprocess.Popen's interface the
    tests use (text pipes)."""

    def __init__(self, argv: List[str], env: Dict[str, str], module: str = MNIST):
        pipes = [os.pipe(), os.pipe()]
        self._process = _SERVER.Process(target=_main, args=(module, list(argv), env, _Fd(pipes[0][1]),
                                                             _Fd(pipes[1][1])),
                                        daemon=True)  # ended with the test session, if still running
        try:
            self._process.start()
        finally:
            for _, write_end in pipes:
                os.close(write_end)  # the child has its own copies: EOF comes when it exits
        self.args = list(argv)
        self.pid = self._process.pid
        self.stdout = os.fdopen(pipes[0][0], "r")
        self.stderr = os.fdopen(pipes[1][0], "r")

    @property
    def returncode(self) -> Optional[int]:
        return self._process.exitcode  # -N: killed by signal N, as Popen says it

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        """Read both pipes to their end (each on a thread: a full pipe must not block the child), then wait."""
        outputs = {}

        def read(name: str, stream) -> None:
            outputs[name] = stream.read()
            stream.close()

        readers = [threading.Thread(target=read, args=(n, s), daemon=True)
                   for n, s in (("out", self.stdout), ("err", self.stderr)) if not s.closed]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        return outputs.get("out", ""), outputs.get("err", "")


def run(argv: List[str], env: Dict[str, str], timeout: Optional[float] = None,
        module: str = MNIST) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True, text=True): kills the child and raises TimeoutExpired on a hang."""
    process = Process(argv, env, module)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(argv, process.returncode, out, err)
