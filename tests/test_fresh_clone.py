"""A fresh clone with nothing beside it: the tests get MNIST themselves, through the product's checksummed fetch
into a cache folder, or stop at once with one line that says how to provide it. Each case runs `python -m pytest`
of one small test in a new process, with its own cache folder; a local HTTP server stands in for the internet
(the public mirrors), so that these tests download nothing."""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from test_data import http_server
from mnist_pipeline import data

# loaded into the inner pytest (-p) before its session starts: the public mirrors are this machine's stand-in
STAND_IN = "import os\nfrom mnist_pipeline import data\ndata.PUBLIC_MIRRORS = (os.environ['STAND_IN_INTERNET'],)\n"


def test_the_tests_mirror_holds_mnist(tmp_path, mirror):
    """The small test the runs below run: the product fetches verified MNIST files from the tests' mirror."""
    data.ensure(tmp_path, str(mirror), splits=("test",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@contextlib.contextmanager
def unreachable() -> Iterator[str]:
    """An http:// URL where nobody listens (a port held but not listening: connections are refused)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/"


def inner_pytest(tmp_path: Path, internet: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m pytest` of the small test above in a new process, with `internet` for the public mirrors and
    tmp_path/cache as XDG_CACHE_HOME."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_", "PYTEST_", "XDG_"))}
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    environment = {**outer, "PYTHONPATH": path, "XDG_CACHE_HOME": str(tmp_path / "cache"),
                   "STAND_IN_INTERNET": internet, **env}
    command = [sys.executable, "-m", "pytest", "-p", "stand_in", "-n", "0", "-p", "no:cacheprovider", "-q",
               "--basetemp", str(tmp_path / "basetemp"), f"{__file__}::test_the_tests_mirror_holds_mnist"]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def assert_passed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0 and "1 passed" in result.stdout, (result.stdout[-3000:], result.stderr[-3000:])


def assert_stopped_with_one_line(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output[-3000:]
    lines = [line for line in output.splitlines() if "MNIST" in line]
    assert len(lines) == 1 and "no MNIST for the tests" in lines[0] and "MNIST_TEST_MIRROR" in lines[0], output
    assert "MNIST_MIRROR" not in lines[0].replace("MNIST_TEST_MIRROR", ""), lines[0]  # (the product's setting)
    assert "Traceback" not in output and "passed" not in output and "error" not in result.stdout, output


def cached(tmp_path: Path) -> list:
    return sorted(p.name for p in (tmp_path / "cache" / "mnist-compose").iterdir())


def test_with_the_internet_the_tests_fill_the_cache_once_from_the_public_mirrors(tmp_path, mirror):
    with http_server(mirror) as internet:
        assert_passed(inner_pytest(tmp_path, internet))
    assert cached(tmp_path) == sorted([*data.FILES, *(f"{name}.gz" for name in data.FILES)])
    with unreachable() as internet:  # filled once: the next run fetches nothing
        assert_passed(inner_pytest(tmp_path, internet))


def test_a_mirror_named_by_url_fills_the_cache_without_the_internet(tmp_path, mirror):
    with unreachable() as nowhere, http_server(mirror) as named:
        assert_passed(inner_pytest(tmp_path, nowhere, MNIST_TEST_MIRROR=named))
    assert cached(tmp_path) == sorted([*data.FILES, *(f"{name}.gz" for name in data.FILES)])


def test_without_a_reachable_mirror_the_run_stops_at_once_with_one_line(tmp_path):
    with unreachable() as nowhere:
        assert_stopped_with_one_line(inner_pytest(tmp_path, nowhere))  # no internet, no MNIST_TEST_MIRROR
        assert_stopped_with_one_line(inner_pytest(tmp_path, nowhere, MNIST_TEST_MIRROR=nowhere))  # named, unreachable
