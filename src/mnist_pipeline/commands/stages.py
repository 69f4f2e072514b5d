"""The pipeline's commands: train, evaluate, infer, all three in one process, and the report.

The stages never import one another or the report: what one hands the next goes through here or the
volume. The report is written once per command, from the records the command made and, for those it
did not make, the records on the volume. evaluate (and pipeline) then export the version they
registered as an ONNX model where onnxruntime imports.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from mnist_pipeline import distributed, settings, signals
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.settings import EvaluateConfig, InferConfig, TrainConfig
from mnist_pipeline.storage.files import describe
from mnist_pipeline.volume import Volume

if TYPE_CHECKING:
    from mnist_pipeline.evaluate import Scored  # (it loads torch: the parser answers without it)
    from mnist_pipeline.records.evaluation import Evaluation
    from mnist_pipeline.records.predictions import Predictions

Values = Dict[str, Any]
log = logging.getLogger(__name__)


def train(args: argparse.Namespace, v: Values) -> int:
    _train(args, v)
    return 0


def evaluate(args: argparse.Namespace, v: Values) -> int:
    scored = _evaluate(v)
    volume = Volume(v["root"])
    _report_after(volume, v["mirror"], describe(volume.eval_results), scored.evaluation)
    _export_after(volume, scored, v, f"{describe(volume.eval_results)} and the report are written")
    return 0


def infer(args: argparse.Namespace, v: Values) -> int:
    _infer(v)
    return 0


def pipeline(args: argparse.Namespace, v: Values) -> int:
    """train, evaluate, infer in one process, then one report of all three."""
    _train(args, v)
    args.train_lock.close()  # taken by main(); evaluate would wait for it
    check_signal("train")
    scored = _evaluate(v)
    check_signal("evaluate")
    inferred = _infer(v)
    check_signal("infer")
    volume = Volume(v["root"])
    _report_after(volume, v["mirror"], f"{describe(volume.results_dir)}/", scored.evaluation, inferred)
    _export_after(volume, scored, v, f"{describe(volume.results_dir)}/ and the report are written")
    return 0


# each stage, run and summed up in one line on stdout (the full results are in the volume's files)

def _train(args: argparse.Namespace, v: Values) -> None:
    from mnist_pipeline import train as stage

    result = stage.run(train_config(v, args.explicit))
    if distributed.world().is_main:  # one summary per group
        print(f"train: epoch {result.epoch}, train loss {result.train_loss:.4f}, "
              f"{result.seconds:.1f} s -> {describe(result.checkpoint)}")


def _evaluate(v: Values) -> Scored:
    from mnist_pipeline import evaluate as stage

    scored = stage.run(evaluate_config(v))
    result = scored.evaluation
    figures = result.feedback.figures if result.feedback else None
    print(f"evaluate: accuracy {result.accuracy:.4f} ({result.correct}/{result.total}), "
          f"test loss {result.test_loss:.4f}, epoch {result.epoch}" +
          (f"; held-out feedback {figures.accuracy:.4f} ({figures.correct}/{figures.total})" if figures else ""))
    return scored


def _infer(v: Values) -> "Predictions":
    from mnist_pipeline import infer as stage

    result = stage.run(infer_config(v))
    files = ", ".join(f"{p.file} (true {p.label})" for p in result.predictions)
    print(f"infer: accuracy {result.accuracy:.4f} > {result.threshold}: {files}")
    return result


def report(args: argparse.Namespace, v: Values) -> int:
    print(f"report: {describe(write_report(Volume(v['root']), v['mirror']))}")
    return 0


def train_config(v: Values, explicit: frozenset) -> TrainConfig:
    return TrainConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                       epochs=v["epochs"], recipe=settings.recipe(v), fresh=v["fresh"], save_every_s=v["save_every"],
                       feedback_share=v["feedback_share"],
                       explicit=frozenset(settings.RECIPE_FIELDS[k] for k in explicit if k in settings.RECIPE_FIELDS))


def evaluate_config(v: Values) -> EvaluateConfig:
    return EvaluateConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                          wait_s=v["wait"], grace_s=v["grace"], started=v["started"], threshold=v["threshold"],
                          promote=v["promote"], margin=v["promote_margin"], keep=v["keep"])


def infer_config(v: Values) -> InferConfig:
    return InferConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                       wait_s=v["wait"], grace_s=v["grace"], threshold=v["threshold"], count=v["count"],
                       seed=v["seed"], started=v["started"])


def write_report(volume: Volume, mirror: Optional[str], scores: Optional["Evaluation"] = None,
                 inferred: Optional["Predictions"] = None) -> Path:
    """model/report/ from the evaluation and infer's predictions this command made (those it did not make: from
    the volume), and the history."""
    from mnist_pipeline import data, report as reports
    from mnist_pipeline.records import aliases, evaluation, history, predictions

    if scores is None:
        try:
            scores = evaluation.read(volume)
        except FileNotFoundError:
            raise PipelineError(f"no {describe(volume.eval_results)} yet: run `mnist evaluate` first") from None
    if inferred is None:
        try:
            inferred = predictions.read(volume)
        except FileNotFoundError:
            pass
        except PipelineError as exc:
            log.warning("the report leaves out results/: %s", exc)
    test_images = data.load_split(volume.data_dir, "test", mirror).images
    return reports.write(volume, scores, history.read(volume), test_images, inferred, aliases.catalogue(volume),
                         aliases.history(volume), feedback_images(volume, scores))


def feedback_images(volume: Volume, scores: "Evaluation") -> Dict[str, bytes]:
    """The pixels of the held-out feedback mistakes `scores` lists, by id; one deleted or changed since is left
    out (with a warning for a changed one)."""
    from mnist_pipeline.records import feedback

    found: Dict[str, bytes] = {}
    for mistake in scores.feedback.mistakes if scores.feedback else ():
        try:
            found[mistake.id] = feedback.image(volume, feedback.read(volume, mistake.id))
        except FileNotFoundError:
            continue
        except PipelineError as exc:
            log.warning("the report leaves out feedback sample %s: %s", mistake.id[:12], exc)
    return found


def _report_after(volume: Volume, mirror: Optional[str], written: str, scores: "Evaluation",
                  inferred: Optional["Predictions"] = None) -> None:
    try:
        print(f"report: {describe(write_report(volume, mirror, scores, inferred))}")
    except PipelineError as exc:
        raise PipelineError(f"{written} is written, but not the report: {exc}; `mnist report` tries again") from None


def _export_after(volume: Volume, scored: Scored, v: Values, written: str) -> None:
    """The ONNX model of the version evaluate registered for `scored`, where onnxruntime imports (the graded
    images lack it: the Compose export service exports there) and --export is auto; a version that has it
    already is left alone."""
    from mnist_pipeline import export, runtime
    from mnist_pipeline.commands.export import line
    from mnist_pipeline.records import versions

    if v["export"] == "never":
        return  # (`mnist export`, or the Compose export service, does it)
    number = next((found.number for found in versions.listing(volume)
                   if isinstance(found, versions.Version) and found.sha256 == scored.evaluation.sha256), None)
    if number is None or volume.exported(number).exists():
        return  # (no version: the checkpoint changed while it was scored, and evaluate said so)
    why = export.unavailable()
    if why:
        log.info("version %d is not exported to ONNX: %s; `mnist export` (the Compose export service) does it "
                 "where its packages are installed", number, why)
        return
    try:
        exported = export.export_version(volume, number, v["mirror"], v["threads"] or runtime.available_cpus(),
                                         (scored.evaluation.sha256, scored.probabilities))
    except signals.Interrupted:
        raise
    except PipelineError as exc:
        raise PipelineError(f"{exc} ({written})") from None
    print(line(exported))


def check_signal(stage: str) -> None:
    if signals.received() is not None:  # arrived after the stage's last save: nothing is lost
        raise signals.interrupted(f"after {stage} finished and saved its results")
