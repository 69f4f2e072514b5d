"""The `mnist` command: flags > MNIST_* environment variables > defaults.

Exit codes: 0 done; 1 error (a one-line `error:` says what and how to fix it);
2 usage error (a bad flag or MNIST_* value); 3 infer: accuracy not above the
threshold, no results written; 4 another train holds the volume;
130 / 143 stopped by SIGINT / SIGTERM (train saved its progress first).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from mnist_pipeline import distributed, faults, signals
from mnist_pipeline.errors import PipelineError, UsageError

# Before torch loads: idle OpenMP threads sleep instead of spinning. Spinning threads made a
# 2-thread epoch ten times slower whenever anything else ran on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_ROOT = Path("mnist-volume")  # beside where you run it, named after the Compose volume
EPILOG = "Exit codes: 0 ok, 1 error, 2 usage error, 3 accuracy not above threshold, 4 volume busy, 130/143 interrupted."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise ValueError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("must be a fraction from 0 to 1")
    return value


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


def _mirror(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a folder or an http(s) URL")
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


ROOT = Setting("--root", Path, DEFAULT_ROOT,
               "volume root holding data/, model/, results/ (containers: /opt/mount)", "DIR")
MIRROR = Setting("--mirror", _mirror, None,
                 "MNIST source: a folder or http(s) base URL with the four files (.gz or raw); "
                 "unset: the public mirrors", "DIR_OR_URL")
DEVICE = Setting("--device", _device, "auto", "auto (CUDA when present), cpu or cuda", "DEVICE")
THREADS = Setting("--threads", _positive_int, None, "CPU threads (default: the CPUs this process may use)", "N")
SEED = Setting("--seed", int, None,
               "train: seed for weights and data order (default 0, kept in the checkpoint); "
               "infer: seed for the image pick (default: a new pick every run)", "N")
WAIT = Setting("--wait", _non_negative_float, 30.0,
               "seconds to wait for the input (longer while its producer is still running)", "SECONDS")

COMMON = [ROOT, MIRROR, DEVICE, THREADS, SEED]
TRAIN = [
    Setting("--epochs", _positive_int, 1, "epochs to train on top of the checkpoint", "N"),
    Setting("--batch-size", _positive_int, 128, "training batch size", "N"),
    Setting("--lr", _positive_float, 0.4, "peak learning rate of each epoch's cycle", "LR"),
    Setting("--fresh", _boolean, False, "move an existing checkpoint aside and start from scratch"),
    Setting("--max-steps", _non_negative_int, 0,
            "batches per epoch, the learning-rate cycle included (0: the whole training set); for quick trials", "N"),
    Setting("--save-every", _non_negative_float, 60.0,
            "seconds between progress saves within an epoch, so a kill -9 loses at most that (0: only on SIGTERM)",
            "SECONDS"),
]
# train only (not pipeline): evaluate and infer run in one process
NPROC_PER_NODE = Setting("--nproc-per-node", _positive_int, 1,
                         "processes training together (data parallel) through torchrun's elastic agent; "
                         "ignored inside torchrun", "N")
EVALUATE = [WAIT]
INFER = [
    WAIT,
    Setting("--threshold", _fraction, 0.95, "accuracy the model must exceed", "FRACTION"),
    Setting("--count", _positive_int, 5, "how many random test images to label", "N"),
]
COMMANDS: Dict[str, List[Setting]] = {
    "train": COMMON + TRAIN + [NPROC_PER_NODE],
    "evaluate": COMMON + EVALUATE,
    "infer": COMMON + INFER,
    "pipeline": COMMON + TRAIN + INFER,
}
DESCRIPTIONS = {
    "train": "Resume from model/mnist_cnn.pt if present, train --epochs more epochs, save atomically.",
    "evaluate": "Wait for a finished checkpoint, score it on the 10,000 test images, write model/eval_results.json.",
    "infer": "Wait for the current checkpoint's evaluation; if accuracy is above --threshold, "
             "write --count labelled test images to results/.",
    "pipeline": "train, evaluate, infer in order.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist", description="MNIST train / evaluate / infer on a shared volume.", epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate,infer,pipeline}", required=True)
    for name, settings in COMMANDS.items():
        sub = commands.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name], epilog=EPILOG)
        for s in settings:
            default = f" (default: {s.default})" if s.default not in (None, False) else ""
            text = f"{s.help}; env {s.env}{default}"
            if s.parse is _boolean:
                sub.add_argument(s.flag, action="store_const", const=True, default=None, help=text)
            else:
                sub.add_argument(s.flag, type=_flag_type(s), default=None, metavar=s.metavar, help=text)
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
    # imported here so that `mnist --help` and usage errors answer before torch loads
    from mnist_pipeline.evaluate import EvaluateConfig
    from mnist_pipeline.infer import InferConfig
    from mnist_pipeline.train import Recipe, TrainConfig

    common = {"root": v["root"], "mirror": v["mirror"], "device": v["device"], "threads": v["threads"]}
    configs = {}
    if command in ("train", "pipeline"):
        recipe = Recipe(seed=v["seed"] or 0, batch_size=v["batch_size"], peak_lr=v["lr"], max_steps=v["max_steps"])
        configs["train"] = TrainConfig(epochs=v["epochs"], recipe=recipe, fresh=v["fresh"],
                                       save_every_s=v["save_every"], **common)
    if command in ("evaluate", "pipeline"):
        configs["evaluate"] = EvaluateConfig(wait_s=v["wait"], **common)
    if command in ("infer", "pipeline"):
        configs["infer"] = InferConfig(
            wait_s=v["wait"], threshold=v["threshold"], count=v["count"], seed=v["seed"], **common
        )
    return configs


def _report(stage: str, result: Any) -> None:
    """The short summary on stdout; the full results are in the volume's files."""
    if stage == "train":
        print(f"train: epoch {result.epoch}, train loss {result.train_loss:.4f}, "
              f"{result.seconds:.1f} s -> {result.checkpoint}")
    elif stage == "evaluate":
        print(f"evaluate: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}), "
              f"test loss {result['test_loss']:.4f}, epoch {result['checkpoint']['epoch']}")
    else:
        files = ", ".join(f"{p['file']} (true {p['label']})" for p in result["predictions"])
        print(f"infer: accuracy {result['accuracy']:.4f} > {result['threshold']}: {files}")


def main(argv: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ) if env is None else env
    values = resolve(parser, args, env)
    world = distributed.world(env)  # a rank of a torchrun group, or a world of one
    if world.size > 1 and args.command != "train":
        parser.error(f"only `mnist train` runs as a torchrun group, not `mnist {args.command}`: run it in one process")
    if values.get("nproc_per_node", 1) > 1 and not distributed.launched(env):
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
    try:
        from mnist_pipeline import evaluate, infer, train

        stages = {"train": train.run, "evaluate": evaluate.run, "infer": infer.run}
        for stage, config in _configs(args.command, values).items():
            with signals.interruptible():
                result = stages[stage](config)
            if world.is_main:  # one summary per group
                _report(stage, result)
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
