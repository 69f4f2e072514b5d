"""What `mnist export` costs: the whole process, and its two parts (writing the graph, the parity check).

    python bench/export_bench.py [--mirror DIR] [--runs 3] [--steps 50]

Trains a short checkpoint and evaluates it without exporting (`--export never`), then times
`mnist export --version 1` as a user runs it (a new interpreter, start to exit; wall and CPU seconds,
the CPU figure being the steadier on a loaded machine), --runs times; then, in
this process, export.to_onnx twice (the first call pays the exporter's imports and set-up, a second
call in the same process does not) and the parity check over the 10,000 test images.
Prints a table and writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pipeline import cpu_model, fresh_root, mnist  # noqa: E402


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def in_process(root: Path, mirror: str, threads: int) -> dict:
    import torch

    from mnist_pipeline import data, export, runtime
    from mnist_pipeline.records import versions
    from mnist_pipeline.volume import Volume

    runtime.setup("cpu", threads)
    volume = Volume(root)
    _, saved, _ = versions.load(volume, 1)
    network = saved.build_model().eval()
    timings = {}
    for name in ("to_onnx_first", "to_onnx_again"):
        started, cpu = time.perf_counter(), time.process_time()
        encoded = export.to_onnx(network, {})
        timings[f"{name}_s"], timings[f"{name}_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
    images = data.load_split(volume.data_dir, "test", mirror).images
    started = time.perf_counter()
    parity = export.check(encoded, network, images, threads)
    timings["parity_s"] = time.perf_counter() - started
    timings["file_bytes"] = len(encoded)
    timings["parity"] = parity.describe()
    timings["torch"] = torch.__version__
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=str(HERE.parent.parent / "shared" / "mnist"), help="local MNIST folder")
    parser.add_argument("--runs", type=int, default=3, help="`mnist export` processes to time")
    parser.add_argument("--steps", type=int, default=50, help="the checkpoint's training steps")
    parser.add_argument("--out", default=str(HERE / "results" / "export.json"))
    args = parser.parse_args(argv)

    from mnist_pipeline import data
    from mnist_pipeline.runtime import available_cpus

    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        parent = Path(tmp)
        data.ensure(parent / "data", args.mirror)
        root = fresh_root(parent / "data", parent, "volume")
        mnist("train", "--root", str(root), "--max-steps", str(args.steps))
        mnist("evaluate", "--root", str(root), "--wait", "0", "--export", "never")
        processes, cpus = [], []
        for run in range(args.runs):
            print(f"mnist export, run {run + 1} of {args.runs} ...", file=sys.stderr)
            cpu = children_cpu_s()
            seconds, _ = mnist("export", "--root", str(root), "--version", "1")
            processes.append(seconds)
            cpus.append(children_cpu_s() - cpu)
        parts = in_process(root, args.mirror, available_cpus())

    report = {"machine": f"{cpu_model()}, {available_cpus()} CPUs available", "python": platform.python_version(),
              "load_average_at_end": list(os.getloadavg()),
              "export_process_s": processes, "export_process_s_median": statistics.median(processes),
              "export_process_cpu_s": cpus, "export_process_cpu_s_median": statistics.median(cpus), **parts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"| measure ({report['machine']}, torch {parts['torch']}) | value |")
    print("|---|---|")
    print(f"| `mnist export --version 1`, whole process, wall (median of {args.runs}) | "
          f"{report['export_process_s_median']:.1f} s ({', '.join(f'{s:.1f}' for s in processes)}) |")
    print(f"| the same, CPU (user + system, all threads) | "
          f"{report['export_process_cpu_s_median']:.1f} s ({', '.join(f'{s:.1f}' for s in cpus)}) |")
    print(f"| export.to_onnx, first call in a process: wall / this thread's CPU | {parts['to_onnx_first_s']:.3f} s / "
          f"{parts['to_onnx_first_cpu_s']:.3f} s |")
    print(f"| export.to_onnx, again in the same process: wall / CPU | {parts['to_onnx_again_s']:.3f} s / "
          f"{parts['to_onnx_again_cpu_s']:.3f} s |")
    print(f"| parity check, 10,000 test images | {parts['parity_s']:.2f} s ({parts['parity']}) |")
    print(f"| the file | {parts['file_bytes']:,} bytes |")
    load = ", ".join(f"{x:.1f}" for x in report["load_average_at_end"])
    print(f"| load average at the end (1, 5, 15 min) | {load} |")
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
