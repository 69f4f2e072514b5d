"""Versions and aliases as a user meets them: evaluate keeps each new checkpoint, `mnist models`, promote,
rollback and prune, serve following an alias or pinned to a version. 20- and 60-step trains."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from conftest import (assert_one_line_error, built_once, litter, private_copy, read_until, run_here, run_mnist,
                      start_mnist, wait_until)
from mnist_pipeline import data
from mnist_pipeline.data import png as png_grayscale

PNG = {"Content-Type": "image/png"}


def ok(*args: str) -> str:
    result = run_here(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def listed(root: Path) -> list:
    return json.loads(ok("models", "--root", str(root), "--json"))


def production(root: Path):
    return next((row["version"] for row in listed(root) if "production" in row["aliases"]), None)


@pytest.fixture(scope="session")
def three_versions(tmp_path_factory, worker_id) -> Path:
    """Version 1: a 20-step checkpoint; 2: a fresh one with a learning rate too small to learn (worse);
    3: a fresh 60-step one (better). Evaluated with --threshold 0, so the accuracy alone decides, and exported,
    so serve's runtime auto answers from ONNX."""
    evaluate = ("evaluate", "--threshold", "0", "--export", "auto")
    return built_once(tmp_path_factory, worker_id, "versions", ("train", "--max-steps", "20"), evaluate,
                      ("train", "--fresh", "--max-steps", "20", "--lr", "0.0001"), evaluate,
                      ("train", "--fresh", "--max-steps", "60"), evaluate)


@pytest.fixture
def versions_copy(three_versions, tmp_path) -> Path:
    return private_copy(three_versions, tmp_path / "volume")


def test_each_new_checkpoint_is_a_version_and_production_moves_only_to_a_better_one(versions_copy):
    root = versions_copy
    rows = listed(root)
    assert [row["version"] for row in rows] == [1, 2, 3]
    first, worse, better = (row["accuracy"] for row in rows)
    assert worse < first < better, "the fixture's trains no longer order as planned"
    moves = [json.loads(line) for line in (root / "model" / "aliases" / "log.jsonl").read_text().splitlines()]
    assert [(m["from"], m["to"], m["reason"]) for m in moves] == [(None, 1, "auto-promotion"), (1, 3, "auto-promotion")]
    assert production(root) == 3
    # the graded files are untouched in meaning: the last checkpoint and its own evaluation
    checkpoint = (root / "model" / "mnist_cnn.pt").read_bytes()
    assert (root / "model" / "versions" / "3" / "mnist_cnn.pt").read_bytes() == checkpoint
    evaluation = json.loads((root / "model" / "eval_results.json").read_text())
    assert evaluation["checkpoint"]["sha256"] == hashlib.sha256(checkpoint).hexdigest() == rows[2]["sha256"]
    # the same checkpoint scored again is no new version
    result = run_here("evaluate", "--root", str(root), "--threshold", "0")
    assert result.returncode == 0 and "is a version already" in result.stderr
    assert [row["version"] for row in listed(root)] == [1, 2, 3]
    table = ok("models", "--root", str(root))
    assert "production" in table.splitlines()[-1] and table.splitlines()[-1].split()[0] == "3"
    report = (root / "model" / "report" / "index.html").read_text()
    assert f"<td>3</td><td>1</td><td>{better:.2%}</td>" in report and "<td>production</td>" in report
    assert "auto-promotion" in report


def test_a_worse_version_leaves_production_and_never_promotes_is_obeyed(versions_copy):
    root = versions_copy
    ok("train", "--root", str(root), "--fresh", "--max-steps", "20", "--lr", "0.0001", "--seed", "1")
    ok("evaluate", "--root", str(root), "--threshold", "0")
    assert [row["version"] for row in listed(root)] == [1, 2, 3, 4] and production(root) == 3
    ok("promote", "4", "--root", str(root))  # the worst one: --promote auto would replace it with any trained one
    ok("train", "--root", str(root), "--fresh", "--max-steps", "60", "--seed", "2")
    ok("evaluate", "--root", str(root), "--threshold", "0", "--promote", "never")
    rows = listed(root)
    assert len(rows) == 5 and rows[4]["accuracy"] > rows[3]["accuracy"], "version 5 is not better than production"
    assert production(root) == 4


def test_promote_and_rollback_walk_the_alias_log(versions_copy):
    root = str(versions_copy)
    assert "production: version 3 -> 2" in ok("promote", "2", "--root", root)
    assert "already" in ok("promote", "2", "--root", root)
    assert "production: version 2 -> 3 (rolled back)" in ok("rollback", "--root", root)
    assert "production: version 3 -> 1 (rolled back)" in ok("rollback", "--root", root)
    assert production(versions_copy) == 1
    assert_one_line_error(run_here("rollback", "--root", root), 1, "no previous version")
    ok("promote", "2", "--root", root, "--alias", "staging")
    rows = {row["version"]: row["aliases"] for row in listed(versions_copy)}
    assert rows == {1: ["production"], 2: ["staging"], 3: []}
    log = ok("models", "log", "--root", root)
    assert [line.split("(")[-1].rstrip(")") for line in log.splitlines()] == [
        "auto-promotion", "auto-promotion", "promote", "rollback", "rollback", "promote"]


@pytest.mark.parametrize("argv, code, fragment", [
    (["promote", "9"], 1, "no version 9"),
    (["promote"], 2, "which version"),
    (["promote", "two"], 2, "not a version number"),
    (["promote", "1", "--alias", "a/b"], 2, "not an alias name"),
    (["rollback", "--alias", "staging"], 1, "not set"),
    (["models", "prune", "--keep", "0"], 2, "--keep"),
    (["models", "prune", "--keep", "-1"], 2, "--keep"),
    (["serve", "--model", "../x"], 2, "--model"),
])
def test_bad_input_is_one_error_line(versions_copy, argv, code, fragment):
    result = run_here(*argv, "--root", str(versions_copy))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
    assert fragment in result.stderr
    assert production(versions_copy) == 3


def test_prune_never_removes_a_version_an_alias_points_to(versions_copy):
    root = str(versions_copy)
    ok("promote", "1", "--root", root)  # the oldest is production
    assert "removed versions 2" in ok("models", "prune", "--keep", "1", "--root", root)
    assert [row["version"] for row in listed(versions_copy)] == [1, 3]
    assert "nothing to remove" in ok("models", "prune", "--keep", "1", "--root", root)
    assert litter(versions_copy) == []


def test_a_corrupt_version_is_listed_as_corrupt_and_never_served(versions_copy, tmp_path):
    root = str(versions_copy)
    broken = versions_copy / "model" / "versions" / "2" / "mnist_cnn.pt"
    broken.write_bytes(broken.read_bytes()[:1000])
    result = run_here("models", "--root", root)
    assert result.returncode == 0 and "2  corrupt: version 2" in result.stdout
    assert "skipping a corrupt version" in result.stderr
    assert_one_line_error(run_here("promote", "2", "--root", root), 1, "version 2")
    assert_one_line_error(run_here("predict", "--root", root, "--model", "2", "--threshold", "0", str(broken)),
                          1, "version 2")
    assert production(versions_copy) == 3
    (versions_copy / "model" / "versions" / "1" / "eval_results.json").write_text("{}")  # which file is wrong
    assert "1  corrupt: version 1: " in (listing := run_here("models", "--root", root).stdout), listing
    assert "versions/1/eval_results.json is not valid: it has no 'total'" in listing


def test_kill_9_at_registration_leaves_no_partial_version(short_trained_copy):
    root = short_trained_copy
    killed = run_mnist("evaluate", "--root", str(root), env={"MNIST_FAULT": "version-before-rename"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (root / "model" / "versions" / "1").exists() and listed(root) == []
    ok("evaluate", "--root", str(root), "--threshold", "0")
    assert [row["version"] for row in listed(root)] == [1] and production(root) == 1
    assert litter(root) == []


def test_two_evaluates_at_once_get_distinct_numbers(short_trained_copy, tmp_path):
    root = short_trained_copy
    release = tmp_path / "release"
    first = start_mnist("evaluate", "--root", str(root), env={"MNIST_FAULT": f"hold:version-before-rename:{release}"})
    try:
        wait_until(lambda: Path(f"{release}.held").exists() or first.poll() is not None, "the first evaluate to hold")
        assert first.poll() is None, first.stderr.read()[-2000:]
        ok("train", "--root", str(root))  # a second checkpoint (epoch 2) while the first holds its number
        second = start_mnist("evaluate", "--root", str(root))
        read_until(second, "waiting for another process")
        release.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
        assert second.wait(timeout=300) == 0, second.stderr.read()[-2000:]
    finally:
        release.touch()
    rows = listed(root)
    assert [(row["version"], row["epoch"]) for row in rows] == [(1, 1), (2, 2)]
    assert rows[0]["sha256"] != rows[1]["sha256"] and litter(root) == []


@pytest.fixture(scope="module")
def digit(mirror, tmp_path_factory) -> bytes:
    test_set = data.load_split(tmp_path_factory.mktemp("data"), "test", str(mirror))
    return png_grayscale(test_set.images[0])


def test_serve_follows_promote_and_rollback_without_a_failed_request_and_a_pinned_one_stays(
        serve, versions_copy, digit):
    root = versions_copy
    followed = serve(root, "--threshold", "0")
    pinned = serve(root, "--threshold", "0", "--model", "2")
    for served, version in ((followed, 3), (pinned, 2)):
        wait_until(lambda s=served, v=version: s.json("GET", "/readyz")[1].get("checkpoint", {}).get("version") == v,
                   f"version {version} to serve")
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, headers, body = followed.request("POST", "/predict", digit, PNG)
            version = json.loads(body).get("checkpoint", {}).get("version")
            answers.append((status, version, headers.get("x-model-version")))
            stop.wait(0.005)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        ok("promote", "1", "--root", str(root))
        wait_until(lambda: answers and answers[-1][1] == 1, "answers from version 1")
        ok("rollback", "--root", str(root))
        wait_until(lambda: answers and answers[-1][1] == 3, "answers from version 3 again")
    finally:
        stop.set()
        thread.join()
    assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:3]
    assert all(header == str(version) for _, version, header in answers)
    served = [version for _, version, _ in answers]
    assert served[0] == 3 and 1 in served and served[-1] == 3
    # the pinned server ignored both moves
    status, body = pinned.json("GET", "/readyz")
    assert status == 200 and body["checkpoint"]["version"] == 2 and body["model"] == 2
    status, headers, _ = pinned.request("POST", "/predict", digit, PNG)
    assert status == 200 and headers["x-model-version"] == "2"


def test_serve_lists_versions_and_answers_with_a_kept_one(serve, versions_copy, digit):
    served = serve(versions_copy, "--threshold", "0")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load production")
    status, body = served.json("GET", "/models")
    assert status == 200 and body["serving"] == 3 and body["aliases"] == {"production": 3}
    assert [row["version"] for row in body["versions"]] == [1, 2, 3]
    for version in (1, 2, 1):
        status, headers, answer = served.request("POST", f"/predict?version={version}", digit, PNG)
        assert status == 200 and headers["x-model-version"] == str(version)
        assert json.loads(answer)["checkpoint"]["version"] == version
    for query, code in (("version=99", 404), ("version=x", 400), ("version=0", 400)):
        status, body = served.json("POST", f"/predict?{query}", digit, PNG)
        assert status == code and "error" in body, (query, body)
    status, headers, metrics = served.request("GET", "/metrics")
    assert re.search(r'^mnist_model_version\{pid="\d+"\} 3\.0$', metrics.decode(), re.MULTILINE)


def test_predict_uses_production_or_the_version_asked(versions_copy, tmp_path, digit):
    image = tmp_path / "seven.png"
    image.write_bytes(digit)
    root = str(versions_copy)
    assert ok("predict", "--root", root, "--threshold", "0", str(image)).startswith(str(image))
    shutil.rmtree(versions_copy / "model" / "versions" / "3")  # production's version gone: said, not guessed
    assert_one_line_error(run_here("predict", "--root", root, "--threshold", "0", str(image)), 1, "no version 3")
    assert ok("predict", "--root", root, "--threshold", "0", "--model", "1", str(image)).startswith(str(image))
