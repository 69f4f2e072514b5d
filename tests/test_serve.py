"""`mnist serve` as a client meets it: a real server process on a free port, real HTTP."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from PIL import Image

from conftest import assert_one_line_error, run_here, run_mnist, wait_until
from test_preprocess import bomb_png
from test_records import write_evaluation
from mnist_pipeline import data
from mnist_pipeline.data import png as png_grayscale
from mnist_pipeline.storage.atomic import atomic_write_bytes


def multipart(files: List[Tuple[str, bytes]], field: str = "file") -> Tuple[bytes, Dict[str, str]]:
    """A multipart/form-data body with one `field` per (filename, content)."""
    boundary = "mnist-test-boundary-7d3f"
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
             for name, content in files]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def digits(mirror, tmp_path_factory) -> List[tuple]:
    """(label, PNG bytes) of the first MNIST test digits of three different classes."""
    test_set = data.load_split(tmp_path_factory.mktemp("data"), "test", str(mirror))
    picked, labels = [], set()
    for image, label in zip(test_set.images, test_set.labels.tolist(), strict=True):
        if label not in labels:
            labels.add(label)
            picked.append((label, png_grayscale(image)))
        if len(picked) == 3:
            return picked
    raise AssertionError("unreachable")


def copy_in(source: Path, target: Path) -> None:
    """Put a file on the served volume the way the services write: atomically."""
    atomic_write_bytes(target, source.read_bytes())


def test_starts_not_ready_then_follows_the_volume_to_ready(serve, trained_root, tmp_path):
    root = tmp_path / "volume"
    root.mkdir()
    served = serve(root)
    assert served.json("GET", "/healthz")[0] == 200
    status, body = served.json("GET", "/readyz")
    assert status == 503 and "mnist train" in body["error"]
    status, body = served.json("POST", "/predict", b"\x89PNG", {"Content-Type": "image/png"})
    assert status == 503 and "mnist train" in body["error"]

    # a checkpoint without its evaluation never serves
    copy_in(trained_root / "model" / "mnist_cnn.pt", root / "model" / "mnist_cnn.pt")
    body = wait_until(lambda: (lambda r: r[0] == 503 and "eval_results.json" in r[1]["error"] and r[1])(
        served.json("GET", "/readyz")), "the server to see the unevaluated checkpoint")
    assert "run `mnist evaluate`" in body["error"]

    # nor does one evaluated below the threshold
    evaluation = json.loads((trained_root / "model" / "eval_results.json").read_text())
    write_evaluation(root, evaluation["checkpoint"]["sha256"], 1, accuracy=0.5)
    wait_until(lambda: "not above the threshold" in served.json("GET", "/readyz")[1].get("error", ""),
               "the server to refuse the checkpoint below the threshold")

    copy_in(trained_root / "model" / "eval_results.json", root / "model" / "eval_results.json")
    status, body = wait_until(lambda: (lambda r: r[0] == 200 and r)(served.json("GET", "/readyz")),
                              "the server to become ready")
    assert body["checkpoint"] == {"sha256": evaluation["checkpoint"]["sha256"], "epoch": 1}
    assert body["accuracy"] == evaluation["accuracy"]


def test_a_taken_port_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # its own process, with a timeout: a serve that did start would never return
        result = run_mnist("serve", "--root", str(tmp_path), "--port", str(port), timeout=120)
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_predict_multipart_several_files_in_upload_order(served_trained, digits):
    served, root = served_trained
    body, headers = multipart([(f"{label}.png", png) for label, png in digits])
    status, answer = served.json("POST", "/predict", body, headers)
    assert status == 200, answer
    sha256 = json.loads((root / "model" / "eval_results.json").read_text())["checkpoint"]["sha256"]
    assert answer["checkpoint"] == {"sha256": sha256, "epoch": 1, "version": 1}  # evaluate kept it as version 1
    assert [p["digit"] for p in answer["predictions"]] == [label for label, _ in digits]
    for prediction in answer["predictions"]:
        assert len(prediction["probabilities"]) == 10
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-3
        assert prediction["confidence"] == max(prediction["probabilities"])


def test_predict_raw_body_and_a_photo_like_upload(served_trained, digits):
    served, _ = served_trained
    label, png = digits[0]
    status, answer = served.json("POST", "/predict", png, {"Content-Type": "image/png"})
    assert status == 200 and answer["predictions"][0]["digit"] == label
    # the same digit as a large JPEG photo: dark ink on light paper, off-centre
    small = Image.open(io.BytesIO(png))
    photo = Image.new("RGB", (640, 480), (235, 230, 220))
    photo.paste(Image.eval(small.resize((224, 224)), lambda v: 255 - v).convert("RGB"), (300, 40))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=80)
    status, answer = served.json("POST", "/predict", buffer.getvalue(), {"Content-Type": "image/jpeg"})
    assert status == 200 and answer["predictions"][0]["digit"] == label


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def big_png() -> bytes:
    """A valid PNG over 2 MB (noise does not compress)."""
    return png_of(Image.frombytes("L", (1600, 1600), os.urandom(1600 * 1600)))


@pytest.mark.parametrize("case, status, fragment", [
    ("not an image", 400, "not an image"),
    ("truncated", 400, "truncated"),
    ("empty body", 400, "empty"),
    ("missing file field", 400, "no `file` field"),
    ("text in the file field", 400, "holds text"),
    ("wrong content type", 415, "Content-Type"),
    ("over 2 MB", 413, "over 2 MB"),
    ("over 2 MB in multipart", 413, "over 2 MB"),
    ("decompression bomb", 400, "pixels"),
    ("65 files", 400, "Maximum number of files is 64"),
    ("blank drawing", 400, "blank"),
])
def test_bad_input_is_a_4xx_with_a_json_error_and_the_server_keeps_serving(served_trained, digits, case, status,
                                                                           fragment):
    served, _ = served_trained
    good = digits[0][1]
    png = {"Content-Type": "image/png"}
    requests = {  # built on demand: only this case's body (a noise PNG or a bomb takes a while)
        "not an image": lambda: (b"hello, I am text", png),
        "truncated": lambda: (good[:len(good) // 2], png),
        "empty body": lambda: (b"", png),
        "missing file field": lambda: multipart([("a.png", good)], field="image"),
        "text in the file field": lambda: (
            b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nseven\r\n--b--\r\n",
            {"Content-Type": "multipart/form-data; boundary=b"}),
        "wrong content type": lambda: (good, {"Content-Type": "text/plain"}),
        "over 2 MB": lambda: (big_png(), png),
        "over 2 MB in multipart": lambda: multipart([("big.png", big_png())]),
        "decompression bomb": lambda: (bomb_png(30000), png),
        "65 files": lambda: multipart([(f"{n}.png", good) for n in range(65)]),
        "blank drawing": lambda: (png_of(Image.new("RGB", (280, 280), "white")), png),
    }
    body, headers = requests[case]()
    answer_status, answer = served.json("POST", "/predict", body, headers)
    assert answer_status == status and fragment in answer["error"], (answer_status, answer)
    status, answer = served.json("POST", "/predict", good, png)
    assert status == 200 and answer["predictions"][0]["digit"] == digits[0][0]


def test_sixty_four_files_are_accepted(served_trained, digits):
    served, _ = served_trained
    status, answer = served.json("POST", "/predict", *multipart([(f"{n}.png", digits[1][1]) for n in range(64)]))
    assert status == 200 and [p["digit"] for p in answer["predictions"]] == [digits[1][0]] * 64


def test_unknown_route_and_method_are_json_errors(served_trained):
    served, _ = served_trained
    assert served.json("GET", "/nothing-here")[0] == 404
    assert served.json("GET", "/predict")[0] == 405


def test_metrics_count_requests_and_name_the_epoch(served_trained, digits):
    served, _ = served_trained
    served.json("POST", "/predict", digits[0][1], {"Content-Type": "image/png"})
    served.json("POST", "/predict", b"", {"Content-Type": "image/png"})
    status, headers, text = served.request("GET", "/metrics")
    text = text.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'mnist_requests_total{route="/predict",status="200"}' in text
    assert 'mnist_requests_total{route="/predict",status="400"}' in text
    assert "mnist_prediction_seconds_bucket" in text
    assert re.search(r'^mnist_checkpoint_epoch\{pid="\d+"\} 1\.0$', text, re.MULTILINE)  # one series a worker


def test_page_is_self_contained(served_trained):
    served, _ = served_trained
    status, headers, page = served.request("GET", "/")
    page = page.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for stable_id in ('id="pad"', 'id="digit"', 'id="clear"', 'href="/report/"'):
        assert stable_id in page
    for asset in ("/static/app.js", "/static/style.css"):
        status, _, content = served.request("GET", asset)
        assert status == 200 and b"http://" not in content and b"https://" not in content  # no CDN, no web font
    assert "https://" not in page


def test_report_is_served_read_only_and_never_outside_its_folder(served_trained):
    served, root = served_trained
    report = root / "model" / "report"
    real = report.rename(root / "model" / "report.real")  # evaluate wrote one; first, a volume without
    status, body = served.json("GET", "/report/")
    assert status == 404 and "mnist evaluate" in body["error"]

    report.mkdir()
    (report / "index.html").write_text("<html><body><img src='confusion.svg'>report</body></html>")
    (report / "confusion.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    (report / "escape.txt").symlink_to(root / "model" / "eval_results.json")
    status, headers, content = served.request("GET", "/report")  # redirected to /report/
    assert status == 200 and b"report" in content and headers["content-type"].startswith("text/html")
    status, headers, _ = served.request("GET", "/report/confusion.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    for escape in ("/report/..%2Feval_results.json", "/report/%2E%2E/eval_results.json", "/report/escape.txt",
                   "/report/..%2F..%2Fmodel%2Fmnist_cnn.pt", "/report/missing.png"):
        status, body = served.json("GET", escape)
        assert status == 404 and "error" in body, (escape, body)
    shutil.rmtree(report)
    real.rename(report)


@pytest.mark.parametrize("promoted, runtime", [(False, "torch"), (True, "onnx")])
def test_hot_reload_switches_to_the_next_evaluated_epoch_without_a_failed_request(serve, short_trained_copy, digits,
                                                                                  promoted, runtime):
    # 20-step epochs (the limit is saved with the checkpoint, so the resumed train is as short): the
    # switch is the point, not the accuracy, so the gate lets any evaluated model through. Not promoted
    # (below evaluate's threshold): serve follows model/mnist_cnn.pt, which torch reads; promoted: the
    # production version, which evaluate exported, so auto serves it with onnx (torch for a moment, between
    # the promotion and the export)
    root = short_trained_copy
    evaluate = ("evaluate", "--root", str(root), *(("--promote", "always", "--export", "auto") if promoted else ()))
    result = run_here(*evaluate)
    assert result.returncode == 0, result.stderr[-3000:]
    served = serve(root, "--threshold", "0")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load epoch 1")
    assert served.json("GET", "/readyz")[1]["runtime"] == runtime
    png = {"Content-Type": "image/png"}
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            status, body = served.json("POST", "/predict", digits[2][1], png)
            answers.append((status, body.get("checkpoint", {}).get("epoch"), time.monotonic() - started))
            # a breath between requests: still hundreds across the swap, but a client that never pauses
            # starves train and evaluate (in this process, on a shared machine) of CPU and of the GIL
            stop.wait(0.005)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result = run_here("train", "--root", str(root))
        assert result.returncode == 0, result.stderr[-3000:]
        # trained but not yet evaluated: still epoch 1, whatever the server has seen of the new file
        status, body = served.json("POST", "/predict", digits[2][1], png)
        assert status == 200 and body["checkpoint"]["epoch"] == 1
        result = run_here(*evaluate)
        assert result.returncode == 0, result.stderr[-3000:]
        wait_until(lambda: answers and answers[-1][1] == 2, "answers from epoch 2")
    finally:
        stop.set()
        thread.join()
    statuses = [status for status, _, _ in answers]
    epochs = [epoch for _, epoch, _ in answers]
    assert statuses.count(200) == len(statuses), f"{len(statuses) - statuses.count(200)} failed requests"
    assert epochs[0] == 1 and epochs[-1] == 2 and epochs == sorted(epochs)
    # evaluate exported epoch 2 after promoting it: auto moves to its ONNX model once it lands
    wait_until(lambda: served.json("GET", "/readyz")[1]["runtime"] == runtime, f"epoch 2 to serve with {runtime}")
    status, body = served.json("POST", "/predict", digits[2][1], png)
    assert status == 200 and body["checkpoint"]["epoch"] == 2
    print(f"{len(answers)} requests during the reload, slowest {max(s for _, _, s in answers) * 1000:.0f} ms")
