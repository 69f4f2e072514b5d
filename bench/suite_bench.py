"""The non-Docker test suite's wall time against one `mnist train`, measured in the same run.

    python bench/suite_bench.py [--mirror DIR_OR_URL] [-- PYTEST_ARGS...]

Issue 19's goal: the suite (`python -m pytest -m "not docker"`) in at most 10x the time of one
`mnist train` (a whole process, data already in the volume, a fresh model, one epoch). The train is
timed before and after the suite, on the same machine, and the ratio uses their mean; the suite reads
MNIST from the same mirror (as MNIST_TEST_MIRROR). The machine's busy CPU time during the suite (all
processes, from /proc/stat) says how far running tests side by side could go: the suite's CPU seconds
over the CPUs is the least it could take. Prints a table and writes bench/results/suite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import cpu_model, mnist

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL = 10.0


def time_train(mirror: str, parent: Path, name: str) -> float:
    root = parent / name
    mnist("train", "--root", str(root), "--mirror", mirror, "--max-steps", "1")  # fetch the data first
    shutil.rmtree(root / "model")
    seconds, _ = mnist("train", "--root", str(root), "--mirror", mirror)
    return seconds


def busy_cpu_s() -> float:
    """CPU seconds this machine has spent busy since boot, every CPU and process (Linux /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_mirror = os.environ.get("MNIST_TEST_MIRROR") or str(REPO.parent / "shared" / "mnist")
    parser.add_argument("--mirror", default=default_mirror,
                        help="MNIST files: a folder or an http(s) URL (default: MNIST_TEST_MIRROR, or ../shared/mnist)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        before = time_train(args.mirror, Path(scratch), "before")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}, "MNIST_TEST_MIRROR": args.mirror}
        started, busy = time.perf_counter(), busy_cpu_s()
        suite = subprocess.run([sys.executable, "-m", "pytest", "-m", "not docker", "-q", "-p", "no:cacheprovider",
                                *args.pytest_args], cwd=REPO, env=env, capture_output=True, text=True)
        suite_s, suite_cpu_s = time.perf_counter() - started, busy_cpu_s() - busy
        after = time_train(args.mirror, Path(scratch), "after")
    summary = suite.stdout.strip().splitlines()[-1] if suite.stdout.strip() else "(no output)"
    if suite.returncode != 0:
        sys.exit(f"bench: the suite failed ({suite.returncode}): {summary}\n{suite.stdout[-3000:]}")
    train_s = (before + after) / 2
    cpus = len(os.sched_getaffinity(0))
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|deselected)", summary)}
    result = {
        "machine": f"{cpu_model()}, {cpus} CPUs available",
        "train_s_before": round(before, 2),
        "train_s_after": round(after, 2),
        "suite_s": round(suite_s, 1),
        "tests": counts,
        "suite_to_train_ratio": round(suite_s / train_s, 1),
        "suite_cpu_s": round(suite_cpu_s, 1),  # busy CPU time of the whole machine during the suite
        "cpu_busy_share": round(suite_cpu_s / (suite_s * cpus), 2),
        "ratio_if_every_cpu_were_busy": round(suite_cpu_s / cpus / train_s, 1),
        "goal_ratio": GOAL,
    }
    print(f"one `mnist train`: {before:.1f} s before, {after:.1f} s after the suite")
    print(f"suite (-m 'not docker'): {suite_s:.0f} s, {summary}")
    print(f"suite / train: {suite_s / train_s:.1f}x (goal: at most {GOAL:g}x)")
    print(f"busy CPU time during the suite: {suite_cpu_s:.0f} s, {suite_cpu_s / (suite_s * cpus):.0%} of {cpus} CPUs; "
          f"with every CPU busy all along it would still be {suite_cpu_s / cpus / train_s:.1f}x")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "suite.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
