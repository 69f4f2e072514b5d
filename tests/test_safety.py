"""Never lose work: exact resume, SIGTERM and kill -9, one train at a time, hostile and unwritable volumes.

Every test here drives real `mnist` processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, private_copy, read_until, run_here, start_mnist
from mnist_pipeline.storage.atomic import TEMP_PREFIX
from mnist_pipeline.storage.locks import exclusive_lock
from mnist_pipeline.volume import Volume

TRAINING_STARTED = "training from step"


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
    private_copy(trained_root / "data", root / "data")
    return root


STEPS = "20"  # a step-limited epoch: resume is the same code whatever the epoch's length


def test_two_one_epoch_runs_equal_one_two_epoch_run(trained_root, tmp_path):
    one_by_one = data_only_copy(trained_root, tmp_path / "one-by-one")
    for _ in range(2):
        result = run_here("train", "--root", str(one_by_one), "--max-steps", STEPS)
        assert result.returncode == 0, result.stderr[-3000:]
    two_at_once = data_only_copy(trained_root, tmp_path / "two-at-once")
    result = run_here("train", "--root", str(two_at_once), "--max-steps", STEPS, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load(two_at_once / "model" / "mnist_cnn.pt"), load(one_by_one / "model" / "mnist_cnn.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert ("cuda_rng" in a) == ("cuda_rng" in b)  # present when trained on CUDA
    for key in ("model", "optimizer", "rng", "cuda_rng"):
        if key in a:
            assert_same_tensors(a[key], b[key], key)


def test_evaluate_waits_while_a_train_runs_then_scores_what_it_produced(trained_copy):
    checkpoint = trained_copy / "model" / "mnist_cnn.pt"
    with exclusive_lock(Volume(trained_copy), "train"):  # a train at work
        evaluate = start_mnist("evaluate", "--root", str(trained_copy), "--wait", "0")
        try:
            read_until(evaluate, "its producer is running")  # with --wait 0 it would have given up at once
            state = load(checkpoint)
            state["epoch"] = 2
            torch.save(state, checkpoint)  # what the train saves as it finishes
        except BaseException:
            evaluate.kill()
            raise
    _, err = evaluate.communicate(timeout=300)
    assert evaluate.returncode == 0, err[-3000:]
    evaluation = json.loads((trained_copy / "model" / "eval_results.json").read_text())
    assert evaluation["checkpoint"]["epoch"] == 2
    assert evaluation["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_a_second_train_refuses_naming_the_holder_and_a_crashed_one_blocks_nobody(trained_copy):
    first = start_mnist("train", "--root", str(trained_copy), "--device", "cpu")
    try:
        read_until(first, TRAINING_STARTED)
        os.kill(first.pid, signal.SIGSTOP)  # held still mid-epoch, lock and all: it cannot finish the epoch meanwhile
        assert lock_holder(trained_copy) == first.pid
        second = run_here("train", "--root", str(trained_copy))
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
        result = run_here(stage, "--root", str(trained_copy), "--wait", "0") if stage != "train" else \
            run_here(stage, "--root", str(trained_copy))
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
    private_copy(trained_root / "data", root / "data")
    with tmpfs(root / "model", "8m") as model:
        for path in (trained_root / "model").iterdir():
            if path.is_file():  # (not the report/ folder)
                shutil.copy(path, model / path.name)
        before = (model / "mnist_cnn.pt").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(model)], check=True)
        for stage in ("train", "evaluate"):
            result = run_here(stage, "--root", str(root))
            assert_one_line_error(result, 1, "Read-only file system", "read-write")
        assert (model / "mnist_cnn.pt").read_bytes() == before


def test_a_full_disk_is_a_clear_error_and_the_checkpoint_stays(trained_root, tmp_path):
    root = tmp_path / "volume"
    private_copy(trained_root / "data", root / "data")
    with tmpfs(root / "model", "4m") as model:
        shutil.copy(trained_root / "model" / "mnist_cnn.pt", model / "mnist_cnn.pt")
        before = (model / "mnist_cnn.pt").read_bytes()
        # fill the disk, leaving less room than a checkpoint needs
        free = shutil.disk_usage(model).free
        (model / "filler").write_bytes(b"\0" * max(0, free - len(before) // 4))
        # its progress save, at step 5, meets the full disk
        train = run_here("train", "--root", str(root), env={"MNIST_FAULT": "sigterm-at-step:5"})
        err = train.stderr
        assert train.returncode == 1, err[-3000:]
        assert "No space left on device" in err and "free some space" in err and "Traceback" not in err
        assert (model / "mnist_cnn.pt").read_bytes() == before
        assert not [p for p in model.iterdir() if p.name.startswith(TEMP_PREFIX)]
