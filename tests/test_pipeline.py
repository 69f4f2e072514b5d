"""The whole pipeline on a temporary root, and each misuse a user can make of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from conftest import assert_one_line_error, run_here, run_mnist
from mnist_pipeline import data


def png_size_and_pixels(path: Path):
    """Decode a PNG with Pillow (independent of our encoder): its size and its 8-bit grey pixels."""
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L"
        return png.size, png.tobytes()


def test_full_run_writes_checkpoint_evaluation_and_five_named_images(trained_copy):
    model_dir = trained_copy / "model"
    state = torch.load(model_dir / "mnist_cnn.pt", weights_only=True)
    assert state["epoch"] == 1 and isinstance(state["model"], dict) and state["format_version"] == 2

    evaluation = json.loads((model_dir / "eval_results.json").read_text())
    assert evaluation["total"] == 10000 and evaluation["correct"] == round(evaluation["accuracy"] * 10000)
    assert evaluation["accuracy"] > 0.98, "one epoch must pass the 95% gate with a wide margin"
    assert len(evaluation["confusion_matrix"]) == 10 and sum(map(sum, evaluation["confusion_matrix"])) == 10000
    assert set(evaluation["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert evaluation["checkpoint"]["epoch"] == 1
    assert evaluation["checkpoint"]["sha256"] == hashlib.sha256((model_dir / "mnist_cnn.pt").read_bytes()).hexdigest()

    result = run_mnist("infer", "--root", str(trained_copy), "--seed", "3")
    assert result.returncode == 0, result.stderr
    results = trained_copy / "results"
    pngs = sorted(results.glob("*.png"))
    assert len(pngs) == 5 and sorted(p.name for p in results.iterdir()) == sorted(
        [p.name for p in pngs] + ["predictions.json"])
    predictions = json.loads((results / "predictions.json").read_text())["predictions"]
    test_images = data.load_split(trained_copy / "data", "test", None).images
    for entry in predictions:
        assert entry["file"].split(".")[0].split("_")[0] == str(entry["predicted"])
        size, pixels = png_size_and_pixels(results / entry["file"])
        assert size == (28, 28)
        assert pixels == bytes(test_images[entry["test_index"]].flatten().tolist())
    assert sum(e["predicted"] == e["label"] for e in predictions) >= 4


def test_infer_picks_anew_each_run_unless_seeded(trained_copy):
    def pick(*flags):
        assert run_here("infer", "--root", str(trained_copy), *flags).returncode == 0
        predictions = json.loads((trained_copy / "results" / "predictions.json").read_text())["predictions"]
        return [p["test_index"] for p in predictions]

    assert pick("--seed", "11") == pick("--seed", "11")
    assert len({tuple(pick()) for _ in range(3)}) > 1
    # a new pick replaces the folder: exactly the new images
    assert len(list((trained_copy / "results").glob("*.png"))) == 5


def test_infer_count_names_repeated_digits_apart(trained_copy):
    assert run_here("infer", "--root", str(trained_copy), "--count", "30", "--seed", "1").returncode == 0
    names = sorted(p.name for p in (trained_copy / "results").glob("*.png"))
    assert len(names) == 30 and any("_" in n for n in names)
    assert all(n[0].isdigit() for n in names)


def test_below_threshold_exits_3_and_keeps_previous_results(trained_copy):
    assert run_here("infer", "--root", str(trained_copy), "--seed", "5").returncode == 0
    before = {p.name: p.read_bytes() for p in (trained_copy / "results").iterdir()}
    result = run_here("infer", "--root", str(trained_copy), "--threshold", "0.9999")
    assert_one_line_error(result, 3, "not above the threshold 0.9999")
    assert {p.name: p.read_bytes() for p in (trained_copy / "results").iterdir()} == before


def test_evaluate_before_any_train(tmp_path):
    result = run_here("evaluate", "--root", str(tmp_path), "--wait", "0")
    assert_one_line_error(result, 1, "no checkpoint", "mnist train")


def test_infer_before_any_evaluate(trained_copy, tmp_path):
    (trained_copy / "model" / "eval_results.json").unlink()
    result = run_here("infer", "--root", str(trained_copy), "--wait", "0")
    assert_one_line_error(result, 1, "eval_results.json", "mnist evaluate")
    result = run_here("infer", "--root", str(tmp_path / "empty"), "--wait", "0")
    assert_one_line_error(result, 1, "mnist train")
    assert not (trained_copy / "results").exists()


def test_infer_refuses_an_evaluation_of_another_checkpoint(trained_copy):
    path = trained_copy / "model" / "eval_results.json"
    evaluation = json.loads(path.read_text())
    evaluation["checkpoint"]["sha256"] = "0" * 64
    path.write_text(json.dumps(evaluation))
    result = run_here("infer", "--root", str(trained_copy), "--wait", "0")
    assert_one_line_error(result, 1, "older checkpoint", "mnist evaluate")
    assert not (trained_copy / "results").exists()


def test_garbage_checkpoint_is_refused_and_left_untouched(trained_copy):
    checkpoint = trained_copy / "model" / "mnist_cnn.pt"
    garbage = b"this is not a checkpoint\n" * 40
    checkpoint.write_bytes(garbage)
    for stage in ("evaluate", "train", "infer"):
        result = run_here(stage, "--root", str(trained_copy), "--wait", "0") if stage != "train" else \
            run_here(stage, "--root", str(trained_copy))
        assert_one_line_error(result, 1, str(checkpoint), "--fresh")
        assert checkpoint.read_bytes() == garbage


def test_checkpoint_of_another_shape_is_refused(trained_copy):
    checkpoint = trained_copy / "model" / "mnist_cnn.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model_config"] = {**state["model_config"], "channels": [8, 8, 8]}
    torch.save(state, checkpoint)
    original = checkpoint.read_bytes()
    result = run_here("evaluate", "--root", str(trained_copy), "--wait", "0")
    assert_one_line_error(result, 1, "do not fit")
    state["format_version"] = 99
    torch.save(state, checkpoint)
    result = run_here("train", "--root", str(trained_copy))
    assert_one_line_error(result, 1, "format_version 99")
    assert checkpoint.read_bytes() != original and torch.load(checkpoint, weights_only=True)["format_version"] == 99


def test_fresh_moves_a_bad_checkpoint_aside_and_starts_over(trained_copy):
    checkpoint = trained_copy / "model" / "mnist_cnn.pt"
    checkpoint.write_bytes(b"garbage")
    result = run_here("train", "--root", str(trained_copy), "--fresh", "--max-steps", "5")
    assert result.returncode == 0, result.stderr
    aside = list((trained_copy / "model").glob("mnist_cnn.pt.*.aside"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"garbage"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
