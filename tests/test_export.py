"""The ONNX export: the file evaluate writes runs in onnxruntime as the checkpoint does in torch, `mnist export`
once and --follow, a broken parity refused, and what happens where onnxruntime is missing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from unittest import mock

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, litter, read_until, run_here, run_mnist, start_mnist, wait_until
from mnist_pipeline import data, export, model
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.volume import Volume

BREAK = {"MNIST_FAULT": "break:export-weights"}  # the first weight written is off by 1


@contextlib.contextmanager
def without_onnxruntime():
    """`import onnxruntime` fails in this process (run_here runs `mnist` here), as in the graded images."""
    with mock.patch.dict(sys.modules, {"onnxruntime": None}):
        yield


def version_dir(root: Path, number: int) -> Path:
    return root / "model" / "versions" / str(number)


def test_evaluate_exports_a_model_that_onnxruntime_answers_as_torch_does(trained_root, mirror):
    """trained_root is `mnist train` and `mnist evaluate` run as a user runs them: evaluate wrote the file."""
    path = Volume(trained_root).exported(1)
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])  # one file
    (images,), (probabilities,) = session.get_inputs(), session.get_outputs()
    assert (images.name, images.type, images.shape) == ("images", "tensor(uint8)", ["batch", 28, 28])
    assert (probabilities.name, probabilities.type, probabilities.shape) == ("probabilities", "tensor(float)",
                                                                              ["batch", 10])
    kept = json.loads((version_dir(trained_root, 1) / "version.json").read_text())
    assert kept["sha256"] == hashlib.sha256((version_dir(trained_root, 1) / "mnist_cnn.pt").read_bytes()).hexdigest()
    assert session.get_modelmeta().custom_metadata_map == {
        "mnist.format_version": "1", "mnist.checkpoint_sha256": kept["sha256"], "mnist.epoch": str(kept["epoch"]),
        "mnist.architecture": "mnist_cnn", "mnist.version": "1"}
    written = onnx.load_from_string(path.read_bytes())
    assert (written.ir_version, [(o.domain, o.version) for o in written.opset_import]) == (10, [("", export.OPSET)])
    assert os.fsencode(Path(model.__file__).parent) not in path.read_bytes()  # no stack traces naming our files

    test_images = data.load_split(trained_root / "data", "test", str(mirror)).images[:2000]
    state = torch.load(version_dir(trained_root, 1) / "mnist_cnn.pt", weights_only=True)
    network = model.build(state["architecture"], state["model_config"])
    network.load_state_dict(state["model"])
    expected = model.predict(network, test_images, torch.device("cpu"))
    for batch in (test_images[:1], test_images):  # the batch axis is dynamic
        answers = torch.from_numpy(session.run(["probabilities"], {"images": batch.numpy()})[0])
        assert torch.equal(answers.argmax(1), expected[:len(batch)].argmax(1))
        assert (answers - expected[:len(batch)]).abs().max() <= export.TOLERANCE


def test_export_writes_what_is_missing_skips_an_unreadable_version_and_rewrites_when_asked(trained_copy):
    root = trained_copy
    written = Volume(root).exported(1).read_bytes()
    Volume(root).exported(1).unlink()
    shutil.copytree(version_dir(root, 1), version_dir(root, 2))  # version 2: its checkpoint's bytes changed
    checkpoint = version_dir(root, 2) / "mnist_cnn.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[::-1])

    result = run_here("export", "--root", str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"export: version 1 -> {root}/model/versions/1/mnist_cnn.onnx (10000 test images: the same "
                           f"digits, max |probability difference| "), line
    assert Volume(root).exported(1).read_bytes() == written  # the same weights give the same file
    assert "skipping version 2" in result.stderr and not Volume(root).exported(2).exists()
    assert_one_line_error(run_here("export", "--root", str(root), "--version", "2"), 1,
                          "version 2 is corrupt", "mnist_cnn.pt")

    version_dir(root, 2).rename(root / "aside")
    nothing = run_here("export", "--root", str(root)).stdout
    assert nothing == "export: nothing to do: every version (1) has its ONNX model\n"
    again = run_here("export", "--root", str(root), "--version", "1")
    assert again.returncode == 0 and again.stdout.startswith("export: version 1 -> ")
    assert_one_line_error(run_here("export", "--root", str(root), "--version", "1", "--follow"), 2, "--follow")


def test_a_model_that_fails_its_parity_check_is_an_error_and_no_file(trained_copy):
    root = trained_copy
    Volume(root).exported(1).unlink()
    evaluation = root / "model" / "eval_results.json"
    evaluation.unlink()

    result = run_mnist("evaluate", "--root", str(root), "--export", "auto", env=BREAK)
    assert_one_line_error(result, 1, "version 1's ONNX model does not answer as its checkpoint does",
                          "get another digit", "no file written")
    assert "evaluate: accuracy" in result.stdout and evaluation.exists()  # the evaluation stays
    assert "eval_results.json and the report are written" in result.stderr
    assert not Volume(root).exported(1).exists() and litter(root) == []

    result = run_mnist("export", "--root", str(root), env=BREAK)
    assert_one_line_error(result, 1, "version 1's ONNX model does not answer", "max |probability difference|")
    assert result.stdout == "" and not Volume(root).exported(1).exists() and litter(root) == []


def test_without_onnxruntime_export_says_how_to_get_it_and_evaluate_goes_on(trained_copy):
    root = trained_copy
    Volume(root).exported(1).unlink()
    evaluated = run_here("evaluate", "--root", str(root), "--export", "never")  # (onnxruntime imports here)
    assert evaluated.returncode == 0 and "export:" not in evaluated.stdout, evaluated.stderr[-3000:]
    assert not Volume(root).exported(1).exists()
    with without_onnxruntime():
        result = run_here("export", "--root", str(root))
        assert_one_line_error(result, 1, "onnxruntime", "pip install onnx onnxscript onnxruntime", "docker compose")
        evaluated = run_here("evaluate", "--root", str(root), "--export", "auto")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "version 1 is not exported to ONNX: onnxruntime does not import here" in evaluated.stderr
    assert "export:" not in evaluated.stdout and not Volume(root).exported(1).exists()


def test_follow_exports_a_version_evaluated_after_it_started_and_survives_a_broken_one(short_trained_copy):
    root = short_trained_copy
    version_dir(root, 1).mkdir(parents=True)  # a version folder with nothing readable in it
    (version_dir(root, 1) / "version.json").write_text("{")
    follower = start_mnist("export", "--root", str(root), "--follow")
    try:
        read_until(follower, "watching")
        with without_onnxruntime():  # evaluate leaves the export to the follower, as in the graded images
            evaluated = run_here("evaluate", "--root", str(root), "--threshold", "0", "--export", "auto")
        assert evaluated.returncode == 0 and "version 2 is not exported" in evaluated.stderr, evaluated.stderr
        wait_until(Volume(root).exported(2).exists, "the follower to export version 2")
        follower.terminate()
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert out.startswith(f"export: version 2 -> {root}/model/versions/2/mnist_cnn.onnx (10000 test images: ")
    assert err.count("skipping version 1") == 1  # said once, however often it looked
    assert "stopped by SIGTERM" in err and "error:" not in err


class Another(nn.Module):
    """A network unlike MnistCNN: other layers (5x5 and grouped convolutions, GELU, average pooling, Dropout,
    a residual sum, a two-layer head), registered in another order than forward() runs them."""

    def __init__(self, mean: float = 0.2, std: float = 0.4):
        super().__init__()
        self.mean, self.std = mean, std
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, model.NUM_CLASSES))
        self.mix = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.GELU(), nn.AvgPool2d(2), nn.Dropout2d(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + torch.relu(self.mix(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return model.normalize(images, self.mean, self.std)


def test_the_default_network_and_another_one_export_and_pass_the_parity_check(tmp_path, mirror):
    """What export_version runs for a version, for MnistCNN with running statistics that matter (its
    BatchNorm, which the exporter folds into the convolutions) and for a network of other layers."""
    torch.manual_seed(0)
    default = model.MnistCNN().eval()
    for norm in (m for m in default.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    images = data.load_split(tmp_path / "data", "test", str(mirror)).images
    for network in (default, Another().eval()):
        encoded = export.to_onnx(network, {"mnist.format_version": "1"})
        parity = export.check(encoded, network, images, threads=1)
        assert parity.passed and parity.images == 10000, (type(network).__name__, parity)
        session = onnxruntime.InferenceSession(encoded, providers=["CPUExecutionProvider"])
        assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [("images", "tensor(uint8)",
                                                                               ["batch", 28, 28])]
        assert session.get_modelmeta().custom_metadata_map == {"mnist.format_version": "1"}


class Branching(model.MnistCNN):
    """A network whose forward() takes a branch on the images' values, which torch.export cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if bool(x.sum() > 0) else -logits


def test_a_network_the_exporter_cannot_trace_is_one_error_naming_it_and_why(capfd):
    with pytest.raises(PipelineError) as raised:
        export.to_onnx(Branching().eval(), {})
    message = str(raised.value)
    assert message.startswith("torch's ONNX exporter cannot export Branching (") and "data-dependent" in message
    assert "\n" not in message and "\x1b" not in message
    assert capfd.readouterr() == ("", "")  # nor the exporter's warnings or partial graph on the terminal


def test_without_torchs_exporter_packages_export_says_how_to_get_them(trained_copy):
    root = trained_copy
    Volume(root).exported(1).unlink()
    with mock.patch.dict(sys.modules, {"onnxscript": None}):
        assert_one_line_error(run_here("export", "--root", str(root)), 1, "onnxscript",
                              "pip install onnx onnxscript onnxruntime")
        evaluated = run_here("evaluate", "--root", str(root), "--export", "auto")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "version 1 is not exported to ONNX: onnx and onnxscript" in evaluated.stderr
    assert not Volume(root).exported(1).exists()
