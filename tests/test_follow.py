"""serve's model holder and the model's input contract, without a server: small fake checkpoints."""

from __future__ import annotations


import torch

from test_records import write_evaluation
from mnist_pipeline.serve import follow
from mnist_pipeline.serve.runtimes import Runtimes
from mnist_pipeline.model import MEAN, STD, MnistCNN, normalize
from mnist_pipeline.records import aliases, checkpoint
from mnist_pipeline.settings import Recipe
from mnist_pipeline.volume import Volume


def write_checkpoint(volume: Volume, epoch: int, model_config=None) -> str:
    model = MnistCNN()
    checkpoint.write(volume.checkpoint, checkpoint.State(
        architecture="mnist_cnn", epoch=epoch, step=0, loss_sum=0.0, model=model.state_dict(),
        model_config=model.config if model_config is None else model_config,
        optimizer={}, rng=torch.get_rng_state(), train_config=Recipe(),
    ))
    return checkpoint.read(volume.checkpoint).sha256


def test_follows_only_gated_checkpoints_and_looks_only_when_files_change(tmp_path, monkeypatch):
    volume = Volume(tmp_path)
    gate_calls = []
    real_gate = aliases.gate
    monkeypatch.setattr(aliases, "gate", lambda *args: gate_calls.append(1) or real_gate(*args))
    swapped = []
    follower = follow.Follower(volume, 0.95, Runtimes("torch", "cpu", torch.get_num_threads()), on_swap=swapped.append)

    follower.poll()
    assert follower.live is None and "mnist train" in follower.problem
    first = write_checkpoint(volume, 1)
    write_evaluation(volume.root, first, 1)
    follower.poll()
    assert follower.live.epoch == 1 and follower.live.sha256 == first and follower.problem == ""
    calls = len(gate_calls)
    for _ in range(3):
        follower.poll()
    assert len(gate_calls) == calls, "unchanged files must not be read again"

    second = write_checkpoint(volume, 2)  # trained, not yet evaluated: epoch 1 keeps serving
    follower.poll()
    assert follower.live.sha256 == first and "mnist evaluate" in follower.problem
    write_evaluation(volume.root, second, 2, accuracy=0.5)  # evaluated below the threshold: still epoch 1
    follower.poll()
    assert follower.live.sha256 == first and "not above the threshold" in follower.problem
    write_evaluation(volume.root, second, 2)
    follower.poll()
    assert follower.live.sha256 == second and follower.live.epoch == 2
    assert [live.epoch for live in swapped] == [1, 2]


def test_normalisation_travels_in_the_checkpoint_and_older_ones_get_the_defaults(tmp_path):
    volume = Volume(tmp_path)
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    custom = MnistCNN(mean=0.5, std=0.25)
    write_checkpoint(volume, 1, model_config=custom.config)
    model = checkpoint.read(volume.checkpoint).build_model()
    assert (model.mean, model.std) == (0.5, 0.25)
    assert torch.equal(model.normalize(images), normalize(images, 0.5, 0.25))

    older = {key: value for key, value in MnistCNN().config.items() if key not in ("mean", "std")}
    write_checkpoint(volume, 1, model_config=older)
    model = checkpoint.read(volume.checkpoint).build_model()
    assert (model.mean, model.std) == (MEAN, STD)
