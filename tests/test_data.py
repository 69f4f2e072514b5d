"""Fetching MNIST from a local folder or an http mirror, verifying it, parsing IDX."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import shutil
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import assert_one_line_error, run_here
from mnist_pipeline import data
from mnist_pipeline.errors import PipelineError


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """The URL of an HTTP server of `folder` (the internet, to the product); silent: run_here reads stderr."""
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=folder)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()



def test_local_mirror_gives_the_real_mnist(tmp_path, mirror):
    train = data.load_split(tmp_path, "train", str(mirror))
    test = data.load_split(tmp_path, "test", str(mirror))
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # stored decompressed, checksums of the decompressed content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(data.FILES)


def test_raw_mirror_files_work_too(tmp_path, mirror):
    raw = tmp_path / "raw-mirror"
    raw.mkdir()
    with gzip.open(mirror / "t10k-labels-idx1-ubyte.gz") as src, open(raw / "t10k-labels-idx1-ubyte", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(mirror / "t10k-images-idx3-ubyte.gz", raw)
    assert len(data.load_split(tmp_path / "data", "test", str(raw))) == 10000


def test_a_corrupt_copy_in_data_is_not_used_but_fetched_again(tmp_path, mirror):
    data.load_split(tmp_path, "test", str(mirror))
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    damaged = bytearray(labels.read_bytes())
    damaged[100] ^= 0xFF
    labels.write_bytes(bytes(damaged))
    assert data.load_split(tmp_path, "test", str(mirror)).labels[:3].tolist() == [7, 2, 1]
    assert data.hashlib.sha256(labels.read_bytes()).hexdigest() == data.FILES[labels.name]


def truncated_mirror(tmp_path: Path, mirror: Path) -> Path:
    bad = tmp_path / "truncated-mirror"
    bad.mkdir()
    for path in mirror.glob("*.gz"):
        content = path.read_bytes()
        (bad / path.name).write_bytes(content[: len(content) // 2] if "labels" in path.name else content)
    return bad


def test_truncated_mirror_file_is_refused_and_leaves_no_file(tmp_path, mirror):
    bad = truncated_mirror(tmp_path, mirror)
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        data.load_split(tmp_path / "data", "test", str(bad))
    assert not (tmp_path / "data" / "t10k-labels-idx1-ubyte").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if "labels" in p.name]


def test_mirror_with_wrong_content_is_refused(tmp_path, mirror):
    bad = tmp_path / "wrong"
    bad.mkdir()
    for path in mirror.glob("*.gz"):
        shutil.copy(path, bad / path.name)
    # right format, wrong data: the test labels served as the training labels
    shutil.copy(mirror / "t10k-labels-idx1-ubyte.gz", bad / "train-labels-idx1-ubyte.gz")
    with pytest.raises(PipelineError, match="checksum"):
        data.load_split(tmp_path / "data", "train", str(bad))


def test_cli_errors_for_missing_and_truncated_mirror(tmp_path, mirror):
    missing = tmp_path / "no-such-folder"
    result = run_here("train", "--root", str(tmp_path / "v1"), env={"MNIST_MIRROR": str(missing)})
    assert_one_line_error(result, 1, "MNIST_MIRROR", str(missing), "no such folder")
    bad = truncated_mirror(tmp_path, mirror)
    result = run_here("train", "--root", str(tmp_path / "v2"), "--mirror", str(bad))
    assert_one_line_error(result, 1, "train-labels-idx1-ubyte", "truncated")
    assert not (tmp_path / "v2" / "model" / "mnist_cnn.pt").exists()


def test_fetch_over_http(tmp_path, mirror):
    with http_server(mirror) as url:
        test = data.load_split(tmp_path, "test", url)
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_truncated_file_over_http_is_refused(tmp_path, mirror):
    bad = truncated_mirror(tmp_path, mirror)
    with http_server(bad) as url:
        with pytest.raises(PipelineError, match="truncated"):
            data.load_split(tmp_path / "data", "test", url)
    assert not (tmp_path / "data" / "t10k-labels-idx1-ubyte").exists()


def test_missing_file_over_http_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with http_server(tmp_path / "empty") as url:
        with pytest.raises(PipelineError, match="HTTP 404"):
            data.load_split(tmp_path / "data", "test", url)


def test_unreachable_http_mirror_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/mnist/"
    result = run_here("train", "--root", str(tmp_path), "--mirror", url)
    assert_one_line_error(result, 1, url, "unreachable")
