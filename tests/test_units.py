"""The small pure pieces: thread count under cgroup limits, deterministic CUDA settings, the LR cycle, data
order, PNG, progress lines, warm-up steps, and a training loop that does not wait on the device each step."""

from __future__ import annotations

import concurrent.futures
import copy
import io
import logging
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FORKS, private_copy
from mnist_pipeline import distributed, runtime, settings, signals, train
from mnist_pipeline.data import png as png_grayscale
from mnist_pipeline.infer import _file_names
from mnist_pipeline.train import cuda, loop, sgd
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


def cuda_switches(before):
    """deterministic_cuda() in this process, with CUBLAS_WORKSPACE_CONFIG `before` and cuDNN autotuning on: the
    settings it leaves. Run in a child: the switches are process-wide."""
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    os.environ.update({} if before is None else {"CUBLAS_WORKSPACE_CONFIG": before})
    torch.backends.cudnn.benchmark = True
    runtime.deterministic_cuda()
    return (os.environ["CUBLAS_WORKSPACE_CONFIG"], torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)


@pytest.mark.parametrize("before, after", [(None, ":4096:8"), (":16:8", ":16:8"), (":0:0", ":4096:8")])
def test_cuda_is_made_deterministic(before, after):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=FORKS) as child:
        config, exact, warn_only, deterministic, benchmark, fill = child.submit(cuda_switches, before).result()
    assert config == after  # a setting that does not make cuBLAS exact is replaced
    assert exact and not warn_only
    assert deterministic and not benchmark
    assert not fill


def test_learning_rate_cycles_within_each_epoch_and_decays_across_epochs():
    recipe = settings.Recipe()
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
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO)
    report = loop._Progress(epoch=1, total=10, done=0, every_s=0.0)
    for step in range(1, 11):
        report.update(step, lambda: 0.5)
    report.close()
    assert report.bar is None
    assert "epoch 1: step 10/10 (100%), loss 0.5000" in caplog.text


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: True, raising=False)
    report = loop._Progress(epoch=2, total=10, done=4, every_s=0.0)
    report.update(5, lambda: 0.5)
    assert report.bar is not None and report.bar.n == 5 and report.bar.desc == "epoch 2"
    report.close()


def test_progress_reads_the_loss_only_when_it_shows_it(monkeypatch):
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: False, raising=False)
    reads = []
    report = loop._Progress(epoch=1, total=100, done=0, every_s=3600.0)
    for step in range(1, 101):
        report.update(step, lambda: reads.append(1) or 0.5)
    assert reads == []


def test_the_training_loop_reads_the_device_only_at_saves_and_epoch_ends(tmp_path, mirror, short_trained_root,
                                                                       monkeypatch):
    """A host read (.item(), float(), bool() of a tensor) waits for the GPU: none may happen per step."""
    monkeypatch.setattr(signals, "_received", None)  # one that another in-process test recorded would stop the run
    reads = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))

    def host_reads(steps: int, root: Path) -> int:
        private_copy(short_trained_root / "data", root / "data")
        reads.clear()
        config = settings.TrainConfig(root=root, mirror=str(mirror), device="cpu", threads=1, save_every_s=0,
                                      recipe=settings.Recipe(max_steps=steps))
        assert train.run(config).epoch == 1
        return len(reads)

    few, many = host_reads(3, tmp_path / "a"), host_reads(12, tmp_path / "b")
    assert few == many, (few, many)


def test_warm_up_steps_run_the_network_and_leave_model_and_generator_untouched(monkeypatch):
    torch.manual_seed(0)
    model = MnistCNN()
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    forward, batches = MnistCNN.forward, []
    monkeypatch.setattr(MnistCNN, "forward", lambda self, x: batches.append(len(x)) or forward(self, x))
    cuda.warm_up_steps(model, settings.Recipe(batch_size=8))
    assert batches == [8, 8]  # forward and backward of the training batch size, on a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_nesterov_sgd_steps_and_saves_exactly_as_torch_optim_sgd():
    """The contract of the adapter (train/sgd.py) that reaches torch's SGD arithmetic through its functional form:
    bit for bit torch.optim.SGD, over real steps at changing learning rates, and the same state_dict."""
    assert torch.__version__.split("+")[0].rsplit(".", 1)[0] == sgd.CHECKED_WITH_TORCH, (
        f"torch {torch.__version__}: check train/sgd.py against this torch's torch.optim.SGD (this test), then "
        f"set CHECKED_WITH_TORCH")
    torch.manual_seed(1)
    ours, theirs = MnistCNN(), MnistCNN()
    theirs.load_state_dict(ours.state_dict())
    recipe = settings.Recipe()
    optimizer = train.NesterovSGD(ours.parameters(), recipe)
    reference = torch.optim.SGD(theirs.parameters(), lr=recipe.peak_lr, momentum=recipe.momentum, nesterov=True,
                                weight_decay=recipe.weight_decay)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for lr in (0.1, 0.4, 0.2):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                strict=True))
    mine, torchs = optimizer.state_dict(), reference.state_dict()
    assert mine["param_groups"][0].keys() >= torchs["param_groups"][0].keys() - {"initial_lr"}
    assert all(mine["param_groups"][0][k] == v for k, v in torchs["param_groups"][0].items())
    assert mine["state"].keys() == torchs["state"].keys()
    assert all(torch.equal(mine["state"][i]["momentum_buffer"], torchs["state"][i]["momentum_buffer"])
               for i in mine["state"])
    # a checkpoint written by torch.optim.SGD loads, and one of another network does not
    again = train.NesterovSGD(MnistCNN().parameters(), recipe)
    again.load_state_dict(torchs)
    assert all(torch.equal(a, b) for a, b in zip(again.momentum_buffers, optimizer.momentum_buffers, strict=True))
    with pytest.raises(ValueError):
        train.NesterovSGD(MnistCNN(channels=(8, 8, 8)).parameters(), recipe).load_state_dict(torchs)


def test_a_trained_checkpoint_continues_under_torch_optim_sgd_as_under_train(short_trained_root):
    """The optimizer state train saves is torch.optim.SGD's: loaded into it, the next steps give the same weights
    as train's own optimizer would."""
    saved = torch.load(short_trained_root / "model" / "mnist_cnn.pt", weights_only=True)
    recipe = settings.Recipe(**saved["train_config"])
    models = [MnistCNN(), MnistCNN()]
    for model in models:
        model.load_state_dict(saved["model"])
    ours = train.NesterovSGD(models[0].parameters(), recipe)
    theirs = torch.optim.SGD(models[1].parameters(), lr=recipe.peak_lr, momentum=recipe.momentum, nesterov=True,
                             weight_decay=recipe.weight_decay)
    for optimizer in (ours, theirs):  # each its own copy: both update the momentum in place
        optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    torch.manual_seed(2)
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for model, optimizer in zip(models, (ours, theirs), strict=True):
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(),
                                                strict=True))


def test_one_process_trains_the_plain_network():
    """Without torchrun nothing wraps the network (DistributedDataParallel joins only a group of processes)."""
    model = MnistCNN()
    assert distributed.wrap(distributed.World(), model) is model


def test_gpu_bench_without_a_gpu_says_so_and_exits_0(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    bench = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"
    # `python bench/gpu_bench.py`, in this process (torch is loaded here already)
    monkeypatch.setattr(sys, "argv", [str(bench)])
    monkeypatch.syspath_prepend(str(bench.parent))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(bench), run_name="__main__")
    assert exited.value.code == 0 and "sees no CUDA GPU" in capsys.readouterr().out
