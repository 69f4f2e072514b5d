"""docs/schemas/: each volume format's JSON Schema, as its record declares it, met by every file a real run writes,
and named field by field in docs/volume.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import REPO, run_here
from mnist_pipeline.records import checkpoint, feedback, schemas
from mnist_pipeline.volume import Volume

SCHEMAS = REPO / "docs" / "schemas"
# where each format lives on the volume (the paths FORMATS names), as patterns of a path inside it
PLACES = {
    "checkpoint.schema.json": r"model/(mnist_cnn|train_progress|versions/\d+/mnist_cnn)\.pt",
    "eval_results.schema.json": r"model/(versions/\d+/)?eval_results\.json",
    "history.schema.json": r"model/history\.jsonl",
    "predictions.schema.json": r"results/predictions\.json",
    "version.schema.json": r"model/versions/\d+/version\.json",
    "counter.schema.json": r"model/versions/counter\.json",
    "alias.schema.json": r"model/aliases/(?!log\.)[^/]+\.json",
    "alias-log.schema.json": r"model/aliases/log\.jsonl",
    "feedback.schema.json": r"feedback/[0-9a-f]{64}\.json",
}


def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_the_committed_schemas_are_what_the_records_declare():
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(schemas.FORMATS)
    assert set(PLACES) == set(schemas.FORMATS)
    for name in schemas.FORMATS:
        assert (SCHEMAS / name).read_text() == schemas.text(name), \
            f"docs/schemas/{name} is out of date: python -m mnist_pipeline.records.schemas docs/schemas"


def documents(path: Path) -> list:
    """What the schema of `path` describes: its JSON value, each line of a .jsonl, a checkpoint's plain values."""
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return [{k: v for k, v in state.items() if k not in checkpoint.TENSORS}]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return [json.loads(path.read_text())]


def test_every_file_a_real_run_writes_meets_its_schema(trained_copy):
    """trained_root's train and evaluate (a version, production, the log), then infer, promote and rollback."""
    root = trained_copy
    for command in (("infer", "--threshold", "0"), ("promote", "1", "--alias", "staging"),
                    ("promote", "1", "--alias", "canary")):
        result = run_here(*command, "--root", str(root))
        assert result.returncode == 0, result.stderr[-3000:]
    feedback.add(Volume(root), bytes(range(256)) * 3 + bytes(16), 7, 1, 1)  # (what serve --feedback on keeps)
    met = set()
    for path in sorted(root.rglob("*")):
        inside = path.relative_to(root).as_posix()
        if path.is_dir() or inside.startswith("data/") or path.name.startswith(".") or \
                path.suffix not in (".json", ".jsonl", ".pt"):
            continue  # (MNIST, locks, pictures, the report, ONNX)
        names = [name for name, place in PLACES.items() if re.fullmatch(place, inside)]
        assert len(names) == 1, f"{inside}: a file of the volume with no schema in docs/schemas/"
        check = validator(names[0])
        for document in documents(path):
            errors = [e.message for e in check.iter_errors(document)]
            assert not errors, (inside, errors[:3])
        met.add(names[0])
    assert met == set(schemas.FORMATS)


FORMAT1 = REPO / "tests" / "fixtures" / "format1"


@pytest.mark.parametrize("name, file, change", [
    ("eval_results.schema.json", "eval_results.json", lambda e: e["confusion_matrix"][0].append(0)),
    ("eval_results.schema.json", "eval_results.json", lambda e: e["mistakes"][0].update(label=True)),
    ("predictions.schema.json", "predictions.json", lambda p: p["checkpoint"].update(sha256="A" * 64)),
    ("predictions.schema.json", "predictions.json", lambda p: p["predictions"][0].update(file="../x.png")),
])
def test_a_schema_refuses_what_the_reader_refuses(name, file, change):
    document = {**json.loads((FORMAT1 / file).read_text()), "format_version": 2}  # (format 1 read as today's)
    assert not list(validator(name).iter_errors(document))
    change(document)
    assert list(validator(name).iter_errors(document))


@pytest.mark.parametrize("name, document", [
    ("alias.schema.json", {"format_version": 1, "version": True}),
    ("alias-log.schema.json", {"time": "t", "alias": "../x", "from": None, "to": 1, "reason": "promote"}),
    ("history.schema.json", {"epoch": 1, "step": 10, "loss": 0.5, "lr": 0.1}),  # (no kind)
])
def test_a_line_or_alias_schema_refuses_what_the_reader_refuses(name, document):
    assert list(validator(name).iter_errors(document))


def volume_md_fields(section: str) -> set:
    """The names docs/volume.md's `## section` gives in backquotes or, as JSON keys, in double quotes."""
    text = (REPO / "docs" / "volume.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([a-z_0-9]+)`", body)) | set(re.findall(r'"([a-z_0-9]+)"', body))


def schema_fields(name: str) -> set:
    """Every property a schema names, its nested objects' included (a digit key of per_class_accuracy is not)."""
    found: set = set()

    def walk(node):
        if isinstance(node, dict):
            found.update(k for k in node.get("properties", {}) if not k.isdigit())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(json.loads((SCHEMAS / name).read_text()))
    return found


@pytest.mark.parametrize("name, section", [
    ("checkpoint.schema.json", "model/mnist_cnn.pt and model/train_progress.pt"),
    ("eval_results.schema.json", "model/eval_results.json"),
    ("history.schema.json", "model/history.jsonl"),
    ("predictions.schema.json", "results/"),
    ("version.schema.json", "model/versions/ and model/aliases/"),
    ("counter.schema.json", "model/versions/ and model/aliases/"),
    ("alias.schema.json", "model/versions/ and model/aliases/"),
    ("alias-log.schema.json", "model/versions/ and model/aliases/"),
    ("feedback.schema.json", "feedback/"),
])
def test_docs_volume_md_names_every_field_of_each_schema(name, section):
    missing = schema_fields(name) - volume_md_fields(section)
    assert not missing, f"docs/volume.md's section {section!r} does not name {sorted(missing)} of {name}"
