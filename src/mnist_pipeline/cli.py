"""The `mnist` command: parse the settings, run the stages in order, write the report, say what happened.

Exit codes: 0 done; 1 error (a one-line `error:` says what and how to fix it);
2 usage error (a bad flag or MNIST_* value); 3 infer: accuracy not above the
threshold, no results written (predict: also the current checkpoint not yet evaluated);
4 another train holds the volume;
130 / 143 stopped by SIGINT / SIGTERM (train saved its progress first).

A command is one entry in COMMANDS: its help and the function that runs it. The stages (train,
evaluate, infer) never import one another or the report: what one hands the next goes through
this layer or the volume.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from mnist_pipeline import distributed, faults, registry_cli, settings, signals
from mnist_pipeline.errors import PipelineError, UsageError
from mnist_pipeline.settings import EvaluateConfig, InferConfig, PredictConfig, ServeConfig, TrainConfig
from mnist_pipeline.storage.files import describe
from mnist_pipeline.storage.locks import exclusive_lock
from mnist_pipeline.volume import Volume

EPILOG = ("Exit codes: 0 ok, 1 error, 2 usage error, 3 accuracy not above threshold (predict: or not evaluated), "
          "4 volume busy, 130/143 interrupted.")

Values = Dict[str, Any]


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace, Values], int]
    modules: tuple = ()  # imported before a signal may interrupt (torch's import is never cut short)
    interruptible: bool = True  # serve: uvicorn handles SIGTERM itself, a graceful shutdown
    arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None  # what it takes besides settings


# --- the commands ------------------------------------------------------------------------------------


def train(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import train as stage

    result = stage.run(_train_config(v, args.explicit))
    if distributed.world().is_main:  # one summary per group
        print(f"train: epoch {result.epoch}, train loss {result.train_loss:.4f}, "
              f"{result.seconds:.1f} s -> {describe(result.checkpoint)}")
    return 0


def evaluate(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import evaluate as stage

    result = stage.run(_evaluate_config(v))
    print(f"evaluate: accuracy {result.accuracy:.4f} ({result.correct}/{result.total}), "
          f"test loss {result.test_loss:.4f}, epoch {result.epoch}")
    volume = Volume(v["root"])
    _report_after(volume, v["mirror"], describe(volume.eval_results))
    return 0


def infer(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import infer as stage

    result = stage.run(_infer_config(v))
    files = ", ".join(f"{p.file} (true {p.label})" for p in result.predictions)
    print(f"infer: accuracy {result.accuracy:.4f} > {result.threshold}: {files}")
    return 0


def pipeline(args: argparse.Namespace, v: Values) -> int:
    """train, evaluate, infer in one process, then one report of all three."""
    from mnist_pipeline import evaluate as evaluate_stage, infer as infer_stage, train as train_stage

    volume = Volume(v["root"])
    result = train_stage.run(_train_config(v, args.explicit))
    args.train_lock.close()  # taken by main(); evaluate would wait for it
    print(f"train: epoch {result.epoch}, train loss {result.train_loss:.4f}, {result.seconds:.1f} s -> "
          f"{describe(result.checkpoint)}")
    _check_signal("train")
    scores = evaluate_stage.run(_evaluate_config(v))
    print(f"evaluate: accuracy {scores.accuracy:.4f} ({scores.correct}/{scores.total}), "
          f"test loss {scores.test_loss:.4f}, epoch {scores.epoch}")
    _check_signal("evaluate")
    inferred = infer_stage.run(_infer_config(v))
    files = ", ".join(f"{p.file} (true {p.label})" for p in inferred.predictions)
    print(f"infer: accuracy {inferred.accuracy:.4f} > {inferred.threshold}: {files}")
    _check_signal("infer")
    _report_after(volume, v["mirror"], f"{describe(volume.results_dir)}/")
    return 0


def report(args: argparse.Namespace, v: Values) -> int:
    print(f"report: {describe(write_report(Volume(v['root']), v['mirror']))}")
    return 0


def predict(args: argparse.Namespace, v: Values) -> int:
    """One line per image on stdout, an `error: FILE: ...` line on stderr for each unreadable one."""
    from mnist_pipeline import predict as stage

    results = stage.run(PredictConfig(images=tuple(args.images), **v))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{result['file']}: {result['digit']} ({result['confidence']:.3f})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in result for result in results) else 0


def serve(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import serve as server

    server.run(ServeConfig(**v))  # uvicorn handles SIGTERM itself: a graceful shutdown
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list (file, digit, confidence, probabilities) instead of lines")


_REPORT = ("mnist_pipeline.report",)
_REGISTRY = ("mnist_pipeline.records.aliases",)
COMMANDS: Dict[str, Command] = {
    "train": Command("Resume from model/mnist_cnn.pt if present, train --epochs more epochs, save atomically.", train,
                     ("mnist_pipeline.train",)),
    "evaluate": Command("Wait for a finished checkpoint, score it on the 10,000 test images, write "
                        "model/eval_results.json and the report (model/report/).", evaluate,
                        ("mnist_pipeline.evaluate",) + _REPORT),
    "infer": Command("Wait for the current checkpoint's evaluation; if accuracy is above --threshold, "
                     "write --count labelled test images to results/.", infer, ("mnist_pipeline.infer",)),
    "pipeline": Command("train, evaluate, infer in order, then the report (with infer's images).", pipeline,
                        ("mnist_pipeline.train", "mnist_pipeline.evaluate", "mnist_pipeline.infer") + _REPORT),
    "report": Command("Rebuild model/report/ (index.html and its pictures) from eval_results.json, the history "
                      "and results/.", report, _REPORT),
    "predict": Command("Read the digit in each IMAGE (any image Pillow reads) with the --model version "
                       "(production), if its evaluation passes --threshold.", predict, ("mnist_pipeline.predict",),
                       arguments=_predict_arguments),
    "models": Command("The versions evaluate has kept (model/versions/), with their aliases; `models log`: every "
                      "alias move; `models prune`: remove the oldest versions no alias points to.",
                      registry_cli.models, _REGISTRY, arguments=registry_cli.models_arguments),
    "promote": Command("Point --alias (production) at version N.", registry_cli.promote, _REGISTRY,
                       arguments=registry_cli.promote_arguments),
    "rollback": Command("Point --alias (production) back at the version it pointed to before.",
                        registry_cli.rollback, _REGISTRY),
    "serve": Command("HTTP prediction API and a draw-a-digit page at http://HOST:PORT; serves the --model "
                     "version (production: follows the alias as it moves) if it passes --threshold.", serve,
                     ("mnist_pipeline.serve",),
                     interruptible=False),
}


# --- what the commands share ---------------------------------------------------------------------------


def _train_config(v: Values, explicit: frozenset) -> TrainConfig:
    return TrainConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                       epochs=v["epochs"], recipe=settings.recipe(v), fresh=v["fresh"], save_every_s=v["save_every"],
                       explicit=frozenset(settings.RECIPE_FIELDS[k] for k in explicit if k in settings.RECIPE_FIELDS))


def _evaluate_config(v: Values) -> EvaluateConfig:
    return EvaluateConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                          wait_s=v["wait"], grace_s=v["grace"], started=v["started"], threshold=v["threshold"],
                          promote=v["promote"], keep=v["keep"])


def _infer_config(v: Values) -> InferConfig:
    return InferConfig(root=v["root"], mirror=v["mirror"], device=v["device"], threads=v["threads"],
                       wait_s=v["wait"], grace_s=v["grace"], threshold=v["threshold"], count=v["count"],
                       seed=v["seed"], started=v["started"])


def write_report(volume: Volume, mirror: Optional[str]) -> Path:
    """model/report/ from the evaluation, the history and infer's predictions on the volume."""
    from mnist_pipeline import data, report as reports
    from mnist_pipeline.records import aliases, evaluation, history, predictions

    try:
        scores = evaluation.read(volume)
    except FileNotFoundError:
        raise PipelineError(f"no {describe(volume.eval_results)} yet: run `mnist evaluate` first") from None
    try:
        inferred = predictions.read(volume)
    except FileNotFoundError:
        inferred = None
    except PipelineError as exc:
        logging.getLogger(__name__).warning("the report leaves out results/: %s", exc)
        inferred = None
    test_images = data.load_split(volume.data_dir, "test", mirror).images
    return reports.write(volume, scores, history.read(volume), test_images, inferred, aliases.catalogue(volume),
                         aliases.history(volume))


def _report_after(volume: Volume, mirror: Optional[str], written: str) -> None:
    try:
        print(f"report: {describe(write_report(volume, mirror))}")
    except PipelineError as exc:
        raise PipelineError(f"{written} is written, but not the report: {exc}; `mnist report` tries again") from None


def _check_signal(stage: str) -> None:
    if signals.received() is not None:  # arrived after the stage's last save: nothing is lost
        raise signals.interrupted(f"after {stage} finished and saved its results")


# --- parsing and running -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist", description="MNIST train / evaluate / infer on a shared volume.", epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help, epilog=EPILOG)
        for dest in settings.COMMAND_SETTINGS[name]:
            s = settings.SETTINGS[dest]
            default = f" (default: {s.default})" if s.default not in (None, False) else ""
            text = f"{s.help}; env {s.env}{default}"
            if s.parse is settings.boolean:
                sub.add_argument(s.flag, action="store_const", const=True, default=None, help=text)
            else:
                sub.add_argument(s.flag, type=_flag_type(s), default=None, metavar=s.metavar, help=text)
        if command.arguments is not None:
            command.arguments(sub)
    return parser


def _flag_type(setting: settings.Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {settings.why(exc)}") from None

    parse.__name__ = setting.dest
    return parse


def main(argv: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None) -> int:
    import time

    started = time.monotonic()  # --grace counts from here
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ) if env is None else env
    try:
        values, args.explicit = settings.resolve(args.command, vars(args), env)
    except ValueError as exc:
        parser.error(str(exc))
    world = distributed.world(env)  # a rank of a torchrun group, or a world of one
    if world.size > 1 and args.command != "train":
        parser.error(f"only `mnist train` runs as a torchrun group, not `mnist {args.command}`: run it in one process")
    nproc = values.pop("nproc_per_node", 1)
    if nproc > 1 and not distributed.launched(env):
        try:
            distributed.check_batch_size(values["batch_size"], nproc)
        except UsageError as exc:
            parser.error(str(exc))
        return distributed.launch(nproc, sys.argv[1:] if argv is None else argv)
    # Before torch loads: idle OpenMP threads sleep instead of spinning, which slows everything else
    # down on a machine with few cores (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signals.install()  # recorded only, until the stages run: torch's import is not interrupted
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if world.is_main else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    volume = Volume(values["root"])
    if args.command in ("evaluate", "infer", "pipeline"):
        values["started"] = started
    try:
        if args.command in ("evaluate", "infer", "models", "promote", "rollback") and not volume.root.is_dir():
            raise PipelineError(
                f"no volume at {describe(volume.root)} (no such folder): run `mnist train --root "
                f"{describe(volume.root)}` first, or fix --root / MNIST_ROOT"
            )
        command = COMMANDS[args.command]
        with contextlib.ExitStack() as args.train_lock:
            if args.command in ("train", "pipeline") and world.size == 1:
                # before torch loads: a train started beside an evaluate and an infer (`docker compose up`)
                # holds its lock long before they would use the old checkpoint. In a torchrun group rank 0
                # takes it in train.run, once the group has formed: a busy volume then stops every rank.
                args.train_lock.enter_context(exclusive_lock(volume, "train"))
            for module in command.modules:
                importlib.import_module(module)
            _check_threads(parser, values)
            if not command.interruptible:
                return command.run(args, values)
            with signals.interruptible():
                code = command.run(args, values)
            _check_signal(args.command)
            return code
    except PipelineError as exc:
        if not getattr(exc, "silent", False):  # (a rank that stops because rank 0 did: rank 0 says why)
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _check_threads(parser: argparse.ArgumentParser, values: Values) -> None:
    from mnist_pipeline import runtime

    cpus = runtime.available_cpus()
    if values.get("threads") is not None and values["threads"] > cpus:
        parser.error(f"--threads / MNIST_THREADS {values['threads']}: this process may use {cpus} CPUs; "
                     f"pass at most {cpus}")


def script() -> None:
    """The `mnist` command: main(), then exit at once.

    os._exit skips the interpreter's teardown, during which Python restores the default signal
    handlers: a `docker stop` landing there would kill the process by the signal (exit -15) instead of
    the promised 143. It also saves the time torch's teardown takes.
    """
    code = main()
    faults.crash_point("exit")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    late = signals.received()
    os._exit(128 + late if late is not None and code == 0 else code)
