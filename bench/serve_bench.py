"""`mnist serve` on torch with one worker against onnx with N workers, side by side, in one run.

    python bench/serve_bench.py [--root DIR] [--seconds 8] [--clients 8] [--batch-clients 4] [--workers N]

For each setup (--setups, default torch:1 onnx:N, N the CPUs this process may use) it starts a
real `mnist serve` on a free port over a trained, evaluated and exported volume (--root; without it
one is trained into a temp folder first, from ../shared/mnist or MNIST_TEST_MIRROR), and measures:
- start: from the process's start (a new interpreter, as `docker compose up` starts it) to the
  first /readyz 200, --starts times;
- single: --clients keep-alive connections each sending POST /predict with one 280x280 PNG drawing
  (as the page sends it), one after another, for --seconds after a second's warm-up: requests/s,
  p50 and p99 latency;
- batch: --batch-clients connections sending 64 MNIST test digits (28x28 PNGs, as an API client
  sends them in bulk) in one multipart request: predictions/s;
- memory: after --memory-requests requests in all (single ones are added to reach it), the RSS of
  each serve process (the parent and its workers) and their sum, and the sum of PSS (shared pages
  counted once).
The client is one selector loop over raw sockets with the requests built beforehand, so it takes
little of the CPUs it shares with the server. Prints a table, the issue's goals, and writes
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
MIRROR = os.environ.get("MNIST_TEST_MIRROR") or str(REPO.parent / "shared" / "mnist")
BATCH = 64
# issue 21's goals
GOALS = {"speedup": 2.0, "p99_ms": 25.0, "batch_per_s": 5000.0, "rss_mb": 120.0, "ready_s": 1.0}


def mnist(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m mnist_pipeline ARGS` from this checkout's source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(MNIST_MIRROR=MIRROR, PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *args], env=env, **kwargs)


def drawings(count: int) -> List[bytes]:
    """280x280 PNGs of strokes as the page's canvas sends them (black on white), each a little different."""
    from PIL import Image, ImageDraw

    pngs = []
    for n in range(count):
        image = Image.new("RGB", (280, 280), "white")
        shift = (n * 7) % 40
        ImageDraw.Draw(image).line([(80 + shift, 60), (200, 60 + shift), (120 - shift // 2, 230)], fill="black",
                                   width=24, joint="curve")
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def digits(count: int) -> List[bytes]:
    """The first `count` MNIST test digits as 28x28 grayscale PNGs: what an API client sends in bulk."""
    import gzip

    from PIL import Image

    folder = Path(MIRROR)
    raw = folder / "t10k-images-idx3-ubyte"
    data = raw.read_bytes() if raw.exists() else gzip.decompress((folder / f"{raw.name}.gz").read_bytes())
    pngs = []
    for n in range(count):
        buffer = io.BytesIO()
        Image.frombytes("L", (28, 28), data[16 + n * 784:16 + (n + 1) * 784]).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def raw_request(body: bytes, content_type: str) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def single_requests(pngs: List[bytes]) -> List[bytes]:
    return [raw_request(png, "image/png") for png in pngs]


def batch_request(pngs: List[bytes]) -> bytes:
    boundary = "bench-boundary-5e1c"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + pngs[n % len(pngs)] + b"\r\n" for n in range(BATCH)]
    return raw_request(b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}")


class Connection:
    """One keep-alive client: sends its request, reads the answer, again."""

    def __init__(self, address: Tuple[str, int], request: bytes):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.request = request
        self.pending = memoryview(b"")
        self.received = bytearray()
        self.began = 0.0

    def send(self) -> None:
        self.pending, self.received, self.began = memoryview(self.request), bytearray(), time.perf_counter()
        self.flush()

    def flush(self) -> None:
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                return
            self.pending = self.pending[sent:]

    def answer(self) -> Optional[int]:
        """The status once the whole answer is in, else None (more to read)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise ConnectionError("the server closed a keep-alive connection")
            self.received += chunk
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", bytes(self.received[:end]))
        if length is None or len(self.received) < end + 4 + int(length.group(1)):
            return None
        return int(self.received[9:12])


def load(address: Tuple[str, int], requests: List[bytes], clients: int, seconds: float,
         warmup: float = 1.0) -> Dict[str, float]:
    """`clients` connections sending requests[i % len] back to back; what was answered in `seconds` after `warmup`."""
    selector = selectors.DefaultSelector()
    connections = [Connection(address, requests[n % len(requests)]) for n in range(clients)]
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
        connection.send()
    started = time.perf_counter()
    measure_from, end = started + warmup, started + warmup + seconds
    latencies: List[float] = []
    failed = sent = 0
    while connections:
        for key, events in selector.select(timeout=1.0):
            connection = key.data
            if events & selectors.EVENT_WRITE and connection.pending:
                connection.flush()
            if not events & selectors.EVENT_READ:
                continue
            status = connection.answer()
            if status is None:
                continue
            now = time.perf_counter()
            sent += 1
            if now >= measure_from:
                latencies.append(now - connection.began)
                failed += status != 200
            if now < end:
                connection.send()
            else:
                selector.unregister(connection.sock)
                connection.sock.close()
                connections.remove(connection)
        for key in list(selector.get_map().values()):  # write interest only while there is something to send
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if key.data.pending else 0)
            if key.events != want:
                selector.modify(key.fileobj, want, key.data)
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "failed": failed, "sent": sent,
            "per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2)}


def get(address: Tuple[str, int], path: str) -> int:
    """One GET on a new connection: the status, 0 when it could not connect."""
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return 0
    return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0


class Server:
    """A `mnist serve` started now; ready() waits for its first /readyz 200 and says how long from the start."""

    def __init__(self, root: Path, runtime: str, workers: int):
        self.began = time.perf_counter()
        self.process = mnist("serve", "--root", str(root), "--port", "0", "--runtime", runtime, "--workers",
                             str(workers), "--threshold", "0", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        self.log: List[str] = []
        self.address: Optional[Tuple[str, int]] = None
        listening = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"listening on http://([\d.]+):(\d+)", line)
                if found:
                    self.address = (found.group(1), int(found.group(2)))
                    listening.set()
            listening.set()

        threading.Thread(target=read, daemon=True).start()
        listening.wait(120)
        if self.address is None:
            raise SystemExit("mnist serve did not start:\n" + "".join(self.log[-20:]))

    def ready(self) -> float:
        deadline = time.perf_counter() + 120
        while get(self.address, "/readyz") != 200:
            if time.perf_counter() > deadline or self.process.poll() is not None:
                raise SystemExit("mnist serve did not become ready:\n" + "".join(self.log[-20:]))
            time.sleep(0.005)
        return time.perf_counter() - self.began

    def memory(self) -> Dict[str, object]:
        """RSS of the parent and each worker (MB), their sum, and the sum of their PSS."""
        parent = self.process.pid
        pids = [parent] + [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        rss, pss = {}, 0.0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            rss[pid] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss += int(re.search(r"Pss:\s+(\d+)", rollup).group(1)) / 1024
        workers = [round(rss[p], 1) for p in pids[1:]] or [round(rss[parent], 1)]
        return {"parent_rss_mb": round(rss[parent], 1) if len(pids) > 1 else None, "worker_rss_mb": workers,
                "rss_sum_mb": round(sum(rss.values()), 1), "pss_sum_mb": round(pss, 1)}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def measure(root: Path, runtime: str, workers: int, args: argparse.Namespace, pngs: List[bytes],
            batch_pngs: List[bytes]) -> Dict:
    starts = []
    for _ in range(args.starts - 1):
        server = Server(root, runtime, workers)
        starts.append(round(server.ready(), 3))
        server.stop()
    server = Server(root, runtime, workers)
    try:
        starts.append(round(server.ready(), 3))
        if "with onnx" not in "".join(server.log) and runtime == "onnx":
            raise SystemExit("the onnx runtime did not serve:\n" + "".join(server.log[-20:]))
        single = load(server.address, single_requests(pngs), args.clients, args.seconds)
        batch = load(server.address, [batch_request(batch_pngs)], args.batch_clients, args.seconds)
        batch["predictions_per_second"] = round(batch["per_second"] * BATCH, 1)
        served = single["sent"] + batch["sent"]
        if served < args.memory_requests:
            more = (args.memory_requests - served) / max(single["per_second"], 1.0)
            served += load(server.address, single_requests(pngs), args.clients, max(more, 0.5), warmup=0)["sent"]
        memory = {"after_requests": served, **server.memory()}
    finally:
        server.stop()
    return {"runtime": runtime, "workers": workers, "start_to_ready_s": starts, "single": single, "batch": batch,
            "memory": memory}


def volume(tmp: str) -> Path:
    root = Path(tmp) / "volume"
    for stage in ("train", "evaluate"):  # evaluate exports the version's ONNX model where onnxruntime imports
        if mnist(stage, "--root", str(root)).wait() != 0:
            raise SystemExit(f"mnist {stage} failed")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a trained, evaluated, exported volume (default: make one)")
    parser.add_argument("--seconds", type=float, default=8.0, help="each load, after a second's warm-up")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="the onnx setup's")
    parser.add_argument("--setups", nargs="+", default=None, help="RUNTIME:WORKERS ... (default torch:1 onnx:N)")
    parser.add_argument("--starts", type=int, default=3, help="starts timed to /readyz 200, per setup")
    parser.add_argument("--memory-requests", type=int, default=10000)
    args = parser.parse_args()
    setups = [(s.split(":")[0], int(s.split(":")[1])) for s in args.setups or ["torch:1", f"onnx:{args.workers}"]]
    pngs, batch_pngs = drawings(8), digits(BATCH)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or volume(tmp)
        for runtime, workers in setups:
            row = measure(root, runtime, workers, args, pngs, batch_pngs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(rows)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "seconds": args.seconds,
              "single": "a 280x280 PNG drawing", "batch": f"{BATCH} MNIST test digits, 28x28 PNGs",
              "setups": rows, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = REPO / "bench" / "results" / "serve.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cpu}, {result['cpus']} CPUs -> {out}")


def report(rows: List[Dict]) -> None:
    """The setups side by side, then issue 21's goals for the last one against the first."""
    names = [f"{r['runtime']} x{r['workers']}" for r in rows]
    lines = [("", names),
             ("start to /readyz 200 (s, median)", [f"{statistics.median(r['start_to_ready_s']):.2f}" for r in rows]),
             (f"single: requests/s ({rows[0]['single']['clients']} clients)",
              [f"{r['single']['per_second']:.0f}" for r in rows]),
             ("single: p50 / p99 ms", [f"{r['single']['p50_ms']:.1f} / {r['single']['p99_ms']:.1f}" for r in rows]),
             ("single: failed", [str(r["single"]["failed"]) for r in rows]),
             (f"batch of {BATCH} digits: predictions/s", [f"{r['batch']['predictions_per_second']:.0f}" for r in rows]),
             ("RSS per worker (MB)", [" ".join(f"{m:.0f}" for m in r["memory"]["worker_rss_mb"]) for r in rows]),
             ("RSS parent (MB)", [str(r["memory"]["parent_rss_mb"] or "-") for r in rows]),
             ("RSS sum / PSS sum (MB)", [f"{r['memory']['rss_sum_mb']:.0f} / {r['memory']['pss_sum_mb']:.0f}"
                                         for r in rows])]
    for label, cells in lines:
        print(f"{label:38}" + "".join(f"{c:>18}" for c in cells))
    if len(rows) < 2:
        return
    base, new = rows[0], rows[-1]
    speedup = new["single"]["per_second"] / max(base["single"]["per_second"], 1e-9)
    rss = max(new["memory"]["worker_rss_mb"] + [new["memory"]["parent_rss_mb"] or 0])
    checks = [(f"requests/s {speedup:.2f}x {names[0]}", speedup >= GOALS["speedup"], f">= {GOALS['speedup']:g}x"),
              (f"p99 {new['single']['p99_ms']:.1f} ms", new["single"]["p99_ms"] <= GOALS["p99_ms"],
               f"<= {GOALS['p99_ms']:g} ms"),
              (f"{new['batch']['predictions_per_second']:.0f} predictions/s in batches",
               new["batch"]["predictions_per_second"] >= GOALS["batch_per_s"], f">= {GOALS['batch_per_s']:g}"),
              (f"largest serve process {rss:.0f} MB", rss <= GOALS["rss_mb"], f"<= {GOALS['rss_mb']:g} MB"),
              (f"ready in {statistics.median(new['start_to_ready_s']):.2f} s",
               statistics.median(new["start_to_ready_s"]) <= GOALS["ready_s"], f"<= {GOALS['ready_s']:g} s")]
    print(f"goals, {names[-1]}:")
    for what, met, goal in checks:
        print(f"  {'met    ' if met else 'NOT met'} {what} (goal {goal})")


if __name__ == "__main__":
    main()
