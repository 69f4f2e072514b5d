"""Predictions per second and latency of `mnist serve` over HTTP keep-alive, 1 and 4 concurrent clients.

    python bench/serve_bench.py [--root DIR] [--seconds 10] [--clients 1 4] [--threads N ...]

Starts a real `mnist serve` on a free port over a trained and evaluated volume (--root; without it
a fresh one is trained into a temp folder first, from ../shared/mnist), then each client thread
sends POST /predict with one image, one after another, on its own keep-alive connection, for
--seconds after a warm-up. The client runs on the same machine, so it takes CPU from the server.
Two images: a 280x280 PNG drawing as the page sends it, and an MNIST test digit as a 28x28 PNG.
Prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "mnist"


def mnist(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["MNIST_MIRROR"] = str(MIRROR)
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *args], env=env, **kwargs)


def drawing_png() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line([(80, 60), (200, 60), (120, 230)], fill="black", width=24, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def mnist_png(root: Path) -> bytes:
    from mnist_pipeline import data
    from mnist_pipeline.data import png as png_grayscale

    return png_grayscale(data.load_split(root / "data", "test", str(MIRROR)).images[0])


def start_server(root: Path, threads: int) -> tuple:
    args = ["serve", "--root", str(root), "--port", "0"] + (["--threads", str(threads)] if threads else [])
    server = mnist(*args, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        found = re.search(r"listening on http://([\d.]+):(\d+)", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()
            host, port = found.group(1), int(found.group(2))
            break
    else:
        raise SystemExit("mnist serve did not start")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", "/readyz")
        if connection.getresponse().status == 200:
            return server, host, port
        time.sleep(0.2)
    raise SystemExit("mnist serve did not become ready")


def load(host: str, port: int, image: bytes, clients: int, seconds: float) -> Dict[str, float]:
    latencies: List[List[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        headers = {"Content-Type": "image/png"}
        for _ in range(20):  # warm-up, not counted
            connection.request("POST", "/predict", image, headers)
            connection.getresponse().read()
        start.wait()
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            connection.request("POST", "/predict", image, headers)
            response = connection.getresponse()
            response.read()
            latencies[number].append(time.perf_counter() - began)
            failures[number] += response.status != 200

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    every = sorted(x for per_client in latencies for x in per_client)
    return {
        "clients": clients,
        "requests": len(every),
        "failed": sum(failures),
        "per_second": round(len(every) / elapsed, 1),
        "p50_ms": round(statistics.median(every) * 1000, 2),
        "p99_ms": round(every[min(len(every) - 1, int(len(every) * 0.99))] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a volume with a trained and evaluated model (default: train one)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="server --threads (0: its default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "volume"
            for stage in ("train", "evaluate"):
                if mnist(stage, "--root", str(root)).wait() != 0:
                    raise SystemExit(f"mnist {stage} failed")
        images = {"drawing 280x280 PNG": drawing_png(), "MNIST digit 28x28 PNG": mnist_png(root)}
        rows = []
        for threads in args.threads:
            server, host, port = start_server(root, threads)
            try:
                for name, image in images.items():
                    for clients in args.clients:
                        row = {"image": name, "server_threads": threads or "default",
                               **load(host, port, image, clients, args.seconds)}
                        rows.append(row)
                        print(f"{name:22} threads {row['server_threads']!s:7} clients {clients}: "
                              f"{row['per_second']:7.1f}/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
                              f"  ({row['requests']} requests, {row['failed']} failed)", flush=True)
            finally:
                server.terminate()
                server.wait()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "seconds": args.seconds, "rows": rows,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = REPO / "bench" / "results" / "serve.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cpu}, {result['cpus']} CPUs -> {out}")


if __name__ == "__main__":
    main()
