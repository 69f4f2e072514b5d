"""The `mnist` command: parse the settings, run the stages in order, write the report, say what happened.

Exit codes: 0 done; 1 error (a one-line `error:` says what and how to fix it);
2 usage error (a bad flag or MNIST_* value); 3 infer: accuracy not above the
threshold, no results written (predict: also the current checkpoint not yet evaluated);
4 another train holds the volume;
130 / 143 stopped by SIGINT / SIGTERM (train saved its progress first).

The commands themselves are in commands/: one entry each in commands.COMMANDS.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from mnist_pipeline import distributed, faults, parse, settings, signals
from mnist_pipeline.commands import COMMANDS, Command
from mnist_pipeline.commands.stages import check_signal
from mnist_pipeline.errors import PipelineError, UsageError
from mnist_pipeline.storage.files import describe
from mnist_pipeline.storage.locks import exclusive_lock
from mnist_pipeline.volume import Volume
EPILOG = ("Exit codes: 0 ok, 1 error, 2 usage error, 3 accuracy not above threshold (predict: or not evaluated), "
          "4 volume busy, 130/143 interrupted.")

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
            if s.parse is parse.boolean:
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
    command = COMMANDS[args.command]
    world = distributed.world(env)  # a rank of a torchrun group, or a world of one
    if world.size > 1 and not command.group:
        parser.error(f"only `mnist train` runs as a torchrun group, not `mnist {args.command}`: run it in one process")
    nproc = values.pop("nproc_per_node", 1)
    if nproc > 1 and not distributed.launched(env):
        try:
            distributed.check_batch_size(values["batch_size"], nproc)
        except UsageError as exc:
            parser.error(str(exc))
        return distributed.launch(nproc, sys.argv[1:] if argv is None else argv)
    _set_up_process(args.verbose, world.is_main)
    if command.waits:
        values["started"] = started
    try:
        return _run(parser, args, command, values, world)
    except PipelineError as exc:
        if not getattr(exc, "silent", False):  # (a rank that stops because rank 0 did: rank 0 says why)
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _set_up_process(verbose: bool, is_main: bool) -> None:
    # Before torch loads: idle OpenMP threads sleep instead of spinning, which slows everything else
    # down on a machine with few cores (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signals.install()  # recorded only, until the stages run: torch's import is not interrupted
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO if is_main else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: Command, values: Dict[str, Any],
         world: distributed.World) -> int:
    """The command, under the train lock where it trains, with SIGTERM and SIGINT its to handle where it can."""
    volume = Volume(values["root"])
    if command.needs_volume and not volume.root.is_dir():
        raise PipelineError(
            f"no volume at {describe(volume.root)} (no such folder): run `mnist train --root "
            f"{describe(volume.root)}` first, or fix --root / MNIST_ROOT"
        )
    with contextlib.ExitStack() as args.train_lock:
        if command.trains and world.size == 1:
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
        check_signal(args.command)
        return code


def _check_threads(parser: argparse.ArgumentParser, values: Dict[str, Any]) -> None:
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
