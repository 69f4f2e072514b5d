"""The feedback loop end to end (issue 31): a handwriting style the model misreads, sent through POST /feedback,
accepted, trained on for one epoch, and scored before and after.

    python bench/feedback_bench.py [--mirror DIR] [--samples 1000] [--heldout 300] [--shares 0.01 0.05 0.2]
                                   [--sheet PNG] [--partial]

On a temporary volume: `mnist train` (one epoch, seed 0) and `mnist evaluate` make version 1; `mnist serve
--feedback on` receives drawings of the style below, as the page sends them, until at least --samples are kept
and --heldout of them landed in the held-out share (the 202 answer names the split); `mnist feedback accept
--all`; version 1's accuracy on the accepted held-out share (BEFORE). Then, each on its own copy of that
volume, one more epoch and `mnist evaluate`: `mnist train --feedback-share S` for each share, and at share 0 as
a control (the extra epoch's own effect). The held-out figures are computed here and must match evaluate's
`feedback` block. Prints the style's held-out accuracy before and after, the error ratio (goal: at most 0.5),
MNIST's test accuracy (goal: still >= 0.99), whether the new version became production, the counts and each
phase's seconds; writes bench/results/feedback.json, whose `chosen` is the smallest share meeting both goals.

The style: digits as block capitals drawn with a thick marker (docs/feedback.md, "The bench's handwriting
style"), 280x280 PNGs of dark ink on white as the page's canvas sends them. Sample i is digit i % 10, drawn
from its own seeded generator: the same --seed gives the same drawings.

--partial runs what a tree without training on feedback allows (the control epoch is a plain `mnist train`);
it writes no results file. Without it, such a tree is refused with a line naming what it lacks.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pipeline import cpu_model, fresh_root, mnist  # noqa: E402

SUBMIT_PATIENCE_S = 900  # for all the uploads: a server this slow is broken
CANVAS = 280  # the page's pad (static/index.html), sent whole as a PNG
Point = Tuple[float, float]

# Each digit as strokes through corners of a unit box (x right, y down), drawn as block capitals are: square
# corners like a seven-segment display, a slashed 0, a 1 with a flag and a base, a flat-topped 3, an open 4, a
# crossed 7, a 9 with a base. One pen stroke each list.
BLOCK: Dict[int, List[List[Point]]] = {
    0: [[(0.1, 0.0), (0.9, 0.0), (0.9, 1.0), (0.1, 1.0), (0.1, 0.0)], [(0.1, 1.0), (0.9, 0.0)]],
    1: [[(0.2, 0.2), (0.55, 0.0), (0.55, 1.0)], [(0.2, 1.0), (0.9, 1.0)]],
    2: [[(0.05, 0.0), (0.9, 0.0), (0.9, 0.5), (0.1, 0.5), (0.1, 1.0), (0.95, 1.0)]],
    3: [[(0.05, 0.0), (0.9, 0.0), (0.9, 1.0), (0.05, 1.0)], [(0.3, 0.5), (0.9, 0.5)]],
    4: [[(0.1, 0.0), (0.1, 0.55), (0.95, 0.55)], [(0.75, 0.1), (0.75, 1.0)]],
    5: [[(0.95, 0.0), (0.1, 0.0), (0.1, 0.5), (0.9, 0.5), (0.9, 1.0), (0.05, 1.0)]],
    6: [[(0.9, 0.0), (0.1, 0.0), (0.1, 1.0), (0.9, 1.0), (0.9, 0.5), (0.1, 0.5)]],
    7: [[(0.05, 0.2), (0.05, 0.0), (0.9, 0.0), (0.9, 1.0)], [(0.4, 0.55), (1.2, 0.55)]],
    8: [[(0.1, 0.0), (0.9, 0.0), (0.9, 1.0), (0.1, 1.0), (0.1, 0.0)], [(0.1, 0.5), (0.9, 0.5)]],
    9: [[(0.9, 0.5), (0.1, 0.5), (0.1, 0.0), (0.9, 0.0), (0.9, 1.0), (0.1, 1.0)]],
}


def drawing(digit: int, rng: random.Random):
    """One digit in the style, as the page's canvas holds it: a 280x280 grayscale image, black on white."""
    from PIL import Image, ImageDraw

    height = rng.uniform(110, 190)  # px: anywhere from a third to two thirds of the pad
    width = height * rng.uniform(0.6, 0.9)
    pen = height * rng.uniform(0.22, 0.34)  # a marker: thick for the digit's size
    slant = rng.uniform(-0.35, 0.15)  # mostly leaning back
    turn = math.radians(rng.uniform(-18, 18))
    # off-centre: anywhere the digit and its ink fit
    cx = rng.uniform(pen + width / 2, CANVAS - pen - width / 2)
    cy = rng.uniform(pen + height / 2, CANVAS - pen - height / 2)
    # a hand's waver: each axis bent by a slow sine, so strokes stay smooth
    waves = [(rng.uniform(-0.04, 0.04), rng.uniform(2, 5), rng.uniform(0, 2 * math.pi)) for _ in range(2)]

    def place(p: Point) -> Point:
        x = p[0] - 0.5 + waves[0][0] * math.sin(waves[0][1] * p[1] + waves[0][2])
        y = p[1] - 0.5 + waves[1][0] * math.sin(waves[1][1] * p[0] + waves[1][2])
        x, y = (x - slant * y) * width, y * height
        return (cx + x * math.cos(turn) - y * math.sin(turn), cy + x * math.sin(turn) + y * math.cos(turn))

    image = Image.new("L", (CANVAS, CANVAS), 255)
    pad = ImageDraw.Draw(image)
    for stroke in BLOCK[digit]:
        points = [place(p) for p in stroke]
        pad.line(points, fill=0, width=round(pen), joint="curve")
        for x, y in (points[0], points[-1]):  # round caps, as the page's lineCap
            pad.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=0)
    return image


def sample(seed: int, index: int) -> Tuple[int, bytes]:
    """Sample `index` of the style: its digit and its PNG."""
    digit = index % 10
    out = io.BytesIO()
    drawing(digit, random.Random(f"{seed}:{index}")).save(out, "PNG")
    return digit, out.getvalue()


def contact_sheet(seed: int, path: Path, rows: int = 4) -> None:
    """The first rows x 10 samples, each pad shrunk to 70 px, as a PNG (for a person to judge the style)."""
    from PIL import Image

    side = 70
    sheet = Image.new("L", (10 * side, rows * side), 160)
    for index in range(rows * 10):
        _, data = sample(seed, index)
        tile = Image.open(io.BytesIO(data)).resize((side - 2, side - 2), Image.LANCZOS)
        sheet.paste(tile, ((index % 10) * side + 1, (index // 10) * side + 1))
    sheet.save(path)


# --- serve -------------------------------------------------------------------------------------------------


class Serve:
    """`mnist serve --feedback on` on a free local port, its stderr drained all along."""

    def __init__(self, root: Path, samples: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
        # one client sends them all: the limits raised just enough for the bench, kept otherwise
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline", "serve", "--root", str(root), "--host", "127.0.0.1",
             "--port", "0", "--workers", "1", "--feedback", "on", "--feedback-rate", str(samples * 10),
             "--feedback-max-pending", str(samples * 10)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.listening.wait(120) or self.process.poll() is not None:
            self.close()
            sys.exit(f"bench: `mnist serve` did not listen within 120 s: {''.join(self.lines)[-500:]}")
        self.url = next(urllib.parse.urlsplit(found.group(1)) for line in self.lines
                        if (found := re.search(r"listening on (http://\S+)", line)))
        self.connection = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=60)

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self.listening.set()
        self.listening.set()  # ended: the wait above sees the exit

    def request(self, method: str, path: str, body: bytes = b"", headers: Dict[str, str] | None = None):
        self.connection.request(method, path, body=body or None, headers=headers or {})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def ready(self, patience_s: float = 120) -> None:
        deadline = time.monotonic() + patience_s
        while self.request("GET", "/readyz")[0] != 200:
            if time.monotonic() > deadline:
                sys.exit(f"bench: `mnist serve` not ready within {patience_s:.0f} s: {''.join(self.lines)[-500:]}")
            time.sleep(0.2)

    def feedback(self, image: bytes, label: int) -> Tuple[int, dict]:
        """POST /feedback as the page sends it: a multipart form with the drawing and its digit."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"drawing.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{label}\r\n"
                f"--{boundary}--\r\n").encode()
        return self.request("POST", "/feedback", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def submit(root: Path, seed: int, samples: int, heldout: int) -> dict:
    """Send the style's samples until `samples` are kept, `heldout` of them held out; what the answers said."""
    served = Serve(root, samples)
    try:
        served.ready()
        started = time.perf_counter()
        splits = {"train": 0, "heldout": 0}
        read_right = {"train": 0, "heldout": 0}
        statuses: Dict[str, int] = {}
        index = 0
        limit = 3 * samples + 3 * heldout  # the split is a hash of the image: far beyond 1 in 3 is a fault
        while sum(splits.values()) < samples or splits["heldout"] < heldout:
            if index >= limit:
                sys.exit(f"bench: {index} samples sent, {splits} kept: the held-out share is not one in three")
            if time.perf_counter() - started > SUBMIT_PATIENCE_S:
                sys.exit(f"bench: {index} samples sent in {SUBMIT_PATIENCE_S} s, {splits} kept: serve is too slow")
            digit, image = sample(seed, index)
            status, answer = served.feedback(image, digit)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 202:
                splits[answer["split"]] += 1
                read_right[answer["split"]] += answer["predicted"] == digit
            elif status != 409:  # the same drawing again (a collision of two seeds' images) is no fault
                sys.exit(f"bench: POST /feedback answered {status} {answer} for sample {index}")
            index += 1
        seconds = time.perf_counter() - started
    finally:
        served.close()
    if "Traceback" in "".join(served.lines):
        sys.exit(f"bench: serve logged a traceback: {''.join(served.lines)[-1500:]}")
    return {"sent": index, "answers": statuses, "kept": splits, "served_read_right": read_right,
            "seconds": seconds, "per_second": index / seconds}


# --- scoring -----------------------------------------------------------------------------------------------


def style_score(root: Path, version: int) -> dict:
    """Version `version`'s accuracy on the accepted held-out share of feedback/, per digit too."""
    import torch

    from mnist_pipeline import runtime
    from mnist_pipeline.model import predict, stack
    from mnist_pipeline.records import feedback as records
    from mnist_pipeline.records import versions
    from mnist_pipeline.volume import Volume

    runtime.setup("cpu", 1)
    volume = Volume(root)
    held = records.accepted(volume, "heldout")
    _, saved, _ = versions.load(volume, version)
    images = stack([held.pixels[i * 784:(i + 1) * 784] for i in range(len(held))])
    predicted = predict(saved.build_model(), images, torch.device("cpu")).argmax(1).tolist()
    per_digit = {}
    for digit in range(10):
        mine = [p for p, label in zip(predicted, held.labels, strict=True) if label == digit]
        per_digit[str(digit)] = sum(p == digit for p in mine) / len(mine) if mine else None
    right = sum(p == label for p, label in zip(predicted, held.labels, strict=True))
    return {"version": version, "count": len(held), "correct": right, "accuracy": right / len(held),
            "per_digit_accuracy": per_digit}


def evaluation(root: Path) -> dict:
    return json.loads((root / "model" / "eval_results.json").read_text())


def timed(phases: Dict[str, float], name: str, *args: str) -> str:
    print(f"bench: mnist {' '.join(args[:1] + args[3:])} ...", file=sys.stderr)
    seconds, out = mnist(*args)
    phases[name] = phases.get(name, 0.0) + seconds
    return out


def features() -> List[str]:
    """What this tree lacks of what the bench needs (the train and evaluate sides of issue 31)."""
    from mnist_pipeline.records import evaluation as scores

    missing = []
    help_text = subprocess.run([sys.executable, "-m", "mnist_pipeline", "train", "--help"], capture_output=True,
                               text=True).stdout
    if "--feedback-share" not in help_text:
        missing.append("`mnist train --feedback-share` (training on the accepted train share)")
    if "feedback" not in getattr(scores.File, "__annotations__", {}):
        missing.append("evaluate's `feedback` block in eval_results.json (scoring the accepted held-out share)")
    return missing


def one_more_epoch(root: Path, share: str | None, phases: Dict[str, float], name: str, before: dict) -> dict:
    """`mnist train` (one more epoch, at `share` when given) and `mnist evaluate` on `root`: the new version's
    scores, on the style's held-out share and on MNIST, and whether it became production."""
    shared = [] if share is None else ["--feedback-share", share]
    timed(phases, f"{name}_train", "train", "--root", str(root), *shared)
    timed(phases, f"{name}_evaluate", "evaluate", "--root", str(root), "--wait", "0")
    scores, style = evaluation(root), style_score(root, 2)
    block = scores.get("feedback")
    if block is not None and (block["total"], block["correct"]) != (style["count"], style["correct"]):
        sys.exit(f"bench: evaluate's feedback block says {block['correct']} of {block['total']} right, the bench "
                 f"{style['correct']} of {style['count']}: they score the same set with the same model")
    production = json.loads((root / "model" / "aliases" / "production.json").read_text())["version"]
    error = 1 - style["accuracy"]
    return {"feedback_share": None if share is None else float(share), "style_heldout": style,
            "error": error, "error_ratio": error / (1 - before["accuracy"]),
            "mnist_accuracy": scores["accuracy"], "production_version": production,
            "evaluate_feedback_block": None if block is None else {
                key: block[key] for key in ("total", "correct", "accuracy", "digest")}}


# --- the run -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=os.environ.get("MNIST_MIRROR") or os.environ.get("MNIST_TEST_MIRROR")
                        or str(HERE.parent.parent / "shared" / "mnist"),
                        help="local MNIST folder (default: MNIST_MIRROR, else MNIST_TEST_MIRROR)")
    parser.add_argument("--samples", type=int, default=1000, help="samples to keep through POST /feedback, at least")
    parser.add_argument("--heldout", type=int, default=300, help="of them in the held-out share, at least")
    parser.add_argument("--shares", nargs="+", default=["0.01", "0.05", "0.2"],
                        help="`mnist train --feedback-share` values to try, each from the same volume")
    parser.add_argument("--seed", type=int, default=0, help="the style's drawings (training keeps its own seed 0)")
    parser.add_argument("--sheet", help="also draw the first 40 samples, shrunk, into this PNG")
    parser.add_argument("--partial", action="store_true",
                        help="skip the training on feedback (for a tree without it); writes no results file")
    parser.add_argument("--out", default=str(HERE / "results" / "feedback.json"))
    args = parser.parse_args(argv)
    args.shares = sorted(args.shares, key=float)  # the first that meets the goals is the smallest

    if args.sheet:
        contact_sheet(args.seed, Path(args.sheet))
    missing = features()
    if missing and not args.partial:
        print("bench: this tree lacks " + "; and ".join(missing) + ". Run it on a tree that has them (issue 31), "
              "or pass --partial for the collection, review and BEFORE figures alone", file=sys.stderr)
        return 2

    from mnist_pipeline import data
    from mnist_pipeline.errors import PipelineError
    from mnist_pipeline.runtime import available_cpus

    phases: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        parent = Path(tmp)
        try:
            data.ensure(parent / "data", args.mirror)
        except PipelineError as exc:
            sys.exit(f"bench: {exc}")
        root = fresh_root(parent / "data", parent, "volume")
        timed(phases, "train", "train", "--root", str(root))
        timed(phases, "evaluate", "evaluate", "--root", str(root), "--wait", "0")
        mnist_before = evaluation(root)["accuracy"]

        print(f"bench: POST /feedback until {args.samples} are kept, {args.heldout} held out ...", file=sys.stderr)
        started = time.perf_counter()
        sent = submit(root, args.seed, args.samples, args.heldout)
        phases["serve_and_submit"] = time.perf_counter() - started
        timed(phases, "accept", "feedback", "--root", str(root), "accept", "--all")
        review = mnist("feedback", "--root", str(root), "stats")[1].strip()
        before = style_score(root, 1)

        # each epoch on a copy of the volume as it is now: version 1 in production, the feedback accepted
        runs = {}
        for name, share in [("plain", None if missing else "0")] + [(f"share {s}", s) for s in args.shares]:
            if share is not None and share != "0" and missing:
                continue
            copy = parent / name.replace(" ", "-")
            shutil.copytree(root, copy)
            runs[name] = one_more_epoch(copy, share, phases, name.replace(" ", "_"), before)
            shutil.rmtree(copy)
    plain = runs.pop("plain")
    met = [run for run in runs.values() if run["error_ratio"] <= 0.5 and run["mnist_accuracy"] >= 0.99]
    chosen = met[0] if met else (runs[f"share {args.shares[0]}"] if runs else None)

    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{cpu_model()}, {available_cpus()} CPUs available, load average "
                   f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
        "torch": __import__("torch").__version__,
        "style_seed": args.seed,
        "submitted": sent,
        "review": review,
        "style_heldout_before": before,
        "error_before": 1 - before["accuracy"],
        "mnist_accuracy_before": mnist_before,
        "plain_epoch": plain,
        "feedback_epochs": list(runs.values()),
        "chosen": chosen and {"feedback_share": chosen["feedback_share"], "error_ratio": chosen["error_ratio"],
                              "mnist_accuracy": chosen["mnist_accuracy"],
                              "error_halved": chosen["error_ratio"] <= 0.5,
                              "mnist_at_least_0.99": chosen["mnist_accuracy"] >= 0.99},
        "seconds": phases,
    }

    print(f"| measure ({report['machine']}) | value |")
    print("|---|---|")
    print(f"| samples sent / kept: train, held out | {sent['sent']} / {sent['kept']['train']}, "
          f"{sent['kept']['heldout']} ({sent['per_second']:.0f} a second, one client) |")
    print(f"| the style, held out: version 1 (one epoch) | accuracy {before['accuracy']:.4f} "
          f"({before['correct']}/{before['count']}), error {1 - before['accuracy']:.4f}; MNIST {mnist_before:.4f} |")
    for name, run in [("one more epoch, share 0 (control)", plain)] + [
            (f"one more epoch, --feedback-share {run['feedback_share']}", run) for run in runs.values()]:
        print(f"| {name} | accuracy {run['style_heldout']['accuracy']:.4f}, error ratio {run['error_ratio']:.2f}; "
              f"MNIST {run['mnist_accuracy']:.4f}; production: version {run['production_version']} |")
    if chosen:
        print(f"| goals at share {chosen['feedback_share']} | error ratio {chosen['error_ratio']:.2f} (<= 0.5: "
              f"{report['chosen']['error_halved']}), MNIST {chosen['mnist_accuracy']:.4f} (>= 0.99: "
              f"{report['chosen']['mnist_at_least_0.99']}) |")
    print("| seconds | " + ", ".join(f"{name} {s:.1f}" for name, s in phases.items()) + " |")
    if missing:
        print("bench: --partial: no results file written (" + "; ".join(missing) + " missing)", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
