"""Data-parallel training under torchrun (DistributedDataParallel over gloo, 2 or 3 processes on this machine's CPUs).

Each run is a real torchrun (or `mnist train --nproc-per-node`) with a timeout, so a hang fails the
test instead of stalling it; interruptions come from fault points (MNIST_FAULT, limited to one rank by
MNIST_FAULT_RANK), never from timed signals. The agent forks from the tests' forkserver (conftest); its
ranks are new interpreters that torchrun starts, as for a user. Each start of a group costs every rank an
interpreter and torch, so the module-scoped fixtures below run a group once for the tests that check
different things about the same run; single-process commands run in the test process (run_here).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.run import main as torchrun_main

import conftest
from conftest import private_copy
from mnist_pipeline import cli, data, distributed
from mnist_pipeline.storage.locks import exclusive_lock
from mnist_pipeline.volume import Volume
from test_interrupts import assert_same_state, litter, load

# one pytest-xdist worker runs them all (pyproject's addopts): the module fixtures run once
pytestmark = pytest.mark.xdist_group("distributed")

TIMEOUT = 120  # seconds for one run: generous on a busy 2-core machine; a hang fails the test
# A step-limited epoch, an eighth of a full one: enough to learn (the plain-checkpoint test's bar)
STEPS = 60
STOP_AT = STEPS - 20  # late in the epoch, so the runs that resume from it are short
KILL_AT = 5  # early in an epoch's warm-up: small steps, so one process's float sums stay close to two ranks'
RESTART_AT = STOP_AT + 5  # where the resumed run that torchrun restarts loses rank 1

# Installed as sitecustomize in every rank: logs each file-system write (open for writing, create,
# rename, delete, mkdir) to <AUDIT_DIR>/rank<R>.log, so a test sees which rank wrote what.
AUDIT_HOOK = '''
import os, sys
if "RANK" in os.environ and "AUDIT_DIR" in os.environ:
    _log = open(os.path.join(os.environ["AUDIT_DIR"], "rank" + os.environ["RANK"] + ".log"), "a", buffering=1)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        else:
            path, writes = (args[0] if args else None), event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir")
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _log.write(event + " " + os.path.abspath(os.fsdecode(path)) + "\\n")

    sys.addaudithook(_hook)
'''


# Two ranks on this machine's CPUs (gloo), said explicitly: on a machine with one GPU, device auto
# would give each rank a GPU it does not have.
ON_CPU = {"MNIST_DEVICE": "cpu"}


def run_mnist(*args: str, env=None, timeout: float = 600, main=cli.script):
    return conftest.run_mnist(*args, env={**ON_CPU, **(env or {})}, timeout=timeout, main=main)


def run_here(*args: str, env=None):
    return conftest.run_here(*args, env={**ON_CPU, **(env or {})})


@pytest.fixture(scope="session")
def data_volume(tmp_path_factory, mirror) -> Path:
    """A volume holding only the verified MNIST files (copy before use)."""
    root = tmp_path_factory.mktemp("ddp-data") / "volume"
    data.ensure(root / "data", str(mirror))
    return root


@pytest.fixture
def volume(data_volume, tmp_path) -> Path:
    return private_copy(data_volume, tmp_path / "volume")


def torchrun(root: Path, *flags: str, env=None, torchrun_flags=(), timeout: float = TIMEOUT):
    """`torchrun --standalone --nproc-per-node 2 ... -m mnist_pipeline train --root ROOT FLAGS`."""
    argv = ["--standalone", "--nproc-per-node", "2", *torchrun_flags, "-m", "mnist_pipeline", "train", "--root",
            str(root), *flags]
    return run_mnist(*argv, env=env, timeout=timeout, main=torchrun_main)  # the agent forked, its ranks new


def rank_fault(fault: str, rank: int = 1) -> dict:
    return {"MNIST_FAULT": fault, "MNIST_FAULT_RANK": str(rank)}


def test_each_rank_takes_a_disjoint_slice_of_the_global_batch():
    batch = torch.arange(128)
    slices = [distributed.shard(distributed.World(rank=r, size=4), batch) for r in range(4)]
    assert all(len(s) == 32 for s in slices)
    assert torch.equal(torch.cat(slices), batch)


@pytest.fixture(scope="module")
def sigterm_runs(tmp_path_factory) -> SimpleNamespace:
    """`mnist train --nproc-per-node 2` (said by MNIST_NPROC_PER_NODE) for STEPS steps on an empty volume (rank 0
    fetches the data while rank 1 waits), with a SIGTERM to rank 1 alone at step STOP_AT; a copy of the volume as
    it left it; then the same command (said by the flag) resuming it. Each rank's writes in both runs are logged by
    AUDIT_HOOK. Shared: the --nproc-per-node and SIGTERM tests check how each run ended, the plain-checkpoint test
    what was written and by whom, the kill -9 test trains the next epoch of its checkpoint."""
    base = tmp_path_factory.mktemp("sigterm")
    volume, stopped, audit = base / "volume", base / "stopped", base / "audit"
    volume.mkdir()
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    audited = {"AUDIT_DIR": str(audit), "PYTHONPATH": os.pathsep.join(filter(None, [str(audit),
                                                                                      os.environ.get("PYTHONPATH")]))}
    interrupted = run_mnist("train", "--root", str(volume), "--max-steps", str(STEPS), timeout=TIMEOUT,
                            env={**audited, "MNIST_NPROC_PER_NODE": "2", **rank_fault(f"sigterm-at-step:{STOP_AT}")})
    private_copy(volume, stopped)
    resumed = run_mnist("train", "--root", str(volume), "--nproc-per-node", "2", timeout=TIMEOUT, env=audited)
    return SimpleNamespace(interrupted=interrupted, stopped=stopped, resumed=resumed, volume=volume, audit=audit)


@pytest.fixture(scope="module")
def restarted_run(sigterm_runs, tmp_path_factory) -> SimpleNamespace:
    """torchrun --max-restarts 1 resuming sigterm_runs' stopped volume, saving progress after every step (--save-every
    that small), with rank 1 killed (kill -9) at step RESTART_AT in the group's first start only: torchrun starts
    the group again, which continues from the progress saved there. Shared: the restart test checks how, the
    SIGTERM test compares its checkpoint with that of sigterm_runs' resumed run, which went on from STOP_AT
    without a stop."""
    volume = tmp_path_factory.mktemp("restarted") / "volume"
    private_copy(sigterm_runs.stopped, volume)
    result = torchrun(volume, "--save-every", "0.000001",
                      env={**rank_fault(f"sigkill-at-step:{RESTART_AT}"), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                      torchrun_flags=("--max-restarts", "1"))
    return SimpleNamespace(volume=volume, result=result)


def test_a_two_process_epoch_saves_a_plain_checkpoint_that_evaluates_and_only_rank_0_writes(sigterm_runs, tmp_path):
    volume, audit, result = sigterm_runs.volume, sigterm_runs.audit, sigterm_runs.resumed
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: epoch 1") == 1  # one summary per group

    state = torch.load(volume / "model" / "mnist_cnn.pt", weights_only=True)
    assert state["epoch"] == 1 and not any(key.startswith("module.") for key in state["model"])
    evaluated = run_here("evaluate", "--root", str(private_copy(volume, tmp_path / "volume")))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    accuracy = json.loads((tmp_path / "volume" / "model" / "eval_results.json").read_text())["accuracy"]
    # trained (an untrained network scores about 0.1); test_the_ranks_average_their_gradients checks how
    assert accuracy >= 0.5

    # in both runs: the fetch, the progress saved at the SIGTERM, the checkpoint
    writes = {rank: [line for line in (audit / f"rank{rank}.log").read_text().splitlines()
                     if str(volume.resolve()) in line] for rank in (0, 1)}
    assert all(any(name in line for line in writes[0]) for name in ("/data/", "train_progress.pt", "mnist_cnn.pt"))
    assert writes[1] == [], writes[1]


def test_sigterm_on_one_rank_stops_every_rank_at_one_step_and_the_resumed_epoch_is_bit_identical(
        sigterm_runs, restarted_run, tmp_path):
    stopped, result = sigterm_runs.stopped, sigterm_runs.interrupted
    assert result.returncode != 0
    # both ranks stopped at step STOP_AT, though only rank 1 got the signal
    message = f"error: stopped by SIGTERM at epoch 1, step {STOP_AT}/{STEPS}; progress saved"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert load(stopped / "model" / "train_progress.pt")["step"] == STOP_AT
    assert not (stopped / "model" / "mnist_cnn.pt").exists()

    # resumed at STOP_AT, the epoch ends with the same bits as the same resume stopped again (kill -9) at RESTART_AT
    # and restarted by torchrun: state that a resume lost or changed would make the two differ
    volume, result = sigterm_runs.volume, sigterm_runs.resumed
    assert result.returncode == 0 and f"from step {STOP_AT}" in result.stderr, result.stderr[-3000:]
    assert_same_state(load(volume / "model" / "mnist_cnn.pt"), load(restarted_run.volume / "model" / "mnist_cnn.pt"))
    assert not (volume / "model" / "train_progress.pt").exists() and not litter(volume)

    # one process continues what two began (not bit-identical: the batch statistics differ)
    other_world = tmp_path / "other-world"
    private_copy(stopped, other_world)
    result = run_here("train", "--root", str(other_world))
    assert result.returncode == 0 and f"from step {STOP_AT}" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("resuming training of 2 process(es) with 1: the epoch will not be bit-identical") == 1
    assert load(other_world / "model" / "mnist_cnn.pt")["epoch"] == 1


# Three ranks: a global batch that splits over 3, a short epoch, a stop half-way
THREE_RANKS = ("--nproc-per-node", "3", "--batch-size", "120", "--max-steps", "24")


def test_three_ranks_resume_an_interrupted_epoch_bit_identical(volume, tmp_path):
    """With three ranks each gradient value's sum over the ranks is grouped by where the value lies in the
    all-reduced buffer, and DistributedDataParallel lays its buckets out anew after a process's first step: the
    epoch stopped half-way and resumed ends with the same bits as the epoch run through."""
    whole = private_copy(volume, tmp_path / "whole")
    result = run_mnist("train", "--root", str(whole), *THREE_RANKS, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = run_mnist("train", "--root", str(volume), *THREE_RANKS, env=rank_fault("sigterm-at-step:12", rank=2),
                        timeout=TIMEOUT)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.count("error: stopped by SIGTERM at epoch 1, step 12/24; progress saved") == 3
    resumed = run_mnist("train", "--root", str(volume), *THREE_RANKS, timeout=TIMEOUT)
    assert resumed.returncode == 0 and "from step 12" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_state(load(whole / "model" / "mnist_cnn.pt"), load(volume / "model" / "mnist_cnn.pt"))


@pytest.fixture(scope="module")
def killed_run(sigterm_runs, tmp_path_factory) -> SimpleNamespace:
    """Two ranks train the next epoch of sigterm_runs' checkpoint, saving progress after every step,
    until rank 1 is killed (kill -9) at step KILL_AT. Shared: the kill -9 test checks how the run ended,
    the gradient test what the ranks had computed by then (the progress rank 0 saved)."""
    volume = tmp_path_factory.mktemp("killed") / "volume"
    private_copy(sigterm_runs.volume, volume)  # a checkpoint: the killed run trains its next epoch
    before = (volume / "model" / "mnist_cnn.pt").read_bytes()
    # the subprocess timeout is the promise: the surviving rank does not hang
    result = run_mnist("train", "--root", str(volume), "--nproc-per-node", "2", "--save-every", "0.000001",
                       env=rank_fault(f"sigkill-at-step:{KILL_AT}"), timeout=60)
    return SimpleNamespace(volume=volume, result=result, checkpoint_before=before)


def test_a_rank_killed_with_kill_9_ends_the_run_with_a_clear_error_and_the_checkpoint_intact(killed_run):
    volume, result = killed_run.volume, killed_run.result
    assert result.returncode == 137, result.stderr[-3000:]  # the first failed rank's: killed by SIGKILL
    assert "error: rank 0 of 2 lost its process group: another rank died" in result.stderr, result.stderr[-3000:]
    assert (volume / "model" / "mnist_cnn.pt").read_bytes() == killed_run.checkpoint_before
    # rank 0 saved progress after the last step both ranks finished, and nothing half-written
    assert load(volume / "model" / "train_progress.pt")["step"] == KILL_AT and not litter(volume)


class HalvesAveraged(nn.Module):
    """What two ranks compute, in one process: each half of the global batch goes through the network
    on its own (train-mode BatchNorm normalises each by its own statistics) and the loss is the mean of
    the two halves' losses, so the gradient is the average of the two ranks' gradients. Only the first
    half (rank 0's) updates BatchNorm's running statistics: rank 0's buffers are the ones rank 0 saves."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = len(images) // 2
        first = self.model(images[:half])
        for norm in self.norms:
            norm.track_running_stats = False
        try:
            second = self.model(images[half:])
        finally:
            for norm in self.norms:
                norm.track_running_stats = True
        return torch.cat([first, second])


def relative_distance(a: dict, b: dict) -> float:
    """The largest ||a - b|| / ||a|| over the tensors of two model states (step counters left out)."""
    return max(((a[k].double() - b[k].double()).norm() / a[k].double().norm()).item()
               for k in a if not k.endswith("num_batches_tracked"))


def test_the_ranks_average_their_gradients(killed_run, tmp_path, monkeypatch):
    """The two ranks' progress equals one process that averages the two halves' gradients, and is far from
    rank 0 training alone on its half (what a missing all-reduce would give): the accuracy bar of the
    plain-checkpoint test would pass either way."""
    ddp = load(killed_run.volume / "model" / "train_progress.pt")

    def one_process(name: str) -> dict:
        volume = tmp_path / name
        private_copy(killed_run.volume, volume)
        (volume / "model" / "train_progress.pt").unlink()  # from the checkpoint, as the killed run began
        result = run_here("train", "--root", str(volume), env={"MNIST_FAULT": f"sigterm-at-step:{ddp['step']}"})
        assert result.returncode == 143, result.stderr[-3000:]
        return load(volume / "model" / "train_progress.pt")

    with monkeypatch.context() as patched:
        patched.setattr(distributed, "wrap", lambda world, model: HalvesAveraged(model))
        averaged = one_process("averaged")
    with monkeypatch.context() as patched:
        patched.setattr(distributed, "shard", lambda world, batch: batch[:len(batch) // 2])
        alone = one_process("alone")
    # float sums in another order (all-reduce, 1 thread a rank) stay well under the first bound; a missing
    # all-reduce (`alone`) is well over the second
    assert relative_distance(ddp["model"], averaged["model"]) < 1e-4
    assert relative_distance(ddp["model"], alone["model"]) > 5e-4


def test_torchrun_max_restarts_restarts_the_group_from_the_saved_progress(restarted_run):
    volume, result = restarted_run.volume, restarted_run.result
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lost its process group" in result.stderr and f"continuing epoch 1 at step {RESTART_AT}" in result.stderr
    assert load(volume / "model" / "mnist_cnn.pt")["epoch"] == 1 and not litter(volume)


def test_mnist_train_nproc_per_node_starts_the_group_itself(sigterm_runs):
    # rank 1 exists (it took the SIGTERM), and the command exits as a single train would
    result = sigterm_runs.interrupted
    assert result.returncode == 143, result.stderr[-3000:]
    assert load(sigterm_runs.stopped / "model" / "train_progress.pt")["step"] == STOP_AT
    result = sigterm_runs.resumed
    assert result.returncode == 0 and f"from step {STOP_AT}" in result.stderr, result.stderr[-3000:]
    assert "train: epoch 1" in result.stdout
    # nothing set on the command line or in MNIST_*: no rank says it ignores a setting, none says the
    # world changed
    assert "ignoring" not in result.stderr and "bit-identical" not in result.stderr, result.stderr[-3000:]


def test_a_world_size_that_does_not_divide_the_batch_is_a_usage_error(volume):
    result = run_here("train", "--root", str(volume), "--nproc-per-node", "3", "--batch-size", "128")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "128 does not split evenly over 3 processes" in result.stderr
    assert not (volume / "model").exists()

    # a resumed run keeps the checkpoint's batch size: that one is checked, by every rank
    assert run_here("train", "--root", str(volume), "--batch-size", "127", "--max-steps", "2").returncode == 0
    checkpoint = volume / "model" / "mnist_cnn.pt"
    before = checkpoint.read_bytes()
    result = run_mnist("train", "--root", str(volume), "--nproc-per-node", "2", timeout=TIMEOUT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]  # once: rank 0's
    assert "trained at batch size 127" in errors[0] and "127 does not split evenly over 2 processes" in errors[0]
    assert "Traceback" not in result.stderr and checkpoint.read_bytes() == before


def test_a_busy_volume_stops_every_rank_with_exit_4(volume, tmp_path):
    """Rank 0 finds the train lock taken; the others stop with its exit code instead of waiting for it. Rank 1 is
    held after hearing it until the agent, rank 0 having exited, sends it SIGTERM: it is ending already."""
    release = tmp_path / "release"
    with exclusive_lock(Volume(volume), "train"):
        group = conftest.start_mnist("train", "--root", str(volume), "--nproc-per-node", "2",
                                     env={**ON_CPU, **rank_fault(f"hold:follows:{release}")})
        try:
            seen = conftest.read_until(group, "closing signal SIGTERM")  # torch's agent says so
            release.touch()
            out, rest = group.communicate(timeout=TIMEOUT)
        finally:
            release.touch()
            group.kill()
    stderr = seen + rest
    assert group.returncode == 4, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: another train is running"), stderr[-3000:]
    assert not (volume / "model" / "mnist_cnn.pt").exists()


def test_sigterm_while_the_ranks_wrap_the_network_stops_every_rank_at_the_first_step(volume, tmp_path):
    """`docker stop` (SIGTERM to `mnist train --nproc-per-node 2`, which the agent passes on to every rank) while
    rank 1 has yet to wrap the network in DistributedDataParallel and rank 0 waits for it there: both stop at the
    first step boundary, rank 0 saves the progress, and none is left to lose its group."""
    release = tmp_path / "release"
    group = conftest.start_mnist("train", "--root", str(volume), "--nproc-per-node", "2",
                                 env={**ON_CPU, **rank_fault(f"hold:wrap:{release}")})
    try:
        held = Path(f"{release}.held")
        for _ in range(TIMEOUT * 10):  # rank 1 says it is held
            if held.exists() or group.poll() is not None:
                break
            time.sleep(0.1)
        assert held.exists(), group.communicate(timeout=TIMEOUT)[1][-3000:]
        os.kill(group.pid, signal.SIGTERM)
        seen = conftest.read_until(group, "closing signal SIGTERM")  # the agent has passed it on
        release.touch()
        out, rest = group.communicate(timeout=TIMEOUT)
    finally:
        release.touch()
        group.kill()
    stderr = seen + rest
    assert group.returncode == 143, stderr[-3000:]
    assert stderr.count("error: stopped by SIGTERM at epoch 1, step 0/") == 2, stderr[-3000:]
    assert "lost its process group" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert load(volume / "model" / "train_progress.pt")["step"] == 0


def test_only_train_runs_as_a_group(volume):
    result = run_here("evaluate", "--root", str(volume), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and "only `mnist train` runs as a torchrun group" in result.stderr
