"""Feedback: POST /feedback keeps the image the model saw with its label, within its limits; `mnist feedback`
reviews it; the page's "Wrong? It was: N" sends it (docs/feedback.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import assert_one_line_error, litter, mnist_env, run_here, wait_until
from mnist_pipeline import data, preprocess
from mnist_pipeline.records import feedback as samples
from mnist_pipeline.volume import Volume
from test_page import SCREENSHOTS, STROKES, browser, draw  # noqa: F401 (browser: a fixture)
from mnist_pipeline.data import png as png_grayscale

PNG = {"Content-Type": "image/png"}


def pixels(seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 256 for i in range(784))


def multipart(image: bytes, label: str) -> tuple:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{label}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def digits(mirror, tmp_path_factory) -> list:
    test_set = data.load_split(tmp_path_factory.mktemp("data"), "test", str(mirror))
    return [png_grayscale(test_set.images[i]) for i in range(6)]


@pytest.fixture
def volume(tmp_path) -> Volume:
    (tmp_path / "volume").mkdir()
    return Volume(tmp_path / "volume")


def fb(root: Path, *args: str):
    return run_here("feedback", *args, "--root", str(root))


# --- the record ----------------------------------------------------------------------------------------


def test_a_sample_reads_back_as_written_and_a_duplicate_is_refused(volume):
    kept = samples.add(volume, pixels(1), 4, 9, 2)
    again = samples.read(volume, kept.id)
    assert (again.label, again.predicted, again.version, again.status) == (4, 9, 2, "pending")
    assert again.split == samples.split_of(kept.id) and kept.id == samples.sample_id(pixels(1), 4)
    assert samples.image(volume, again) == pixels(1)
    with pytest.raises(samples.Duplicate):
        samples.add(volume, pixels(1), 4, 9, 2)
    samples.add(volume, pixels(1), 5, 9, 2)  # the same drawing with another label is another sample
    assert len(samples.ids(volume)) == 2 and litter(volume.root) == []


@pytest.mark.parametrize("damage", [
    lambda record, png: record.write_text("{not json"),
    lambda record, png: record.write_text(json.dumps({**json.loads(record.read_text()), "label": 12})),
    lambda record, png: record.write_text(json.dumps({**json.loads(record.read_text()), "status": "maybe"})),
    lambda record, png: record.write_text(json.dumps({**json.loads(record.read_text()), "split": "heldout"
                                                      if "train" in record.read_text() else "train"})),
    lambda record, png: record.write_bytes(b"\xff" * 5000),
    lambda record, png: (record.unlink(), os.mkfifo(record)),
    lambda record, png: png.write_bytes(b"not a png"),
    lambda record, png: png.write_bytes(samples.png_of(pixels(9))),  # pixels that do not hash to its name
])
def test_a_hostile_sample_file_is_one_error_naming_it(volume, damage):
    kept = samples.add(volume, pixels(2), 3, 3, 1)
    record, png = volume.feedback_record(kept.id), volume.feedback_image(kept.id)
    damage(record, png)
    result = fb(volume.root)  # (lists the pending ones and draws their images)
    assert_one_line_error(result, 1, kept.id)


# --- serve ---------------------------------------------------------------------------------------------


def test_feedback_is_off_unless_asked(served_trained, digits):
    served, root = served_trained
    status, answer = served.json("POST", "/feedback?label=3", digits[0], PNG)
    assert status == 404 and "--feedback on" in answer["error"]
    assert served.json("GET", "/readyz")[1]["feedback"] is False
    assert not (root / "feedback").exists()


def test_a_sample_is_the_image_the_model_saw_with_the_servers_prediction(serve, trained_copy, digits):
    served = serve(trained_copy, "--feedback", "on")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the model")
    assert served.json("GET", "/readyz")[1]["feedback"] is True
    _, predicted = served.json("POST", "/predict", digits[0], PNG)
    status, kept = served.json("POST", "/feedback", *multipart(digits[0], "8"))
    assert status == 202, kept
    sample = samples.read(Volume(trained_copy), kept["id"])
    assert samples.image(Volume(trained_copy), sample) == preprocess.from_bytes(digits[0])
    assert (sample.label, sample.predicted, sample.version, sample.status) == \
        (8, predicted["predictions"][0]["digit"], predicted["checkpoint"]["version"], "pending")
    assert served.json("POST", "/feedback", *multipart(digits[0], "8"))[0] == 409  # the same sample again
    status, answer = served.json("POST", "/feedback?label=2", b"\x89PNG\r\n\x1a\n broken", PNG)
    assert status == 400 and answer == served.json("POST", "/predict", b"\x89PNG\r\n\x1a\n broken", PNG)[1]
    listed = fb(trained_copy)
    assert listed.returncode == 0 and kept["id"][:12] in listed.stdout
    assert (trained_copy / "model" / "feedback_sheet.png").stat().st_size > 0


def test_bad_labels_and_the_caps(serve, trained_copy, digits):
    served = serve(trained_copy, "--feedback", "on", "--feedback-max-pending", "1")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the model")
    for query in ("", "?label=x"):
        status, answer = served.json("POST", "/feedback" + query, digits[0], PNG)
        assert status == 400 and "label" in answer["error"], answer
    assert served.json("POST", "/feedback?label=1", digits[0], PNG)[0] == 202
    status, answer = served.json("POST", "/feedback?label=2", digits[1], PNG)
    assert status == 507 and "review" in answer["error"], answer
    assert fb(trained_copy, "reject", "--all").returncode == 0  # reviewed: room again
    assert served.json("POST", "/feedback?label=2", digits[1], PNG)[0] == 202


def test_a_proxy_is_trusted_only_when_named(serve, trained_copy, digits):
    served = serve(trained_copy, "--feedback", "on", "--feedback-rate", "1", "--trusted-proxy", "127.0.0.1")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the model")
    for number, client in enumerate(("10.0.0.1", "10.0.0.2")):  # two clients behind the proxy: one sample each
        forwarded = {**PNG, "X-Forwarded-For": f"1.2.3.4, {client}"}
        assert served.json("POST", f"/feedback?label={number}", digits[number], forwarded)[0] == 202
    status, headers, body = served.request("POST", "/feedback?label=5", digits[2],
                                           {**PNG, "X-Forwarded-For": "10.0.0.1"})
    assert status == 429 and int(headers["retry-after"]) >= 1 and "a minute" in json.loads(body)["error"]


@pytest.mark.parametrize("peer, forwarded, trusted, client", [
    ("10.0.0.9", "1.2.3.4", None, "10.0.0.9"),  # no proxy named: the header is the client's own, ignored
    ("10.0.0.9", "1.2.3.4", ("10.0.0.1",), "10.0.0.9"),  # not from the named proxy: ignored
    ("10.0.0.1", "6.6.6.6, 1.2.3.4", ("10.0.0.1",), "1.2.3.4"),  # the proxy's own entry, the client's before it
    ("10.0.0.1", "1.2.3.4, 10.0.0.2", ("10.0.0.1", "10.0.0.2"), "1.2.3.4"),  # two proxies
    ("10.0.0.1", "garbage", ("10.0.0.1",), "10.0.0.1"),
])
def test_the_client_address(peer, forwarded, trusted, client):
    from starlette.requests import Request

    from mnist_pipeline.serve.feedback import client_address

    request = Request({"type": "http", "client": (peer, 1234), "headers": [(b"x-forwarded-for", forwarded.encode())]})
    assert client_address(request, trusted) == client


def test_schemathesis_finds_every_feedback_answer_in_the_schema(serve, trained_copy, tmp_path):
    """test_api runs Schemathesis with feedback off (404); here it is on: 202, 409, 429 and 400s, each typed."""
    served = serve(trained_copy, "--feedback", "on", "--feedback-rate", "20", "--feedback-max-pending", "30")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the model")
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run([str(schemathesis), "run", served.url + "/openapi.json", "--include-path", "/feedback",
                             "--checks", "not_a_server_error,response_schema_conformance", "--phases",
                             "coverage,fuzzing", "--max-examples", "15", "--seed", "7", "--max-time", "60",
                             "--request-timeout", "30", "--workers", "1", "--report-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # (its cache goes there)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"Tested: 1\b", result.stdout), result.stdout[-3000:]


# --- writers -------------------------------------------------------------------------------------------


def _write(root: str, first: int, start) -> None:
    start.wait()
    for seed in range(first, first + 20):
        samples.add(Volume(Path(root)), pixels(seed), seed % 10, 0, None)


def test_two_writers_at_once_land_every_sample(volume):
    fork = multiprocessing.get_context("fork")
    start = fork.Barrier(2)
    writers = [fork.Process(target=_write, args=(str(volume.root), first, start)) for first in (0, 100)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert len(samples.ids(volume)) == 40 and litter(volume.root) == []
    assert all(s.status == "pending" for s in samples.every(volume))


ADD = "import sys; from pathlib import Path; from mnist_pipeline.records import feedback as f; " \
      "from mnist_pipeline.volume import Volume; v = Volume(Path(sys.argv[1])); "


def test_kill_9_while_writing_leaves_whole_samples_only(volume):
    samples.add(volume, pixels(3), 1, 1, 1)
    env = mnist_env({"MNIST_FAULT": "feedback-before-rename"})  # the image written, its record not yet
    adding = subprocess.run([sys.executable, "-c", ADD + "f.add(v, bytes(784), 2, 2, 1)", str(volume.root)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert adding.returncode == -9, adding.stderr
    kept = samples.ids(volume)
    assert len(kept) == 1 and volume.feedback_image(samples.sample_id(bytes(784), 2)).exists()
    reviewing = subprocess.run([sys.executable, "-c", ADD + f"f.review(v, {kept[0]!r}, 'accepted')",
                                str(volume.root)], env=env, capture_output=True, text=True, timeout=60)
    assert reviewing.returncode == -9, reviewing.stderr
    assert [s.status for s in samples.every(volume)] == ["pending"]  # the review did not happen, whole
    samples.add(volume, bytes(784), 2, 2, 1)  # what was cut short is no sample: it can be sent again
    assert len(samples.ids(volume)) == 2 and litter(volume.root) == []


# --- review --------------------------------------------------------------------------------------------


def test_review_commands(volume):
    kept = [samples.add(volume, pixels(seed), seed % 10, 0, 1).id for seed in range(6)]
    assert "6 pending" in fb(volume.root).stdout
    assert fb(volume.root, "accept", kept[0][:8], kept[1]).stdout.startswith("accepted 2 samples")
    assert fb(volume.root, "reject", kept[0][:8]).returncode == 0  # accepted, then rejected
    assert fb(volume.root, "reject", "--all").stdout.startswith("rejected 4 samples")
    assert fb(volume.root, "accept", kept[2]).returncode == 0
    assert {s.id: s.status for s in samples.every(volume)} == {
        kept[0]: "rejected", kept[1]: "accepted", kept[2]: "accepted", **{k: "rejected" for k in kept[3:]}}
    stats = fb(volume.root, "stats").stdout
    assert [line.split()[-1] for line in stats.splitlines()[1:]] == ["0", "2", "4", "6"], stats
    assert "no samples wait" in fb(volume.root).stdout
    assert fb(volume.root, "delete", kept[5]).stdout.startswith("deleted 1 sample")
    assert fb(volume.root, "delete", "--older-than", "0").stdout.startswith("deleted 5 samples")
    assert samples.ids(volume) == [] and os.listdir(volume.feedback_dir) == []


@pytest.mark.parametrize("argv, code, fragment", [
    (("accept",), 2, "which samples"),
    (("accept", "abcdef", "--all"), 2, "which samples"),
    (("reject", "xyz"), 1, "not a sample id"),
    (("accept", "abcdef"), 1, "names no samples"),
    (("delete",), 2, "which samples"),
    (("stats", "abcdef"), 2, "takes no IDs"),
])
def test_bad_review_input_is_one_error_line(volume, argv, code, fragment):
    samples.add(volume, pixels(4), 1, 1, 1)
    assert_one_line_error(fb(volume.root, *argv), code, fragment)


def test_bad_days_are_a_usage_error(volume):
    result = fb(volume.root, "delete", "--older-than", "soon")
    assert result.returncode == 2 and "not a number of days" in result.stderr


# --- the page ------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("report")  # with the other browser tests (test_page): one Chromium
def test_the_page_sends_wrong_it_was_n_and_the_sample_waits_for_review(serve, trained_copy, browser):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    served = serve(trained_copy, "--feedback", "on")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the model")
    browser.get(served.url + "/")
    WebDriverWait(browser, 60).until(lambda b: "epoch" in b.find_element("id", "model").text)
    draw(browser, STROKES[7])
    WebDriverWait(browser, 30).until(lambda b: b.find_element("id", "feedback").is_displayed())
    browser.find_element("css selector", "#digits button[data-digit='2']").click()
    WebDriverWait(browser, 30).until(lambda b: "kept as 2" in b.find_element("id", "thanks").text)
    browser.save_screenshot(str(SCREENSHOTS / "page-feedback.png"))
    [sample] = list(samples.every(Volume(trained_copy)))
    assert (sample.label, sample.status) == (2, "pending")
    listed = fb(trained_copy)
    assert listed.returncode == 0 and sample.id[:12] in listed.stdout
