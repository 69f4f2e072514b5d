"""Accepted held-out feedback in evaluate, promotion, `mnist models` and the report (docs/feedback.md): scored
beside MNIST's test set, a gate for production, and nothing changes while there is none. 20- and 60-step trains."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, built_once, private_copy, run_here
from mnist_pipeline import data
from mnist_pipeline.model import predict
from mnist_pipeline.records import checkpoint, evaluation
from mnist_pipeline.records import feedback as samples
from mnist_pipeline.report import pictures
from mnist_pipeline.volume import Volume
from test_schemas import validator

POOL = 3000  # test images the samples are picked from


def ok(*args: str) -> subprocess.CompletedProcess:
    result = run_here(*args)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def pool(mirror) -> torch.Tensor:
    """The images feedback samples are made of: MNIST test images, as preprocess's output is MNIST-like."""
    return data.load_split(mirror, "test", None).images[:POOL]


def predictions_of(path: Path, images: torch.Tensor) -> torch.Tensor:
    """What the checkpoint at `path` reads in `images`, computed here (probabilities)."""
    return predict(checkpoint.read(path).build_model(), images, torch.device("cpu"))


def heldout_samples(images: torch.Tensor, labels: List[int], count: int) -> List[Tuple[bytes, int]]:
    """The first `count` (image, label) pairs whose id puts them in the held-out share."""
    chosen = []
    for image, label in zip(images, labels, strict=True):
        pixels = bytes(image.flatten().tolist())
        if samples.split_of(samples.sample_id(pixels, label)) == "heldout":
            chosen.append((pixels, label))
    assert len(chosen) >= count, "too few held-out samples in the pool"
    return chosen[:count]


def add(root: Path, pairs: List[Tuple[bytes, int]], status: str = "accepted") -> List[str]:
    volume = Volume(root)
    ids = []
    for pixels, label in pairs:
        sample = samples.add(volume, pixels, label, predicted=0, version=None)
        if status != "pending":
            samples.review(volume, sample.id, status)
        ids.append(sample.id)
    return ids


def eval_json(root: Path) -> dict:
    return json.loads((root / "model" / "eval_results.json").read_text())


def models(root: Path) -> Dict[int, dict]:
    return {row["version"]: row for row in json.loads(ok("models", "--root", str(root), "--json").stdout)}


def production(root: Path) -> int:
    return json.loads((root / "model" / "aliases" / "production.json").read_text())["version"]


# --- nothing accepted and held out: evaluate as before there was feedback ---------------------------------------

def test_without_accepted_held_out_feedback_evaluate_writes_what_it_wrote_before(short_trained_root, tmp_path, pool):
    """A feedback folder with pending and rejected held-out samples and accepted training ones changes nothing."""
    plain = private_copy(short_trained_root, tmp_path / "plain")
    other = private_copy(short_trained_root, tmp_path / "other")
    labels = [int(d) for d in data.load_split(short_trained_root / "data", "test", None).labels[:POOL]]
    add(other, heldout_samples(pool, labels, 4)[:2], "pending")
    add(other, heldout_samples(pool, labels, 4)[2:], "rejected")
    add(other, [pair for pair in zip((bytes(i.flatten().tolist()) for i in pool), labels, strict=True)
                if samples.split_of(samples.sample_id(*pair)) == "train"][:3])
    assert len(samples.accepted(Volume(other), "train")) == 3 and not samples.accepted(Volume(other), "heldout")
    for root in (plain, other):
        result = ok("evaluate", "--root", str(root), "--threshold", "0")
        assert "held-out feedback" not in result.stderr

    def same(path: Path) -> str:  # the file but for when it was written and how long that took
        return re.sub(r'"(compute_seconds|evaluated_at|created)": [^,\n]+', r'"\1": _', path.read_text())

    for name in ("model/eval_results.json", "model/versions/1/eval_results.json", "model/versions/1/version.json"):
        assert same(plain / name) == same(other / name), name
    assert eval_json(plain)["format_version"] == evaluation.WITHOUT_FEEDBACK and "feedback" not in eval_json(plain)
    assert json.loads((plain / "model/versions/1/version.json").read_text())["format_version"] == 1
    assert models(other)[1]["feedback"] is None
    assert not (other / "model" / "report" / "feedback_mistakes.png").exists()
    assert "held-out feedback" not in (other / "model" / "report" / "index.html").read_text().lower()


# --- scored, kept, listed and drawn -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tmp_path_factory, pool) -> Tuple[Path, List[str]]:
    """A 20-step version evaluated without feedback (1), then trained on to 40 steps and evaluated with 24
    accepted held-out samples of MNIST's own labels (2); the sample ids."""
    root = tmp_path_factory.mktemp("scored") / "volume"
    for args in (("train", "--max-steps", "20"), ("evaluate", "--threshold", "0"), ("train", "--max-steps", "20")):
        ok(*args, "--root", str(root))
    labels = [int(d) for d in data.load_split(root / "data", "test", None).labels[:POOL]]
    ids = add(root, heldout_samples(pool, labels, 24))
    ok("evaluate", "--root", str(root), "--threshold", "0")
    return root, ids


def test_evaluate_scores_the_accepted_held_out_feedback_as_the_model_reads_it(scored, pool):
    root, ids = scored
    record = eval_json(root)
    assert record["format_version"] == evaluation.FORMAT_VERSION == 3
    block = record["feedback"]
    heldout = samples.accepted(Volume(root), "heldout")
    assert block["digest"] == heldout.digest and block["total"] == len(ids) == 24
    images = torch.frombuffer(bytearray(heldout.pixels), dtype=torch.uint8).reshape(-1, 28, 28)
    probabilities = predictions_of(root / "model" / "mnist_cnn.pt", images)
    confidence, predicted = probabilities.max(dim=1)
    labels = torch.tensor(heldout.labels)
    right = int((predicted == labels).sum())
    assert (block["correct"], block["accuracy"]) == (right, right / 24)
    expected = [[0] * 10 for _ in range(10)]
    for label, guess in zip(labels.tolist(), predicted.tolist(), strict=True):
        expected[label][guess] += 1
    assert block["confusion_matrix"] == expected
    wrong = {heldout.ids[i]: (int(labels[i]), int(predicted[i])) for i in range(24) if predicted[i] != labels[i]}
    assert 0 < len(wrong) < 24, "the test needs some right and some wrong"
    assert {m["id"]: (m["label"], m["predicted"]) for m in block["mistakes"]} == wrong
    surest = [m["confidence"] for m in block["mistakes"]]
    assert surest == sorted(surest, reverse=True)
    # the version keeps its figures, and MNIST's own scores are as they were
    assert models(root)[2]["feedback"] == {k: block[k] for k in ("digest", "total", "correct", "accuracy")}
    assert record["total"] == 10_000 and record["correct"] == round(record["accuracy"] * 10_000)
    for schema, path in (("eval_results.schema.json", root / "model" / "eval_results.json"),
                         ("version.schema.json", root / "model" / "versions" / "2" / "version.json")):
        assert not list(validator(schema).iter_errors(json.loads(path.read_text()))), path


def test_a_changed_held_out_sample_is_one_error_naming_it_until_it_is_deleted(scored, tmp_path):
    root = private_copy(scored[0], tmp_path / "volume")
    changed = scored[1][5]
    (root / "feedback" / f"{changed}.png").write_bytes(samples.png_of(bytes(784)))
    result = run_here("evaluate", "--root", str(root), "--threshold", "0")
    assert_one_line_error(result, 1, f"feedback/{changed}.png", "mnist feedback delete")
    ok("feedback", "delete", changed[:12], "--root", str(root))
    result = ok("evaluate", "--root", str(root), "--threshold", "0")
    assert "; held-out feedback " in result.stdout and eval_json(root)["feedback"]["total"] == 23


def test_mnist_models_shows_both_accuracies(scored):
    root, _ = scored
    rows = {int(line.split()[0]): line for line in ok("models", "--root", str(root)).stdout.splitlines()[1:]}
    block = eval_json(root)["feedback"]
    assert re.search(r"^ +1 +1 +0\.\d{4} +- ", rows[1]), rows[1]  # evaluated before any feedback
    assert f"{block['accuracy']:.4f} of 24" in rows[2] and f"{models(root)[2]['accuracy']:.4f}" in rows[2]


def test_the_report_shows_the_held_out_feedback_and_draws_its_mistakes(scored, tmp_path):
    root = private_copy(scored[0], tmp_path / "volume")
    folder = root / "model" / "report"
    block = eval_json(root)["feedback"]
    page = (folder / "index.html").read_text()
    assert '<h2 id="held-out-feedback">Held-out feedback</h2>' in page
    assert f'held-out feedback accuracy<b>{block["accuracy"]:.2%}</b>' in page  # beside MNIST's headline figures
    assert f"{block['accuracy']:.2%}" in page and f"{block['correct']:,} / 24" in page
    assert '<img src="feedback_mistakes.png"' in page and '<img src="feedback_confusion.png"' in page
    assert f"{block['accuracy']:.2%} of 24</td>" in page  # the versions table, version 2
    with Image.open(folder / "feedback_mistakes.png") as grid:
        grid = grid.convert("L")
        for k, mistake in enumerate(block["mistakes"]):
            tile = grid.crop(pictures.mistake_digit_box(k)).resize((28, 28), Image.Resampling.NEAREST)
            assert tile.tobytes() == samples.image(Volume(root), samples.read(Volume(root), mistake["id"])), k
    with Image.open(folder / "feedback_confusion.png") as image:
        picture = image.convert("RGB")
        matrix = block["confusion_matrix"]
        for row in range(10):
            assert picture.crop(pictures.confusion_box(row, row)).tobytes() == \
                pictures.confusion_cell(matrix, row, row).tobytes()
    # a mistake deleted since is left out of the picture; `mnist report` still draws the rest
    samples.delete(Volume(root), block["mistakes"][0]["id"])
    ok("report", "--root", str(root))
    with Image.open(folder / "feedback_mistakes.png") as grid:
        tile = grid.convert("L").crop(pictures.mistake_digit_box(0)).resize((28, 28), Image.Resampling.NEAREST)
        second = block["mistakes"][1]["id"] if len(block["mistakes"]) > 1 else None
        if second:
            assert tile.tobytes() == samples.image(Volume(root), samples.read(Volume(root), second))


def test_a_format_2_evaluation_still_reads_in_the_report_and_the_registry(scored, tmp_path):
    root = private_copy(scored[0], tmp_path / "volume")
    older = root / "model" / "versions" / "1" / "eval_results.json"
    assert json.loads(older.read_text())["format_version"] == 2
    shutil.copy(older, root / "model" / "eval_results.json")
    ok("report", "--root", str(root))
    assert "Held-out feedback" not in (root / "model" / "report" / "index.html").read_text()
    assert not (root / "model" / "report" / "feedback_mistakes.png").exists()
    assert sorted(models(root)) == [1, 2]
    # each format read strictly: a format-2 file with a feedback block, a format-3 one without, are refused
    record = eval_json(scored[0])
    for change in ({"format_version": 2}, {"feedback": None}):
        broken = {**record, **change}
        if change.get("feedback", 0) is None:
            del broken["feedback"]
        (root / "model" / "eval_results.json").write_text(json.dumps(broken))
        result = run_here("report", "--root", str(root))
        assert result.returncode != 0 and "eval_results.json is not valid" in result.stderr, result.stderr


# --- promotion ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weak_then_strong(tmp_path_factory, worker_id) -> Path:
    """Version 1 (production): a 20-step checkpoint; then a fresh 60-step one, trained but not evaluated yet."""
    return built_once(tmp_path_factory, worker_id, "weak_then_strong", ("train", "--max-steps", "20"),
                      ("evaluate", "--threshold", "0"), ("train", "--fresh", "--max-steps", "60"))


def disagreeing(first: Path, second: Path, pool: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pool's images the two checkpoints read differently, with what each reads."""
    ours, theirs = (predictions_of(path, pool).argmax(dim=1) for path in (first, second))
    differ = (ours != theirs).nonzero().flatten()
    return pool[differ], ours[differ], theirs[differ]


def test_promotion_is_refused_when_the_new_version_reads_the_held_out_feedback_worse(weak_then_strong, tmp_path,
                                                                                    pool):
    root = private_copy(weak_then_strong, tmp_path / "volume")
    images, weak, strong = disagreeing(root / "model/versions/1/mnist_cnn.pt", root / "model/mnist_cnn.pt", pool)
    add(root, heldout_samples(images, weak.tolist(), 12))  # production (1) reads each right, the new one none
    result = ok("evaluate", "--root", str(root), "--threshold", "0")
    rows = models(root)
    assert rows[2]["accuracy"] > rows[1]["accuracy"], "the fixture's trains no longer order as planned"
    assert production(root) == 1
    assert "production stays at version 1: version 2 reads 0.0% of 12 held-out feedback samples, version 1 " \
           "100.0%" in result.stderr, result.stderr
    assert rows[2]["feedback"]["correct"] == 0


def test_promotion_goes_ahead_when_the_new_version_is_better_on_both(weak_then_strong, tmp_path, pool):
    root = private_copy(weak_then_strong, tmp_path / "volume")
    images, weak, strong = disagreeing(root / "model/versions/1/mnist_cnn.pt", root / "model/mnist_cnn.pt", pool)
    add(root, heldout_samples(images, strong.tolist(), 12))
    ok("evaluate", "--root", str(root), "--threshold", "0")
    assert production(root) == 2 and models(root)[2]["feedback"]["accuracy"] == 1.0


def test_a_production_checkpoint_that_does_not_load_leaves_the_rule_to_mnist_alone(weak_then_strong, tmp_path,
                                                                                   pool):
    root = private_copy(weak_then_strong, tmp_path / "volume")
    images, weak, strong = disagreeing(root / "model/versions/1/mnist_cnn.pt", root / "model/mnist_cnn.pt", pool)
    add(root, heldout_samples(images, weak.tolist(), 12))  # (would hold the new one back)
    kept = root / "model/versions/1/mnist_cnn.pt"
    damaged = bytearray(kept.read_bytes())
    damaged[-100] ^= 0xFF  # the same size: version 1 still lists, its checkpoint no longer hashes as kept
    kept.write_bytes(bytes(damaged))
    result = ok("evaluate", "--root", str(root), "--threshold", "0")
    assert "production's version 1 is not scored on the held-out feedback" in result.stderr, result.stderr
    assert production(root) == 2  # better on MNIST: today's rule


@pytest.fixture(scope="module")
def strong_then_weak(weak_then_strong, tmp_path_factory) -> Path:
    """weak_then_strong with the 60-step version evaluated (2, production, better on MNIST), then a fresh
    20-step checkpoint of another seed, not evaluated yet."""
    root = private_copy(weak_then_strong, tmp_path_factory.mktemp("strong_then_weak") / "volume")
    ok("evaluate", "--root", str(root), "--threshold", "0")
    ok("train", "--root", str(root), "--fresh", "--max-steps", "20", "--seed", "1")
    assert production(root) == 2
    return root


@pytest.mark.parametrize("margin, promoted", [(None, False), ("100", True)])
def test_promotion_is_refused_when_mnist_falls_by_more_than_the_margin(strong_then_weak, tmp_path, pool, margin,
                                                                       promoted):
    root = private_copy(strong_then_weak, tmp_path / "volume")
    images, weak, strong = disagreeing(root / "model/mnist_cnn.pt", root / "model/versions/2/mnist_cnn.pt", pool)
    add(root, heldout_samples(images, weak.tolist(), 12))  # the new one reads each right, production none
    env = {"MNIST_PROMOTE_MARGIN": margin} if margin else None
    result = run_here("evaluate", "--root", str(root), "--threshold", "0", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = models(root)
    assert rows[2]["accuracy"] - rows[3]["accuracy"] > 0.001, "the fixture's trains no longer order as planned"
    assert rows[3]["feedback"]["accuracy"] == 1.0
    assert production(root) == (3 if promoted else 2)
    if not promoted:
        assert (f"production stays at version 2: version 3 reads {rows[3]['accuracy']:.2%} of MNIST's test set, "
                f"more than 0.1 point below version 2's {rows[2]['accuracy']:.2%}") in result.stderr, result.stderr
