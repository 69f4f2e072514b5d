"""The evaluation report (model/report/) and the training history it draws from."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, litter, private_copy, run_here, run_mnist
from test_page import SCREENSHOTS, browser  # noqa: F401 (a fixture: a test's parameter)
from test_safety import tmpfs
from mnist_pipeline import cli, data, report
from mnist_pipeline.evaluate import MISTAKES_KEPT
from mnist_pipeline.records import checkpoint, history
from mnist_pipeline.report import pictures
from mnist_pipeline.model import predict
from mnist_pipeline.volume import Volume

# one pytest-xdist worker runs them all (pyproject's addopts): `reported` is built once, and the browser tests
# of test_page and test_serve_hostile join them, so that one Chromium starts
pytestmark = pytest.mark.xdist_group("report")

STEPS_PER_EPOCH = 35
STEPS = ("--max-steps", str(STEPS_PER_EPOCH))  # a real curve in seconds
POINTS = [*range(history.EVERY, STEPS_PER_EPOCH + 1, history.EVERY)] + (
    [STEPS_PER_EPOCH] if STEPS_PER_EPOCH % history.EVERY else [])  # each epoch's points, at these steps


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mirror) -> Path:
    """A root after train, evaluate, train (resumed), evaluate, infer, report (shared: copy to change)."""
    root = tmp_path_factory.mktemp("reported") / "volume"
    for args in (("train", *STEPS), ("evaluate",), ("train", *STEPS), ("evaluate",),
                 ("infer", "--threshold", "0", "--seed", "1"), ("report",)):
        result = run_here(*args, "--root", str(root))
        assert result.returncode == 0, (args, result.stderr[-3000:])
    return root


@pytest.fixture
def reported_copy(reported, tmp_path) -> Path:
    return private_copy(reported, tmp_path / "volume")


def evaluation_of(root: Path) -> dict:
    return json.loads((root / "model" / "eval_results.json").read_text())


def train_records(root: Path) -> list:
    return [r for r in history.read(Volume(root)) if isinstance(r, history.TRAIN_KINDS)]


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_every_report_file_exists_decodes_and_references_only_its_own_files(reported):
    folder = reported / "model" / "report"
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.FILES)
    for name in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert ET.parse(folder / "training.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    page = (folder / "index.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert f'<meta name="mnist-report-format" content="{report.FORMAT_VERSION}">' in page
    parser = _References()
    parser.feed(page)
    urls = [u for u in parser.urls if u != "data:,"]  # the empty favicon: no request for /favicon.ico
    files = [u for u in urls if not u.startswith("data:image/png;base64,")]
    assert sorted(files) == sorted(["confusion_matrix.png", "mistakes.png", "confusion_matrix.png",
                                    "mistakes.png", "training.svg"])
    assert all((folder / f).is_file() for f in files)
    # the infer images come inline, one per results/ PNG; results/ keeps exactly infer's files
    results = reported / "results"
    pngs = sorted(p.name for p in results.glob("*.png"))
    assert len(pngs) == 5 and sorted(p.name for p in results.iterdir()) == pngs + ["predictions.json"]
    assert len(urls) - len(files) == 5
    evaluation = evaluation_of(reported)
    assert f"{evaluation['accuracy']:.2%}" in page and evaluation["checkpoint"]["sha256"] in page


def test_confusion_matrix_picture_shows_the_counts_of_eval_results(reported):
    matrix = evaluation_of(reported)["confusion_matrix"]
    assert sum(map(sum, matrix)) == 10000
    with Image.open(reported / "model" / "report" / "confusion_matrix.png") as picture:
        picture = picture.convert("RGB")
        for row in range(10):
            for column in range(10):
                drawn = picture.crop(pictures.confusion_box(row, column))
                expected = pictures.confusion_cell(matrix, row, column)
                assert drawn.tobytes() == expected.tobytes(), f"cell true {row}, predicted {column}"
    # the cells differ with their numbers (the check above is not blind)
    assert pictures.confusion_cell(matrix, 0, 0).tobytes() != pictures.confusion_cell(
        [[c + (r == 0) for c in row] for r, row in enumerate(matrix)], 0, 0).tobytes()


def test_mistakes_grid_shows_the_most_confident_mistakes_first(reported):
    model = checkpoint.read(reported / "model" / "mnist_cnn.pt").build_model()
    test_set = data.load_split(reported / "data", "test", None)
    evaluation = evaluation_of(reported)  # recomputed on the device evaluate used: the same kernels, the same sums
    probabilities = predict(model.to(evaluation["device"]), test_set.images, torch.device(evaluation["device"]))
    confidence, predicted = probabilities.max(dim=1)
    wrong = set((predicted != test_set.labels).nonzero().flatten().tolist())
    mistakes = evaluation["mistakes"]
    assert len(wrong) > MISTAKES_KEPT, "the test needs more mistakes than the grid shows"
    assert len(mistakes) == MISTAKES_KEPT
    shown = [m["test_index"] for m in mistakes]
    assert set(shown) <= wrong and len(set(shown)) == len(shown)
    for m in mistakes:
        assert (m["label"], m["predicted"]) == (int(test_set.labels[m["test_index"]]), int(predicted[m["test_index"]]))
    ours = [float(confidence[i]) for i in shown]
    assert all(a >= b - 1e-5 for a, b in zip(ours, ours[1:], strict=False)), "most confident first"
    assert max(float(confidence[i]) for i in wrong - set(shown)) <= ours[-1] + 1e-5, "the most confident ones"
    with Image.open(reported / "model" / "report" / "mistakes.png") as grid:
        grid = grid.convert("L")
        rows = -(-len(mistakes) // pictures.COLUMNS)
        assert grid.height < pictures.GRID_ORIGIN[1] + (rows + 1) * pictures.TILE[1]
        for k, index in enumerate(shown):
            tile = grid.crop(pictures.mistake_digit_box(k)).resize((28, 28), Image.Resampling.NEAREST)
            assert tile.tobytes() == bytes(test_set.images[index].flatten().tolist()), f"tile {k}"


def test_history_holds_both_epochs_without_gaps_or_duplicates(reported):
    records = history.read(Volume(reported))
    steps = [(r.epoch, r.step) for r in records if isinstance(r, history.Point)]
    assert steps == [(e, s) for e in (1, 2) for s in POINTS]
    assert all(r.loss > 0 and r.lr >= 0 for r in records if isinstance(r, history.Point))
    epochs = [(r.epoch, r.steps) for r in records if isinstance(r, history.EpochEnd)]
    assert epochs == [(1, STEPS_PER_EPOCH), (2, STEPS_PER_EPOCH)]
    evaluations = [r for r in records if isinstance(r, history.Scores)]
    assert [r.epoch for r in evaluations] == [1, 2]
    evaluation = evaluation_of(reported)
    assert evaluations[1].accuracy == evaluation["accuracy"]
    assert evaluations[1].sha256 == evaluation["checkpoint"]["sha256"]
    assert not [r for r in records if isinstance(r, history.Window)], "nothing pending after a finished epoch"


def test_an_epoch_stopped_by_sigterm_and_finished_later_gives_the_same_history(reported, tmp_path):
    root = str(private_copy(reported / "data", tmp_path / "volume" / "data").parent)  # the data, not the rest
    stopped = run_here("train", "--root", root, "--epochs", "2", *STEPS, env={"MNIST_FAULT": "sigterm-at-step:17"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    partial = history.read(Volume(tmp_path / "volume"))
    assert [(r.kind, r.step) for r in partial] == [("step", 10), ("window", 17)]
    resumed = run_here("train", "--root", root, "--epochs", "2", *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # bit-exact resume: the same points as train + train (resumed) in one go, float for float
    assert train_records(tmp_path / "volume") == train_records(reported)


@pytest.mark.parametrize("fault, flags", [
    ("sigkill-at-step:17", ("--save-every", "0.001")),  # resumes from the progress of step 16, mid-point
    ("checkpoint-before-rename", ()),  # the history already has epoch 1, the checkpoint not yet
])
def test_a_kill_9_leaves_a_history_that_resumes_exactly(reported, tmp_path, fault, flags):
    root = str(private_copy(reported / "data", tmp_path / "volume" / "data").parent)  # the data, not the rest
    killed = run_mnist("train", "--root", root, "--epochs", "2", *STEPS, *flags, env={"MNIST_FAULT": fault})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_here("train", "--root", root, "--epochs", "2", *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_records(tmp_path / "volume") == train_records(reported)


def test_fresh_moves_the_history_aside_and_starts_a_new_one(reported_copy):
    old = (reported_copy / "model" / "history.jsonl").read_bytes()
    result = run_here("train", "--root", str(reported_copy), "--fresh", *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    aside = list((reported_copy / "model").glob("history.jsonl.*.aside"))
    assert len(aside) == 1 and aside[0].read_bytes() == old
    records = history.read(Volume(reported_copy))
    assert [(r.kind, r.epoch) for r in records] == [("step", 1)] * len(POINTS) + [("epoch", 1)]


def test_report_rebuilds_the_whole_folder_and_leaves_results_alone(reported_copy):
    folder = reported_copy / "model" / "report"
    (folder / "stale.txt").write_text("from an older report")
    results = {p.name: p.read_bytes() for p in (reported_copy / "results").iterdir()}
    result = run_here("report", "--root", str(reported_copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {folder / 'index.html'}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.FILES)
    assert {p.name: p.read_bytes() for p in (reported_copy / "results").iterdir()} == results


def test_report_before_any_evaluate_or_from_an_older_one_is_a_one_line_error(tmp_path):
    result = run_here("report", "--root", str(tmp_path))
    assert_one_line_error(result, 1, "eval_results.json", "mnist evaluate")
    assert not (tmp_path / "model" / "report").exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "eval_results.json").write_text('{"accuracy": 0.99}')  # an earlier version's, say
    result = run_here("report", "--root", str(tmp_path))
    assert_one_line_error(result, 1, "eval_results.json", "has no 'total'", "mnist evaluate")


def test_a_failing_report_is_an_error_that_keeps_eval_results(reported_copy, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = reported_copy / "model" / "report"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(report, "training_svg", full_disk)
    code = cli.main(["evaluate", "--root", str(reported_copy), "--grace", "0"], env={})  # no train is starting
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1
    assert "eval_results.json is written, but not the report" in errors[0] and "No space left" in errors[0]
    assert "mnist report" in errors[0]
    evaluation = evaluation_of(reported_copy)
    sha = hashlib.sha256((reported_copy / "model" / "mnist_cnn.pt").read_bytes()).hexdigest()
    assert evaluation["checkpoint"]["sha256"] == sha and evaluation["total"] == 10000
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the previous report stays whole"
    # evaluating the same checkpoint again replaced its test scores in the history, not added them
    epochs = [r.epoch for r in history.read(Volume(reported_copy)) if isinstance(r, history.Scores)]
    assert epochs == [1, 2]


def test_a_full_disk_fails_the_report_but_not_eval_results(reported, tmp_path):
    root = tmp_path / "volume"
    private_copy(reported / "data", root / "data")
    with tmpfs(root / "model", "1m") as model:
        for name in ("mnist_cnn.pt", "history.jsonl"):
            shutil.copy(reported / "model" / name, model / name)
        # room for eval_results.json and the history (a few kB each), not for the pictures
        (model / "filler").write_bytes(b"\0" * (shutil.disk_usage(model).free - 40_000))
        result = run_here("evaluate", "--root", str(root))
        assert_one_line_error(result, 1, "eval_results.json is written, but not the report", "No space left",
                              "mnist report")
        assert evaluation_of(root)["confusion_matrix"] == evaluation_of(reported)["confusion_matrix"]
        assert not (model / "report").exists() and not litter(root)
        (model / "filler").unlink()
        assert run_here("report", "--root", str(root)).returncode == 0  # once there is room
        assert sorted(p.name for p in (model / "report").iterdir()) == sorted(report.FILES)


def test_history_skips_unreadable_or_incomplete_lines(tmp_path, caplog):
    volume = Volume(tmp_path)
    volume.model_dir.mkdir()
    volume.history.write_text('{"kind":"step","epoch":1,"step":10,"loss":1.0,"lr":0.1}\n{"kind": "st\n'
                              '{"kind":"step","epoch":1,"step":20}\n{"kind":"eval","epoch":1,"accuracy":"high"}\n')
    assert history.read(volume) == [history.Point(epoch=1, step=10, loss=1.0, lr=0.1)]
    assert "skipped 3 unreadable line" in caplog.text


def assert_the_page_shows_every_image(browser, url: str, screenshot: str) -> None:
    """Every image loaded, the chart drawn, no console error; a screenshot of the whole page for people."""
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(url)
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.execute_script("return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) == 2 + 5 and all(done and width > 0 for _, done, width in images), images
    # the chart is drawn: each of its points takes room on the page and says what it shows when hovered
    points = browser.execute_script("return [...document.querySelectorAll('svg circle')]"
                                    ".map(c => [c.getBoundingClientRect().width, c.textContent])")
    assert points and all(width > 0 and "train loss" in text for width, text in points), points[:3]
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1100, height + 150)
    browser.save_screenshot(str(SCREENSHOTS / screenshot))
    browser.set_window_size(1000, 1000)


def test_the_report_opens_in_a_browser_with_every_image_loaded(reported, browser):
    assert_the_page_shows_every_image(browser, (reported / "model" / "report" / "index.html").as_uri(), "report.png")


def test_serve_shows_the_report_at_slash_report(reported, browser, serve):
    served = serve(reported)
    assert_the_page_shows_every_image(browser, served.url + "/report", "report-served.png")


def test_history_summary_places_each_epoch_after_the_steps_of_the_earlier_ones():
    records = [
        history.Point(epoch=1, step=10, loss=2.0, lr=0.1),
        history.Point(epoch=1, step=25, loss=1.0, lr=0.0),
        history.EpochEnd(epoch=1, steps=25, train_loss=1.5),
        history.Scores(epoch=1, accuracy=0.9, test_loss=0.3, sha256="a" * 64),
        history.Point(epoch=2, step=10, loss=0.5, lr=0.05),  # an epoch still running
    ]
    summary = history.summary(records)
    assert [p.x for p in summary.points] == [10, 25, 35]
    assert [(e.end.epoch, e.x, e.scores.accuracy) for e in summary.epochs] == [(1, 25, 0.9)]


def test_pipeline_ends_with_a_report_that_shows_its_infer_images(tmp_path):
    result = run_here("pipeline", "--root", str(tmp_path), *STEPS, "--threshold", "0", "--seed", "2",
                      "--export", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    # the report's line, then the export's (onnxruntime is installed here)
    assert result.stdout.splitlines()[-2] == f"report: {tmp_path / 'model' / 'report' / 'index.html'}"
    assert result.stdout.splitlines()[-1].startswith("export: version 1 -> ")
    page = (tmp_path / "model" / "report" / "index.html").read_text()
    files = [p["file"] for p in json.loads((tmp_path / "results" / "predictions.json").read_text())["predictions"]]
    assert all(f'alt="results/{name}"' in page for name in files) and "older checkpoint" not in page


def test_a_broken_results_folder_is_left_out_of_the_report(reported_copy):
    predictions = reported_copy / "results" / "predictions.json"
    summary = json.loads(predictions.read_text())
    summary["predictions"][0]["file"] = "../model/mnist_cnn.pt"  # never read outside results/
    predictions.write_text(json.dumps(summary))
    result = run_here("report", "--root", str(reported_copy))
    assert result.returncode == 0, result.stderr
    assert "leaves out results/" in result.stderr and "is not a name infer gives" in result.stderr
    page = (reported_copy / "model" / "report" / "index.html").read_text()
    assert "data:image" not in page and "No infer results yet" in page
