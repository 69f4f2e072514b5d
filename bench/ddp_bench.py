"""Data-parallel training here: epoch time and accuracy with 1 and 2 processes, start-up costs, a step's time.

    python bench/ddp_bench.py [--mirror DIR] [--seeds 0 1 2] [--steps 100] [--rounds 3]

Part 1, whole epochs (skipped with --seeds and no seed): `mnist train` in one process (all CPUs as threads,
then one thread) and `mnist train --nproc-per-node 2` (the CPUs shared out: one thread each on 2 cores), each
from scratch, then `mnist evaluate`. Part 2, in a 2-process gloo group as train builds it
(distributed.process_group, distributed.wrap: DistributedDataParallel with train's communication hook, and
train's optimizer): what wrapping the network in DistributedDataParallel costs each rank at start-up, and one
training step split up: compute alone (DDP's no_sync(): no gradient all-reduce), the whole DDP step, and the
per-step control collectives (the stop flag and the loss average). Part 3, each in a new interpreter (--rounds
times, interleaved): creating torch.optim.SGD against train's NesterovSGD, the first optimizer of a process.
Prints tables and writes bench/results/ddp.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pipeline import cpu_model, fresh_root, mnist  # noqa: E402

SUMMARY = re.compile(r"train: epoch \d+, train loss [\d.]+, ([\d.]+) s")


def epoch(data_dir: Path, parent: Path, name: str, seed: int, *flags: str) -> dict:
    root = fresh_root(data_dir, parent, name)
    process_s, out = mnist("train", "--root", str(root), "--seed", str(seed), *flags)
    mnist("evaluate", "--root", str(root), "--wait", "0")
    evaluation = json.loads((root / "model" / "eval_results.json").read_text())
    return {"epoch_s": float(SUMMARY.search(out).group(1)), "process_s": process_s,
            "accuracy": evaluation["accuracy"]}


def step_breakdown(data_dir: Path, steps: int) -> dict:
    """Runs this script as 2 gloo workers under torchrun; rank 0 prints its timings as JSON."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).resolve()), "--worker", "--data", str(data_dir), "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"bench: the 2-process step breakdown failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker(data_dir: Path, steps: int, batch_size: int = 128) -> None:
    import torch
    import torch.distributed
    from torch import nn

    from mnist_pipeline import data, distributed, runtime, settings
    from mnist_pipeline.model import MnistCNN, normalize
    from mnist_pipeline.train import NesterovSGD, epoch_order

    world = distributed.world()
    device = runtime.setup("cpu", distributed.threads(world, None))
    with distributed.process_group(world, device):
        split = data.load_split(data_dir, "train", None)
        images, labels = normalize(split.images), split.labels
        order = epoch_order(0, 0, len(labels))
        torch.manual_seed(0)
        model = MnistCNN()
        started, cpu_started = time.perf_counter(), time.process_time()
        ddp = distributed.wrap(world, model)  # the first DistributedDataParallel of the process
        wrap_s, wrap_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        optimizer = NesterovSGD(model.parameters(), settings.Recipe())
        loss_fn = nn.CrossEntropyLoss()

        def train_step(i: int) -> torch.Tensor:
            batch = distributed.shard(world, order[i * batch_size:(i + 1) * batch_size])
            loss = loss_fn(ddp(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss

        def timed(run_steps) -> float:
            distributed.barrier(world)
            started = time.perf_counter()
            run_steps()
            distributed.barrier(world)
            return (time.perf_counter() - started) / steps * 1000

        def compute_only() -> None:
            with ddp.no_sync():  # gradients stay local: no all-reduce
                for i in range(steps):
                    train_step(i)

        def ddp_steps() -> None:
            for i in range(steps):
                train_step(i)

        def control() -> None:
            loss = torch.tensor(1.0)
            for _ in range(steps):
                distributed.stop_agreed(world, False)
                distributed.average(world, loss).item()

        gradients = torch.zeros(sum(p.numel() for p in model.parameters()))

        def gradient_all_reduce() -> None:  # the gradients' all-reduce alone, not overlapped with backward
            for _ in range(steps):
                distributed.average(world, gradients)

        for i in range(10):  # warm-up: DDP builds its buckets on the first steps
            train_step(i)
        parts = {"compute_ms": compute_only, "ddp_step_ms": ddp_steps, "all_reduce_alone_ms": gradient_all_reduce,
                 "control_ms": control}
        rounds = [{name: timed(run) for name, run in parts.items()} for _ in range(3)]  # interleaved: fairer
        figures = {name: statistics.median(r[name] for r in rounds) for name in parts}
        figures.update(threads=torch.get_num_threads(), local_batch=batch_size // world.size,
                       parameters=gradients.numel())
        wraps = [torch.zeros(2, dtype=torch.float64) for _ in range(world.size)]
        torch.distributed.all_gather(wraps, torch.tensor([wrap_s, wrap_cpu_s], dtype=torch.float64))
        figures["wrap_s_per_rank"] = [w[0].item() for w in wraps]
        figures["wrap_cpu_s_per_rank"] = [w[1].item() for w in wraps]
        if world.is_main:
            print(json.dumps(figures), flush=True)


# Part 3: one optimizer created in a new interpreter, timed from after `import torch`
OPTIMIZER = """
import sys, time
import torch
from mnist_pipeline import settings
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.train import NesterovSGD
model, recipe = MnistCNN(), settings.Recipe()
started, cpu_started = time.perf_counter(), time.process_time()
if sys.argv[1] == "torch":
    torch.optim.SGD(model.parameters(), lr=recipe.peak_lr, momentum=recipe.momentum, nesterov=True,
                    weight_decay=recipe.weight_decay)
else:
    NesterovSGD(model.parameters(), recipe)
print(time.perf_counter() - started, time.process_time() - cpu_started)
"""


def optimizer_start(rounds: int) -> dict:
    """{optimizer: [[wall s, CPU s] per new interpreter]}"""
    times: dict = {"torch.optim.SGD": [], "NesterovSGD": []}
    for _ in range(rounds):
        for name, arg in (("torch.optim.SGD", "torch"), ("NesterovSGD", "ours")):
            result = subprocess.run([sys.executable, "-c", OPTIMIZER, arg], capture_output=True, text=True, check=True)
            times[name].append([float(word) for word in result.stdout.split()])
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=str(HERE.parent.parent / "shared" / "mnist"), help="local MNIST folder")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="steps timed per part of the breakdown")
    parser.add_argument("--rounds", type=int, default=3, help="new interpreters per optimizer (part 3)")
    parser.add_argument("--out", default=str(HERE / "results" / "ddp.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.data), args.steps)
        return 0

    from mnist_pipeline import data
    from mnist_pipeline.runtime import available_cpus

    with tempfile.TemporaryDirectory(prefix="mnist-ddp-bench-") as tmp:
        parent = Path(tmp)
        data.ensure(parent / "data", args.mirror)
        variants = {f"1 process, {available_cpus()} threads": [], "1 process, 1 thread": ["--threads", "1"],
                    "2 processes, 1 thread each": ["--nproc-per-node", "2"]}
        runs = {name: [] for name in variants}
        for seed in args.seeds:
            for i, (name, flags) in enumerate(variants.items()):
                runs[name].append(epoch(parent / "data", parent, f"{i}-{seed}", seed, *flags))
            print(f"seed {seed}: " + "; ".join(f"{name} {r[-1]['epoch_s']:.1f} s, accuracy {r[-1]['accuracy']:.4f}"
                                               for name, r in runs.items()), flush=True)
        breakdown = step_breakdown(parent / "data", args.steps)
        optimizers = optimizer_start(args.rounds)

    print(f"\n{cpu_model()}, {available_cpus()} CPUs; seeds {args.seeds}; medians")
    if args.seeds:
        print("| run | epoch (training loop) | whole process | accuracy per seed |\n|---|---|---|---|")
    for name, results in runs.items() if args.seeds else ():
        accuracies = " / ".join(f"{r['accuracy']:.4f}" for r in results)
        print(f"| {name} | {statistics.median(r['epoch_s'] for r in results):.1f} s | "
              f"{statistics.median(r['process_s'] for r in results):.1f} s | {accuracies} |")
    b = breakdown
    print(f"\n2-process step (local batch {b['local_batch']}, {b['threads']} thread per rank): compute "
          f"{b['compute_ms']:.1f} ms, whole DDP step {b['ddp_step_ms']:.1f} ms (gradient all-reduce of "
          f"{b['parameters']} values alone: {b['all_reduce_alone_ms']:.2f} ms); stop flag + loss average "
          f"{b['control_ms']:.2f} ms")
    print("wrapping the network in DistributedDataParallel, each rank's first, wall (CPU): "
          + " / ".join(f"{wall:.2f} s ({cpu:.2f} s)" for wall, cpu in zip(b["wrap_s_per_rank"],
                                                                          b["wrap_cpu_s_per_rank"], strict=True)))
    print(f"creating the first optimizer of a new interpreter, medians of {args.rounds}, wall (CPU): " + "; ".join(
        f"{name} {statistics.median(t[0] for t in times):.3f} s ({statistics.median(t[1] for t in times):.3f} s)"
        for name, times in optimizers.items()))
    Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "cpus": available_cpus(), "seeds": args.seeds,
                                          "epochs": runs, "step_breakdown": breakdown,
                                          "optimizer_start_s": optimizers}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
