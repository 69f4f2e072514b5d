"""The Open Inference Protocol (KServe v2) as its users meet it: Triton's own HTTP client (tritonclient) against a
live `mnist serve` of three versions, next to /predict's answers for the same images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy
import pytest
from PIL import Image, ImageDraw

from conftest import Served, private_copy, run_here, wait_until
from test_serve import multipart
from test_versions import three_versions  # noqa: F401 - the fixture
from mnist_pipeline import data, preprocess
from mnist_pipeline.data import png as png_grayscale

tritonclient = pytest.importorskip("tritonclient.http")

INFER = "/v2/models/mnist/infer"


@pytest.fixture(scope="module")
def served(three_versions, tmp_path_factory) -> Iterator[Tuple[Served, Path]]:
    """`mnist serve` following production (version 3) of a copy of three_versions; a test that moves it puts it back."""
    root = private_copy(three_versions, tmp_path_factory.mktemp("v2") / "volume")
    with contextlib.closing(Served(root, "--threshold", "0")) as server:
        wait_until(lambda: server.json("GET", "/readyz")[1].get("checkpoint", {}).get("version") == 3,
                   "version 3 to serve")
        yield server, root


@pytest.fixture(scope="module")
def files(mirror, tmp_path_factory) -> List[bytes]:
    """Five MNIST test digits as 28x28 PNGs, and a 280x280 drawing (black on white, RGB) that preprocessing changes."""
    test_set = data.load_split(tmp_path_factory.mktemp("data"), "test", str(mirror))
    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line([(90, 60), (200, 70), (120, 230)], fill="black", width=24)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return [png_grayscale(test_set.images[n]) for n in range(5)] + [buffer.getvalue()]


def client(served: Served):
    return tritonclient.InferenceServerClient(served.url.removeprefix("http://"))


def predicted(served: Served, files: List[bytes], version: str = "") -> numpy.ndarray:
    """/predict's probabilities for the files (as the same server's runtime gives them)."""
    body, headers = multipart([(f"{n}.png", f) for n, f in enumerate(files)])
    status, answer = served.json("POST", "/predict" + (f"?version={version}" if version else ""), body, headers)
    assert status == 200, answer
    return numpy.array([row["probabilities"] for row in answer["predictions"]], dtype=numpy.float32)


def images_input(pixels: numpy.ndarray, binary: bool):
    tensor = tritonclient.InferInput("images", list(pixels.shape), "UINT8")
    return tensor.set_data_from_numpy(pixels, binary_data=binary)


def test_server_and_model_metadata(served):
    server, _ = served
    triton = client(server)
    assert triton.is_server_live() and triton.is_server_ready()
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    metadata = triton.get_model_metadata("mnist")
    assert metadata["name"] == "mnist" and metadata["versions"] == ["3"]
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]},
                                  {"name": "image_files", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                                   {"name": "digit", "datatype": "INT64", "shape": [-1]}]
    assert triton.get_model_metadata("mnist", "2")["versions"] == ["2"]
    assert triton.is_model_ready("mnist") and triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("mnist", "9") and not triton.is_model_ready("other")


@pytest.mark.parametrize("version", ["", "2"])
def test_infer_answers_as_predict_for_the_same_images(served, files, version):
    """UINT8 pixels (the preprocessed 28x28 images) and image_files (the files themselves), as JSON and as binary
    data, answer what /predict answers for the files, from the same version."""
    server, _ = served
    triton = client(server)
    expected = predicted(server, files, version)
    pixels = numpy.stack([numpy.frombuffer(preprocess.from_bytes(f), numpy.uint8).reshape(28, 28) for f in files])
    encoded = numpy.array(files, dtype=numpy.object_)
    in_json = numpy.array([base64.b64encode(f) for f in files], dtype=numpy.object_)  # JSON text holds base64
    requests = {
        "binary pixels": [images_input(pixels, True)],
        "JSON pixels [N, 1, 28, 28]": [images_input(pixels.reshape(-1, 1, 28, 28), False)],
        "binary files": [tritonclient.InferInput("image_files", [len(files)], "BYTES").set_data_from_numpy(encoded)],
        "JSON files": [tritonclient.InferInput("image_files", [len(files)], "BYTES").set_data_from_numpy(
            in_json, binary_data=False)],
    }
    for what, inputs in requests.items():
        for outputs in (None, [tritonclient.InferRequestedOutput(name, binary_data=False)
                               for name in ("probabilities", "digit")]):
            result = triton.infer("mnist", inputs, model_version=version, outputs=outputs, request_id=what)
            answer = result.get_response()
            assert answer["model_version"] == (version or "3") and answer["id"] == what, answer
            # no outputs named: tritonclient asks for binary ones
            assert all(("data" in o) == (outputs is not None) for o in answer["outputs"]), (what, answer)
            probabilities = result.as_numpy("probabilities")
            assert probabilities.dtype == numpy.float32 and probabilities.shape == (len(files), 10)
            # /predict rounds to 6 decimals
            assert numpy.abs(probabilities - expected).max() <= 1e-6, (what, outputs)
            assert result.as_numpy("digit").tolist() == expected.argmax(axis=1).tolist()


def test_a_hot_reload_during_a_client_loop_fails_no_request(served):
    server, root = served
    pixels = numpy.zeros((8, 28, 28), numpy.uint8)
    pixels[:, 6:22, 13:15] = 255  # a one
    answers, stop = [], threading.Event()

    def loop():
        triton = client(server)  # (its own connection, in this thread)
        while not stop.is_set():
            try:
                answers.append(triton.infer("mnist", [images_input(pixels, True)]).get_response()["model_version"])
            except Exception as exc:  # noqa: BLE001 - a failed request is what this test looks for
                answers.append(exc)
            stop.wait(0.005)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for args, version in ((("promote", "1"), "1"), (("rollback",), "3")):
            result = run_here(*args, "--root", str(root))
            assert result.returncode == 0, result.stderr[-3000:]
            wait_until(lambda v=version: answers and answers[-1] == v, f"answers from version {version}")
    finally:
        stop.set()
        thread.join()
    failed = [a for a in answers if not isinstance(a, str)]
    assert not failed, failed[:3]
    assert answers[0] == "3" and "1" in answers and answers[-1] == "3"


def body_of(inputs: list, **rest) -> bytes:
    return json.dumps({"inputs": inputs, **rest}).encode()


def pixels_json(count: int = 1, shape=None, datatype: str = "UINT8", values=None) -> dict:
    return {"name": "images", "datatype": datatype, "shape": shape or [count, 28, 28],
            "data": values if values is not None else [0] * (784 * count)}


BINARY = {"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}
BAD = [  # (path, body, headers, status, a fragment of the error)
    (INFER, body_of([pixels_json(datatype="FP32")]), {}, 400, "datatype 'FP32'"),
    (INFER, body_of([pixels_json(shape=[1, 28])]), {}, 400, "shape [1, 28]"),
    (INFER, body_of([{**pixels_json(), "name": "pixels"}]), {}, 400, "unknown input 'pixels'"),
    (INFER, body_of([pixels_json(65)]), {}, 400, "65 images: send 1 to 64"),
    (INFER, body_of([pixels_json(values=[0] * 783)]), {}, 400, "holds 783 values"),
    (INFER, body_of([pixels_json(values=[256] * 784)]), {}, 400, "outside 0 to 255"),
    (INFER, body_of([pixels_json()], outputs=[{"name": "logits"}]), {}, 400, "unknown output 'logits'"),
    (INFER, body_of([{**pixels_json(), "name": ["images"]}]), {}, 400, "unknown input"),
    (INFER, body_of([pixels_json()], outputs=[{"name": {}}]), {}, 400, "unknown output"),
    (INFER, body_of([pixels_json()], id="\ud800"), {}, 400, "`id` is not a string"),
    (INFER, body_of([BINARY]) + bytes(783), {"Inference-Header-Content-Length": str(len(body_of([BINARY])))}, 400,
     "binary_data_size 784, but 783 bytes"),
    (INFER, body_of([BINARY]) + bytes(784), {"Inference-Header-Content-Length": "9999"}, 400,
     "Inference-Header-Content-Length '9999'"),
    (INFER, body_of([{"name": "image_files", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]), {},
     400, "element 1: not an image"),
    (INFER, b"[" * 100_000, {}, 400, "not a JSON inference request"),
    ("/v2/models/mnist/versions/9/infer", body_of([pixels_json()]), {}, 404, "no version 9"),
    ("/v2/models/mnist/versions/x/infer", body_of([pixels_json()]), {}, 400, "not a version number"),
    ("/v2/models/mnist/versions/" + "9" * 5000 + "/infer", body_of([pixels_json()]), {}, 400, "not a version number"),
    ("/v2/models/fashion/infer", body_of([pixels_json()]), {}, 404, "unknown model 'fashion'"),
]


def test_bad_requests_are_a_4xx_saying_which_and_a_good_one_echoes_its_id(served):
    server, _ = served
    for path, body, headers, status, fragment in BAD:
        got, answer = server.json("POST", path, body, headers)
        assert got == status and fragment in answer["error"], (path, body[:100], got, answer)
    status, headers, content = server.request("POST", INFER, body_of([pixels_json(2)], id="r-7"))
    answer = json.loads(content)
    assert status == 200 and answer["id"] == "r-7" and answer["model_version"] == headers["x-model-version"] == "3"
    assert [o["shape"] for o in answer["outputs"]] == [[2, 10], [2]]
    with pytest.raises(tritonclient.InferenceServerException) as raised:
        client(server).get_model_metadata("mnist", "9")
    assert raised.value.status() == "404"
