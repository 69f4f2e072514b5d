"""Never lose work: exact resume, SIGTERM and kill -9, one train at a time, hostile and unwritable volumes.

Every test here drives real `mnist` processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_mnist, start_mnist
from mnist_pipeline import data
from mnist_pipeline.volume import Volume, exclusive_lock

TRAINING_STARTED = "training from step"


def read_until(process: subprocess.Popen, marker: str) -> str:
    """Read the process's stderr until a line with `marker` (or its end)."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"process ended before printing {marker!r}:\n{''.join(seen)[-3000:]}")


def lock_holder(root: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((root / "model" / ".train.lock").read_text())["pid"]
    return None


def assert_same_tensors(a, b, where="state"):
    """torch.equal on every tensor of two nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def data_only_copy(trained_root: Path, root: Path) -> Path:
    """A fresh volume with the MNIST files already in data/ (saves fetching them)."""
    shutil.copytree(trained_root / "data", root / "data")
    return root


@pytest.fixture(scope="session")
def second_epoch_root(trained_root, tmp_path_factory) -> Path:
    """trained_root after a second `mnist train`, with an `mnist evaluate` started while it ran."""
    root = tmp_path_factory.mktemp("second") / "volume"
    shutil.copytree(trained_root, root)
    train = start_mnist("train", "--root", str(root))
    read_until(train, TRAINING_STARTED)
    evaluate = run_mnist("evaluate", "--root", str(root), "--wait", "0")
    train_err = train.communicate(timeout=900)[1]
    assert train.returncode == 0, train_err[-3000:]
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    return root


def test_second_train_resumes_and_evaluate_waits_for_it(second_epoch_root, trained_root):
    checkpoint = second_epoch_root / "model" / "mnist_cnn.pt"
    assert load(checkpoint)["epoch"] == 2
    # evaluate was started with --wait 0 while train ran: it waited for train and scored epoch 2
    evaluation = json.loads((second_epoch_root / "model" / "eval_results.json").read_text())
    assert evaluation["checkpoint"]["epoch"] == 2
    assert evaluation["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert evaluation["accuracy"] >= json.loads((trained_root / "model" / "eval_results.json").read_text())[
        "accuracy"] - 0.003


def test_two_one_epoch_runs_equal_one_two_epoch_run(second_epoch_root, trained_root, tmp_path):
    root = data_only_copy(trained_root, tmp_path / "volume")
    result = run_mnist("train", "--root", str(root), "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    two_at_once, one_by_one = load(root / "model" / "mnist_cnn.pt"), load(second_epoch_root / "model" / "mnist_cnn.pt")
    assert two_at_once["epoch"] == one_by_one["epoch"] == 2
    assert ("cuda_rng" in two_at_once) == ("cuda_rng" in one_by_one)  # present when trained on CUDA
    for key in ("model", "optimizer", "rng", "cuda_rng"):
        if key in two_at_once:
            assert_same_tensors(two_at_once[key], one_by_one[key], key)


def test_kill_9_during_train_never_leaves_a_broken_checkpoint_or_partial_data(tmp_path, trained_root):
    root = tmp_path / "volume"
    rng = random.Random(7)
    # from an empty volume first (kills land in the fetch), then from a trained one (kills land in training;
    # on CPU, whose epoch lasts long enough for that)
    for round_, delay in enumerate([0.3, 1.0, 2.0, 3.0, 6.0, 9.0]):
        if round_ == 3:
            shutil.rmtree(root, ignore_errors=True)  # absent where the kills all came before train made it
            shutil.copytree(trained_root, root)
        train = start_mnist("train", "--root", str(root), "--device", "cpu")
        with contextlib.suppress(subprocess.TimeoutExpired):
            train.wait(timeout=delay + rng.random())
        train.kill()
        train.communicate()
        for name, sha256 in data.FILES.items():  # a file under its final name is always whole
            path = root / "data" / name
            assert not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() == sha256, name
        checkpoint = root / "model" / "mnist_cnn.pt"
        if checkpoint.exists():
            assert load(checkpoint)["epoch"] >= 1
    # and the volume still works
    result = run_mnist("evaluate", "--root", str(root), "--wait", "0")
    assert result.returncode == 0, result.stderr[-3000:]


def test_kill_9_during_infer_never_leaves_a_partial_results_folder(trained_copy):
    results = trained_copy / "results"
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        infer = start_mnist("infer", "--root", str(trained_copy))
        with contextlib.suppress(subprocess.TimeoutExpired):
            infer.wait(timeout=delay)
        infer.kill()
        infer.communicate()
        if results.exists():
            names = {p.name for p in results.iterdir()}
            listed = {p["file"] for p in json.loads((results / "predictions.json").read_text())["predictions"]}
            assert names == listed | {"predictions.json"} and len(listed) == 5
    result = run_mnist("infer", "--root", str(trained_copy))
    assert result.returncode == 0, result.stderr
    assert len(list(results.glob("*.png"))) == 5
    # a killed infer's staging folder can remain, but only under a temp name (swept once stale)
    leftovers = [p.name for p in trained_copy.iterdir() if p.name not in ("data", "model", "results")]
    assert all(name.startswith(".tmp-results.") for name in leftovers), leftovers


def test_a_second_train_refuses_naming_the_holder_and_a_crashed_one_blocks_nobody(trained_copy):
    # on CPU: a GPU could finish the epoch before the second train starts
    first = start_mnist("train", "--root", str(trained_copy), "--device", "cpu")
    try:
        read_until(first, TRAINING_STARTED)
        assert lock_holder(trained_copy) == first.pid
        second = run_mnist("train", "--root", str(trained_copy))
        assert_one_line_error(second, 4, "another train", f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate()
    # the kernel dropped the dead train's lock: the next one gets it at once
    with exclusive_lock(Volume(trained_copy), "train"):
        pass
    assert load(trained_copy / "model" / "mnist_cnn.pt")["epoch"] == 1


class _RunsCode:
    """A pickle payload: loading it with plain pickle would run `touch`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_crafted_to_run_code_is_refused_and_the_code_does_not_run(trained_copy, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = trained_copy / "model" / "mnist_cnn.pt"
    state = load(checkpoint)
    state["payload"] = _RunsCode(marker)
    torch.save(state, checkpoint)
    crafted = checkpoint.read_bytes()
    assert b"system" in crafted  # the payload really is in the file
    for stage in ("evaluate", "train", "infer"):
        result = run_mnist(stage, "--root", str(trained_copy), "--wait", "0") if stage != "train" else \
            run_mnist(stage, "--root", str(trained_copy))
        assert_one_line_error(result, 1, str(checkpoint), "does not load safely")
        assert not marker.exists()
        assert checkpoint.read_bytes() == crafted


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_volume_is_a_clear_error_and_the_checkpoint_stays(trained_root, tmp_path):
    root = tmp_path / "volume"
    shutil.copytree(trained_root / "data", root / "data")
    with tmpfs(root / "model", "8m") as model:
        for path in (trained_root / "model").iterdir():
            shutil.copy(path, model / path.name)
        before = (model / "mnist_cnn.pt").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(model)], check=True)
        for stage in ("train", "evaluate"):
            result = run_mnist(stage, "--root", str(root))
            assert_one_line_error(result, 1, "Read-only file system", "read-write")
        assert (model / "mnist_cnn.pt").read_bytes() == before


def test_a_full_disk_is_a_clear_error_and_the_checkpoint_stays(trained_root, tmp_path):
    root = tmp_path / "volume"
    shutil.copytree(trained_root / "data", root / "data")
    with tmpfs(root / "model", "4m") as model:
        shutil.copy(trained_root / "model" / "mnist_cnn.pt", model / "mnist_cnn.pt")
        before = (model / "mnist_cnn.pt").read_bytes()
        # fill the disk, leaving less room than a checkpoint needs
        free = shutil.disk_usage(model).free
        (model / "filler").write_bytes(b"\0" * max(0, free - len(before) // 4))
        # on CPU: a GPU could finish the epoch before the signal lands
        train = start_mnist("train", "--root", str(root), "--device", "cpu")
        read_until(train, TRAINING_STARTED)
        train.send_signal(signal.SIGTERM)  # its progress save now meets the full disk
        _, err = train.communicate(timeout=60)
        assert train.returncode == 1, err[-3000:]
        assert "No space left on device" in err and "free some space" in err and "Traceback" not in err
        assert (model / "mnist_cnn.pt").read_bytes() == before
        assert not [p for p in model.iterdir() if p.name.startswith(".tmp-")]
