"""Accuracy and speed of `mnist train / evaluate / infer`, beside the reference recipe, in one run.

    python bench/bench_pipeline.py [--mirror DIR] [--seeds 0 1 2] [--quick]

Every figure is a whole `mnist` process (start to exit, data already in the
volume) unless it says compute. Prints a table and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def mnist(*args: str, threads: int | None = None) -> tuple[float, str]:
    """Run one `mnist` process; return its wall time and stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    if threads:
        env["MNIST_THREADS"] = str(threads)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mnist_pipeline", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench: `mnist {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return seconds, result.stdout


def fresh_root(data_dir: Path, parent: Path, name: str) -> Path:
    root = parent / name
    shutil.copytree(data_dir, root / "data")
    return root


def train_and_score(data_dir: Path, parent: Path, name: str, *flags: str, threads: int | None = None) -> dict:
    root = fresh_root(data_dir, parent, name)
    train_s, _ = mnist("train", "--root", str(root), *flags, threads=threads)
    evaluate_s, _ = mnist("evaluate", "--root", str(root), "--wait", "0", threads=threads)
    evaluation = json.loads((root / "model" / "eval_results.json").read_text())
    return {"train_s": train_s, "evaluate_s": evaluate_s, "evaluate_compute_s": evaluation["compute_seconds"],
            "accuracy": evaluation["accuracy"], "root": root}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=str(REPO.parent / "shared" / "mnist"), help="local MNIST folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="skip the thread and batch-size sweeps")
    parser.add_argument("--out", default=str(HERE / "results" / "pipeline.json"))
    args = parser.parse_args(argv)

    from mnist_pipeline import data
    from mnist_pipeline.runtime import available_cpus

    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        parent = Path(tmp)
        data.ensure(parent / "data", args.mirror)
        cpus = available_cpus()

        reference_json = parent / "reference.json"
        print(f"reference recipe: one epoch on {cpus} threads ...", file=sys.stderr)
        # the same OpenMP setting `mnist` uses, so the comparison is of recipes, not thread runtimes
        subprocess.run([sys.executable, str(HERE / "reference_recipe.py"), "--mirror", args.mirror,
                        "--threads", str(cpus), "--json", str(reference_json)], check=True,
                       env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        reference = json.loads(reference_json.read_text())

        runs = {}
        for seed in args.seeds:
            print(f"mnist train/evaluate, seed {seed} ...", file=sys.stderr)
            runs[seed] = train_and_score(parent / "data", parent, f"seed{seed}", "--seed", str(seed))
        first = runs[args.seeds[0]]
        infer_s, _ = mnist("infer", "--root", str(first["root"]), "--seed", "0")
        infer_compute_s = json.loads((first["root"] / "results" / "predictions.json").read_text())["compute_seconds"]

        sweeps = []
        if not args.quick:
            for threads in sorted({1, cpus}):
                r = train_and_score(parent / "data", parent, f"threads{threads}", threads=threads)
                sweeps.append({"what": f"threads {threads}", "train_s": r["train_s"], "accuracy": r["accuracy"]})
            for batch in (64, 256):
                r = train_and_score(parent / "data", parent, f"batch{batch}", "--batch-size", str(batch))
                sweeps.append({"what": f"batch {batch}", "train_s": r["train_s"], "accuracy": r["accuracy"]})

    accuracies = [r["accuracy"] for r in runs.values()]
    train_times = [r["train_s"] for r in runs.values()]
    report = {
        "machine": f"{cpu_model()}, {cpus} CPUs available",
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "reference_epoch_s": reference["epoch_seconds"],
        "reference_accuracy": reference["accuracy"],
        "train_s_median": statistics.median(train_times),
        "train_to_reference_ratio": statistics.median(train_times) / reference["epoch_seconds"],
        "accuracy_median": statistics.median(accuracies),
        "accuracy_min": min(accuracies),
        "per_seed": {str(s): {k: v for k, v in r.items() if k != "root"} for s, r in runs.items()},
        "evaluate_s": first["evaluate_s"],
        "evaluate_compute_s": first["evaluate_compute_s"],
        "infer_s": infer_s,
        "infer_compute_s": infer_compute_s,
        "sweeps": sweeps,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"| measure ({report['machine']}) | value |")
    print("|---|---|")
    print(f"| reference recipe, bare epoch | {reference['epoch_seconds']:.1f} s, "
          f"accuracy {reference['accuracy']:.4f} |")
    for seed, r in runs.items():
        print(f"| `mnist train` seed {seed}, whole process | {r['train_s']:.1f} s, accuracy {r['accuracy']:.4f} |")
    print(f"| train / reference epoch (median) | {report['train_to_reference_ratio']:.2f} |")
    print(f"| accuracy median / min over seeds | {report['accuracy_median']:.4f} / {report['accuracy_min']:.4f} |")
    print(f"| `mnist evaluate`, whole process / compute | {first['evaluate_s']:.1f} s / "
          f"{first['evaluate_compute_s']:.2f} s |")
    print(f"| `mnist infer`, whole process / compute | {infer_s:.1f} s / {infer_compute_s:.3f} s |")
    for sweep in sweeps:
        print(f"| train, {sweep['what']} | {sweep['train_s']:.1f} s, accuracy {sweep['accuracy']:.4f} |")
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
