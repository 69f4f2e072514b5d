"""Paths that are not files, or not what they claim: a FIFO, a device, a huge sparse file, a name that is
not UTF-8. Each is one `error:` line or a reason in /readyz, never a hang, a traceback or a read of gigabytes."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import assert_one_line_error, private_copy, run_here, run_mnist, wait_until


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_predict_refuses_a_fifo_a_device_and_a_huge_file_without_reading_them(trained_root, fifo, tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(2 << 30)  # 2 GB, sparse: reading it whole is what must not happen
    result = run_here("predict", "--root", str(trained_root), str(fifo), "/dev/zero", str(huge))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {fifo}: it is a FIFO (named pipe), not a regular file",
                      "error: /dev/zero: it is a character device, not a regular file",
                      f"error: {huge}: it is larger than 67,108,864 bytes, more than any image this program reads"]


@pytest.mark.parametrize("where", ["model/mnist_cnn.pt", "data/t10k-images-idx3-ubyte"])
def test_evaluate_on_a_fifo_is_one_error_line_not_a_hang(where, trained_root, tmp_path):
    root = private_copy(trained_root, tmp_path / "volume")
    (root / where).unlink()
    os.mkfifo(root / where)
    result = run_here("evaluate", "--root", str(root), "--wait", "0")
    assert_one_line_error(result, 1, where, "FIFO")


def test_predict_prints_a_name_that_is_not_utf8_with_escapes(trained_root, tmp_path):
    name = os.fsdecode(b"digit-\xff.png")  # a byte that is not UTF-8: a surrogate in Python's str
    image = tmp_path / name
    shutil.copy(trained_root / "model" / "report" / "confusion_matrix.png", image)
    # (a new interpreter: the encoding is chosen at its start)
    result = run_mnist("predict", "--root", str(trained_root), str(image), env={"PYTHONIOENCODING": "utf-8"},
                       fresh=True)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith(f"{tmp_path}/digit-\\xff.png: ")


def test_serve_says_why_a_fifo_in_place_of_the_checkpoint_is_not_served_and_goes_on_following(
        serve, trained_root, tmp_path):
    root = tmp_path / "volume"
    (root / "model").mkdir(parents=True)  # a volume from before versions: serve reads model/mnist_cnn.pt itself
    for name in ("mnist_cnn.pt", "eval_results.json"):
        shutil.copy(trained_root / "model" / name, root / "model" / name)
    good = root / "model" / "good.pt"
    os.replace(root / "model" / "mnist_cnn.pt", good)
    os.mkfifo(root / "model" / "mnist_cnn.pt")
    served = serve(root)
    status, body = wait_until(lambda: (lambda r: r if "FIFO" in r[1].get("error", "") else None)(
        served.json("GET", "/readyz")), "/readyz to name the FIFO")
    assert status == 503 and "not a regular file" in body["error"]
    os.replace(good, root / "model" / "mnist_cnn.pt")  # the watcher was not blocked: it picks this up
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the real checkpoint to be served")


def test_infer_moves_a_users_files_out_of_results_and_never_deletes_them(trained_root, tmp_path):
    root = private_copy(trained_root, tmp_path / "volume")
    results = root / "results"
    (results / "notes").mkdir(parents=True)
    (results / "notes.txt").write_text("mine")
    (results / "notes" / "more.txt").write_text("also mine")
    (results / "7.png").write_bytes(b"an earlier infer's")  # infer's own kind of name: replaced
    result = run_here("infer", "--root", str(root), "--threshold", "0", "--wait", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moved notes, notes.txt out of results" in result.stderr
    names = sorted(p.name for p in results.iterdir())
    assert len(names) == 6 and names[-1] == "predictions.json" and all(n.endswith(".png") for n in names[:-1])
    (aside,) = root.glob("results.*.aside")
    assert (aside / "notes.txt").read_text() == "mine" and (aside / "notes" / "more.txt").read_text() == "also mine"
