"""`mnist` (or torchrun) in a process of its own, forked from a server that has already imported torch.

A new interpreter spends about 1.5 s importing torch before `mnist` does anything; a fork of this
server starts in a fraction of that (bench/suite_bench.py measures the suite). The server itself never
runs a torch operation, so each child starts torch's thread pools as a new process would (a fork of
a process that has used them hangs in them). What a child runs is what `python -m mnist_pipeline`
runs: cli.script() (or torchrun's main), with its own argv, environment, stdout and stderr, and its
own exit (a SIGKILL fault kills the child, nothing else).

torchrun's agent starts its ranks as new interpreters, which also import torch._dynamo (for
DistributedDataParallel). With RANKS_ENV set to rank_server() in a forked agent's environment
(torchrun, or `mnist train --nproc-per-node`), it asks the rank server instead: a second such server
that has imported torch._dynamo too, and forks each rank into a process group of its own, as torchrun
would start it.

What a fork cannot show, the tests keep fresh interpreters for (conftest.run_mnist(fresh=True)):
anything about the start itself, such as the train lock taken before torch loads, or --grace, which
counts from the process's start (the server's, in a fork).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing import reduction
from typing import Dict, List, Optional, Tuple

SERVER = multiprocessing.get_context("forkserver")
# cli first, as in `python -m mnist_pipeline`: it sets OMP_WAIT_POLICY before torch loads OpenMP; serve, so
# that each `mnist serve` does not load FastAPI and uvicorn again
SERVER.set_forkserver_preload(["mnist_pipeline.cli", "torch", "torch.distributed.run", "mnist_pipeline.serve",
                               __name__])
MNIST = "mnist_pipeline"
RANKS_ENV = "FORKED_RANK_SERVER"  # in a forked agent's environment: the rank server's address


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
    if RANKS_ENV in env:  # an agent, perhaps: its ranks come from the rank server
        _start_ranks_with(env[RANKS_ENV])
    if module == MNIST:
        from mnist_pipeline import cli

        cli.script()  # what mnist_pipeline/__main__.py runs; it ends the process with os._exit
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # SystemExit: the child's exit code


class Process:
    """A forked `python -m MODULE` (`mnist` unless told), with the part of subprocess.Popen's interface the
    tests use (text pipes)."""

    def __init__(self, argv: List[str], env: Dict[str, str], module: str = MNIST):
        pipes = [os.pipe(), os.pipe()]
        self._process = SERVER.Process(target=_main, args=(module, list(argv), env, _Fd(pipes[0][1]),
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


_rank_server: Optional[Tuple[str, multiprocessing.Process]] = None


def rank_server() -> str:
    """The address of this session's rank server (started on first use): the value for RANKS_ENV."""
    global _rank_server
    if _rank_server is None:
        name = f"mnist-test-ranks-{os.getpid()}"  # abstract: no file to clean up
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind("\0" + name)
        listener.listen()
        server = SERVER.Process(target=_serve_ranks, args=(_Fd(listener.fileno()),), daemon=True)
        server.start()
        listener.close()
        _rank_server = name, server
    return _rank_server[0]


def _serve_ranks(listener_fd: int) -> None:
    """The rank server: each connection asks for one rank (argv, environment, stdout and stderr) and hears
    back its pid, once its process group exists, then its exit code, as Popen says it (-N: signal N). An
    ended rank stays a zombie until its agent has read that and closed the connection, as a Popen child
    stays one until poll() reads it: the agent may still signal its group until then."""
    import torch._dynamo  # noqa: F401  (what each rank would import itself)

    listener = socket.socket(fileno=listener_fd)
    children_ended, wake_up = os.pipe()
    os.set_blocking(wake_up, False)
    signal.set_wakeup_fd(wake_up)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
    asking: Dict[int, socket.socket] = {}  # rank pid -> its agent's connection, until the agent closes it
    told = set()  # the ranks whose exit code their agent has been sent
    while True:
        readable = select.select([listener, children_ended, *asking.values()], [], [])[0]
        if listener in readable:
            connection, _ = listener.accept()
            message, outputs, _, _ = socket.recv_fds(connection, 1 << 20, 2)
            argv, env = pickle.loads(message)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (listener, connection, *asking.values()):
                    fd.close()
                os.close(children_ended)
                os.close(wake_up)
                os.setpgid(0, 0)
                sys.stdout.reconfigure(write_through=True)  # as `python -u`, which torchrun runs
                _run_to_the_end(_main, MNIST, argv, env, *outputs)
            os.setpgid(pid, pid)  # here too: the agent may signal the group as soon as it has the pid
            for fd in outputs:
                os.close(fd)
            with contextlib.suppress(OSError):  # (an agent gone already: its connection reads as ended below)
                connection.send(str(pid).encode())
            asking[pid] = connection
        if children_ended in readable:
            os.read(children_ended, 4096)
        for pid, connection in list(asking.items()):
            if pid not in told:
                ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # (not reaped)
                if ended is not None:
                    code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
                    with contextlib.suppress(OSError):
                        connection.send(str(code).encode())
                    told.add(pid)
            if connection in readable:  # its agent has read the exit code, or is gone (then so is the rank)
                if pid not in told:
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                connection.close()
                del asking[pid]
                told.discard(pid)


def _run_to_the_end(run, *args) -> None:
    """run(*args) in a forked child, then end the child as the interpreter would end it (cli.script ends it
    itself; argparse's usage errors and --help end it with SystemExit)."""
    code = 1
    try:
        run(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _ForkedRank:
    """What torchrun's agent keeps of a rank it started (the part of subprocess.Popen it uses)."""

    def __init__(self, address: str, args: List[str], env: Dict[str, str], outputs: List[int]):
        self.args, self.returncode = args, None
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._connection.connect("\0" + address)
        socket.send_fds(self._connection, [pickle.dumps((args, env))], outputs)
        self.pid = int(self._connection.recv(64))

    def poll(self) -> Optional[int]:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_exit_code()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_exit_code()
        return self.returncode

    def _read_exit_code(self) -> None:
        self.returncode = int(self._connection.recv(64))
        self._connection.close()  # the server reaps the rank now, as Popen's poll() would


def _start_ranks_with(address: str) -> None:
    """In an agent: start `python -u -m mnist_pipeline ...` ranks through the rank server."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import SubprocessHandler

    popen = SubprocessHandler._popen

    def forked_rank(handler: SubprocessHandler, args: tuple, env: Dict[str, str]):
        if list(args[:4]) != [sys.executable, "-u", "-m", MNIST]:
            return popen(handler, args, env)
        outputs = [file.fileno() if file else fd for file, fd in ((handler._stdout, 1), (handler._stderr, 2))]
        return _ForkedRank(address, list(args[4:]), env, outputs)

    SubprocessHandler._popen = forked_rank
