"""Accepted feedback in training (docs/feedback.md#training): `mnist train` mixes the accepted train samples into
each epoch at --feedback-share, the set frozen for the epoch; with none it trains exactly as without feedback.

Samples are made with records.feedback directly (MNIST test images with their labels, as serve would keep a
drawing), no server. Epochs are a few steps long (--max-steps): resume is the same code whatever the length.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List
from unittest import mock

import pytest
import torch

from conftest import assert_one_line_error, private_copy, run_here
from mnist_pipeline import cli, data
from mnist_pipeline.records import checkpoint, feedback
from mnist_pipeline.train import epoch_order, mix
from mnist_pipeline.train.optimizer import mixed_order
from mnist_pipeline.volume import Volume
from test_interrupts import assert_same_state, load
from test_schemas import documents, validator

STEPS = "12"
STATE_KEYS = {"format_version", "architecture", "epoch", "step", "loss_sum", "model", "model_config", "optimizer",
              "rng", "train_config", "world_size"}  # a checkpoint's keys without feedback (on the CPU)
FEEDBACK_KEYS = {"feedback", "feedback_pixels", "feedback_labels"}


@pytest.fixture
def data_root(short_trained_root, tmp_path) -> Path:
    """An empty volume but for the MNIST files (no fetching)."""
    root = tmp_path / "volume"
    private_copy(short_trained_root / "data", root / "data")
    return root


@pytest.fixture(scope="module")
def candidates(short_trained_root) -> Dict[str, List[tuple]]:
    """MNIST test images with their labels, as samples (pixels, label), by the split their id puts them in."""
    test = data.load_split(short_trained_root / "data", "test", None)
    found: Dict[str, List[tuple]] = {"train": [], "heldout": []}
    for i in range(200):
        pixels, label = test.images[i].numpy().tobytes(), int(test.labels[i])
        found[feedback.split_of(feedback.sample_id(pixels, label))].append((pixels, label))
    return found


def keep(root: Path, samples: List[tuple], status: str = "accepted") -> List[str]:
    """The samples kept in root's feedback/ with `status`, as a review leaves them; their ids."""
    volume, ids = Volume(root), []
    for pixels, label in samples:
        sample = feedback.add(volume, pixels, label, predicted=(label + 1) % 10, version=None)
        if status != "pending":
            feedback.review(volume, sample.id, status)
        ids.append(sample.id)
    return ids


def train(root: Path, *flags: str, env=None):
    result = run_here("train", "--root", str(root), "--max-steps", STEPS, *flags, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_of(root: Path, name: str) -> Path:
    return private_copy(root, root.parent / name)


def test_the_mixed_order_without_draws_is_the_epoch_order():
    assert torch.equal(mixed_order(0, 2, 1000), epoch_order(0, 2, 1000))
    mixed = mixed_order(0, 2, 1000, size=7, draws=100)
    assert len(mixed) == 1100 and torch.equal(mixed, mixed_order(0, 2, 1000, size=7, draws=100))
    assert sorted(mixed[mixed < 1000].tolist()) == list(range(1000))  # each MNIST image once
    drawn = torch.bincount(mixed[mixed >= 1000] - 1000, minlength=7)
    assert drawn.sum() == 100 and drawn.max() - drawn.min() <= 1  # a cycle through the set


def test_without_accepted_train_samples_training_is_what_it_was(data_root, candidates):
    """No feedback/, share 0 with accepted train samples, and only heldout, pending or rejected ones: the same
    checkpoint, byte for byte, with no feedback field; accepted train samples change the weights."""
    plain, off, others, mixed = (copy_of(data_root, name) for name in ("plain", "off", "others", "mixed"))
    keep(off, candidates["train"][:5])
    keep(others, candidates["heldout"][:3])
    keep(others, candidates["train"][:2], "pending")
    keep(others, candidates["train"][2:4], "rejected")
    train_ids = keep(mixed, candidates["train"][:5])
    keep(mixed, candidates["heldout"][:3])
    keep(mixed, candidates["train"][5:7], "rejected")
    keep(mixed, candidates["train"][7:9], "pending")
    train(plain)
    train(off, "--feedback-share", "0")
    result = train(others, env={"MNIST_FEEDBACK_SHARE": "0.2"})
    assert "feedback:" not in result.stderr
    result = train(mixed)

    made = plain / "model" / "mnist_cnn.pt"
    assert set(load(made)) == STATE_KEYS
    for root in (off, others):
        assert (root / "model" / "mnist_cnn.pt").read_bytes() == made.read_bytes(), root.name
    state = load(mixed / "model" / "mnist_cnn.pt")
    assert set(state) == STATE_KEYS | FEEDBACK_KEYS
    assert state["feedback"]["ids"] == sorted(train_ids)  # neither heldout, nor pending, nor rejected ones
    assert state["feedback"]["share"] == 0.05 and state["feedback"]["draws"] == 3158
    assert any(not torch.equal(v, load(made)["model"][k]) for k, v in state["model"].items())
    lines = [line for line in result.stderr.splitlines() if "feedback:" in line]
    assert len(lines) == 1 and "epoch 1 mixes in 5 accepted samples at share 0.05" in lines[0], result.stderr
    assert checkpoint.read(mixed / "model" / "mnist_cnn.pt").state.feedback["digest"] == state["feedback"]["digest"]
    schema = validator("checkpoint.schema.json")  # (docs/schemas/: its plain values, feedback's included)
    assert not list(schema.iter_errors(documents(mixed / "model" / "mnist_cnn.pt")[0]))


def test_an_interrupted_epoch_resumes_on_its_frozen_set_bit_identical(data_root, candidates):
    """Stopped mid-epoch; then more samples accepted and one of the frozen ones deleted: the resumed epoch ends
    with the bits of the epoch run through on the set it began with."""
    first = candidates["train"][:6]
    keep(data_root, first)
    whole = copy_of(data_root, "whole")
    train(whole)

    result = run_here("train", "--root", str(data_root), "--max-steps", STEPS, env={"MNIST_FAULT": "sigterm-at-step:5"})
    assert result.returncode == 143, result.stderr[-3000:]
    progress = load(data_root / "model" / "train_progress.pt")
    assert progress["step"] == 5 and len(progress["feedback"]["ids"]) == 6
    keep(data_root, candidates["train"][6:9])
    feedback.delete(Volume(data_root), progress["feedback"]["ids"][0])

    result = train(data_root)
    assert "from step 5" in result.stderr
    assert "feedback: epoch 1 goes on with the 6 accepted samples it began with" in result.stderr, result.stderr
    ended = load(data_root / "model" / "mnist_cnn.pt")
    assert_same_state(ended, load(whole / "model" / "mnist_cnn.pt"))
    assert ended["feedback"] == progress["feedback"]
    assert torch.equal(ended["feedback_pixels"], progress["feedback_pixels"])


def test_the_next_epoch_takes_up_a_changed_set_and_says_so_in_one_line(data_root, candidates):
    keep(data_root, candidates["train"][:4])
    train(data_root)
    again = train(data_root)  # nothing changed: nothing said
    assert "feedback:" not in again.stderr, again.stderr
    added = keep(data_root, candidates["train"][4:7])
    result = train(data_root)
    lines = [line for line in result.stderr.splitlines() if "feedback:" in line]
    assert len(lines) == 1 and "epoch 3 mixes in 7 accepted samples at share 0.05" in lines[0], result.stderr
    assert "(was 4 at share 0.05)" in lines[0]
    state = load(data_root / "model" / "mnist_cnn.pt")
    assert state["epoch"] == 3 and set(added) < set(state["feedback"]["ids"]) and len(state["feedback"]["ids"]) == 7

    result = train(data_root, "--feedback-share", "0")
    assert "feedback: epoch 4 mixes in no accepted samples (was 7 at share 0.05)" in result.stderr, result.stderr
    assert not FEEDBACK_KEYS & set(load(data_root / "model" / "mnist_cnn.pt"))


def test_a_set_changed_between_the_epochs_of_one_run_trains_as_two_runs_do(data_root, candidates):
    """Samples accepted while train runs: its next epoch trains on them (on CUDA, a new graph of the step), and the
    two epochs end with the bits of two runs of one epoch each."""
    keep(data_root, candidates["train"][:3])
    two_runs = copy_of(data_root, "two-runs")
    train(two_runs)
    keep(two_runs, candidates["train"][3:6])
    train(two_runs)

    read = mix._read
    reads = []

    def read_then_review(volume, share, images):  # (at each epoch's start) what a reviewer does meanwhile
        found = read(volume, share, images)
        if not reads:
            keep(data_root, candidates["train"][3:6])
        reads.append(len(found))
        return found

    with mock.patch.object(mix, "_read", read_then_review):
        result = train(data_root, "--epochs", "2")
    assert reads == [3, 6] and "feedback: epoch 2 mixes in 6 accepted samples" in result.stderr, result.stderr
    assert_same_state(load(data_root / "model" / "mnist_cnn.pt"), load(two_runs / "model" / "mnist_cnn.pt"))


@pytest.mark.parametrize("argv, env, fragment", [
    (["--feedback-share", "0.6"], {}, "--feedback-share"),
    (["--feedback-share", "-0.1"], {}, "--feedback-share"),
    (["--feedback-share", "nan"], {}, "--feedback-share"),
    (["--feedback-share", "a lot"], {}, "not a number"),
    ([], {"MNIST_FEEDBACK_SHARE": "0.7"}, "MNIST_FEEDBACK_SHARE='0.7'"),
    ([], {"MNIST_FEEDBACK_SHARE": "5%"}, "MNIST_FEEDBACK_SHARE='5%'"),
])
def test_a_bad_feedback_share_is_a_usage_error(tmp_path, argv, env, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--root", str(tmp_path), *argv], env=env)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "model").exists()


def test_a_malformed_accepted_sample_stops_train_with_one_error_line(data_root, candidates):
    ids = keep(data_root, candidates["train"][:3])
    record = Volume(data_root).feedback_record(ids[1])
    record.write_text(record.read_text().replace('"label"', '"lable"'))
    result = run_here("train", "--root", str(data_root), "--max-steps", STEPS)
    assert_one_line_error(result, 1, str(record), "mnist feedback delete")
    assert not (data_root / "model" / "mnist_cnn.pt").exists()
    assert run_here("train", "--root", str(data_root), "--max-steps", STEPS, "--feedback-share", "0").returncode == 0


def test_a_checkpoint_whose_feedback_images_changed_is_refused(data_root, candidates):
    keep(data_root, candidates["train"][:3])
    train(data_root)
    made = data_root / "model" / "mnist_cnn.pt"
    assert checkpoint.read(made).state.feedback_pixels.shape == (3, 28, 28)
    state = load(made)
    state["feedback_pixels"][1, 14, 14] ^= 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    made.write_bytes(buffer.getvalue())
    result = run_here("train", "--root", str(data_root), "--max-steps", STEPS)
    assert_one_line_error(result, 1, "not a usable checkpoint", "image and label do not hash to its id")

    # a sparse tensor loads with weights_only too, and reading its values would fail: refused first
    state["feedback_pixels"] = state["feedback_pixels"].to_sparse()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    made.write_bytes(buffer.getvalue())
    result = run_here("train", "--root", str(data_root), "--max-steps", STEPS)
    assert_one_line_error(result, 1, "not a usable checkpoint", "feedback_pixels are not 3 images")


@pytest.mark.xdist_group("distributed")  # (with test_distributed's groups: one worker starts them)
def test_two_ranks_train_on_rank_0s_set_and_stop_together_on_a_malformed_one(data_root, candidates):
    """Rank 0 reads the set and sends it to rank 1: one line says so, the checkpoint holds it. A malformed sample
    stops both ranks before the first step, with rank 0's one error line."""
    from test_distributed import TIMEOUT, run_mnist, torchrun

    ids = keep(data_root, candidates["train"][:4])
    broken = copy_of(data_root, "broken")
    result = torchrun(data_root, "--max-steps", STEPS, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("feedback:") == 1, result.stderr[-3000:]  # rank 0's, the second epoch the same
    assert "feedback: epoch 1 mixes in 4 accepted samples" in result.stderr
    state = load(data_root / "model" / "mnist_cnn.pt")
    assert state["epoch"] == 2 and state["feedback"]["ids"] == sorted(ids)

    Volume(broken).feedback_image(ids[0]).write_bytes(b"not a png")
    result = run_mnist("train", "--root", str(broken), "--max-steps", STEPS, "--nproc-per-node", "2", timeout=TIMEOUT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a PNG image" in errors[0], result.stderr[-3000:]
    assert "lost its process group" not in result.stderr
    assert not (broken / "model" / "mnist_cnn.pt").exists()


def test_a_rank_other_than_0_takes_up_the_new_set_that_rank_0_sent(tmp_path):
    """The other ranks know a set by its tensors only (rank 0 alone reads the ids): a set sent for a new epoch
    is taken as it is, never mistaken for the last epoch's because both came without ids."""
    from mnist_pipeline import distributed

    def received(count: int) -> mix.Mix:
        return mix.Mix(ids=(), digest="", pixels=torch.zeros(count, 28, 28, dtype=torch.uint8),
                       labels=torch.zeros(count, dtype=torch.int64), share=0.05, draws=mix.draws_for(0.05, 60000))

    last, new = received(3), received(6)
    with mock.patch.object(mix, "_shared", return_value=new):
        taken = mix.at_epoch_start(Volume(tmp_path), distributed.World(rank=1, size=2), 0.05, 60000, 1, last)
    assert taken is new
