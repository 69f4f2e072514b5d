"""Stopped at an exact moment: SIGTERM, SIGINT and kill -9 at fault points (MNIST_FAULT), never by racing the clock.

What each test proves: the previous state is intact and loadable, the next run recovers, and an epoch
finished after an interruption is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, fault_survivable, litter, private_copy, run_here, run_mnist
from mnist_pipeline import signals
from mnist_pipeline.errors import Interrupted

STATE = ("model", "optimizer", "rng", "cuda_rng")  # cuda_rng: only in checkpoints of a CUDA run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert ("cuda_rng" in a) == ("cuda_rng" in b)
    for key in (k for k in STATE if k in a):
        sa, sb = a[key], b[key]
        if isinstance(sa, torch.Tensor):
            assert torch.equal(sa, sb), key
            continue
        flat_a, flat_b = _flatten(sa), _flatten(sb)
        assert flat_a.keys() == flat_b.keys(), key
        for name, value in flat_a.items():
            other = flat_b[name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (key, name)


def _flatten(value, prefix="") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


@pytest.fixture
def data_root(short_trained_root, tmp_path) -> Path:
    """An empty volume but for the MNIST files (no fetching)."""
    root = tmp_path / "volume"
    private_copy(short_trained_root / "data", root / "data")
    return root


# short_trained_root's limit: an epoch of STEPS steps, trained there without a stop (resume is the same code
# whatever the epoch's length)
STEPS = "20"


def train(root: Path, *flags: str, fault: str = "", extra_env=None):
    env = {"MNIST_FAULT": fault} if fault else {}
    env.update(extra_env or {})
    # a SIGKILL fault kills its process: only those need one of their own
    run = run_here if fault_survivable(fault or None) else run_mnist
    return run("train", "--root", str(root), *flags, env=env)


def test_sigterm_mid_epoch_saves_progress_and_the_epoch_finishes_bit_identical(short_trained_root, data_root):
    """An epoch stopped three times: the result equals short_trained_root's uninterrupted epoch."""
    progress = data_root / "model" / "train_progress.pt"
    for step in (4, 9, 15):
        result = train(data_root, "--max-steps", STEPS, fault=f"sigterm-at-step:{step}")
        assert result.returncode == 143, result.stderr[-3000:]
        assert "progress saved" in result.stderr and "Traceback" not in result.stderr
        assert not (data_root / "model" / "mnist_cnn.pt").exists(), "the checkpoint only holds finished epochs"
        assert load(progress)["step"] == step
    result = train(data_root, "--max-steps", STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 15" in result.stderr
    assert not progress.exists() and not litter(data_root)
    assert_same_state(load(data_root / "model" / "mnist_cnn.pt"), load(short_trained_root / "model" / "mnist_cnn.pt"))


def test_sigint_stops_like_sigterm_with_exit_130(data_root):
    result = train(data_root, "--max-steps", "20", fault="sigint-at-step:5")
    assert_one_line_error(result, 130, "stopped by SIGINT", "step 5/20", "progress saved")
    assert load(data_root / "model" / "train_progress.pt")["step"] == 5


def test_a_sigterm_during_the_last_save_exits_143_with_everything_saved(data_root):
    result = train(data_root, "--max-steps", "20", fault="sigterm:checkpoint-before-rename")
    assert_one_line_error(result, 143, "stopped by SIGTERM", "after train finished")
    assert load(data_root / "model" / "mnist_cnn.pt")["epoch"] == 1
    assert not (data_root / "model" / "train_progress.pt").exists()


def test_a_sigterm_as_the_process_exits_still_exits_143(short_trained_copy):
    """Python's teardown restores the default handlers: a signal there would kill the process (-15)."""
    result = run_mnist("evaluate", "--root", str(short_trained_copy), env={"MNIST_FAULT": "sigterm:exit"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "evaluate: accuracy" in result.stdout


def test_a_second_signal_never_interrupts_the_shutdown_the_first_began():
    previous = {s: signal.getsignal(s) for s in signals.SIGNALS}
    try:
        signals.install()
        with pytest.raises(Interrupted) as stopped:
            with signals.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("SIGTERM did not interrupt")
        os.kill(os.getpid(), signal.SIGTERM)  # recorded only: raising here would break the shutdown
        os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.exit_code == 143 and signals.received() == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_kill_9_before_the_checkpoint_rename_keeps_the_previous_checkpoint(short_trained_copy):
    checkpoint = short_trained_copy / "model" / "mnist_cnn.pt"
    before = checkpoint.read_bytes()
    result = train(short_trained_copy, "--max-steps", "20", fault="checkpoint-before-rename")
    assert result.returncode == -signal.SIGKILL
    assert checkpoint.read_bytes() == before and load(checkpoint)["epoch"] == 1
    result = train(short_trained_copy, "--max-steps", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load(checkpoint)["epoch"] == 2 and not litter(short_trained_copy)


def test_kill_9_before_a_progress_rename_keeps_the_previous_progress(data_root):
    progress = data_root / "model" / "train_progress.pt"
    assert train(data_root, "--max-steps", "30", fault="sigterm-at-step:10").returncode == 143
    before = progress.read_bytes()
    result = train(data_root, "--max-steps", "30", "--save-every", "0.000001", fault="progress-before-rename")
    assert result.returncode == -signal.SIGKILL
    assert progress.read_bytes() == before
    result = train(data_root, "--max-steps", "30")
    assert result.returncode == 0 and "from step 10" in result.stderr, result.stderr[-3000:]
    assert not progress.exists() and not litter(data_root)


def test_periodic_progress_survives_kill_9_and_resumes_bit_identical(short_trained_root, data_root):
    # --save-every that small saves after every step: the kill before step 12 finds step 12 saved
    result = train(data_root, "--max-steps", STEPS, "--save-every", "0.000001", fault="sigkill-at-step:12")
    assert result.returncode == -signal.SIGKILL
    assert load(data_root / "model" / "train_progress.pt")["step"] == 12
    result = train(data_root, "--max-steps", STEPS)
    assert result.returncode == 0 and "from step 12" in result.stderr, result.stderr[-3000:]
    assert_same_state(load(data_root / "model" / "mnist_cnn.pt"), load(short_trained_root / "model" / "mnist_cnn.pt"))


@pytest.mark.parametrize("epoch, relation", [(3, "a later"), (0, "an earlier")])
def test_progress_that_does_not_continue_the_checkpoint_is_set_aside_never_deleted(short_trained_copy, epoch, relation):
    model = short_trained_copy / "model"
    stray = load(model / "mnist_cnn.pt")
    stray.update(epoch=epoch, step=7)
    torch.save(stray, model / "train_progress.pt")
    kept = (model / "train_progress.pt").read_bytes()
    result = train(short_trained_copy, "--max-steps", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{relation} one than the checkpoint's epoch 1" in result.stderr and "moved train_progress.pt aside" in \
        result.stderr
    asides = list(model.glob("train_progress.pt.*.aside"))
    assert len(asides) == 1 and asides[0].read_bytes() == kept
    assert load(model / "mnist_cnn.pt")["epoch"] == 2  # continued from the checkpoint, not the stray progress


def test_a_diverging_run_stops_with_an_error_and_keeps_the_last_good_checkpoint(short_trained_copy):
    checkpoint = short_trained_copy / "model" / "mnist_cnn.pt"
    state = load(checkpoint)
    state["train_config"]["peak_lr"] = 1e12  # a resumed run keeps the checkpoint's recipe
    torch.save(state, checkpoint)
    before = checkpoint.read_bytes()
    result = train(short_trained_copy, "--save-every", "0.000001")
    assert_one_line_error(result, 1, "training diverged", "lower --lr")
    assert checkpoint.read_bytes() == before
    progress = short_trained_copy / "model" / "train_progress.pt"  # saved while the run was still finite, if at all
    if progress.exists():
        saved = load(progress)
        assert torch.isfinite(torch.tensor(saved["loss_sum"]))
        assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
