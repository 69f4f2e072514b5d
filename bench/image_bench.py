"""Image sizes and container start-to-exit times of the Compose services.

    python bench/image_bench.py [--compose v1|v2] [--project mnistbench] [--repeat 5] [--skip-train]

Assumes a running Docker engine and, where no registry is reachable, scripts/offline-prep.sh
already run. Builds (cached: seconds), then measures
  - each service image's size (docker inspect .Size, decimal MB) and its largest layers;
  - a bare container start: `docker run --rm IMAGE python -c pass`, and one that imports torch;
  - `compose run --rm train|evaluate|infer` wall time with the data already in the volume (the
    volume <project>_mnist is kept between runs, so train resumes: one more epoch each time).
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("train", "evaluate", "infer")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", choices=sorted(COMPOSE), default="v1")
    parser.add_argument("--project", default="mnistbench")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each bare container start")
    parser.add_argument("--skip-train", action="store_true", help="time evaluate and infer only")
    parser.add_argument("--variants", action="store_true", help="also measure numpy added and .pyc removed")
    parser.add_argument("--clean", action="store_true", help="remove the project's volume and images at the end")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "images.json")
    args = parser.parse_args()
    compose, project = COMPOSE[args.compose], args.project
    images = {service: f"{project}_{service}" for service in SERVICES}
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

    report["images"] = {}
    for service, image in images.items():
        size = int(sh(["docker", "image", "inspect", "--format", "{{.Size}}", image], project).stdout)
        report["images"][service] = {"image": image, "mb": round(size / 1e6, 1)}
    history = sh(["docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}",
                  images["train"]], project).stdout
    layers = sorted((line.split("\t", 1) for line in history.splitlines()), key=lambda layer: -int(layer[0]))
    report["largest_layers"] = [{"mb": round(int(size) / 1e6, 1), "created_by": by[-100:] or "(base image)"}
                               for size, by in layers[:3]]

    report["start"] = {}
    for label, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch")):
        runs = [timed(["docker", "run", "--rm", images["train"], "python", "-c", code], project)
                for _ in range(args.repeat)]
        report["start"][label] = {"median_s": round(statistics.median(runs), 2), "runs_s": [round(r, 2) for r in runs]}

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

    if args.clean:
        sh(compose + ["down", "--volumes"], project, check=False)
        sh(["docker", "rmi", "--no-prune", *images.values()], project, check=False)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'image':<28}{'size MB':>10}")
    for info in report["images"].values():
        print(f"{info['image']:<28}{info['mb']:>10}")
    print(f"\n{'container start to exit':<50}{'median s':>10}")
    for label, info in report["start"].items():
        print(f"{'docker run --rm IMAGE ' + label:<50}{info['median_s']:>10}")
    for service, seconds in report["services"].items():
        print(f"{' '.join(compose) + ' run --rm ' + service:<50}{seconds:>10}")
    if "variants" in report:
        v = report["variants"]
        print(f"\nnumpy: +{v['numpy_mb']} MB, import torch {v['import_torch_s']} s -> "
              f"{v['import_torch_with_numpy_s']} s; "
              f".pyc: {v['pyc_mb']} MB, import torch without them {v['import_torch_without_pyc_s']} s")
    print(f"\nbuild {report['build_s']} s (cached when unchanged); load average at start "
          f"{report['load_average_at_start'][0]:.1f} on {report['cpus']} CPUs; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
