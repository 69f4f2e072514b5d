"""`mnist export [--version N] [--follow]`: each evaluated version's ONNX model (export.py does the work).

One line on stdout per model written. --follow looks again every POLL_S until SIGTERM or SIGINT, as the
Compose export service runs it: a version that fails is logged once and tried again later, with a longer
wait each time, and never ends the watch. The command handles both signals itself (Command.interruptible
is off): an export under way finishes, then it stops, with the exit code the signal asks for.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from mnist_pipeline import signals
from mnist_pipeline.commands.registry import version_number
from mnist_pipeline.errors import PipelineError, UsageError
from mnist_pipeline.storage.files import describe
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

Values = Dict[str, Any]
POLL_S = 1.0  # --follow: how often the versions are looked at
RETRY_S, MAX_RETRY_S = 30.0, 600.0  # a version that failed is tried again after this, doubling up to the most
INSTALL = ("`pip install onnx onnxscript onnxruntime numpy`, or let the Compose export service do it "
           "(`docker compose --profile serve up export`)")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=version_number, metavar="N",
                        help="export version N only, again if it has its ONNX model already "
                             "(`mnist models` lists them)")


def export(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import export as stage, runtime

    if v["follow"] and args.version is not None:
        raise UsageError("--follow (or MNIST_FOLLOW) exports every version as it comes, --version N one version: "
                         "pass one of them, and unset MNIST_FOLLOW for --version")
    why = stage.unavailable()
    if why:
        raise PipelineError(f"mnist export needs torch's ONNX exporter (onnx, onnxscript) and onnxruntime for its "
                            f"parity check: {why}; {INSTALL}")
    threads = v["threads"] or runtime.available_cpus()
    runtime.setup("cpu", threads)
    exports = Exports(Volume(v["root"]), v["mirror"], threads)
    if args.version is not None:
        print(line(stage.export_version(exports.volume, args.version, v["mirror"], threads)))
    elif v["follow"]:
        exports.follow()
    else:
        exports.once()
    return 0


def line(exported) -> str:
    """The stdout line of one export.Exported."""
    return f"export: version {exported.number} -> {describe(exported.path)} ({exported.parity.describe()})"


class Exports:
    """Exports the versions that lack their ONNX model; remembers what failed, to say it once and retry later."""

    def __init__(self, volume: Volume, mirror: Optional[str], threads: int):
        self.volume, self.mirror, self.threads = volume, mirror, threads
        self.retry_at: Dict[int, float] = {}  # a version that failed -> when to try it again
        self.waited: Dict[int, float] = {}  # -> how long that was
        self.said: Dict[Any, str] = {}  # version (or "volume") -> the last warning about it

    def once(self) -> None:
        """One pass; a version that fails is the error (the others are exported first)."""
        exported, skipped, failed = self.run_pass()
        if signals.received() is not None:
            raise signals.interrupted(f"after exporting {exported} versions")
        if failed:
            for _, failure in failed[1:]:
                log.warning("%s", failure)
            more = f"; and {len(failed) - 1} more versions failed (logged above)" if len(failed) > 1 else ""
            raise PipelineError(failed[0][1] + more)
        if not exported and not skipped:
            from mnist_pipeline.records import versions

            kept = len(versions.listing(self.volume))
            print(f"export: nothing to do: every version ({kept}) has its ONNX model" if kept else
                  "export: no versions yet: `mnist evaluate` keeps each checkpoint it scores as one")

    def follow(self) -> None:
        log.info("watching %s for versions without their ONNX model; SIGTERM or SIGINT stops",
                 describe(self.volume.versions_dir))
        while signals.received() is None:
            try:
                for number, failure in self.run_pass()[2]:
                    self.warn(number, failure)
                self.said.pop("volume", None)
            except (PipelineError, OSError) as exc:  # e.g. model/versions/ not readable: the next look may do
                self.warn("volume", f"cannot look at {describe(self.volume.versions_dir)}: {exc}")
            deadline = time.monotonic() + POLL_S
            while signals.received() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        log.info("%s", signals.interrupted())

    def run_pass(self) -> Tuple[int, int, List[Tuple[int, str]]]:
        """Export each version lacking its model: (exported, skipped, each failed version and why)."""
        from mnist_pipeline import export as stage
        from mnist_pipeline.records import versions

        exported, skipped, failed = 0, 0, []
        for found in versions.listing(self.volume):
            number = found.number
            if signals.received() is not None:
                break
            if isinstance(found, versions.Corrupt):
                self.warn(number, f"skipping version {number}: {found.problem}")
                skipped += 1
                continue
            if self.volume.exported(number).exists() or time.monotonic() < self.retry_at.get(number, 0.0):
                continue
            try:
                print(line(stage.export_version(self.volume, number, self.mirror, self.threads)), flush=True)
                exported += 1
                self.retry_at.pop(number, None)
                self.waited.pop(number, None)
            except versions.NoSuchVersion:
                continue  # removed by a prune meanwhile
            except stage.Unusable as exc:
                self.warn(number, f"skipping version {number}: {exc}")
                self.later(number)
                skipped += 1
            except signals.Interrupted:
                raise
            except PipelineError as exc:
                text = str(exc)
                failed.append((number, text if text.startswith(f"version {number}") else f"version {number}: {text}"))
                self.later(number)
        return exported, skipped, failed

    def later(self, number: int) -> None:
        self.waited[number] = min(self.waited.get(number, RETRY_S / 2) * 2, MAX_RETRY_S)
        self.retry_at[number] = time.monotonic() + self.waited[number]

    def warn(self, about: Any, message: str) -> None:
        if self.said.get(about) != message:
            log.warning("%s", message)
            self.said[about] = message
