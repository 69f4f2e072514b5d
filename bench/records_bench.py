"""What reading the volume's JSON records costs a command: each figure the median of fresh interpreters.

    python bench/records_bench.py ROOT [--runs 15]

ROOT: an evaluated volume (model/eval_results.json, model/versions/). Prints, in milliseconds, the import of
the record modules; reading eval_results.json and every version (what `mnist models` reads) after that
import; the reads evaluate does (its evaluation, the versions, the aliases, the history, the counter) in a
process that holds torch and a network, as evaluate does; and a whole `mnist models` process. Run it with
PYTHONPATH pointing at another tree's src/ to compare two versions of the code on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORT = "import mnist_pipeline.records.evaluation, mnist_pipeline.records.versions, mnist_pipeline.records.aliases"
VOLUME = """
from pathlib import Path
from mnist_pipeline.volume import Volume
from mnist_pipeline.records import aliases, evaluation, versions
volume = Volume(Path({root!r}))
"""
READ = "evaluation.read(volume)\nassert aliases.catalogue(volume)"
TORCH = "from mnist_pipeline.records import checkpoint, history\ncheckpoint.read(volume.checkpoint).build_model()"
EVALUATES = "evaluation.read(volume); versions.listing(volume); aliases.every(volume); history.read(volume)\n" \
            "versions._next_number(volume)"


def timed(code: str, setup: str = "") -> float:
    """The CPU milliseconds `code` takes in a fresh interpreter, after its start and `setup`."""
    probe = f"{setup}\nimport time\nstarted = time.process_time()\n{code}\nprint(1e3 * (time.process_time() - started))"
    return float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)


def process(*args: str) -> float:
    """The wall milliseconds of a whole `mnist` process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnist_pipeline", *args], check=True, capture_output=True)
    return 1e3 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    volume = VOLUME.format(root=args.root)
    figures = {
        "import the record modules (CPU ms)": lambda: timed(IMPORT),
        "read eval_results.json and every version, after that import (CPU ms)": lambda: timed(READ, volume),
        "evaluate's reads, torch and a network loaded (CPU ms)": lambda: timed(EVALUATES, volume + TORCH),
        "`mnist models`, whole process (wall ms)": lambda: process("models", "--root", args.root),
    }
    for name, measure in figures.items():
        values = [measure() for _ in range(args.runs)]
        print(f"{name}: median {statistics.median(values):.0f}, min {min(values):.0f}")


if __name__ == "__main__":
    main()
