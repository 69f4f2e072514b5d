"""What the tests share: MNIST, `mnist` run as a user runs it, and the volumes and servers several tests use."""

import concurrent.futures
import contextlib
import fcntl
import gzip
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from unittest import mock

import pytest

from mnist_pipeline import cli, data, faults
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.storage.atomic import TEMP_PREFIX, atomic_write_bytes

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in cli.main, before torch loads: idle threads sleep, not spin
# -n logical: a pytest-xdist worker more than the CPUs, whose tests run while another's wait on a server or a child
os.environ.setdefault("PYTEST_XDIST_AUTO_NUM_WORKERS", str(len(os.sched_getaffinity(0)) + 1))

REPO = Path(__file__).resolve().parents[1]
NAMED = os.environ.get("MNIST_TEST_MIRROR", "")  # a folder or an http(s) URL
# the folder every test reads MNIST from: raw files, which a volume's fetch copies without inflating, and .gz
MIRROR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-compose"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts its workers
def pytest_sessionstart(session):
    """MNIST in MIRROR before the first test, or one line that says how to provide it instead of many errors."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: its controller has seen to it
        return
    try:
        data.ensure(MIRROR, NAMED or None)  # verified, or fetched (None: from the public mirrors)
        for name in data.FILES:  # gzipped too, as mirrors serve them: the tests of the fetch read .gz files
            if not (MIRROR / f"{name}.gz").exists():
                atomic_write_bytes(MIRROR / f"{name}.gz", gzip.compress((MIRROR / name).read_bytes(), 1, mtime=0))
    except (PipelineError, OSError) as exc:  # one line from pytest, before any test; the product's advice is for users
        cause = str(exc).split("; ")[0].replace("MNIST_MIRROR=", "")
        raise pytest.UsageError(f"no MNIST for the tests ({cause}): set MNIST_TEST_MIRROR to a folder or http(s) "
                                f"URL of the MNIST files, to fill {MIRROR} once (unset: public mirrors)") from None


def pytest_collection_modifyitems(items):
    """For each of these built_once volumes, one test that needs it first, the others last: no worker waits for it.
    Then the modules of quick in-process checks last: where the workers finish unevenly, those fill in."""
    for name in ("three_versions", "trained_root"):
        needing = [item for item in items if name in item.fixturenames]
        items[:] = needing[:1] + [item for item in items if item not in needing] + needing[1:]
    quick = {"cli", "docs", "follow", "kubernetes", "pipeline", "predict", "records", "units"}  # tests/test_*.py
    items.sort(key=lambda item: item.path.stem.removeprefix("test_") in quick)


@pytest.fixture(scope="session")
def mirror() -> Path:
    return MIRROR


def mnist_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A test's `mnist` environment: no stray MNIST_* settings, the tests' mirror, no grace or export unless asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    # pytest-xdist's workers share the CPUs: each one's processes take their share, not all of them each
    share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    return {**env, "MNIST_MIRROR": str(MIRROR), "MNIST_GRACE": "0", "MNIST_EXPORT": "never",
            "MNIST_THREADS": str(share), **(extra or {})}


def litter(root: Path) -> list:
    """The temp files and folders of this program under `root` (see storage.atomic.TEMP_PREFIX)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(TEMP_PREFIX + "*"))


# `mnist` and torchrun's agent fork from a server that has imported torch and the stages (slow in a new
# interpreter) and runs no torch op, so a child starts torch's thread pools as a new process does.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["mnist_pipeline.cli", "torch", "mnist_pipeline.train", "mnist_pipeline.evaluate",
                              "onnxruntime", "torch.distributed.run"])


class Forked(FORKS.Process):
    """A forked `mnist ARGV` (main(): what `python -m mnist_pipeline` runs) with subprocess.Popen's interface."""

    def __init__(self, argv: List[str], env: Dict[str, str], main: Callable[[], None]):
        pairs = [socket.socketpair() for _ in range(2)]  # (ours, the child's) for stdout, then stderr
        super().__init__(daemon=True)
        self.child = (main, argv, env, pairs[0][1], pairs[1][1])  # pickled for the child, as the whole process is
        self.start()
        self.args, self.stdout, self.stderr = argv, *(ours.makefile("r", encoding="utf-8") for ours, _ in pairs)
        for end in (*pairs[0], *pairs[1]):  # (the files keep ours open) EOF comes when the child ends
            end.close()

    def run(self) -> None:  # the child: a SystemExit or an exception ends it as it ends an interpreter
        main, argv, env, out, err = self.child
        os.environ.clear()
        os.environ.update(env)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [sys.executable, *argv]
        main()

    returncode = property(lambda self: self.exitcode)  # -N: killed by signal N, as Popen says it
    poll = returncode.fget

    def wait(self, timeout: Optional[float] = None) -> int:
        self.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        """Both outputs to their end, each read on a thread: a full pipe would block the child."""
        pool = concurrent.futures.ThreadPoolExecutor(2)
        reads = [pool.submit(stream.read) for stream in (self.stdout, self.stderr)]
        pool.shutdown(wait=False)
        self.wait(timeout)  # (a hang: TimeoutExpired; the caller kills the child, which ends the reads)
        return reads[0].result(), reads[1].result()


def start_mnist(*args: str, env: Optional[Dict[str, str]] = None, fresh: bool = False,
                main: Callable[[], None] = cli.script):
    """`mnist ARGS` (main=torch.distributed.run.main: torchrun ARGS) in a process the test talks to while it runs:
    forked, or with `fresh` a new interpreter, where the start matters (python -m as typed, PYTHONIOENCODING)."""
    # serve's server (granian) starts its workers with multiprocessing, which a forked (daemonic) child may not
    if not fresh and args[:1] != ("serve",):
        return Forked(list(args), mnist_env(env), main)
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *args], env=mnist_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_mnist(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 600, fresh: bool = False,
              main: Callable[[], None] = cli.script) -> subprocess.CompletedProcess:
    """start_mnist's twin that waits for the end, as a user runs `mnist`; a hang fails the test."""
    process = start_mnist(*args, env=env, fresh=fresh, main=main)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        process.kill()  # (after a hang; a no-op otherwise)
    return subprocess.CompletedProcess(list(args), process.returncode, out, err)


def fault_survivable(fault: Optional[str]) -> bool:
    """No fault, or a SIGTERM or SIGINT that main() handles itself (not sigterm:exit, after it): run_here can run it."""
    return fault is None or fault.startswith(("sigterm", "sigint-at-step:")) and fault != "sigterm:exit"


def run_here(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`mnist ARGS` in this test process: run_mnist's exit code, stdout and stderr, without a process to start."""
    environment = mnist_env(env)
    fault = environment.get(faults.ENV)
    assert fault_survivable(fault), f"MNIST_FAULT={fault} would kill the test process or never fire here: use run_mnist"
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # the root logger as a new process has it, for cli.main's logging.basicConfig (pytest's put back after)
        with mock.patch.dict(os.environ), mock.patch.multiple(logging.root, handlers=[], level=logging.WARNING), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            os.environ.pop(faults.ENV, None)
            os.environ.update({faults.ENV: fault} if fault else {})  # faults.py reads the process environment
            try:
                code = cli.main(list(args), env=environment)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def read_until(process: subprocess.Popen, marker: str) -> str:
    """Read the process's stderr until a line with `marker` (or its end)."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"process ended before printing {marker!r}:\n{''.join(seen)[-3000:]}")


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """A user error: the given exit code, one `error:` line naming the fragments, no traceback."""
    assert result.returncode == code and "Traceback" not in result.stderr, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), (fragments, result.stderr)


def built_once(tmp_path_factory, worker_id: str, name: str, *commands: Tuple[str, ...]) -> Path:
    """The volume `name` after `mnist COMMAND... --root ROOT` each, built by the first worker to ask, shared by all."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(shared / name, ignore_errors=True)  # what a failed build left
            for command in commands:
                result = run_here(*command, "--root", str(shared / name))
                assert result.returncode == 0, (command, result.stderr[-3000:])
            (shared / f"{name}.done").touch()
    return shared / name


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory, worker_id) -> Path:
    """A volume after `mnist train` and `mnist evaluate`, which exported version 1 (shared: copy before changing)."""
    return built_once(tmp_path_factory, worker_id, "trained", ("train",), ("evaluate", "--export", "auto"))


@pytest.fixture(scope="session")
def short_trained_root(tmp_path_factory, worker_id) -> Path:
    """A volume after `mnist train --max-steps 20`, a limit its resumed trains keep (shared: copy before changing)."""
    return built_once(tmp_path_factory, worker_id, "short", ("train", "--max-steps", "20"))


def private_copy(shared: Path, target: Path) -> Path:
    """A copy of a shared volume (or a folder in one) to change; its MNIST files are hard links (never written into)."""
    def copy(src: str, dst: str) -> None:
        if Path(src).parent.name == "data":
            with contextlib.suppress(OSError):  # (on another file system: copied)
                return os.link(src, dst)
        shutil.copy2(src, dst)
    return Path(shutil.copytree(shared, target, copy_function=copy))


@pytest.fixture
def short_trained_copy(short_trained_root, tmp_path) -> Path:
    return private_copy(short_trained_root, tmp_path / "volume")


@pytest.fixture
def trained_copy(trained_root, tmp_path) -> Path:
    return private_copy(trained_root, tmp_path / "volume")


class Served:
    """A running `mnist serve`, one worker unless args say more: its URL, its stderr read all along (or it blocks)."""

    def __init__(self, root: Path, *args: str, env: Optional[Dict[str, str]] = None, fresh: bool = False):
        self.process = start_mnist("serve", "--root", str(root), "--port", "0", "--workers", "1", *args, env=env,
                                   fresh=fresh)
        self.stderr = [read_until(self.process, "listening on")]
        self.url = re.search(r"listening on (http://\S+)", self.stderr[0]).group(1)
        self._drain = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        self._drain.start()

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None) -> tuple:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.request.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None) -> tuple:
        status, response_headers, content = self.request(method, path, body, headers)
        assert response_headers.get("content-type", "").startswith("application/json"), (status, content[:300])
        return status, json.loads(content)

    def close(self) -> None:
        """SIGTERM and wait; all it wrote to stderr holds no traceback."""
        self.process.terminate()
        self.process.wait(timeout=30)
        self._drain.join(timeout=10)
        self.process.stdout.close()
        assert "Traceback" not in "".join(self.stderr), "".join(self.stderr)[-5000:]


@pytest.fixture
def serve() -> Iterator:
    """`mnist serve --root ROOT ...` on a free port: serve(root, *args, env=None) -> Served; stopped afterwards."""
    with contextlib.ExitStack() as started:
        yield lambda root, *args, env=None: started.enter_context(contextlib.closing(Served(root, *args, env=env)))


def wait_until(condition, what: str, patience_s: float = 120):
    """Poll condition() until it returns something truthy (a generous limit catches a hang, not slowness)."""
    deadline = time.monotonic() + patience_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up after {patience_s} s waiting for {what}"
        time.sleep(0.1)
    return value


@pytest.fixture(scope="session")
def served_trained(trained_root, tmp_path_factory) -> Iterator[Tuple[Served, Path]]:
    """A ready `mnist serve` of a copy of trained_root's model/, and that root (a test that changes it puts it back)."""
    root = tmp_path_factory.mktemp("served") / "volume"
    shutil.copytree(trained_root / "model", root / "model")
    with contextlib.closing(Served(root)) as served:
        wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
        yield served, root
