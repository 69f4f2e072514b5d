"""`mnist serve` against two peer apps, or one app under candidate servers: interleaved rounds, one client.

    python bench/serve_bench.py [--root DIR] [--rounds 5] [--seconds 2] [--quick]    # mnist serve vs the peers
    python bench/serve_bench.py --servers [--root DIR] [--rounds 5] [--seconds 2]     # the servers to choose from

Default mode: `mnist serve --workers 2` and the two peer apps of bench/peers (plain.py: FastAPI +
onnxruntime as a user writes them; tuned.py: the same at one onnxruntime thread, access log off),
each under `uvicorn --workers 2`. --servers: tuned.py unchanged under uvicorn --workers 2, gunicorn
with uvicorn workers (-w 2) and granian (--workers 2). Every server listens on 127.0.0.1 and answers
from the same ONNX file (model/versions/N/mnist_cnn.onnx of --root; without it a volume is trained
briefly and exported into a temp folder first, from MNIST_TEST_MIRROR or ../shared/mnist).

Each round measures every server in turn (the order rotates from round to round), first with
--clients keep-alive connections each sending one 280x280 PNG drawing per request (multipart field
`file`), then --batch-clients connections each sending 64 MNIST test digits (28x28 PNGs) per request:
a short warm-up, in which the connections open --stagger seconds apart, then --seconds of load.
(Opened all at once, --stagger 0, the connections of a server whose workers share one listening
socket, as uvicorn's and gunicorn's do, mostly land on one worker.) Per round and in summary (the
median of the rounds): req/s, images/s, p50/p99 latency, the server's CPU per request (user + system
of its parent and every process below it, from /proc/PID/stat before and after the load, over every
request it answered in that time) and the busiest process's share of that CPU (about 50% when two
workers share the work, 100% when one does it all), with same-round ratios against the reference
(tuned, or uvicorn in --servers).

The client is one selector loop over raw sockets with the requests encoded beforehand; it runs on
the same machine and shares its CPUs with the servers (its own CPU per request is reported too).
Writes bench/results/serve.json: the mode's section ("peers" or "servers"), the other kept.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
import platform
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "bench" / "peers"
MIRROR = os.environ.get("MNIST_TEST_MIRROR") or str(REPO.parent / "shared" / "mnist")
OUT = REPO / "bench" / "results" / "serve.json"
BATCH = 64
TICK = os.sysconf("SC_CLK_TCK")
# issue 28's goals for mnist serve against the tuned peer, in one run with the same client
GOALS = {"single_ratio": 1.5, "batch_ratio": 1.2, "p99_ms": 25.0}


def mnist(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m mnist_pipeline ARGS` from this checkout's source, with no stray MNIST_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(MNIST_MIRROR=MIRROR, PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *args], env=env, **kwargs)


def volume(tmp: str, steps: int) -> Path:
    """A volume trained for `steps` steps, evaluated and exported (accuracy does not matter for speed)."""
    root = Path(tmp) / "volume"
    for stage in (("train", "--max-steps", str(steps)), ("evaluate", "--export", "auto")):
        with tempfile.TemporaryFile() as log:
            if mnist(stage[0], "--root", str(root), *stage[1:], stdout=log, stderr=subprocess.STDOUT).wait() != 0:
                log.seek(0)
                tail = log.read().decode(errors="replace").splitlines()[-20:]
                raise SystemExit(f"error: mnist {stage[0]} failed building the bench's volume:\n" + "\n".join(tail))
    print(f"a volume trained for {steps} steps and exported: {root}", flush=True)
    return root


def exported(root: Path) -> Tuple[int, Path]:
    """The newest version of `root` with an ONNX model, and that file."""
    found = sorted((int(p.parent.name), p) for p in (root / "model" / "versions").glob("*/mnist_cnn.onnx")
                   if p.parent.name.isdecimal())
    if not found:
        raise SystemExit(f"error: no model/versions/N/mnist_cnn.onnx under {root}: run `mnist evaluate --export auto`")
    return found[-1]


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
    from PIL import Image

    raw = Path(MIRROR) / "t10k-images-idx3-ubyte"
    try:
        data = raw.read_bytes() if raw.exists() else gzip.decompress(raw.with_name(raw.name + ".gz").read_bytes())
    except OSError as exc:
        raise SystemExit(f"error: no MNIST test images in {MIRROR} ({exc.strerror}): set MNIST_TEST_MIRROR to a "
                         f"folder holding t10k-images-idx3-ubyte[.gz]") from None
    pngs = []
    for n in range(count):
        buffer = io.BytesIO()
        Image.frombytes("L", (28, 28), data[16 + n * 784:16 + (n + 1) * 784]).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


def multipart(pngs: List[bytes]) -> bytes:
    """POST /predict with each PNG in a multipart field `file`: a whole request, head and body."""
    boundary = "bench-boundary-5e1c"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for n, png in enumerate(pngs)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One keep-alive client: sends its request, reads the whole answer, again."""

    def __init__(self, address: Tuple[str, int], request: bytes):
        self.address, self.request = address, request
        self.connect()
        self.pending, self.received, self.began = memoryview(b""), bytearray(), 0.0

    def connect(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)

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
        """The status once the whole answer is in, else None (more to read). Raises ConnectionError when closed."""
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
        if length is None:
            raise ConnectionError("an answer without Content-Length: " + bytes(self.received[:end]).decode("latin-1"))
        if len(self.received) < end + 4 + int(length.group(1)):
            return None
        return int(self.received[9:12])


def load(address: Tuple[str, int], request: bytes, clients: int, seconds: float, warmup: float,
         stagger: float = 0.0) -> Dict:
    """`clients` connections sending `request` back to back, the n-th opened n * `stagger` seconds after the
    first: what was answered in `seconds` after `warmup`, and how many answers there were in all (warm-up and
    the last ones in flight included)."""
    selector = selectors.DefaultSelector()
    connections: List[Connection] = []
    started = time.perf_counter()
    measure_from, end = started + warmup, started + warmup + seconds
    latencies: List[float] = []
    failed = answered = reconnects = opened = 0
    while connections or opened < clients:
        while opened < clients and time.perf_counter() >= started + opened * stagger:
            connection = Connection(address, request)
            selector.register(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
            connection.send()
            connections.append(connection)
            opened += 1
        if time.perf_counter() > end + 60:
            raise SystemExit(f"error: {len(connections)} requests unanswered a minute after the load ended")
        wait = 1.0 if opened == clients else max(0.0, started + opened * stagger - time.perf_counter())
        for key, events in selector.select(timeout=wait):
            connection = key.data
            if events & selectors.EVENT_WRITE and connection.pending:
                connection.flush()
            if not events & selectors.EVENT_READ:
                continue
            try:
                status = connection.answer()
            except ConnectionError:  # closed by the server: counted, a new connection carries on
                selector.unregister(connection.sock)
                connection.sock.close()
                reconnects += 1
                connection.connect()
                selector.register(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
                connection.send()
                continue
            if status is None:
                continue
            now = time.perf_counter()
            answered += 1
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
    selector.close()
    latencies.sort()
    if not latencies:
        raise SystemExit("error: no request was answered in the measured time: raise --seconds")
    return {"requests": len(latencies), "failed": failed, "reconnects": reconnects, "answered": answered,
            "req_per_s": len(latencies) / seconds, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000}


def get(address: Tuple[str, int], path: str) -> int:
    """One GET on a new connection: the status, 0 when it could not connect."""
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return 0
    return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree(pid: int) -> List[int]:
    """`pid` and every process below it."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return pids


def cpu(pids: List[int]) -> Dict[int, float]:
    """Each process's user + system CPU seconds so far (its threads included)."""
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15 of stat(5)
    return seconds


class Server:
    """A server started now on a free port of 127.0.0.1, its output in a log file; ready() waits for `probe`."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], probe: str, logs: Path):
        self.name, self.probe, self.port = name, probe, free_port()
        self.address = ("127.0.0.1", self.port)
        self.argv = [part.replace("{port}", str(self.port)) for part in argv]
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def ready(self) -> None:
        deadline = time.monotonic() + 120
        while get(self.address, self.probe) != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"error: {self.name} did not answer {self.probe}:\n" + "\n".join(tail))
            time.sleep(0.05)

    def command(self, root: Path) -> str:
        """The command line, as one would type it in the repository with the volume at VOLUME."""
        return " ".join("python" if a == sys.executable else a for a in self.argv).replace(
            str(root), "VOLUME").replace(f"{REPO}{os.sep}", "")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # its own session: the workers go with it
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def setups(mode: str, root: Path, version: int, model: Path) -> List[Tuple[str, List[str], str]]:
    """(name, argv, readiness path) of each server of the mode; the first one is the reference of the ratios."""
    python = sys.executable
    uvicorn = [python, "-m", "uvicorn", "--app-dir", str(PEERS), "--host", "127.0.0.1", "--port", "{port}",
               "--workers", "2"]
    if mode == "servers":
        return [("uvicorn", uvicorn + ["--no-access-log", "tuned:app"], "/openapi.json"),
                ("gunicorn", [python, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", "2",
                              "-b", "127.0.0.1:{port}", "--chdir", str(PEERS), "tuned:app"], "/openapi.json"),
                ("granian", [python, "-m", "granian", "--interface", "asgi", "--workers", "2", "--host", "127.0.0.1",
                             "--port", "{port}", "--working-dir", str(PEERS), "tuned:app"], "/openapi.json")]
    return [("tuned", uvicorn + ["--no-access-log", "tuned:app"], "/openapi.json"),
            ("plain", uvicorn + ["plain:app"], "/openapi.json"),
            ("mnist", [python, "-m", "mnist_pipeline", "serve", "--root", str(root), "--host", "127.0.0.1",
                       "--port", "{port}", "--workers", "2", "--model", str(version), "--runtime", "onnx",
                       "--threshold", "0"], "/readyz")]


def check(server: Server, single: bytes, batch: bytes) -> None:
    """One answer of each kind, 200 and with as many predictions as images, before anything is timed."""
    for request, images in ((single, 1), (batch, BATCH)):
        answer = b""
        try:
            with socket.create_connection(server.address, timeout=60) as sock:
                sock.sendall(request)
                while True:
                    head, found, body = answer.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                    if found and length and len(body) >= int(length.group(1)):
                        break
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise OSError("closed before the whole answer")
                    answer += chunk
            status = int(head[9:12])
            answered = len(json.loads(body).get("predictions", [])) if status == 200 else 0
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {server.name} gave no whole answer to {images} image(s): {exc}: "
                             f"{answer[:300]!r}") from None
        if answered != images:
            raise SystemExit(f"error: {server.name} answered {status} with {answered} predictions for {images} "
                             f"image(s): {body[:300]!r}")


def measure(server: Server, request: bytes, images: int, clients: int, args: argparse.Namespace) -> Dict:
    """One load on one server, with its processes' CPU and the client's own around it."""
    pids = tree(server.process.pid)
    before, client_before = cpu(pids), resource.getrusage(resource.RUSAGE_SELF)
    result = load(server.address, request, clients, args.seconds, args.warmup, args.stagger)
    after, client_after = cpu(pids), resource.getrusage(resource.RUSAGE_SELF)
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    client = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    busiest = max(used.values()) / max(sum(used.values()), 1e-9)
    return {"server": server.name, "clients": clients, **{k: result[k] for k in ("requests", "failed", "reconnects")},
            "req_per_s": round(result["req_per_s"], 1), "images_per_s": round(result["req_per_s"] * images, 1),
            "p50_ms": round(result["p50_ms"], 2), "p99_ms": round(result["p99_ms"], 2),
            "cpu_ms_per_request": round(sum(used.values()) / result["answered"] * 1000, 3),
            "busiest_process_cpu_share": round(busiest, 2),
            "client_cpu_ms_per_request": round(client / result["answered"] * 1000, 3)}


def summarise(rounds: List[Dict], names: List[str], reference: str) -> Dict:
    """The median of the rounds for each server and kind, and the median (min-max) of the same-round ratios."""
    summary: Dict = {}
    for kind in ("single", "batch"):
        rows = {name: [r[kind][name] for r in rounds] for name in names}
        summary[kind] = {name: {key: round(statistics.median(row[key] for row in rows[name]), 3)
                                for key in ("req_per_s", "images_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request",
                                            "client_cpu_ms_per_request", "busiest_process_cpu_share")}
                         for name in names}
        for name in names:
            summary[kind][name]["failed"] = sum(row["failed"] for row in rows[name])
        ratios = {}
        for name in names:
            if name == reference:
                continue
            for key in ("req_per_s", "cpu_ms_per_request"):
                values = [a[key] / max(b[key], 1e-9) for a, b in zip(rows[name], rows[reference], strict=True)]
                ratios[f"{name}/{reference} {key}"] = {"median": round(statistics.median(values), 2),
                                                        "min": round(min(values), 2), "max": round(max(values), 2)}
        summary[kind]["ratios"] = ratios
    return summary


def table(summary: Dict, names: List[str]) -> None:
    for kind in ("single", "batch"):
        unit = "1 drawing 280x280" if kind == "single" else f"{BATCH} digits 28x28"
        print(f"\n{kind} ({unit} per request), median of the rounds:")
        print(f"  {'server':10}{'req/s':>9}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}"
              f"{'client CPU ms/req':>19}{'busiest process':>17}{'failed':>8}")
        for name in names:
            row = summary[kind][name]
            print(f"  {name:10}{row['req_per_s']:>9.0f}{row['images_per_s']:>10.0f}{row['p50_ms']:>9.1f}"
                  f"{row['p99_ms']:>9.1f}{row['cpu_ms_per_request']:>12.2f}{row['client_cpu_ms_per_request']:>19.2f}"
                  f"{row['busiest_process_cpu_share']:>17.0%}{row['failed']:>8}")
        for what, ratio in summary[kind]["ratios"].items():
            print(f"  {what}: {ratio['median']:.2f}x (rounds {ratio['min']:.2f}-{ratio['max']:.2f})")


def goals(summary: Dict) -> List[str]:
    """issue 28's goals for mnist serve against the tuned peer, from this run."""
    single = summary["single"]["ratios"]["mnist/tuned req_per_s"]["median"]
    batch = summary["batch"]["ratios"]["mnist/tuned req_per_s"]["median"]
    p99 = summary["single"]["mnist"]["p99_ms"]
    return [f"{'met    ' if met else 'NOT met'} {what} (goal {goal})" for what, met, goal in (
        (f"single: {single:.2f}x the tuned peer's req/s", single >= GOALS["single_ratio"],
         f">= {GOALS['single_ratio']}x"),
        (f"64-image: {batch:.2f}x the tuned peer's images/s", batch >= GOALS["batch_ratio"],
         f">= {GOALS['batch_ratio']}x"),
        (f"single: p99 {p99:.1f} ms at 8 clients", p99 <= GOALS["p99_ms"], f"<= {GOALS['p99_ms']:g} ms"))]


def machine() -> Dict:
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor())
    load_average = [round(v, 2) for v in os.getloadavg()]
    return {"cpu": cpu_name, "cpus": len(os.sched_getaffinity(0)), "load_average": load_average}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a volume with model/versions/N/mnist_cnn.onnx (default: make one)")
    parser.add_argument("--servers", action="store_true", help="tuned.py under uvicorn, gunicorn and granian")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="each load, after --warmup")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--stagger", type=float, default=0.05,
                        help="seconds between opening one connection and the next, in the warm-up (0: all at once)")
    parser.add_argument("--clients", type=int, default=8, help="single-image keep-alive connections")
    parser.add_argument("--batch-clients", type=int, default=4, help="64-image keep-alive connections")
    parser.add_argument("--train-steps", type=int, default=100, help="the built volume's training steps")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 0.5 s loads")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results/serve.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 0.5, 0.5
    if args.stagger * max(args.clients, args.batch_clients) > args.warmup:
        parser.error(f"--stagger {args.stagger:g} opens the last connection after the --warmup {args.warmup:g}: "
                     f"raise --warmup or lower --stagger")
    mode = "servers" if args.servers else "peers"
    # the peers run under uvicorn, which serve itself no longer needs
    missing = [name for name in ("uvicorn",) + (("gunicorn", "uvicorn_worker", "granian") if args.servers else ())
               if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: the peers{' and --servers' if args.servers else ''} need {', '.join(missing)} in "
                         f"this Python: pip install uvicorn==0.55.0" + (" granian==2.8.9 gunicorn==27.0.1 "
                         "uvicorn-worker==0.4.0" if args.servers else "") + " (into a virtual environment)")
    single, batch = multipart(drawings(1)), multipart(digits(BATCH))
    began = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or volume(tmp, args.train_steps)
        version, model = exported(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
        env.update(PEER_MODEL=str(model), PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
        servers: List[Server] = []
        try:
            for name, argv, probe in setups(mode, root, version, model):
                servers.append(Server(name, argv, env, probe, Path(tmp)))
            for server in servers:
                server.ready()
                check(server, single, batch)
                load(server.address, single, args.clients, 1.0, 0.0)  # every worker up and warm
            names = [s.name for s in servers]
            print(f"{mode}: {', '.join(names)}, 2 workers each, from {model.relative_to(root)}; "
                  f"{args.rounds} rounds of {args.warmup:g} s warm-up + {args.seconds:g} s per load; the client "
                  f"shares the machine's {at_start['cpus']} CPUs (load average {at_start['load_average']})",
                  flush=True)
            rounds = []
            for number in range(args.rounds):
                order = servers[number % len(servers):] + servers[:number % len(servers)]
                row: Dict = {"round": number + 1, "order": [s.name for s in order], "single": {}, "batch": {}}
                for kind, request, images, clients in (("single", single, 1, args.clients),
                                                       ("batch", batch, BATCH, args.batch_clients)):
                    for server in order:
                        row[kind][server.name] = measure(server, request, images, clients, args)
                rounds.append(row)
                print(f"round {number + 1}: " + "; ".join(f"{kind} " + ", ".join(
                    f"{n} {row[kind][n]['req_per_s']:.0f} req/s p99 {row[kind][n]['p99_ms']:.0f} ms "
                    f"{row[kind][n]['cpu_ms_per_request']:.1f} CPU ms/req" for n in names)
                    for kind in ("single", "batch")), flush=True)
            commands = {s.name: s.command(root) for s in servers}
        finally:
            for server in servers:
                server.stop()
    summary = summarise(rounds, names, names[0])
    table(summary, names)
    checked = goals(summary) if mode == "peers" else []
    if checked:
        print("\nissue 28's goals for mnist serve (this run, this machine):")
        print("\n".join(f"  {line}" for line in checked))
    at_end = machine()
    print(f"\n{at_end['cpu']}, {at_end['cpus']} CPUs shared with the client; load average at the start "
          f"{at_start['load_average']}, at the end {at_end['load_average']}")
    if args.no_write:
        return
    section = {"measured_at": began, "machine": {**at_start, "load_average_end": at_end["load_average"]},
               "client": "one selector loop over raw keep-alive sockets, requests encoded beforehand, on the same "
                         "machine: it shares the CPUs with the servers",
               "single": f"{args.clients} clients, one 280x280 PNG drawing per request (multipart field `file`)",
               "batch": f"{args.batch_clients} clients, {BATCH} MNIST test digits (28x28 PNGs) per request",
               "rounds_of": {"rounds": args.rounds, "warmup_s": args.warmup, "seconds": args.seconds,
                             "stagger_s": args.stagger},
               "cpu_per_request": "user + system of the server's parent and every process below it, from "
                                  "/proc/PID/stat around each load, over every request answered then",
               "commands": commands, "rounds": rounds, "summary": summary, "goals": checked}
    try:
        result = json.loads(OUT.read_text())
    except (OSError, ValueError):
        result = {}
    if not isinstance(result, dict) or not {"peers", "servers"} & set(result):
        result = {}  # the old single-mode file: replaced
    result[mode] = section
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {OUT.relative_to(REPO)} ({mode})")


if __name__ == "__main__":
    main()
