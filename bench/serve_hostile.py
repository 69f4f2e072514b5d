"""`mnist serve` under hostile load: memory, answers and latency, printed as figures.

Starts a real `mnist serve` on a trained volume (built here with a short train and an evaluate unless
--root names one) and measures:

1. storm: 16 clients at once, each sending over and over the worst image that passes the limits
   (the most decoded bytes for a given file, in each format), and one 64-file request of them:
   the server's peak RSS (goal: at most 1 GB), that every answer is JSON with 200, 400, 413 or 503,
   and /healthz latency meanwhile (goal: within 1 s);
2. half-open: 300 connections that send one header line and then nothing, then /healthz and a
   /predict from a new client (goal: each within 1 s); once with the default limits, once with an
   open-file limit of 256 (granian then accepts fewer; those it has are closed after --read-timeout);
3. the server's log size after all that (no flood).

    PYTHONPATH=src python bench/serve_hostile.py [--root VOLUME] [--seconds 20] [--mirror DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageDraw

from mnist_pipeline import preprocess

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 16
HALF_OPEN = 300
LIMIT = preprocess.MAX_DECODED_BYTES


def mnist(*args: str) -> List[str]:
    return [sys.executable, "-m", "mnist_pipeline", *args]


def build_volume(root: Path, mirror: Optional[str]) -> None:
    env = {**os.environ, **({"MNIST_MIRROR": mirror} if mirror else {})}
    for args in (("train", "--max-steps", "50"), ("evaluate", "--grace", "0")):
        subprocess.run(mnist(*args, "--root", str(root)), env=env, check=True, capture_output=True)


def digit(image: Image.Image, ink) -> Image.Image:
    """Draw a 7 over most of the image."""
    w, h = image.size
    ImageDraw.Draw(image).line([(w * .3, h * .15), (w * .7, h * .15), (w * .45, h * .85)], fill=ink,
                               width=max(3, w // 20))
    return image


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def worst_images() -> Dict[str, bytes]:
    """For each format, the image just inside the limits that decodes to the most bytes."""
    rgba = int(math.sqrt(LIMIT / 4))
    bilevel = int(math.sqrt(LIMIT))
    webp = int(math.sqrt(LIMIT / 12))
    # progressive JPEG: its full-size coefficients (1.5 a pixel with 4:2:0 colour, 2 bytes each) plus the
    # grayscale decode at 1/2 scale
    progressive = int(math.sqrt(0.98 * LIMIT / (1.5 * 2 + 0.25)))  # (0.98: the blocks round up)
    images = {
        f"RGBA PNG {rgba}x{rgba}": encoded(digit(Image.new("RGBA", (rgba, rgba), (0, 0, 0, 0)), (0, 0, 0, 255)),
                                           "PNG"),
        f"1-bit PNG {bilevel}x{bilevel}": encoded(digit(Image.new("1", (bilevel, bilevel), 1), 0), "PNG"),
        f"WebP {webp}x{webp}": encoded(digit(Image.new("RGBA", (webp, webp), (255, 255, 255, 0)), (0, 0, 0, 255)),
                                       "WEBP", lossless=True),
        f"progressive JPEG {progressive}x{progressive}": encoded(
            digit(Image.new("RGB", (progressive, progressive), "white"), "black"), "JPEG", progressive=True,
            quality=50),
    }
    side = 9000  # a baseline JPEG is decoded at 1/8 scale: as large as Pillow opens (89 megapixels)
    while True:
        data = encoded(digit(Image.new("L", (side, side), 255), 0), "JPEG", quality=10)
        if len(data) < 2 * 2**20:
            images[f"baseline JPEG {side}x{side}"] = data
            break
        side -= 1000
    for name, data in images.items():
        preprocess.from_bytes(data)  # each passes the limits
        assert len(data) <= 2 * 2**20, name
    return images


class Server:
    def __init__(self, root: Path, *args: str, nofile: Optional[int] = None):
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)

        def limit_files() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.process = subprocess.Popen(mnist("serve", "--root", str(root), "--port", "0", "--threshold", "0", *args),
                                        stderr=self.log, preexec_fn=limit_files)
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"listening on http://([\d.]+):(\d+)", Path(self.log.name).read_text())
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mnist serve did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.1)
        self.url = f"http://{self.host}:{self.port}"
        while self.get("/readyz")[0] != 200:
            time.sleep(0.2)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Summed over serve's processes: granian's parent and its workers (VmHWM: each one's own peak, summed,
        an upper bound of the whole's)."""
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # (ended meanwhile)
                continue
            total += int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))
        return total / 1024

    def pids(self) -> List[int]:
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    pending += [int(child) for child in (task / "children").read_text().split()]
                except OSError:
                    pass
        return found

    def get(self, path: str, timeout: float = 30) -> Tuple[int, float]:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as answer:
                answer.read()
                return answer.status, time.monotonic() - started
        except urllib.error.HTTPError as exc:
            return exc.code, time.monotonic() - started
        except OSError:
            return 0, time.monotonic() - started

    def post(self, body: bytes, content_type: str, timeout: float = 120) -> Tuple[int, bool, float]:
        """(status, whether the answer was JSON, seconds); status 0: no answer."""
        started = time.monotonic()
        request = urllib.request.Request(self.url + "/predict", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                json.loads(answer.read())
                return answer.status, answer.headers.get("content-type", "").startswith("application/json"), \
                    time.monotonic() - started
        except urllib.error.HTTPError as exc:
            data = exc.read()
            try:
                json.loads(data)
                is_json = exc.headers.get("content-type", "").startswith("application/json")
            except ValueError:
                is_json = False
            return exc.code, is_json, time.monotonic() - started
        except OSError:
            return 0, False, time.monotonic() - started

    def stop(self) -> int:
        self.process.terminate()
        self.process.wait(timeout=60)
        size = os.path.getsize(self.log.name)
        os.unlink(self.log.name)
        return size


def multipart(files: List[bytes]) -> Tuple[bytes, str]:
    boundary = "bench-boundary-5f1c"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}.png\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for n, data in enumerate(files)) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def storm(server: Server, body: bytes, content_type: str, seconds: float) -> None:
    """CLIENTS clients sending `body` over and over for `seconds`; /healthz polled meanwhile."""
    answers: List[Tuple[int, bool, float]] = []
    health: List[float] = []
    stop = threading.Event()
    peak = [server.rss_mb()]
    before = peak[0]

    def client() -> None:
        while not stop.is_set():
            answers.append(server.post(body, content_type))

    def watch() -> None:
        while not stop.is_set():
            status, seconds_taken = server.get("/healthz", timeout=10)
            health.append(seconds_taken if status == 200 else math.inf)
            peak[0] = max(peak[0], server.rss_mb())
            stop.wait(0.05)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)] + [threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    statuses: Dict[int, int] = {}
    for status, _, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    not_json = sum(1 for status, is_json, _ in answers if not is_json)
    unexpected = sum(n for status, n in statuses.items() if status not in (200, 400, 413, 503))
    health.sort()
    print(f"    {len(answers)} answers {dict(sorted(statuses.items()))}, not JSON: {not_json}, "
          f"other than 200/400/413/503: {unexpected}; slowest answer {max(s for *_, s in answers):.2f} s")
    print(f"    RSS {before:.0f} MB before, peak {peak[0]:.0f} MB during (sampled), {server.rss_mb():.0f} MB after; "
          f"/healthz: {len(health)} polls, median {health[len(health) // 2] * 1000:.0f} ms, "
          f"slowest {health[-1] * 1000:.0f} ms")


def half_open(server: Server, png: bytes, count: int) -> None:
    """`count` connections that send one header line and nothing more; then a new client's requests."""
    sockets = []
    refused = 0
    for _ in range(count):
        try:
            sock = socket.create_connection((server.host, server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            sockets.append(sock)
        except OSError:
            refused += 1
    time.sleep(0.5)
    status, seconds = server.get("/healthz", timeout=10)
    predicted, is_json, predict_seconds = server.post(png, "image/png", timeout=10)
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    print(f"    {count} half-open connections ({refused} not accepted, {closed} closed by the server at once): "
          f"/healthz {status} in {seconds * 1000:.0f} ms, /predict {predicted} in {predict_seconds * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="a trained and evaluated volume (default: build one)")
    parser.add_argument("--mirror", default=os.environ.get("MNIST_MIRROR", str(REPO.parent / "shared" / "mnist")))
    parser.add_argument("--seconds", type=float, default=20, help="length of each storm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch) / "volume"
            print("building a volume: train --max-steps 50, evaluate ...")
            build_volume(root, args.mirror)
        images = worst_images()
        small = encoded(digit(Image.new("L", (280, 280), 255), 0), "PNG")
        print(f"decoded-size limit {LIMIT // 2**20} MiB an image; {os.cpu_count()} CPUs here")

        server = Server(root)
        print(f"server up: RSS {server.rss_mb():.0f} MB, peak so far {server.rss_mb('VmHWM'):.0f} MB")
        for name, data in images.items():
            started = time.monotonic()
            status, _, _ = server.post(data, "image/png")
            print(f"  {name}: {len(data) // 1024} KB file, one request {status} in "
                  f"{time.monotonic() - started:.2f} s")
        for name, data in images.items():
            print(f"  storm, {CLIENTS} clients, {name}:")
            storm(server, data, "image/png", args.seconds)
        pngs = [data for name, data in images.items() if "PNG" in name]
        body, kind = multipart([pngs[n % len(pngs)] for n in range(64)])
        print(f"  storm, {CLIENTS} clients, 64 of the PNGs in one multipart request ({len(body) // 2**20} MB):")
        storm(server, body, kind, args.seconds)
        print(f"  peak RSS of the server over everything: {server.rss_mb('VmHWM'):.0f} MB (goal: at most 1024)")
        print("  half-open connections, default limits:")
        half_open(server, small, HALF_OPEN)
        print(f"  server log: {server.stop()} bytes")

        server = Server(root, nofile=256)
        print("  half-open connections, open-file limit 256:")
        half_open(server, small, HALF_OPEN)
        half_open(server, small, HALF_OPEN)
        print(f"  server log: {server.stop()} bytes")


if __name__ == "__main__":
    main()
