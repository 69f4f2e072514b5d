"""The small pure pieces: thread count under cgroup limits, the LR cycle, data order, PNG, progress lines."""

from __future__ import annotations

import io
import logging

import torch
from PIL import Image

from mnist_pipeline import runtime, train
from mnist_pipeline.infer import _file_names, png_grayscale
from mnist_pipeline.model import MnistCNN


def test_thread_count_follows_the_cgroup_quota_not_the_host(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert runtime.available_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.available_cpus(tmp_path) == 16
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000")  # cgroup v1, --cpus 1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert runtime.available_cpus(tmp_path) == 1


def test_learning_rate_cycles_within_each_epoch_and_decays_across_epochs():
    recipe = train.Recipe()
    steps = 100
    first = [train.learning_rate(recipe, 0, s, steps) for s in range(steps)]
    assert first[0] == 0 and max(first) == recipe.peak_lr == first[int(steps * recipe.warmup_fraction)]
    assert first[-1] < 0.01 * recipe.peak_lr
    second = [train.learning_rate(recipe, 1, s, steps) for s in range(steps)]
    assert max(second) == recipe.peak_lr * recipe.epoch_decay


def test_data_order_depends_only_on_seed_and_epoch():
    a = train.epoch_order(0, 0, 1000)
    assert torch.equal(a, train.epoch_order(0, 0, 1000))
    assert not torch.equal(a, train.epoch_order(0, 1, 1000))
    assert not torch.equal(a, train.epoch_order(1, 0, 1000))
    assert sorted(a.tolist()) == list(range(1000))


def test_model_config_round_trips_and_sizes_are_derived():
    model = MnistCNN(channels=(8, 16), strides=(1, 1), pools=(True, True))
    again = MnistCNN(**model.config)
    again.load_state_dict(model.state_dict())
    assert again(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.classifier.in_features == 16 * 7 * 7


def test_png_holds_the_image():
    image = torch.arange(28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(28, 28)
    with Image.open(io.BytesIO(png_grayscale(image))) as png:  # an independent decoder
        png.load()
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))
        assert png.tobytes() == bytes(image.flatten().tolist())


def test_repeated_digits_get_distinct_names_that_start_with_the_digit():
    assert _file_names([7, 2, 7, 7, 0]) == ["7.png", "2.png", "7_1.png", "7_2.png", "0.png"]


def test_progress_is_plain_log_lines_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO)
    report = train._Progress(epoch=1, total=10, done=0, every_s=0.0)
    for step in range(1, 11):
        report.update(step, 0.5)
    report.close()
    assert report.bar is None
    assert "epoch 1: step 10/10 (100%), loss 0.5000" in caplog.text


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: True, raising=False)
    report = train._Progress(epoch=2, total=10, done=4, every_s=0.0)
    report.update(5, 0.5)
    assert report.bar is not None and report.bar.n == 5 and report.bar.desc == "epoch 2"
    report.close()
