"""The `mnist` command: flags > MNIST_* environment variables > defaults.

Exit codes: 0 done; 1 error (a one-line `error:` says what and how to fix it);
2 usage error (a bad flag or MNIST_* value); 3 infer: accuracy not above the
threshold, no results written (predict: also the current checkpoint not yet evaluated);
4 another train holds the volume;
130 / 143 stopped by SIGINT / SIGTERM (train saved its progress first).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from mnist_pipeline import config, distributed, faults, limits, signals
from mnist_pipeline.config import (
    DEFAULT_ROOT, EvaluateConfig, InferConfig, PredictConfig, Recipe, ReportConfig, ServeConfig, TrainConfig,
    default_of,
)
from mnist_pipeline.errors import PipelineError, UsageError
from mnist_pipeline.volume import Volume, exclusive_lock

# Before torch loads: idle OpenMP threads sleep instead of spinning, which slows everything else
# down on a machine with few cores (bench/ has the figures).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EPILOG = ("Exit codes: 0 ok, 1 error, 2 usage error, 3 accuracy not above threshold (predict: or not evaluated), "
          "4 volume busy, 130/143 interrupted.")


def _positive_int(text: str) -> int:
    return limits.positive(int(text))


def _non_negative_int(text: str) -> int:
    return limits.non_negative_int(int(text))


def _non_negative_float(text: str) -> float:
    return limits.non_negative(float(text))


def _positive_float(text: str) -> float:
    return limits.positive_number(float(text))


def _learning_rate(text: str) -> float:
    return limits.learning_rate(float(text))


def _fraction(text: str) -> float:
    return limits.fraction(float(text))


def _seed(text: str) -> int:
    return limits.seed(int(text))


def _epochs(text: str) -> int:
    return limits.epochs(int(text))


def _batch_size(text: str) -> int:
    return limits.batch_size(int(text))


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda"):
        raise ValueError("must be auto, cpu or cuda")
    return text


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 1 to 65535 (0: any free one)")
    return value


def _root(text: str) -> Path:
    if not text.strip():
        raise ValueError("must be a folder (empty would mean the current one)")
    return Path(text)


def _mirror(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a folder or an http(s) URL")
    if "://" in text:
        try:
            parts = urllib.parse.urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"is not a usable URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be a folder or an http(s) URL")
        if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in text):
            raise ValueError("is not a usable URL (no host name, or a space in it)")
    return text


@dataclass(frozen=True)
class Setting:
    """One option: its flag, its MNIST_* twin, how to read it, its default."""

    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "MNIST_" + self.dest.upper()


ROOT = Setting("--root", _root, DEFAULT_ROOT,
               "volume root holding data/, model/, results/ (containers: /opt/mount)", "DIR")
MIRROR = Setting("--mirror", _mirror, None,
                 "MNIST source: a folder or http(s) base URL with the four files (.gz or raw); "
                 "unset: the public mirrors", "DIR_OR_URL")
DEVICE = Setting("--device", _device, config.DEVICE, "auto (CUDA when present), cpu or cuda", "DEVICE")
THREADS = Setting("--threads", _positive_int, None, "CPU threads (default: the CPUs this process may use)", "N")
SEED = Setting("--seed", _seed, None,
               f"train: seed for weights and data order (default {default_of(Recipe, 'seed')}, "
               "kept in the checkpoint); infer: seed for the image pick (default: a new pick every run)", "N")
WAIT = Setting("--wait", _non_negative_float, config.WAIT_S,
               "seconds to wait for the input (longer while its producer is still running)", "SECONDS")

THRESHOLD = Setting("--threshold", _fraction, config.THRESHOLD, "accuracy the model must exceed", "FRACTION")
GRACE = Setting("--grace", _non_negative_float, config.GRACE_S,
                "seconds after start during which work already done is not used yet: a train started "
                "at the same time (`docker compose up`) takes its lock first", "SECONDS")

COMMON = [ROOT, MIRROR, DEVICE, THREADS]
TRAIN = [
    Setting("--epochs", _epochs, default_of(TrainConfig, "epochs"), "epochs to train on top of the checkpoint", "N"),
    Setting("--batch-size", _batch_size, default_of(Recipe, "batch_size"), "training batch size", "N"),
    Setting("--lr", _learning_rate, default_of(Recipe, "peak_lr"), "peak learning rate of each epoch's cycle", "LR"),
    Setting("--fresh", _boolean, default_of(TrainConfig, "fresh"),
            "move an existing checkpoint aside and start from scratch"),
    Setting("--max-steps", _non_negative_int, default_of(Recipe, "max_steps"),
            "batches per epoch, the learning-rate cycle included (0: the whole training set); for quick trials", "N"),
    Setting("--save-every", _non_negative_float, default_of(TrainConfig, "save_every_s"),
            "seconds between progress saves within an epoch, so a kill -9 loses at most that (0: only on SIGTERM)",
            "SECONDS"),
]
# train only (not pipeline): evaluate and infer run in one process
NPROC_PER_NODE = Setting("--nproc-per-node", _positive_int, config.NPROC_PER_NODE,
                         "processes training together (data parallel) through torchrun's elastic agent; "
                         "ignored inside torchrun", "N")
EVALUATE = [WAIT, GRACE]
INFER = [
    WAIT,
    GRACE,
    THRESHOLD,
    Setting("--count", _positive_int, default_of(InferConfig, "count"), "how many random test images to label", "N"),
]
PREDICT = [ROOT, DEVICE, THREADS, THRESHOLD]
SERVE = PREDICT + [
    Setting("--host", _host, default_of(ServeConfig, "host"), "address to listen on (the image: 0.0.0.0)", "HOST"),
    Setting("--port", _port, default_of(ServeConfig, "port"), "TCP port to listen on (0: any free one, logged)",
            "PORT"),
    Setting("--max-connections", _positive_int, default_of(ServeConfig, "max_connections"),
            "connections open at once; a new one closes the one idle longest", "N"),
    Setting("--max-decodes", _positive_int, default_of(ServeConfig, "max_decodes"),
            "images decoded at once (default: the CPUs this process may use)", "N"),
    Setting("--max-waiting", _non_negative_int, default_of(ServeConfig, "max_waiting"),
            "requests waiting for a decode; more get 503 with Retry-After", "N"),
    Setting("--read-timeout", _positive_float, default_of(ServeConfig, "read_timeout"),
            "seconds a request's head or body may stall before the connection is closed (408)", "SECONDS"),
    Setting("--keep-alive", _positive_float, default_of(ServeConfig, "keep_alive"),
            "seconds an idle connection stays open after an answer", "SECONDS"),
]
COMMANDS: Dict[str, List[Setting]] = {
    "train": COMMON + [SEED] + TRAIN + [NPROC_PER_NODE],
    "evaluate": COMMON + EVALUATE,  # no --seed: scoring draws nothing at random
    "infer": COMMON + [SEED] + INFER,
    "pipeline": COMMON + [SEED] + TRAIN + INFER,
    "report": [ROOT, MIRROR],
    "predict": PREDICT,
    "serve": SERVE,
}
DESCRIPTIONS = {
    "train": "Resume from model/mnist_cnn.pt if present, train --epochs more epochs, save atomically.",
    "evaluate": "Wait for a finished checkpoint, score it on the 10,000 test images, write model/eval_results.json "
                "and the report (model/report/).",
    "infer": "Wait for the current checkpoint's evaluation; if accuracy is above --threshold, "
             "write --count labelled test images to results/.",
    "pipeline": "train, evaluate, infer in order, then the report again (with infer's images).",
    "report": "Rebuild model/report/ (index.html and its pictures) from eval_results.json, the history and results/.",
    "predict": "Read the digit in each IMAGE (any image Pillow reads) with the current checkpoint, "
               "if its evaluation passes --threshold.",
    "serve": "HTTP prediction API and a draw-a-digit page at http://HOST:PORT; follows each new "
             "evaluated checkpoint that passes --threshold.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist", description="MNIST train / evaluate / infer on a shared volume.", epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for name, settings in COMMANDS.items():
        sub = commands.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name], epilog=EPILOG)
        for s in settings:
            default = f" (default: {s.default})" if s.default not in (None, False) else ""
            text = f"{s.help}; env {s.env}{default}"
            if s.parse is _boolean:
                sub.add_argument(s.flag, action="store_const", const=True, default=None, help=text)
            else:
                sub.add_argument(s.flag, type=_flag_type(s), default=None, metavar=s.metavar, help=text)
        if name == "predict":
            sub.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
            sub.add_argument("--json", action="store_true",
                             help="print a JSON list (file, digit, confidence, probabilities) instead of lines")
    return parser


def _flag_type(setting: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {_why(exc)}") from None

    parse.__name__ = setting.dest
    return parse


def _why(exc: ValueError) -> str:
    text = str(exc)
    return "not a number" if text.startswith(("invalid literal", "could not convert")) else text


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Any]:
    """Each setting of the chosen command: the flag if given, else its MNIST_* variable, else the default."""
    values = {}
    for s in COMMANDS[args.command]:
        value = getattr(args, s.dest)
        if value is None and s.env in env:
            try:
                value = s.parse(env[s.env])
            except ValueError as exc:
                parser.error(f"{s.env}={env[s.env]!r}: {_why(exc)}; fix or unset it, or pass {s.flag}")
        values[s.dest] = s.default if value is None else value
    return values


def _configs(command: str, v: Dict[str, Any]):
    if command == "report":  # reads files only: no device, threads or seed
        return {"report": ReportConfig(root=v["root"], mirror=v["mirror"])}
    common = {"root": v["root"], "mirror": v["mirror"], "device": v["device"], "threads": v["threads"]}
    configs = {}
    if command in ("train", "pipeline"):
        # --seed is unset (None) by default: infer then picks anew each run, and train uses the recipe's seed
        seed = default_of(Recipe, "seed") if v["seed"] is None else v["seed"]
        recipe = Recipe(seed=seed, batch_size=v["batch_size"], peak_lr=v["lr"], max_steps=v["max_steps"])
        configs["train"] = TrainConfig(epochs=v["epochs"], recipe=recipe, fresh=v["fresh"],
                                       save_every_s=v["save_every"], **common)
    if command in ("evaluate", "pipeline"):
        configs["evaluate"] = EvaluateConfig(wait_s=v["wait"], grace_s=v["grace"], **common)
    if command in ("infer", "pipeline"):
        configs["infer"] = InferConfig(
            wait_s=v["wait"], grace_s=v["grace"], threshold=v["threshold"], count=v["count"], seed=v["seed"], **common
        )
    if command == "pipeline":  # evaluate's report came before infer's images
        configs["report"] = ReportConfig(root=v["root"], mirror=v["mirror"])
    return configs


def _report(stage: str, result: Any) -> None:
    """The short summary on stdout; the full results are in the volume's files."""
    if stage == "train":
        print(f"train: epoch {result.epoch}, train loss {result.train_loss:.4f}, "
              f"{result.seconds:.1f} s -> {result.checkpoint}")
    elif stage == "evaluate":
        print(f"evaluate: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}), "
              f"test loss {result['test_loss']:.4f}, epoch {result['checkpoint']['epoch']}")
    elif stage == "report":
        print(f"report: {result}")
    else:
        files = ", ".join(f"{p['file']} (true {p['label']})" for p in result["predictions"])
        print(f"infer: accuracy {result['accuracy']:.4f} > {result['threshold']}: {files}")


def _predict(values: Dict[str, Any], images: List[Path], as_json: bool) -> int:
    """One line per image on stdout, an `error: FILE: ...` line on stderr for each unreadable one."""
    import json

    from mnist_pipeline import predict

    results = predict.run(PredictConfig(images=tuple(images), **values))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
        elif not as_json:
            print(f"{result['file']}: {result['digit']} ({result['confidence']:.3f})")
    if as_json:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in result for result in results) else 0


def main(argv: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ) if env is None else env
    values = resolve(parser, args, env)
    world = distributed.world(env)  # a rank of a torchrun group, or a world of one
    if world.size > 1 and args.command != "train":
        parser.error(f"only `mnist train` runs as a torchrun group, not `mnist {args.command}`: run it in one process")
    if args.command == "train" and values["nproc_per_node"] > 1 and not distributed.launched(env):
        try:
            distributed.check_batch_size(values["batch_size"], values["nproc_per_node"])
        except UsageError as exc:
            parser.error(str(exc))
        return distributed.launch(values["nproc_per_node"], sys.argv[1:] if argv is None else argv)
    signals.install()  # recorded only, until the stages run: torch's import is not interrupted
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if world.is_main else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    volume = Volume(values["root"])
    try:
        if args.command in ("evaluate", "infer") and not volume.root.is_dir():
            raise PipelineError(
                f"no volume at {volume.root} (no such folder): run `mnist train --root {volume.root}` first, "
                f"or fix --root / MNIST_ROOT"
            )
        with contextlib.ExitStack() as train_lock:
            if args.command in ("train", "pipeline") and world.size == 1:
                # before torch loads (a second or two): a train started beside an evaluate and an infer
                # (`docker compose up`) holds its lock long before they would use the old checkpoint.
                # In a torchrun group rank 0 takes it once the group has formed: a busy volume then
                # stops every rank at once instead of leaving the others waiting for rank 0.
                train_lock.enter_context(exclusive_lock(volume, "train"))
            from mnist_pipeline import evaluate, infer, report, runtime, train

            cpus = runtime.available_cpus()
            if values.get("threads") is not None and values["threads"] > cpus:
                parser.error(f"--threads / MNIST_THREADS {values['threads']}: this process may use {cpus} CPUs; "
                             f"pass at most {cpus}")
            if args.command == "serve":
                from mnist_pipeline import serve

                serve.run(ServeConfig(**values))  # uvicorn handles SIGTERM itself: a graceful shutdown
                return 0
            if args.command == "predict":
                with signals.interruptible():
                    return _predict(values, args.images, args.json)
            stages = {"train": train.run, "evaluate": evaluate.run, "infer": infer.run, "report": report.run}
            for stage, stage_config in _configs(args.command, values).items():
                with signals.interruptible():
                    result = stages[stage](stage_config)
                if world.is_main:  # one summary per group
                    _report(stage, result)
                if stage == "train":
                    train_lock.close()  # pipeline: its evaluate must not wait for its own train
                if signals.received() is not None:  # arrived after the stage's last save: nothing is lost
                    raise signals.interrupted(f"after {stage} finished and saved its results")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def script() -> None:
    """The `mnist` command: main(), then exit at once.

    os._exit skips the interpreter's teardown, during which Python restores the default signal
    handlers: a `docker stop` landing there killed the process by the signal (exit -15) instead of
    the promised 143. It also saves the time torch's teardown takes.
    """
    code = main()
    faults.crash_point("exit")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    late = signals.received()
    os._exit(128 + late if late is not None and code == 0 else code)
