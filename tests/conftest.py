"""Shared fixtures: the real MNIST files in ../shared/mnist as the mirror, and real `mnist` processes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import forked

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "mnist"
# screenshots the browser tests leave for people to look at (git-ignored)
SCREENSHOTS = REPO / "test-artifacts"
# Debian's chromium and chromium-driver (.ci/run installs them): Selenium downloads nothing
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: needs a Docker engine (deselect with -m 'not docker')")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs the group's tests in one worker")
    take_this_workers_cpus()


def take_this_workers_cpus() -> None:
    """Under pytest-xdist (pyproject's addopts), worker i of n keeps CPUs i, i + n, ... for itself and the
    processes it starts, which size their threads by them: workers that each trained on every CPU would
    spend CPU time fighting over them (bench/suite_bench.py prints the suite's CPU time)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):  # (Linux only)
        return
    cpus, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, cpus[index % len(cpus)::int(count)] or cpus)


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"the MNIST mirror {MIRROR} is missing: the tests need ../shared/mnist beside the repo")
    return MIRROR


def mnist_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a test's `mnist` process: no stray MNIST_* settings, the local mirror."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["MNIST_MIRROR"] = str(MIRROR)
    env["MNIST_GRACE"] = "0"  # no start-up grace (for `docker compose up`) unless a test asks for one
    env.update(extra or {})
    return env


def litter(root: Path) -> list:
    """The temp files and folders of this program under `root` (see storage.atomic.TEMP_PREFIX)."""
    from mnist_pipeline.storage.atomic import TEMP_PREFIX

    return sorted(str(p.relative_to(root)) for p in root.rglob(TEMP_PREFIX + "*"))


def mnist_command(*args: str) -> list:
    return [sys.executable, "-m", "mnist_pipeline", *args]


def run_mnist(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 600,
              fresh: bool = False) -> subprocess.CompletedProcess:
    """`mnist ARGS` in a process of its own: forked from one with torch loaded (tests/forked.py), or with
    `fresh` a new interpreter, for what depends on the start itself (python -m as typed, the train lock
    before torch, --grace)."""
    if fresh:
        return subprocess.run(mnist_command(*args), env=mnist_env(env), capture_output=True, text=True,
                              timeout=timeout)
    return forked.run(list(args), mnist_env(env), timeout)


def fault_survivable(fault: Optional[str]) -> bool:
    """No fault, or one that only signals (SIGTERM, SIGINT) where main() itself handles it: run_here can run it."""
    return fault is None or (fault.startswith(("sigterm:", "sigterm-at-step:", "sigint-at-step:"))
                             and fault != "sigterm:exit")  # (exit: after main() returned)


def run_here(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`mnist ARGS` inside this test process, where torch is already loaded: a second or more faster
    than run_mnist per call. Same exit code, stdout and stderr. MNIST_FAULT only for a SIGTERM or
    SIGINT that main() handles: a SIGKILL, or a signal after main() returns, needs run_mnist."""
    from mnist_pipeline import cli, faults

    environment = mnist_env(env)
    fault = environment.get(faults.ENV)
    assert fault_survivable(fault), f"MNIST_FAULT={fault} would kill the test process or never fire here: use run_mnist"
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    saved_fault = os.environ.pop(faults.ENV, None)
    if fault is not None:  # faults.py reads the process environment
        os.environ[faults.ENV] = fault
    log_handler = logging.StreamHandler(err)
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.addHandler(log_handler)
    root_logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args), env=environment)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        root_logger.removeHandler(log_handler)
        root_logger.setLevel(level)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        os.environ.pop(faults.ENV, None)
        if saved_fault is not None:
            os.environ[faults.ENV] = saved_fault
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def start_mnist(*args: str, env: Optional[Dict[str, str]] = None, fresh: bool = False):
    """run_mnist's twin for a process the test talks to while it runs: a subprocess.Popen, or its like."""
    if fresh:
        return subprocess.Popen(mnist_command(*args), env=mnist_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return forked.Process(list(args), mnist_env(env))


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
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def bomb_png(side: int = 30000) -> bytes:
    """A decompression bomb: a side x side black 1-bit PNG, a few hundred KB that decode to ~side**2 / 8 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the row's bits
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@contextlib.contextmanager
def http_server(folder: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


def shared_folder(tmp_path_factory) -> Path:
    """This run's temp folder that every pytest-xdist worker sees (each has its own below it)."""
    # (getbasetemp() first empties a new run's folder: a thread must not be the first to call it)
    folder = tmp_path_factory.getbasetemp()
    return folder.parent if "PYTEST_XDIST_WORKER" in os.environ else folder


def built_once(shared: Path, name: str, build) -> Path:
    """A session fixture's folder, shared/NAME: build(folder) once for the whole run, also when pytest-xdist
    runs the tests in several processes (the first to get here builds it, the others wait for it)."""
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _trained_volume_builder():
    """build(folder) for trained_root, its environment read now: a thread must not read os.environ while
    run_here changes it."""
    env = mnist_env()

    def build(folder: Path) -> None:
        for stage in ("train", "evaluate"):
            result = forked.run([stage, "--root", str(folder / "volume")], env, 600)
            assert result.returncode == 0, result.stderr[-3000:]

    return build


@pytest.fixture(scope="session", autouse=True)
def trained_root_started_early(request, tmp_path_factory, mirror) -> None:
    """When a test of this run needs trained_root, start building it at once, beside the first tests: the
    tests that need it then wait less or not at all. (A failed build here is built again by the fixture,
    which reports the failure.)"""
    if any("trained_root" in item.fixturenames for item in request.session.items):
        shared = shared_folder(tmp_path_factory)
        threading.Thread(target=built_once, args=(shared, "trained", _trained_volume_builder()), daemon=True).start()


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory, mirror) -> Path:
    """A volume root after one `mnist train` and one `mnist evaluate` (shared: copy before changing)."""
    return built_once(shared_folder(tmp_path_factory), "trained", _trained_volume_builder()) / "volume"


@pytest.fixture(scope="session")
def short_trained_root(tmp_path_factory, mirror) -> Path:
    """A volume after one `mnist train --max-steps 20`. The limit is saved with the checkpoint, so a
    train resumed from it is as short (shared: copy before changing)."""
    root = tmp_path_factory.mktemp("short") / "volume"
    result = run_here("train", "--root", str(root), "--max-steps", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def private_copy(shared: Path, tmp_path: Path) -> Path:
    """A copy of a shared (session or module) volume for one test to change."""
    root = tmp_path / "volume"
    shutil.copytree(shared, root)
    return root


@pytest.fixture
def short_trained_copy(short_trained_root, tmp_path) -> Path:
    return private_copy(short_trained_root, tmp_path)


@pytest.fixture
def trained_copy(trained_root, tmp_path) -> Path:
    return private_copy(trained_root, tmp_path)


class Served:
    """A running `mnist serve` process: its base URL and its stderr so far."""

    def __init__(self, root: Path, *args: str, env: Optional[Dict[str, str]] = None):
        self.process = start_mnist("serve", "--root", str(root), "--port", "0", *args, env=env)
        self.stderr: List[str] = []
        self.url = ""
        for line in self.process.stderr:  # the first lines, up to the address it listens on
            self.stderr.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.process.wait(timeout=30)
            raise AssertionError(f"mnist serve did not start: {''.join(self.stderr)[-3000:]}")
        # keep reading, so that a full pipe never blocks the server
        self._drain = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        self._drain.start()

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict]:
        status, response_headers, data = self.request(method, path, body, headers)
        assert response_headers.get("content-type", "").startswith("application/json"), (status, data[:300])
        return status, json.loads(data)

    def stop(self) -> str:
        """SIGTERM, wait, and return all it wrote to stderr."""
        self.process.terminate()
        self.process.wait(timeout=30)
        self._drain.join(timeout=10)
        self.process.stdout.close()
        return "".join(self.stderr)


@pytest.fixture
def serve() -> Iterator:
    """Start `mnist serve --root ROOT ...` on a free port: serve(root, *args) -> Served; stopped afterwards."""
    started: List[Served] = []

    def start(root: Path, *args: str) -> Served:
        started.append(Served(root, *args))
        return started[-1]

    yield start
    for served in started:
        log = served.stop()
        assert "Traceback" not in log, log[-5000:]


PATIENCE_S = 120  # how long a test waits for a server to notice a change on the volume


def wait_until(condition, what: str):
    """Poll condition() until it returns something truthy (a generous limit catches a hang, not slowness)."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up after {PATIENCE_S} s waiting for {what}")


@pytest.fixture(scope="session")
def served_trained(trained_root, tmp_path_factory) -> Iterator[Tuple[Served, Path]]:
    """One ready `mnist serve` of a copy of trained_root's model/ (all serve reads), and that root:
    one server start for test_serve's API tests and test_page. A test that changes the volume puts it back."""
    root = tmp_path_factory.mktemp("served") / "volume"
    shutil.copytree(trained_root / "model", root / "model")
    served = Served(root)
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    yield served, root
    log = served.stop()
    assert "Traceback" not in log, log[-5000:]


def multipart(files: List[Tuple[str, bytes]], field: str = "file") -> Tuple[bytes, Dict[str, str]]:
    """A multipart/form-data body with one `field` per (filename, content)."""
    boundary = "mnist-test-boundary-7d3f"
    parts = [
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
         f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
        for name, content in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Selenium; skipped where it is not installed (a failure under CI)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing = f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
        pytest.fail(f"{missing} (CI is set)") if os.environ.get("CI") else pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # no background traffic: this machine's closed network refuses it, many connections at a time
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    SCREENSHOTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def write_evaluation(root: Path, sha256: str, epoch: int, accuracy: float = 0.99) -> None:
    """A valid evaluation naming that checkpoint: `accuracy` of 10,000 images right (wrong ones taken for 1)."""
    from mnist_pipeline.records import evaluation
    from mnist_pipeline.volume import Volume

    correct = round(accuracy * 10_000)
    matrix = tuple((correct, 10_000 - correct, *[0] * 8) if row == 0 else (0,) * 10 for row in range(10))
    evaluation.write(Volume(root), evaluation.Evaluation(
        accuracy=correct / 10_000, test_loss=0.1, correct=correct, total=10_000, per_class_accuracy=(1.0,) * 10,
        confusion_matrix=matrix, mistakes=(), sha256=sha256, epoch=epoch, compute_seconds=0.0, device="cpu",
        evaluated_at="2026-12-04T00:00:00+0000"))

