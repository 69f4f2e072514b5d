"""GPU figures of `mnist train`: epoch time, whole-process time and accuracy per seed, and where the time goes.

    python bench/gpu_bench.py [--mirror DIR] [--seeds 0 1 2] [--sweep 128:0.4 256:0.2] [--out FILE]
    python bench/gpu_bench.py --device cpu --max-steps 20 --seeds 0   # a dry run of the script itself

Each train is a whole `mnist train --device cuda` process on a fresh volume (the MNIST files
fetched from the local mirror), scored by `mnist evaluate`. The breakdown runs one more such
train in a child that times the phases of the real code path (runtime.setup, data.load_split,
the first steps, checkpoint.write, ...) by wrapping those functions, so it measures what
`mnist train` does, not a copy. Prints tables; writes bench/results/gpu.json (or --out).
Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EPOCH_LINE = re.compile(r"epoch 1 done in ([0-9.]+) s")


def child_env(mirror: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["MNIST_MIRROR"] = mirror
    return env


def mnist(mirror: str, *args: str) -> tuple[float, str]:
    """One whole `mnist` process: (wall seconds, stderr)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mnist_pipeline", *args], env=child_env(mirror),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"gpu_bench: `mnist {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return seconds, result.stderr


def train_and_score(mirror: str, root: Path, *flags: str) -> dict:
    train_s, log = mnist(mirror, "train", "--root", str(root), *flags)
    epoch = EPOCH_LINE.search(log)
    evaluate_s, _ = mnist(mirror, "evaluate", "--root", str(root), "--wait", "0", *flags[:2])
    evaluation = json.loads((root / "model" / "eval_results.json").read_text())
    return {"train_s": round(train_s, 3), "epoch_s": float(epoch.group(1)) if epoch else None,
            "accuracy": evaluation["accuracy"], "evaluate_s": round(evaluate_s, 3),
            "evaluate_compute_s": evaluation["compute_seconds"]}


def breakdown(mirror: str, root: Path, flags: list) -> dict:
    """Run `mnist train` in a child that times its phases; return {phase: seconds}."""
    report = root.parent / f"{root.name}-phases.json"
    spawned = time.time()
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phases-child", str(report), "train", "--root",
                    str(root), *flags], env=child_env(mirror), check=True, capture_output=True)
    whole = time.perf_counter() - started
    marks = json.loads(report.read_text())
    phases = {"python start": marks[0][1] - spawned}
    for (_, before), (name, after) in zip(marks, marks[1:], strict=False):
        phases[name] = phases.get(name, 0.0) + after - before
    phases["exit (os._exit)"] = spawned + whole - marks[-1][1]
    phases["whole process"] = whole
    return {k: round(v, 3) for k, v in phases.items()}


def phases_child(report: str, argv: list) -> None:
    """In the child: time each phase of `mnist train` at the boundaries of the functions it calls.

    Each mark is (what ran since the previous mark, wall time); at marks after GPU work the device
    is synchronised first, so a phase holds its own GPU work (not at the others: the warm-up thread's
    work overlaps them).
    """
    marks = [("", time.time())]

    def mark(name: str, sync: bool = False) -> None:
        if sync and "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            sys.modules["torch"].cuda.synchronize()
        marks.append((name, time.time()))

    import torch  # noqa: F401 - timed on its own

    mark("import torch")
    from mnist_pipeline import cli, data, runtime
    from mnist_pipeline.records import checkpoint
    from mnist_pipeline.train import cuda, loop, resume

    mark("import mnist_pipeline")

    def timed(owner, attr: str, name: str, before: str | None = None) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if before:
                mark(before, sync=True)
            result = original(*args, **kwargs)
            mark(name, sync=bool(before))
            return result

        setattr(owner, attr, wrapper)

    timed(runtime, "setup", "runtime.setup (device, threads, deterministic CUDA)", before="argparse, logging")
    timed(resume, "starting_point", "no checkpoint: model built, moved to the GPU (CUDA context)")
    timed(data, "load_split", "data.load_split: fetch, verify, parse the training set")
    timed(data, "ensure", "data.ensure: fetch, verify the test set")
    timed(cuda, "finish_warm_up", "waiting for the warm-up steps' end (CUDA kernels, cuDNN, cuBLAS)")
    timed(checkpoint, "write", "checkpoint.write", before="steps 3..N, the epoch's end")
    step_function = loop._step_function

    def counted_step_function(*args, **kwargs):
        mark("images to the GPU", sync=True)
        step, calls = step_function(*args, **kwargs), [0]
        mark("step function: on CUDA, warm-up steps on the capture stream, graph capture", sync=True)

        def counted(batch):
            loss = step(batch)
            calls[0] += 1
            if calls[0] <= 2:
                mark(("first step (and the epoch's order)", "second step")[calls[0] - 1], sync=True)
            return loss

        return counted

    loop._step_function = counted_step_function
    code = cli.main(argv)
    mark("after the save: remove progress, log, report")
    Path(report).write_text(json.dumps(marks))
    sys.stdout.flush()
    os._exit(code)  # as cli.script does


def step_times(data_dir: Path, device_name: str, steps: int = 300) -> dict:
    """Milliseconds per training step once warm, eager and replayed from a CUDA graph (in this process)."""
    from mnist_pipeline import data, runtime, settings, train
    from mnist_pipeline.train import loop, resume

    device = runtime.setup(device_name, None)
    split = data.load_split(data_dir, "train", None)
    images, labels = split.images.to(device), split.labels.to(device)  # uint8: the step normalises
    order = train.epoch_order(0, 0, len(labels)).to(device)
    times = {}
    for name, graphed in (("eager", False), ("CUDA graph", True)):
        state = resume.TrainingState.fresh(settings.Recipe(), device)
        state.model.train()
        step, size = loop._step_function(state, images, labels, cuda_graph=graphed), state.recipe.batch_size
        for i in range(20 + steps):
            if i == 20:
                float(state.loss_sum)  # waits for the warm-up steps
                started = time.perf_counter()
            state.loss_sum += step(order[i * size:(i + 1) * size])
        float(state.loss_sum)
        times[name] = round((time.perf_counter() - started) / steps * 1000, 3)
    return times


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--phases-child"]:
        phases_child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=os.environ.get("MNIST_MIRROR", str(REPO.parent / "shared" / "mnist")),
                        help="local MNIST folder (default: $MNIST_MIRROR, else ../shared/mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", nargs="*", default=[], metavar="BATCH:LR",
                        help="also train seed 0 with these batch sizes and peak learning rates")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of this script")
    parser.add_argument("--max-steps", type=int, default=0, help="batches per epoch (0: all); for dry runs")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: torch {torch.__version__} sees no CUDA GPU here; nothing measured "
              f"(run it on a machine with one)")
        return 0
    from mnist_pipeline import settings

    recipe = settings.Recipe()
    common = ["--device", args.device, "--max-steps", str(args.max_steps)]  # --device first: evaluate takes it
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    machine = (f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")
    print(f"gpu_bench on {machine}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mnist-gpu-bench-") as tmp:
        parent = Path(tmp)
        runs = {}
        for seed in args.seeds:
            print(f"train + evaluate, seed {seed}, fresh volume ...", file=sys.stderr)
            runs[seed] = train_and_score(args.mirror, parent / f"seed{seed}", *common, "--seed", str(seed))
        print("train with the data already in the volume ...", file=sys.stderr)
        warm_root = parent / "data-present"
        shutil.copytree(parent / f"seed{args.seeds[0]}" / "data", warm_root / "data")
        data_present_s, _ = mnist(args.mirror, "train", "--root", str(warm_root), *common,
                                  "--seed", str(args.seeds[0]))
        print("breakdown of one train, fresh volume ...", file=sys.stderr)
        phases = breakdown(args.mirror, parent / "phases", [*common, "--seed", str(args.seeds[0])])
        print("steady step times, eager and CUDA graph ...", file=sys.stderr)
        steps = step_times(warm_root / "data", args.device, 50 if args.max_steps else 300)
        sweep = {}
        for entry in args.sweep:
            batch, lr = entry.split(":")
            print(f"train + evaluate, batch {batch}, lr {lr} ...", file=sys.stderr)
            sweep[entry] = train_and_score(args.mirror, parent / f"sweep{batch}-{lr}", *common,
                                           "--seed", str(args.seeds[0]), "--batch-size", batch, "--lr", lr)

    accuracies = [r["accuracy"] for r in runs.values()]
    report = {
        "machine": machine,
        "recipe": {"batch_size": recipe.batch_size, "peak_lr": recipe.peak_lr},
        "per_seed": {str(s): r for s, r in runs.items()},
        "accuracy_median": statistics.median(accuracies),
        "accuracy_min": min(accuracies),
        "epoch_s_median": statistics.median(r["epoch_s"] for r in runs.values()),
        "train_s_median": statistics.median(r["train_s"] for r in runs.values()),
        "train_s_data_present": round(data_present_s, 3),
        "phases": phases,
        "step_ms": steps,
        "sweep": sweep,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"| `mnist train --device {args.device}`, one epoch ({machine}) | epoch | whole process | accuracy |")
    print("|---|---|---|---|")
    for seed, r in runs.items():
        print(f"| seed {seed}, batch {recipe.batch_size}, fresh volume | {r['epoch_s']:.2f} s | "
              f"{r['train_s']:.1f} s | {r['accuracy']:.4f} |")
    print(f"| median / min accuracy | | | {report['accuracy_median']:.4f} / {report['accuracy_min']:.4f} |")
    print(f"| seed {args.seeds[0]}, data already in the volume | | {data_present_s:.1f} s | |")
    first = runs[args.seeds[0]]
    print(f"| `mnist evaluate --device {args.device}`, whole process / compute | | {first['evaluate_s']:.1f} s / "
          f"{first['evaluate_compute_s']:.2f} s | |")
    for entry, r in sweep.items():
        batch, lr = entry.split(":")
        print(f"| seed {args.seeds[0]}, batch {batch}, lr {lr} | {r['epoch_s']:.2f} s | {r['train_s']:.1f} s | "
              f"{r['accuracy']:.4f} |")
    print(f"| one step once warm (batch {recipe.batch_size}), eager / CUDA graph | {steps['eager']:.3f} ms / "
          f"{steps['CUDA graph']:.3f} ms | | |")
    print()
    print("| where one `mnist train` process's time goes (fresh volume) | seconds |")
    print("|---|---|")
    for name, seconds in phases.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
