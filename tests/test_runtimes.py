"""serve's runtimes: onnx (the exported model, no torch) and torch, picked by --runtime; the same answers.

trained_root's evaluate exported version 1, so the API tests of test_serve.py and test_versions.py
run on onnx (auto); here: serve where torch does not import, its answers against torch's, the choice
of runtime and why a version is not served.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import onnx
import pytest
import torch

from conftest import Served, assert_one_line_error, private_copy, run_mnist, wait_until
from test_serve import digits, multipart  # noqa: F401 (a fixture)
from mnist_pipeline import data, export, preprocess
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import MnistCNN, predict, stack
from mnist_pipeline.records import checkpoint
from mnist_pipeline.serve import follow
from mnist_pipeline.serve.runtimes import OnnxLive, Runtimes, TorchLive
from mnist_pipeline.volume import Volume

# a sitecustomize that makes `import <name>` fail (torch: as in serve's slim image) and says each time it was tried
BLOCKER = '''
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {name!r}:
            sys.stderr.write(f"test: import {{name}} attempted\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, Blocked())
'''


def without(module: str, tmp_path: Path) -> dict:
    """The environment of a new interpreter in which `import <module>` fails."""
    folder = tmp_path / f"no-{module}"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER.format(name=module))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def torch_answers(root: Path, pngs: list) -> list:
    """What torch answers for `pngs` with version 1's checkpoint: probabilities [10] per image."""
    model = checkpoint.read(root / "model" / "versions" / "1" / "mnist_cnn.pt").build_model()
    return predict(model, stack([preprocess.from_bytes(png) for png in pngs]), torch.device("cpu")).tolist()


def assert_same_answers(answer: dict, expected: list) -> None:
    """serve's predictions are torch's digits, with probabilities within the export's parity tolerance."""
    got = answer["predictions"]
    assert [p["digit"] for p in got] == [max(range(10), key=e.__getitem__) for e in expected]
    difference = max(abs(a - b) for p, e in zip(got, expected, strict=True)
                     for a, b in zip(p["probabilities"], e, strict=True))
    assert difference <= export.TOLERANCE + 1e-6, difference  # (+ the rounding to 6 decimals)


def test_serve_without_torch_waits_for_the_export_then_answers_as_torch_does(trained_root, tmp_path, digits):
    root = private_copy(trained_root, tmp_path / "volume")
    onnx = Volume(root).exported(1)
    aside = onnx.rename(tmp_path / "aside.onnx")  # as between evaluate's promotion and its export
    with contextlib.closing(Served(root, fresh=True, env=without("torch", tmp_path))) as served:
        status, body = wait_until(lambda: (lambda r: r[0] == 503 and "ONNX" in r[1]["error"] and r)(
            served.json("GET", "/readyz")), "the server to say why version 1 is not served")
        assert "mnist export" in body["error"] and "torch" in body["error"], body
        shutil.copyfile(aside, tmp_path / "aside.copy")
        os.replace(tmp_path / "aside.copy", onnx)  # the export lands
        status, body = wait_until(lambda: (lambda r: r[0] == 200 and r)(served.json("GET", "/readyz")),
                                  "the server to serve the exported model")
        assert body["runtime"] == "onnx" and body["checkpoint"]["version"] == 1
        status, answer = served.json("POST", "/predict", *multipart([(f"{n}.png", png) for n, png in digits]))
        assert status == 200 and [p["digit"] for p in answer["predictions"]] == [label for label, _ in digits]
        assert_same_answers(answer, torch_answers(root, [png for _, png in digits]))
        status, body = served.json("POST", "/predict", b"not an image", {"Content-Type": "image/png"})
        assert status == 400 and "not an image" in body["error"]
    # the blocker worked: auto asked for torch once, for the version without its ONNX model
    assert "".join(served.stderr).count("attempted") == 1, "".join(served.stderr)[-3000:]


def test_serve_with_runtime_onnx_never_tries_torch(trained_root, tmp_path, digits):
    with contextlib.closing(Served(trained_root, "--runtime", "onnx", fresh=True,
                                   env=without("torch", tmp_path))) as served:
        wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the exported model")
        status, answer = served.json("POST", "/predict", digits[1][1], {"Content-Type": "image/png"})
        assert status == 200 and answer["predictions"][0]["digit"] == digits[1][0]
    assert "attempted" not in "".join(served.stderr)


def test_the_onnx_and_torch_runtimes_answer_alike(served_trained, serve, digits):
    onnx, root = served_trained
    torch_served = serve(root, "--runtime", "torch")
    wait_until(lambda: torch_served.json("GET", "/readyz")[0] == 200, "the torch server to load the model")
    assert onnx.json("GET", "/readyz")[1]["runtime"] == "onnx"
    assert torch_served.json("GET", "/readyz")[1]["runtime"] == "torch"
    body, headers = multipart([(f"{n}.png", png) for n, png in digits])
    answers = [served.json("POST", "/predict", body, headers) for served in (onnx, torch_served)]
    assert answers[0][0] == answers[1][0] == 200
    assert answers[0][1]["checkpoint"] == answers[1][1]["checkpoint"]
    assert_same_answers(answers[0][1], [p["probabilities"] for p in answers[1][1]["predictions"]])
    assert_same_answers(answers[1][1], torch_answers(root, [png for _, png in digits]))


@pytest.fixture
def exported_copy(trained_root, tmp_path) -> Volume:
    return Volume(private_copy(trained_root, tmp_path / "volume"))


def test_auto_picks_onnx_where_the_version_is_exported_else_torch(exported_copy, tmp_path):
    volume = exported_copy
    assert isinstance(Runtimes("auto", "auto", 1).load(volume, "production", 0.5), OnnxLive)
    assert isinstance(Runtimes("torch", "cpu", 1).load(volume, "production", 0.5), TorchLive)
    volume.exported(1).rename(tmp_path / "aside.onnx")
    assert isinstance(Runtimes("auto", "cpu", 1).load(volume, "production", 0.5), TorchLive)
    with pytest.raises(PipelineError, match=r"version 1 has no ONNX model .*run `mnist export`"):
        Runtimes("onnx", "cpu", 1).load(volume, "production", 0.5)


def rewritten(data: bytes, metadata: Optional[Dict[str, str]] = None, fixed_batch: bool = False) -> bytes:
    """An ONNX model's bytes with metadata entries replaced, or its inputs' batch axis fixed at 1: the files
    serve must refuse (or take), made without an export."""
    written = onnx.load_from_string(data)
    if metadata:
        onnx.helper.set_model_props(written, {**{p.key: p.value for p in written.metadata_props}, **metadata})
    for value in written.graph.input if fixed_batch else ():
        value.type.tensor_type.shape.dim[0].dim_value = 1  # (replaces the named axis: one of the two is set)
    return written.SerializeToString()


def test_the_gate_and_a_stale_or_broken_export_keep_onnx_from_serving(exported_copy, tmp_path):
    volume, runtime = exported_copy, Runtimes("onnx", "cpu", 1)
    with pytest.raises(PipelineError, match="not above the threshold"):
        runtime.load(volume, "production", 0.9999)
    with pytest.raises(PipelineError, match="alias 'staging' is not set"):
        runtime.load(volume, "staging", 0.5)
    good = volume.exported(1).read_bytes()
    volume.exported(1).write_bytes(rewritten(good, {"mnist.checkpoint_sha256": "0" * 64}))
    with pytest.raises(PipelineError, match=r"export of another checkpoint.*`mnist export --version 1`"):
        runtime.load(volume, 1, 0.5)
    volume.exported(1).write_bytes(rewritten(good, {"mnist.format_version": "2"}))  # a later contract
    with pytest.raises(PipelineError, match=r"not an export this version reads \(mnist.format_version '2', not '1'"):
        runtime.load(volume, 1, 0.5)
    volume.exported(1).write_bytes(rewritten(good, fixed_batch=True))  # one image at a time: answers would go missing
    with pytest.raises(PipelineError, match=r"does not take `images` uint8 \[N, 28, 28\]"):
        runtime.load(volume, 1, 0.5)
    volume.exported(1).write_bytes(b"not an ONNX model")
    with pytest.raises(PipelineError, match="mnist_cnn.onnx does not load"):
        runtime.load(volume, 1, 0.5)
    volume.exported(1).unlink()
    os.mkfifo(volume.exported(1))
    with pytest.raises(PipelineError, match="FIFO"):
        runtime.load(volume, 1, 0.5)
    # a volume from before versions: only torch reads model/mnist_cnn.pt
    shutil.rmtree(volume.aliases_dir)
    with pytest.raises(PipelineError, match="production is not set, and --runtime onnx serves versions only: `mnist"):
        runtime.load(volume, "production", 0.5)
    assert Runtimes("auto", "cpu", 1).load(volume, "production", 0.5).version is None


def test_a_file_the_previous_exporter_wrote_is_served_as_the_torch_network_in_it_answers(exported_copy, mirror):
    """Volumes hold files that `mnist export` wrote before it used torch's exporter (ONNX IR version 8, opset
    17; tests/fixtures/export_v1/README.md): serve takes them, and answers as the network they hold."""
    volume = exported_copy
    old = (Path(__file__).parent / "fixtures" / "export_v1" / "ir8_opset17.onnx").read_bytes()
    written = onnx.load_from_string(old)
    assert (written.ir_version, written.opset_import[0].version) == (8, 17)
    network = MnistCNN(channels=(4, 8), strides=(2, 1), pools=(False, True)).eval()
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in written.graph.initializer}
    missing, _ = network.load_state_dict({k: v for k, v in weights.items() if k in network.state_dict()},
                                         strict=False)
    assert all(name.endswith("num_batches_tracked") for name in missing), missing
    sha256 = json.loads((volume.version_dir(1) / "version.json").read_text())["sha256"]
    volume.exported(1).write_bytes(rewritten(old, {"mnist.checkpoint_sha256": sha256}))

    live = Runtimes("onnx", "cpu", 1).load(volume, 1, 0.5)
    assert isinstance(live, OnnxLive) and live.version == 1
    images = data.load_split(volume.data_dir, "test", str(mirror)).images[:500]
    answers = torch.from_numpy(live.predict([image.numpy().tobytes() for image in images]))
    expected = predict(network, images, torch.device("cpu"))
    assert (answers - expected).abs().max() <= export.TOLERANCE


def test_an_export_that_lands_moves_the_follower_from_torch_to_onnx(exported_copy, tmp_path):
    volume = exported_copy
    aside = volume.exported(1).rename(tmp_path / "aside.onnx")
    swapped = []
    follower = follow.Follower(volume, 0.5, Runtimes("auto", "cpu", 1), on_swap=swapped.append)
    follower.poll()
    assert follower.live.runtime == "torch" and follower.live.version == 1
    follower.poll()
    assert len(swapped) == 1, "nothing changed: nothing is loaded again"
    os.replace(aside, volume.exported(1))
    follower.poll()
    assert follower.live.runtime == "onnx" and [live.runtime for live in swapped] == ["torch", "onnx"]


def test_a_request_before_the_next_poll_finds_the_model_that_landed(exported_copy, tmp_path):
    """Workers poll apart: one may say ready while another has not looked since the export landed."""
    volume = exported_copy
    aside = volume.exported(1).rename(tmp_path / "aside.onnx")
    follower = follow.Follower(volume, 0.5, Runtimes("onnx", "cpu", 1))  # (its thread is never started)
    assert follower.current() is None and "no ONNX model" in follower.problem
    os.replace(aside, volume.exported(1))
    assert follower.current().runtime == "onnx" and follower.problem == ""


def test_runtime_onnx_on_cuda_is_refused_at_the_start(trained_root):
    # (its own process, with a timeout: a serve that did start would never return)
    assert_one_line_error(run_mnist("serve", "--root", str(trained_root), "--runtime", "onnx", "--device", "cuda",
                                    "--port", "0", timeout=120), 1, "--runtime onnx runs on the CPU")


@pytest.mark.parametrize("runtime, missing", [("torch", "torch"), ("onnx", "onnxruntime")])
def test_a_runtime_named_that_does_not_import_is_one_error_line(trained_root, tmp_path, runtime, missing):
    result = run_mnist("serve", "--root", str(trained_root), "--runtime", runtime, "--port", "0", "--workers", "1",
                       env=without(missing, tmp_path), fresh=True, timeout=120)
    assert_one_line_error(result, 1, f"--runtime {runtime}, but {missing} does not import here")
