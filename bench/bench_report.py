"""What the report costs: history recording per training step, the history save, building model/report/.

    python bench/bench_report.py [--steps 2000]

Times, on this machine's CPU, in one process:
  - history.Recorder.add, as train calls it after every step (a tensor add; a loss read every 10 steps),
    beside one real training step of the network at batch 128 (forward, backward, SGD step);
  - Recorder.save with 100 full epochs of points (what train writes beside each checkpoint then);
  - report.build on a volume trained for 60 steps (evaluate's extra time).
Prints the figures; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mnist` sets it: spinning threads distort the step time

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mnist_pipeline.commands.stages import write_report  # noqa: E402
from mnist_pipeline.records import history  # noqa: E402
from mnist_pipeline.model import MnistCNN  # noqa: E402
from mnist_pipeline.volume import Volume  # noqa: E402

MIRROR = REPO.parent / "shared" / "mnist"


def per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for i in range(1, calls + 1):
        fn(i)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="recorder calls to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        volume = Volume(Path(tmp))
        recorder = history.Recorder(volume, 0, 0, torch.device("cpu"))
        model, loss_fn = MnistCNN(), nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

        def train_step(_: int) -> torch.Tensor:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        loss = train_step(0)
        record_us = statistics.median(per_call_us(lambda i: recorder.add(1, i, loss, 0.1), args.steps)
                                      for _ in range(3))
        step_us = per_call_us(train_step, 30)
        print(f"Recorder.add: {record_us:.1f} us a step; a training step (batch 128): {step_us / 1000:.1f} ms; "
              f"recording is {record_us / step_us:.4%} of a step")

        recorder.records = [history.Point(epoch=e, step=s, loss=0.1234567, lr=0.01234567)
                            for e in range(1, 101) for s in range(10, 470, 10)]
        started = time.perf_counter()
        recorder.save(100, 0)
        print(f"Recorder.save, 100 epochs of points ({volume.history.stat().st_size / 1e3:.0f} kB): "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")

        root = Path(tmp) / "volume"
        env = {**os.environ, "MNIST_MIRROR": str(MIRROR), "PYTHONPATH": str(REPO / "src")}
        for stage in (["train", "--max-steps", "60"], ["evaluate"]):
            subprocess.run([sys.executable, "-m", "mnist_pipeline", *stage, "--root", str(root)], env=env,
                           check=True, capture_output=True)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            write_report(Volume(root), None)
            timings.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in Volume(root).report_dir.iterdir())
        print(f"the report: {statistics.median(timings):.2f} s (median of 3), model/report/ {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
