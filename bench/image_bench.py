"""Image sizes and container start-to-exit times of the Compose services.

    python bench/image_bench.py [--compose v1|v2] [--project mnistbench] [--repeat 5] [--skip-train]

Assumes a running Docker engine and, where no registry is reachable, scripts/offline-prep.sh
already run. Builds (cached: seconds) the default image and the serve and export targets, then
measures
  - each image's size (docker inspect .Size, decimal MB; the serve image's goal: at most 250 MB),
    the largest layers of the default and the serve image, and what each package of the serve
    image's venv takes;
  - a bare container start: `docker run --rm IMAGE python -c pass`, and one that imports torch (the
    default image) or onnxruntime (the serve image);
  - `compose run --rm train|evaluate|infer` wall time with the data already in the volume (the
    volume <project>_mnist is kept between runs, so train resumes: one more epoch each time), then
    `compose run --rm export mnist export` (the new version's ONNX model);
  - serve's start: `docker run` to the first 200 of /readyz on that volume, and then the memory of
    all the container's processes: one worker (--workers 1) on onnx in the serve image, then the
    serve image with its defaults (a worker per CPU, at most 4).
With --variants, also the two choices the Dockerfile made, measured in a throwaway container:
numpy added (its size, and `import torch` time with it) and the .pyc files removed (`import torch`
time without them; the venv is read-only to the services' user, so they would never be rewritten).
Prints a table and writes bench/results/images.json. --clean removes the project's volume and
images afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("train", "evaluate", "infer")
TARGETS = ("serve", "export")  # profile serve: built when named
SERVE_GOAL_MB = 250
COMPOSE = {"v1": ["docker-compose"], "v2": ["docker", "compose"]}
CHECKPOINT_EXISTS = "import os, sys; sys.exit(0 if os.path.exists('/opt/mount/model/mnist_cnn.pt') else 1)"
WHEEL_TAGS = "import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]} {platform.machine()}')"
# run as root in a throwaway container, numpy's wheel mounted at /numpy
VARIANTS = r"""
import json, os, shutil, statistics, subprocess, sys, sysconfig, time
from pathlib import Path

def import_torch_s(runs=5):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)

def mb(paths):
    return round(sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file()) / 1e6, 1)

site = Path(sysconfig.get_paths()["purelib"])
found = {"import_torch_s": import_torch_s()}
subprocess.run([sys.executable, "-m", "ensurepip", "-q"], check=True)  # the image leaves pip out
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", "/numpy",
                "numpy"], check=True)
found["numpy_mb"] = mb(site.glob("numpy*"))
found["import_torch_with_numpy_s"] = import_torch_s()
subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "numpy"], check=True)
caches = [p for p in Path(sys.prefix).rglob("__pycache__")]
found["pyc_mb"] = mb(caches)
for cache in caches:
    shutil.rmtree(cache)
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
found["import_torch_without_pyc_s"] = import_torch_s(3)
print(json.dumps(found))
"""


def env_for(project: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")  # Compose v1 runs the first `docker` on PATH
    env["COMPOSE_PROJECT_NAME"] = project
    return env


def sh(cmd, project: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env_for(project), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def timed(cmd, project: str) -> float:
    start = time.perf_counter()
    sh(cmd, project)
    return time.perf_counter() - start


def measure_variants(image: str, project: str) -> dict:
    """numpy added, .pyc removed: what each would cost or save (pip download uses this machine's pip setup)."""
    python, machine = sh(["docker", "run", "--rm", image, "python", "-c", WHEEL_TAGS], project).stdout.split()
    with tempfile.TemporaryDirectory() as wheels:
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python, "--platform", f"manylinux_2_28_{machine}", "-d", wheels, "numpy"], project)
        found = sh(["docker", "run", "--rm", "-u", "root", "-v", f"{wheels}:/numpy:ro", image,
                    "python", "-c", VARIANTS], project).stdout
    return json.loads(found.strip().splitlines()[-1])


# run in the serve image: the bytes of each top-level entry of its venv's site-packages
SITE_SIZES = r"""
import json, sysconfig
from pathlib import Path
site = Path(sysconfig.get_paths()["purelib"])
def size(path):
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
print(json.dumps({entry.name: size(entry) for entry in site.iterdir()}))
"""
# the serve image's venv in parts: a site-packages entry belongs to the first part its name starts with
SERVE_PARTS = (("onnxruntime", ("onnxruntime",)), ("numpy", ("numpy",)), ("Pillow", ("PIL", "pillow")),
               ("mnist package", ("mnist_pipeline",)))
# the memory of every process in a container but this one: RSS and PSS (shared pages split among
# the processes sharing them: forked workers share the parent's) summed, in bytes
CONTAINER_MEMORY = r"""
import json, os, re
total = {"rss": 0, "pss": 0}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) != os.getpid():
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                text = f.read()
        except OSError:
            continue
        for key, field in (("rss", "Rss"), ("pss", "Pss")):
            total[key] += int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024
print(json.dumps(total))
"""
READY_POLL_S = 0.02
# serve's starts measured: one worker, then the serve image as Compose runs it (--workers: the
# container's CPUs, at most 4). The default image has no HTTP stack: serve runs from the serve image.
SERVE_STARTS = (("serve", ["--runtime", "onnx", "--workers", "1"]),
                ("serve", []))


def image_mb(image: str, project: str) -> float:
    return round(int(sh(["docker", "image", "inspect", "--format", "{{.Size}}", image], project).stdout) / 1e6, 1)


def largest_layers(image: str, project: str, count: int = 3) -> list:
    history = sh(["docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}",
                  image], project).stdout
    layers = sorted((line.split("\t", 1) for line in history.splitlines()), key=lambda layer: -int(layer[0]))
    return [{"mb": round(int(size) / 1e6, 1), "created_by": by[-100:] or "(base image)"} for size, by in layers[:count]]


def serve_venv_parts(image: str, project: str) -> dict:
    """MB of each part of the serve image's venv; "HTTP stack" is the rest (FastAPI and its dependencies)."""
    sizes = json.loads(sh(["docker", "run", "--rm", image, "python", "-c", SITE_SIZES], project).stdout)
    parts = {name: 0 for name, _ in SERVE_PARTS}
    parts["HTTP stack"] = 0
    for entry, size in sizes.items():
        part = next((name for name, prefixes in SERVE_PARTS if entry.startswith(prefixes)), "HTTP stack")
        parts[part] += size
    return {name: round(size / 1e6, 1) for name, size in parts.items()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_start(image: str, volume: str, options: list, project: str) -> dict:
    """`docker run` of `mnist serve OPTIONS` to the first 200 of /readyz; then the container's memory."""
    port = free_port()
    start = time.perf_counter()
    container = sh(["docker", "run", "-d", "--rm", "-v", f"{volume}:/opt/mount:ro", "-p", f"127.0.0.1:{port}:8000",
                    image, "mnist", "serve", *options], project).stdout.strip()
    try:
        ready = None
        while ready is None and time.perf_counter() - start < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    ready = json.load(response)
            except (urllib.error.URLError, OSError):  # not listening yet, or 503: not ready
                time.sleep(READY_POLL_S)
        ready_s = time.perf_counter() - start
        if ready is None:
            logs = sh(["docker", "logs", container], project, check=False)
            sys.exit(f"error: {image} `mnist serve {' '.join(options)}` not ready within 120 s: "
                     f"{(logs.stdout + logs.stderr)[-2000:]}")
        memory = json.loads(sh(["docker", "exec", container, "python", "-c", CONTAINER_MEMORY], project).stdout)
    finally:
        sh(["docker", "stop", "-t", "5", container], project, check=False)
    return {"ready_s": round(ready_s, 2), "rss_mb": round(memory["rss"] / 1e6, 1),
            "pss_mb": round(memory["pss"] / 1e6, 1), "runtime": ready.get("runtime"),
            "version": ready["checkpoint"].get("version")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", choices=sorted(COMPOSE), default="v1")
    parser.add_argument("--project", default="mnistbench")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each bare container start and serve start")
    parser.add_argument("--skip-train", action="store_true", help="time evaluate and infer only")
    parser.add_argument("--variants", action="store_true", help="also measure numpy added and .pyc removed")
    parser.add_argument("--clean", action="store_true", help="remove the project's volume and images at the end")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "images.json")
    args = parser.parse_args()
    compose, project = COMPOSE[args.compose], args.project
    images = {service: f"{project}_{service}" for service in SERVICES + TARGETS}
    volume = f"{project}_mnist"

    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "docker_engine": sh(["docker", "version", "--format", "{{.Server.Version}}"], project).stdout.strip(),
        "compose": sh(compose + ["version", "--short"], project).stdout.strip(),
        "project": project,
    }
    print(f"building ({' '.join(compose)}, project {project}) ...", file=sys.stderr)
    report["build_s"] = round(timed(compose + ["build"], project), 1)
    report["build_serve_export_s"] = round(timed(compose + ["--profile", "serve", "build", *TARGETS], project), 1)

    report["images"] = {service: {"image": image, "mb": image_mb(image, project)} for service, image in images.items()}
    report["serve_goal_mb"] = SERVE_GOAL_MB
    report["largest_layers"] = largest_layers(images["train"], project)
    report["serve_largest_layers"] = largest_layers(images["serve"], project)
    report["serve_venv_mb"] = serve_venv_parts(images["serve"], project)

    report["start"] = {}
    for image, code in ((images["train"], "pass"), (images["train"], "import torch"),
                        (images["serve"], "pass"), (images["serve"], "import onnxruntime")):
        runs = [timed(["docker", "run", "--rm", image, "python", "-c", code], project) for _ in range(args.repeat)]
        report["start"][f"{image} python -c '{code}'"] = {"median_s": round(statistics.median(runs), 2),
                                                          "runs_s": [round(r, 2) for r in runs]}

    if args.variants:
        report["variants"] = measure_variants(images["train"], project)

    has_checkpoint = sh(["docker", "run", "--rm", "-v", f"{volume}:/opt/mount", images["train"],
                         "python", "-c", CHECKPOINT_EXISTS], project, check=False).returncode == 0
    if not has_checkpoint:
        print("first train in this volume (fetches the data; not timed) ...", file=sys.stderr)
        sh(compose + ["run", "--rm", "train"], project)
    report["services"] = {}
    for service in SERVICES:
        if service == "train" and args.skip_train:
            continue
        print(f"timing `run --rm {service}` ...", file=sys.stderr)
        report["services"][service] = round(timed(compose + ["run", "--rm", service], project), 1)
    print("timing `run --rm export mnist export` ...", file=sys.stderr)
    report["services"]["export"] = round(timed(compose + ["--profile", "serve", "run", "--rm", "export",
                                                          "mnist", "export"], project), 1)

    report["serve_start"] = {}
    for image, options in SERVE_STARTS:
        label = f"{images[image]} {' '.join(options) or '(defaults)'}"
        print(f"timing serve's start: {label} ...", file=sys.stderr)
        runs = [serve_start(images[image], volume, options, project) for _ in range(args.repeat)]
        report["serve_start"][label] = {
            "ready_median_s": round(statistics.median(r["ready_s"] for r in runs), 2),
            "rss_median_mb": round(statistics.median(r["rss_mb"] for r in runs), 1),
            "pss_median_mb": round(statistics.median(r["pss_mb"] for r in runs), 1),
            "runs": runs,
        }

    if args.clean:
        sh(compose + ["--profile", "serve", "down", "--volumes"], project, check=False)
        sh(["docker", "rmi", "--no-prune", *images.values()], project, check=False)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'image':<28}{'size MB':>10}")
    for info in report["images"].values():
        print(f"{info['image']:<28}{info['mb']:>10}")
    serve_mb = report["images"]["serve"]["mb"]
    print(f"serve image: {serve_mb} MB, goal at most {SERVE_GOAL_MB} MB: "
          f"{'met' if serve_mb <= SERVE_GOAL_MB else 'NOT met'}")
    base_mb = next((layer["mb"] for layer in report["serve_largest_layers"] if layer["created_by"] == "(base image)"),
                   None)
    print(f"of it: base image {base_mb} MB; venv " + ", ".join(f"{name} {mb}" for name, mb in
                                                               report["serve_venv_mb"].items()) + " MB")
    print(f"\n{'container start to exit':<64}{'median s':>10}")
    for label, info in report["start"].items():
        print(f"{'docker run --rm ' + label:<64}{info['median_s']:>10}")
    for service, seconds in report["services"].items():
        print(f"{' '.join(compose) + ' run --rm ' + service:<64}{seconds:>10}")
    print(f"\n{'serve: docker run to /readyz 200, then memory (all processes)':<64}{'median s':>10}"
          f"{'RSS MB':>10}{'PSS MB':>10}")
    for label, info in report["serve_start"].items():
        print(f"{label:<64}{info['ready_median_s']:>10}{info['rss_median_mb']:>10}{info['pss_median_mb']:>10}")
    if "variants" in report:
        v = report["variants"]
        print(f"\nnumpy: +{v['numpy_mb']} MB, import torch {v['import_torch_s']} s -> "
              f"{v['import_torch_with_numpy_s']} s; "
              f".pyc: {v['pyc_mb']} MB, import torch without them {v['import_torch_without_pyc_s']} s")
    print(f"\nbuild {report['build_s']} s, serve and export {report['build_serve_export_s']} s (cached when "
          f"unchanged); load average at start {report['load_average_at_start'][0]:.1f} on {report['cpus']} CPUs; "
          f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
