"""The volume's files as records: strict reads, the formats users' volumes hold, one error line for a bad file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, private_copy, run_here
from mnist_pipeline import model
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import aliases, checkpoint, evaluation, history, predictions, versions
from mnist_pipeline.report import chart
from mnist_pipeline.volume import Volume


def write_evaluation(root: Path, sha256: str, epoch: int, accuracy: float = 0.99) -> None:
    """A valid evaluation naming that checkpoint: `accuracy` of 10,000 images right (wrong ones taken for 1)."""
    correct = round(accuracy * 10_000)
    matrix = tuple((correct, 10_000 - correct, *[0] * 8) if row == 0 else (0,) * 10 for row in range(10))
    evaluation.write(Volume(root), evaluation.Evaluation(
        accuracy=correct / 10_000, test_loss=0.1, correct=correct, total=10_000,
        per_class_accuracy=(correct / 10_000,) + (0.0,) * 9,  # (a digit with no images: 0, as evaluate says)
        confusion_matrix=matrix, mistakes=(), sha256=sha256, epoch=epoch, compute_seconds=0.0, device="cpu",
        evaluated_at="2026-12-04T00:00:00+0000"))


FORMAT1 = Path(__file__).parent / "fixtures" / "format1"


@pytest.fixture
def format1(tmp_path) -> Volume:
    """A volume holding the files as 0.1.0 wrote them (tests/fixtures/format1/README.md)."""
    volume = Volume(tmp_path / "volume")
    volume.model_dir.mkdir(parents=True)
    volume.results_dir.mkdir()
    for name in ("mnist_cnn.pt", "eval_results.json", "history.jsonl"):
        shutil.copy(FORMAT1 / name, volume.model_dir / name)
    shutil.copy(FORMAT1 / "predictions.json", volume.results_dir / "predictions.json")
    return volume


def test_format_1_files_read_as_todays_records(format1):
    saved = checkpoint.read(format1.checkpoint)
    assert saved.state.architecture == "mnist_cnn" and saved.state.world_size is None  # (format 1 does not say)
    assert isinstance(saved.build_model(), model.MnistCNN)
    scores = evaluation.read(format1)
    assert scores.sha256 == saved.sha256 and scores.correct == 1010 and scores.total == 10_000
    assert [r.kind for r in history.read(format1)] == ["step", "epoch", "eval"]
    inferred = predictions.read(format1)
    assert inferred.sha256 == saved.sha256 and [p.file for p in inferred.predictions][0] == "3.png"
    saved_gate, _ = evaluation.evaluated(format1, 0.1)  # the gate passes it (accuracy 0.101)
    assert saved_gate.sha256 == saved.sha256


def test_a_format_1_volume_trains_on_and_is_written_as_format_2(format1, short_trained_root):
    private_copy(short_trained_root / "data", format1.root / "data")
    result = run_here("train", "--root", str(format1.root))
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(format1.checkpoint, weights_only=True)
    assert (state["format_version"], state["architecture"], state["epoch"]) == (2, "mnist_cnn", 2)


def test_the_first_format_1_files_read_too_and_the_first_network_is_refused_by_name(format1):
    """Format 1's first files: checkpoints from before the step limit and the network's mean and std, with
    label_smoothing 0 and the epoch's train_loss; evaluations from before they listed mistakes."""
    state = torch.load(format1.checkpoint, weights_only=True)
    del state["train_config"]["max_steps"]
    state["train_config"]["label_smoothing"] = 0.0
    state["model_config"] = {k: v for k, v in state["model_config"].items() if k not in ("mean", "std")}
    torch.save({**state, "train_loss": 0.5}, format1.checkpoint)
    saved = checkpoint.read(format1.checkpoint)
    assert saved.state.train_config.max_steps == 0  # (and label_smoothing dropped: Recipe has none)
    assert isinstance(saved.build_model(), model.MnistCNN)

    record = eval_json(format1)
    del record["mistakes"]
    format1.eval_results.write_text(json.dumps(record))
    assert evaluation.read(format1).mistakes == ()
    record["format_version"] = evaluation.WITHOUT_FEEDBACK  # format 2 always lists them
    format1.eval_results.write_text(json.dumps(record))
    with pytest.raises(PipelineError, match="has no 'mistakes'"):
        evaluation.read(format1)

    # the network of the first release had other layers: its weights cannot be loaded into today's
    state["model_config"] = {"channels": [32, 64, 128], "first_kernel": 5}
    torch.save(state, format1.checkpoint)
    with pytest.raises(PipelineError, match="its network is the first release's"):
        checkpoint.read(format1.checkpoint)


def test_a_checkpoint_names_its_architecture_and_loading_picks_the_class(format1, monkeypatch):
    class Tiny(torch.nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.config = {"width": width}
            self.linear = torch.nn.Linear(width, 10)

    monkeypatch.setitem(model.ARCHITECTURES, "tiny", Tiny)
    state = dataclasses.replace(checkpoint.read(format1.checkpoint).state, architecture="tiny",
                                model_config={"width": 5}, model=Tiny(5).state_dict())
    checkpoint.write(format1.checkpoint, state)
    assert isinstance(checkpoint.read(format1.checkpoint).build_model(), Tiny)
    monkeypatch.delitem(model.ARCHITECTURES, "tiny")
    with pytest.raises(PipelineError, match="architecture 'tiny' is not one this version knows"):
        checkpoint.read(format1.checkpoint)


def eval_json(volume: Volume) -> dict:
    return json.loads(volume.eval_results.read_text())


@pytest.mark.parametrize("change, fragment", [
    (lambda e: e.update(accuracy=True), "accuracy is True, not a finite number"),
    (lambda e: e.update(accuracy="0.99"), "accuracy is '0.99', not a finite number"),
    (lambda e: e.update(accuracy=0.99), "accuracy 0.99 is not correct / total"),
    (lambda e: e["checkpoint"].update(epoch="<script>x</script>"), "checkpoint.epoch is '<script>"),
    (lambda e: e["confusion_matrix"][0].append(1), "confusion_matrix[0] has 11 items, more than 10"),
    (lambda e: e["confusion_matrix"][0].__setitem__(0, -1), "confusion_matrix[0][0] is -1"),
    (lambda e: e["mistakes"].append({"test_index": 10_000, "label": 1, "predicted": 2, "confidence": 0.5}),
     "test_index is 10000"),
    (lambda e: e.update(test_loss=float("inf")), "Infinity is not a number JSON allows"),
    (lambda e: e.update(format_version=9), "format_version 9 is newer"),
    (lambda e: e.pop("per_class_accuracy"), "no 'per_class_accuracy'"),
    (lambda e: e["per_class_accuracy"].pop("3"), "per_class_accuracy has no '3'"),
    (lambda e: e["per_class_accuracy"].update({"3": 0.5}), "per_class_accuracy[3] is 0.5, not the share"),
    (lambda e: e["mistakes"].append({"test_index": 5, "label": 2, "predicted": 2, "confidence": 0.5}),
     "predicted its own label 2: not a mistake"),
    (lambda e: e["checkpoint"].pop("sha256"), "checkpoint has no 'sha256'"),
])
def test_a_malformed_evaluation_is_one_error_naming_the_file_for_every_reader(change, fragment, format1):
    record = eval_json(format1)
    change(record)
    format1.eval_results.write_text(json.dumps(record))  # (json writes inf as Infinity)
    with pytest.raises(PipelineError, match="eval_results.json is not valid") as refused:
        evaluation.read(format1)
    assert fragment in str(refused.value)
    for command in (["infer", "--threshold", "0", "--wait", "0"], ["report"], ["predict", "x.png"]):
        result = run_here(*command, "--root", str(format1.root))
        assert_one_line_error(result, 1, "eval_results.json is not valid", "mnist evaluate")


BAD_LINES = [
    b"\xff\xfe not UTF-8",
    b'{"kind":"step","epoch":100000000,"step":10,"loss":1.0,"lr":0.1}',
    b'{"kind":"step","epoch":1.5,"step":10,"loss":1.0,"lr":0.1}',
    b'{"kind":"step","epoch":-3,"step":10,"loss":1.0,"lr":0.1}',
    b'{"kind":"step","epoch":1,"step":10,"loss":Infinity,"lr":0.1}',
    b'{"kind":"epoch","epoch":1,"steps":true,"train_loss":0.5}',
    b'[1, 2]',
    b'{"kind": "window", "epoch": 1}',
    b'{"kind":"step","format_version":2,"epoch":1,"step":10,"loss":1.0,"lr":0.1}',  # a newer version's line
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_a_bad_history_line_is_skipped_with_one_warning(line, format1, caplog):
    with format1.history.open("ab") as file:
        file.write(line + b"\n")
    assert [r.kind for r in history.read(format1)] == ["step", "epoch", "eval"]
    assert caplog.text.count("skipped 1 unreadable line") == 1


def test_train_goes_on_past_bad_history_lines_and_writes_the_file_anew_without_them(format1, short_trained_root):
    """All of BAD_LINES in one history (one train for them all): one warning, and none of them kept."""
    with format1.history.open("ab") as file:
        file.write(b"".join(line + b"\n" for line in BAD_LINES))
    private_copy(short_trained_root / "data", format1.root / "data")
    result = run_here("train", "--root", str(format1.root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("unreadable line") == 1 and f"skipped {len(BAD_LINES)} unreadable" in result.stderr
    kept = format1.history.read_bytes()
    assert not any(line in kept for line in BAD_LINES)


def test_a_history_that_is_not_a_file_is_set_aside_and_train_goes_on(format1, short_trained_root):
    format1.history.unlink()
    format1.history.mkdir()  # a folder where the file should be
    private_copy(short_trained_root / "data", format1.root / "data")
    result = run_here("train", "--root", str(format1.root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved history.jsonl aside" in result.stderr and format1.history.is_file()
    assert [p.is_dir() for p in format1.model_dir.glob("history.jsonl.*.aside")] == [True]


def test_the_chart_thins_a_long_history_to_a_few_thousand_points():
    records = [history.Point(epoch=1 + i // 47, step=10 * (1 + i % 47), loss=1.0 / (1 + i), lr=0.1)
               for i in range(200_000)]
    svg = chart.training_svg(history.summary(records))
    assert svg.count("<circle") == chart.MAX_POINTS and len(svg) < 2_000_000


@pytest.mark.parametrize("change, fragment", [
    (lambda p: p["predictions"][0].update(confidence="high"), "predictions[0].confidence is 'high'"),
    (lambda p: p["predictions"][1].pop("label"), "predictions[1] has no 'label'"),
    (lambda p: p["predictions"].append(p["predictions"][0]), "predictions name one file twice"),
])
def test_a_malformed_predictions_file_is_left_out_of_the_report_not_fatal(change, fragment, format1):
    path = format1.results_dir / "predictions.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(PipelineError, match="predictions.json is not valid") as refused:
        predictions.read(format1)
    assert fragment in str(refused.value)


VERSION_JSON = {"format_version": 1, "sha256": "a" * 64, "bytes": 10, "epoch": 1, "accuracy": 0.5, "test_loss": 1.0,
                "created": "2026-12-07T00:00:00+0000", "recipe": {}, "data_sha256": "b" * 64, "package": "0.1.0"}


@pytest.mark.parametrize("change, fragment", [
    (lambda v: v.update(sha256="<b>" * 22), "sha256 '<b><b><b>"),
    (lambda v: v.update(bytes=0), "bytes is 0, below 1"),
    (lambda v: v.update(accuracy=float("nan")), "NaN is not a number JSON allows"),
    (lambda v: v.update(created=["x"]), "created is ['x'], not a string"),
    (lambda v: v.pop("package"), "it has no 'package'"),
    (lambda v: v.update(format_version=3), "format_version 3 is newer than 2"),
    (lambda v: v.update(format_version=2), "it has no 'feedback' (format 2 has it"),
    (lambda v: v.update(feedback={"digest": "c" * 64, "total": 2, "correct": 1, "accuracy": 0.5}),
     "it has feedback figures, which format 1 does not have"),
])
def test_a_malformed_version_json_is_one_error_naming_it(change, fragment, tmp_path):
    volume = Volume(tmp_path)
    volume.version_dir(1).mkdir(parents=True)
    record = dict(VERSION_JSON)
    change(record)
    (volume.version_dir(1) / "version.json").write_text(json.dumps(record))
    with pytest.raises(PipelineError, match="version.json is not valid") as refused:
        versions.read(volume, 1)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("content, fragment", [
    ('{"format_version": 1, "version": true}', "version is True, not a whole number"),
    ('{"format_version": 1, "version": 0}', "version is 0, below 1"),
    ('{"format_version": 1}', "it has no 'version'"),
    ('[3]', "it is [3], not an object"),
    ('{"version": 3}', ""),  # (format 1 that does not say so: read as 3)
])
def test_an_alias_file_reads_strictly(content, fragment, tmp_path):
    volume = Volume(tmp_path)
    volume.aliases_dir.mkdir(parents=True)
    volume.alias_path("production").write_text(content)
    if not fragment:
        assert aliases.read(volume, "production") == 3
        return
    with pytest.raises(PipelineError, match="production.json is not valid") as refused:
        aliases.read(volume, "production")
    assert fragment in str(refused.value)


def test_an_alias_log_line_that_does_not_read_is_skipped_with_a_warning(tmp_path, caplog):
    volume = Volume(tmp_path)
    volume.aliases_dir.mkdir(parents=True)
    good = {"time": "t", "alias": "production", "from": None, "to": 1, "reason": "promote"}
    lines = [good, {**good, "alias": "../x"}, {**good, "to": "2"}, {**good, "from": 1, "to": 2}]
    volume.alias_log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(m.before, m.to) for m in aliases.history(volume)] == [(None, 1), (1, 2)]
    assert "line 2 is skipped: alias '../x' is not an alias name" in caplog.text
    assert "line 3 is skipped: to is '2', not a whole number" in caplog.text
