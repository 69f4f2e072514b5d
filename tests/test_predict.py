"""`mnist predict IMAGE...`: the user's own images, the same gate as infer, one line per file."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from PIL import Image

from conftest import assert_one_line_error, run_here
from mnist_pipeline import data
from mnist_pipeline.data import png as png_grayscale


@pytest.fixture(scope="module")
def images(trained_root, mirror, tmp_path_factory):
    """Three MNIST test digits as files: a PNG, an inverted large JPEG, a BMP; with their labels."""
    folder = tmp_path_factory.mktemp("images")
    test_set = data.load_split(trained_root / "data", "test", str(mirror))
    files = []
    for index, kind in zip((0, 1, 2), ("png", "jpg", "bmp"), strict=True):
        image = Image.open(io.BytesIO(png_grayscale(test_set.images[index])))
        if kind != "png":
            image = Image.eval(image.resize((140, 140)), lambda v: 255 - v).convert("RGB")
        path = folder / f"digit{index}.{kind}"
        image.save(path)
        files.append((path, int(test_set.labels[index])))
    return files


def test_one_line_per_file_in_argument_order(trained_root, images):
    result = run_here("predict", "--root", str(trained_root), *[str(path) for path, _ in images])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(images)
    for line, (path, label) in zip(lines, images, strict=True):
        assert re.fullmatch(rf"{re.escape(str(path))}: {label} \((0\.\d{{3}}|1\.000)\)", line), line


def test_json_and_an_unreadable_file_among_good_ones(trained_root, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = [str(images[0][0]), str(broken), str(tmp_path / "missing.png"), str(images[1][0])]
    result = run_here("predict", "--root", str(trained_root), "--json", *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in errors if line.startswith(("error: " + args[1], "error: " + args[2]))]
    assert len(errors) == 2 and "missing.png: cannot read it" in errors[1]
    listed = json.loads(result.stdout)
    assert [entry["file"] for entry in listed] == args
    assert [entry.get("digit") for entry in listed] == [images[0][1], None, None, images[1][1]]
    assert len(listed[0]["probabilities"]) == 10 and listed[0]["confidence"] == max(listed[0]["probabilities"])


def test_gate_not_passed_exits_3_saying_what_to_run(trained_root, images, tmp_path):
    image = str(images[0][0])
    trained_copy = tmp_path / "volume"  # predict reads only model/: no copy of data/
    shutil.copytree(trained_root / "model", trained_copy / "model")
    result = run_here("predict", "--root", str(tmp_path / "empty"), image)
    assert_one_line_error(result, 3, "no checkpoint", "mnist train")
    result = run_here("predict", "--root", str(trained_copy), "--threshold", "0.9999", image)
    assert_one_line_error(result, 3, "not above the threshold 0.9999")
    # with no production version, predict falls back to the current checkpoint, which needs its evaluation
    (trained_copy / "model" / "aliases" / "production.json").unlink()
    (trained_copy / "model" / "eval_results.json").unlink()
    result = run_here("predict", "--root", str(trained_copy), image)
    assert_one_line_error(result, 3, "mnist evaluate")
    assert result.stdout == ""
