"""What reading the volume's JSON records costs a command: each figure the median of fresh interpreters.

    python bench/records_bench.py ROOT [--runs 15]

ROOT: an evaluated volume (model/eval_results.json, model/versions/). Prints, in milliseconds, the import of
the record modules, that import plus reading eval_results.json and every version (what `mnist models` and
evaluate's registration read), and a whole `mnist models` process. Run it with PYTHONPATH pointing at another
tree's src/ to compare two versions of the code on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORT = "import mnist_pipeline.records.evaluation, mnist_pipeline.records.versions, mnist_pipeline.records.aliases"
READ = IMPORT + """
from pathlib import Path
from mnist_pipeline.volume import Volume
from mnist_pipeline.records import aliases, evaluation
volume = Volume(Path({root!r}))
evaluation.read(volume)
assert aliases.catalogue(volume)
"""


def timed(code: str) -> float:
    """The CPU milliseconds `code` takes in a fresh interpreter (after its own start)."""
    probe = f"import time\nstarted = time.process_time()\n{code}\nprint(1e3 * (time.process_time() - started))"
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
    figures = {
        "import the record modules (CPU ms)": lambda: timed(IMPORT),
        "import + read eval_results.json and every version (CPU ms)": lambda: timed(READ.format(root=args.root)),
        "`mnist models`, whole process (wall ms)": lambda: process("models", "--root", args.root),
    }
    for name, measure in figures.items():
        values = [measure() for _ in range(args.runs)]
        print(f"{name}: median {statistics.median(values):.0f}, min {min(values):.0f}")


if __name__ == "__main__":
    main()
