"""The Open Inference Protocol's infer route against /predict, in one run, with Triton's client as the load.

    python bench/v2_bench.py [--root DIR] [--seconds 8] [--rounds 4] [--clients 4] [--workers N]

One `mnist serve` (onnx where the volume's version is exported) on a free port over --root (without it a
volume is trained, evaluated and exported into a temp folder first, from ../shared/mnist or
MNIST_TEST_MIRROR). The same 64 MNIST test digits go, in requests of all 64, as:
- v2 binary: UINT8 [64, 28, 28] as the binary tensor extension, outputs as binary data (tritonclient's
  default): no decoding, no preprocessing;
- v2 JSON: the same pixels as JSON `data`, outputs as JSON;
- v2 image_files: the 280x280 PNG drawings below as BYTES (binary), which get /predict's preprocessing;
- /predict: each digit as a 280x280 PNG drawing (black on white, as the page sends one), 64 in one
  multipart request, sent with geventhttpclient (the transport tritonclient itself uses).
Each runs for --seconds in all, in --rounds parts interleaved with the others' (each after 0.3 s of
warm-up), --clients greenlets each keeping one connection busy, and reports images/s; then the ratio of
v2 binary to /predict (issue 30's goal: 3x or more). Writes bench/results/v2.json.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import gevent
import numpy
import tritonclient.http as triton
from geventhttpclient import HTTPClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MIRROR = os.environ.get("MNIST_TEST_MIRROR") or str(REPO.parent / "shared" / "mnist")
BATCH = 64
GOAL = 3.0  # v2 binary images/s over /predict's


def mnist(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m mnist_pipeline ARGS` from this checkout's source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(MNIST_MIRROR=MIRROR, PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *args], env=env, **kwargs)


def digits() -> numpy.ndarray:
    """The first BATCH MNIST test digits, uint8 [BATCH, 28, 28]."""
    folder = Path(MIRROR)
    raw = folder / "t10k-images-idx3-ubyte"
    data = raw.read_bytes() if raw.exists() else gzip.decompress((folder / f"{raw.name}.gz").read_bytes())
    return numpy.frombuffer(data[16:16 + BATCH * 784], numpy.uint8).reshape(BATCH, 28, 28).copy()


def drawings(pixels: numpy.ndarray) -> List[bytes]:
    """Each digit as a 280x280 RGB PNG, black ink on white: what the page's canvas sends."""
    pngs = []
    for digit in pixels:
        buffer = io.BytesIO()
        Image.fromarray(255 - digit).resize((280, 280), Image.BILINEAR).convert("RGB").save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def multipart(pngs: List[bytes]) -> Tuple[bytes, Dict[str, str]]:
    boundary = "v2-bench-boundary-3a9d"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for n, png in enumerate(pngs)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Server:
    """A `mnist serve` started now, on a free port; ready() waits for GET /v2/health/ready."""

    def __init__(self, root: Path, workers: int):
        self.process = mnist("serve", "--root", str(root), "--port", "0", "--workers", str(workers), "--threshold",
                             "0", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: List[str] = []
        self.address: Optional[str] = None
        listening = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"listening on http://([\d.]+:\d+)", line)
                if found:
                    self.address = found.group(1)
                    listening.set()
            listening.set()

        threading.Thread(target=read, daemon=True).start()
        listening.wait(120)
        if self.address is None:
            raise SystemExit("mnist serve did not start:\n" + "".join(self.log[-20:]))

    def ready(self) -> None:
        client = triton.InferenceServerClient(self.address)
        deadline = time.perf_counter() + 120
        while not client.is_server_ready():
            if time.perf_counter() > deadline or self.process.poll() is not None:
                raise SystemExit("mnist serve did not become ready:\n" + "".join(self.log[-20:]))
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def load(send: Callable[[], None], clients: int, seconds: float, warmup: float = 1.0) -> Dict[str, float]:
    """`clients` greenlets each calling send() again and again; the requests answered in `seconds` after warm-up."""
    counts = {"requests": 0, "failed": 0}
    began = time.perf_counter()
    start, end = began + warmup, began + warmup + seconds

    def client() -> None:
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            try:
                send()
                ok = True
            except Exception:  # noqa: BLE001 - counted: a failure is a figure here
                ok = False
            if sent >= start:
                counts["requests" if ok else "failed"] += 1

    gevent.joinall([gevent.spawn(client) for _ in range(clients)])
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {"requests": counts["requests"], "failed": counts["failed"], "seconds": elapsed,
            "images_per_second": round(counts["requests"] * BATCH / elapsed, 1)}


def measure(address: str, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    pixels = digits()
    pngs = drawings(pixels)
    client = triton.InferenceServerClient(address, concurrency=args.clients)
    http = HTTPClient.from_url(f"http://{address}/", concurrency=args.clients)
    body, headers = multipart(pngs)

    def tensor(name: str, datatype: str, value: numpy.ndarray, binary: bool):
        return triton.InferInput(name, list(value.shape), datatype).set_data_from_numpy(value, binary_data=binary)

    binary_pixels = [tensor("images", "UINT8", pixels, True)]
    json_pixels = [tensor("images", "UINT8", pixels, False)]
    files = [tensor("image_files", "BYTES", numpy.array(pngs, dtype=numpy.object_), True)]
    in_json = [triton.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "digit")]
    expected = client.infer("mnist", binary_pixels).as_numpy("digit")

    def predict() -> None:
        response = http.post("/predict", body, headers)
        answer = response.read()
        if response.status_code != 200:
            raise RuntimeError(answer[:200])

    cases = {
        "v2 binary UINT8": lambda: client.infer("mnist", binary_pixels),
        "v2 JSON UINT8": lambda: client.infer("mnist", json_pixels, outputs=in_json),
        "v2 image_files (280x280 PNGs)": lambda: client.infer("mnist", files),
        "/predict (280x280 PNGs)": predict,
    }
    if not (client.infer("mnist", json_pixels, outputs=in_json).as_numpy("digit") == expected).all():
        raise SystemExit("v2 JSON and binary answers differ")
    # interleaved rounds: the machine's other work, which comes and goes, weighs on each case alike
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, send in cases.items():
            runs[name].append(load(send, args.clients, args.seconds / args.rounds, warmup=0.3))
    rows = {}
    for name, parts in runs.items():
        requests, seconds = sum(p["requests"] for p in parts), sum(p["seconds"] for p in parts)
        rows[name] = {"clients": args.clients, "requests": requests, "failed": sum(p["failed"] for p in parts),
                      "images_per_second": round(requests * BATCH / seconds, 1),
                      "rounds_images_per_second": [p["images_per_second"] for p in parts]}
        print(f"{name:32s} {rows[name]['images_per_second']:10.0f} images/s  ({requests} requests, "
              f"{rows[name]['failed']} failed; rounds {rows[name]['rounds_images_per_second']})", flush=True)
    return rows


def volume(tmp: str) -> Path:
    root = Path(tmp) / "volume"
    for stage in ("train", "evaluate"):  # evaluate exports the version's ONNX model where onnxruntime imports
        if mnist(stage, "--root", str(root)).wait() != 0:
            raise SystemExit(f"mnist {stage} failed")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a trained, evaluated, exported volume (default: make one)")
    parser.add_argument("--seconds", type=float, default=8.0, help="each load, in all its rounds")
    parser.add_argument("--rounds", type=int, default=4, help="each load in this many parts, the loads interleaved")
    parser.add_argument("--clients", type=int, default=4, help="connections kept busy at once")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="serve's --workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or volume(tmp)
        server = Server(root, args.workers)
        try:
            server.ready()
            runtime = "onnx" if "with onnx" in "".join(server.log) else "torch"
            rows = measure(server.address, args)
        finally:
            server.stop()
    ratio = rows["v2 binary UINT8"]["images_per_second"] / max(rows["/predict (280x280 PNGs)"]["images_per_second"],
                                                                1e-9)
    print(f"v2 binary UINT8 / /predict: {ratio:.1f}x (goal >= {GOAL:g}x: {'met' if ratio >= GOAL else 'NOT met'})")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "workers": args.workers, "runtime": runtime,
              "seconds": args.seconds, "rounds": args.rounds, "batch": BATCH, "loads": rows,
              "ratio_v2_binary_to_predict": round(ratio, 2),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = REPO / "bench" / "results" / "v2.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cpu}, {result['cpus']} CPUs, serve --workers {args.workers} ({runtime}) -> {out}")


if __name__ == "__main__":
    main()
