"""The Compose contract end to end, under Compose v1 (`docker-compose`) and v2 (`docker compose`).

Builds the images with scripts/offline-prep.sh's override (these machines reach no registry), runs
train, evaluate, infer one after another in a project of its own, looks into the volume, brings
`serve` up (the slim image, no torch, with `export` writing the ONNX model it answers from) and
predicts from the host, as `mnist predict` on torch does, checks serve's hardening (published on
127.0.0.1 only, its limits) and that its restart policy brings it back after a SIGKILL, trains again
to check it resumes, trains once more with the `ddp` profile (two containers, one rank each), then
`up` (all three at once: evaluate and infer must use the new epoch), and removes what it made. Slow (four trainings per
flavor): deselect with -m "not docker". Skipped where no Docker engine answers or offline-prep
cannot run; under CI (CI set) those are failures instead, and both Compose flavors must be present.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, List, Optional

import pytest

from conftest import MIRROR, REPO

# one worker builds the images once (pytest-xdist, pyproject's addopts)
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("docker")]

SERVICES = ("train", "evaluate", "infer")
MAX_IMAGE_BYTES = 990e6
STRICT = bool(os.environ.get("CI"))
# the Compose v2 plugin: .ci/run installs it where the docker CLI looks for plugins
COMPOSE = {"v1": ["docker-compose"], "v2": ["docker", "compose"]}

# run inside a throwaway container on the volume: what the services left there
INSPECT_VOLUME = r"""
import json, os, torch
root = "/opt/mount"
found = {"results": None, "png_magic": [], "epoch": None, "accuracy": None, "evaluated": None, "inferred": None}
if os.path.isdir(f"{root}/results"):
    found["results"] = sorted(os.listdir(f"{root}/results"))
    for name in found["results"]:
        if name.endswith(".png"):
            with open(f"{root}/results/{name}", "rb") as f:
                found["png_magic"].append(f.read(8) == b"\x89PNG\r\n\x1a\n")
if os.path.exists(f"{root}/model/mnist_cnn.pt"):
    found["epoch"] = torch.load(f"{root}/model/mnist_cnn.pt", weights_only=True)["epoch"]
if os.path.exists(f"{root}/model/eval_results.json"):
    with open(f"{root}/model/eval_results.json") as f:
        evaluation = json.load(f)
    found["accuracy"] = evaluation["accuracy"]
    found["evaluated"] = evaluation["checkpoint"]["epoch"]
if os.path.exists(f"{root}/results/predictions.json"):
    with open(f"{root}/results/predictions.json") as f:
        found["inferred"] = json.load(f)["checkpoint"]["epoch"]
print(json.dumps(found))
"""
TORCH_VERSION = "import pkg_resources; print(pkg_resources.get_distribution('torch').version)"
READ_FILES = ("import base64, json, sys; "
              "print(json.dumps({p: base64.b64encode(open(p, 'rb').read()).decode() for p in sys.argv[1:]}))")
# export's parity check: the largest |probability difference| between onnxruntime and torch
PARITY = 1e-4
# run inside the serve container: the pid of `mnist serve`, the one child of the init process (tini, PID 1)
SERVE_PID = r"""
import os
children = []
for entry in os.listdir("/proc"):
    if entry.isdigit() and entry != str(os.getpid()):
        with open(f"/proc/{entry}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        if fields[1] == "1":
            children.append(int(entry))
assert len(children) == 1, children
print(children[0])
"""
KILL = "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGKILL)"
# docker-compose.yml's serve hardening, as `docker inspect` reports it (HostConfig)
SERVE_HOST_CONFIG = {"Memory": 1536 * 1024 * 1024, "PidsLimit": 512, "CapDrop": ["ALL"],
                     "SecurityOpt": ["no-new-privileges:true"], "ReadonlyRootfs": True}


def docker_env(project: str = "", settings: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Only the MNIST_* `settings`; /usr/bin first, since Compose v1 runs whichever `docker` comes first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(settings or {})
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")
    if project:
        env["COMPOSE_PROJECT_NAME"] = project
    return env


def run(cmd: List[str], project: str = "", timeout: float = 120, check: bool = True,
        settings: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=docker_env(project, settings), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-3000:]}")
    return result


def unavailable(reason: str):
    if STRICT:
        pytest.fail(f"{reason} (CI is set, so this fails rather than skips)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def offline_prepared() -> str:
    """A Docker engine, and this machine prepared by scripts/offline-prep.sh (idempotent, fast once done)."""
    if not shutil.which("docker") or run(["docker", "info"], timeout=60, check=False).returncode != 0:
        unavailable("no Docker engine answers (`docker info` failed): start dockerd to run the Compose tests")
    if not MIRROR.is_dir():
        unavailable(f"the MNIST mirror {MIRROR} is missing, so scripts/offline-prep.sh cannot run")
    prep = run(["bash", "scripts/offline-prep.sh", "--mirror", str(MIRROR)], timeout=1800, check=False)
    if prep.returncode != 0:
        unavailable(f"scripts/offline-prep.sh failed: {(prep.stderr or prep.stdout).strip()[-1000:]}")
    return prep.stdout


def compose_command(flavor: str) -> List[str]:
    command = COMPOSE[flavor]
    version = run(command + ["version", "--short"], timeout=60, check=False) if shutil.which(command[0]) else None
    if version is None or version.returncode != 0:
        unavailable(f"Compose {flavor} (`{' '.join(command)}`) is not installed; .ci/run installs both")
    if not version.stdout.strip().lstrip("v").startswith("1." if flavor == "v1" else "2."):
        unavailable(f"`{' '.join(command)}` is Compose {version.stdout.strip()}, not {flavor}")
    return command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def drawn_one() -> bytes:
    """A photo-like 1: a dark vertical stroke on light paper."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 300), (240, 238, 230))
    ImageDraw.Draw(image).line([(100, 40), (100, 260)], fill=(20, 20, 30), width=22)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def http(url: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None):
    """(status, JSON body), or (None, why) while nothing answers."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        return None, str(exc)


def inspect(container: str, field: str):
    """`docker inspect` of one field of `container`, parsed from its JSON."""
    return json.loads(run(["docker", "inspect", "--format", "{{json %s}}" % field, container]).stdout)


def check_serve(compose: List[str], project: str, images: Dict[str, str], pngs: List[str]) -> None:
    """`compose up -d serve` (named, as its profile needs; export comes with it), ready from the host on
    the onnx runtime, the same answers as torch's for infer's test images, published on 127.0.0.1 only
    with its limits, back after a SIGKILL of `mnist serve`, then both down."""
    port = free_port()
    run(compose + ["up", "-d", "serve"], project, timeout=1200, settings={"MNIST_PORT": str(port)})
    for image in (images["serve"], images["export"]):
        size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout)
        assert size <= MAX_IMAGE_BYTES, f"{image} is {size / 1e6:.0f} MB, over 990 MB"
    no_torch = run(["docker", "run", "--rm", images["serve"], "python", "-c", "import torch"], check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch
    containers = {}
    for name, writable in (("serve", False), ("export", True)):
        container = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                         "--filter", f"label=com.docker.compose.service={name}"]).stdout.split()
        assert len(container) == 1, (name, container)
        containers[name] = container[0]
        mounts = json.loads(run(["docker", "inspect", "--format", "{{json .Mounts}}", container[0]]).stdout)
        assert [m["RW"] for m in mounts if m["Destination"] == "/opt/mount"] == [writable], (name, mounts)
        host_config = inspect(container[0], ".HostConfig")
        assert host_config["RestartPolicy"]["Name"] == "unless-stopped", (name, host_config["RestartPolicy"])
    # serve: reachable from this host only, with its limits
    host_config = inspect(containers["serve"], ".HostConfig")
    assert {key: host_config[key] for key in SERVE_HOST_CONFIG} == SERVE_HOST_CONFIG, host_config
    mounts = run(["docker", "exec", containers["serve"], "cat", "/proc/mounts"]).stdout.splitlines()
    assert [line.split()[2] for line in mounts if line.split()[1] == "/tmp"] == ["tmpfs"], mounts
    published = inspect(containers["serve"], ".NetworkSettings.Ports")["8000/tcp"]
    assert [(p["HostIp"], p["HostPort"]) for p in published] == [("127.0.0.1", str(port))], published
    base = f"http://127.0.0.1:{port}"

    def ready_and_predicting() -> None:
        deadline = time.monotonic() + 180  # a limit for a hang, never a speed assertion
        status, ready = http(base + "/readyz")
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            status, ready = http(base + "/readyz")
        logs = run(compose + ["logs", "serve", "export"], project, check=False).stdout[-3000:]
        assert status == 200, f"/readyz: {status} {ready}\n{logs}"
        assert (ready["checkpoint"]["epoch"], ready["runtime"]) == (1, "onnx"), ready
        status, answer = http(base + "/predict", drawn_one(), {"Content-Type": "image/png"})
        assert status == 200 and answer["predictions"][0]["digit"] == 1, (status, answer)

    ready_and_predicting()

    # the torch path: `mnist predict` in the default image, on the same PNGs
    paths = [f"/opt/mount/results/{name}" for name in pngs]
    expected = json.loads(run(compose + ["run", "--rm", "evaluate", "mnist", "predict", "--json", *paths],
                              project).stdout)
    assert [item["file"] for item in expected] == paths, expected
    files = json.loads(run(["docker", "run", "--rm", "-v", f"{project}_mnist:/opt/mount:ro", images["train"],
                            "python", "-c", READ_FILES, *paths]).stdout)
    for item in expected:
        status, answer = http(base + "/predict", base64.b64decode(files[item["file"]]), {"Content-Type": "image/png"})
        assert status == 200, (item["file"], status, answer)
        served = answer["predictions"][0]
        assert served["digit"] == item["digit"], (item, served)
        difference = max(abs(a - b) for a, b in zip(served["probabilities"], item["probabilities"], strict=True))
        assert difference <= PARITY, (item, served)

    # `mnist serve` killed outright (as the OOM killer would): the restart policy brings it back
    pid = run(["docker", "exec", containers["serve"], "python", "-c", SERVE_PID]).stdout.strip()
    started = inspect(containers["serve"], ".State")["StartedAt"]
    # (the exec itself may end with the container: no exit code to check; the restart below shows the kill)
    run(["docker", "exec", containers["serve"], "python", "-c", KILL, pid], check=False)
    deadline = time.monotonic() + 60  # a limit for a hang, never a speed assertion
    state = inspect(containers["serve"], ".State")
    while state["StartedAt"] == started and time.monotonic() < deadline:
        time.sleep(0.5)
        state = inspect(containers["serve"], ".State")
    assert state["StartedAt"] != started and state["Running"], state
    assert inspect(containers["serve"], ".RestartCount") >= 1
    ready_and_predicting()
    run(compose + ["stop", "serve", "export"], project, timeout=120)
    run(compose + ["rm", "-f", "serve", "export"], project, timeout=120)


@pytest.mark.parametrize("flavor", ["v1", "v2"])
def test_compose_build_and_run_train_evaluate_infer(flavor, offline_prepared):
    compose = compose_command(flavor)
    project = f"mniste2e{flavor}{uuid.uuid4().hex[:8]}"
    images = {service: f"{project}_{service}" for service in SERVICES}
    volume = f"{project}_mnist"

    def service(name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        return run(compose + ["run", "--rm", name], project, timeout=timeout)

    def versions() -> list:
        """`mnist models --json` in a container of the evaluate service."""
        return json.loads(run(compose + ["run", "--rm", "evaluate", "mnist", "models", "--json"], project).stdout)

    def inspect_volume() -> dict:
        found = run(["docker", "run", "--rm", "-v", f"{volume}:/opt/mount", images["train"],
                     "python", "-c", INSPECT_VOLUME])
        return json.loads(found.stdout.strip().splitlines()[-1])

    try:
        run(compose + ["build"], project, timeout=2400)
        layers = {}
        for name, image in images.items():
            size, layers[name] = run(["docker", "image", "inspect", "--format",
                                      "{{.Size}} {{json .RootFS.Layers}}", image]).stdout.split(" ", 1)
            assert int(size) <= MAX_IMAGE_BYTES, f"{image} is {int(size) / 1e6:.0f} MB, over 990 MB"
            version = run(["docker", "run", "--rm", image, "python", "-c", TORCH_VERSION]).stdout.strip()
            assert tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups()) >= (1, 10), version
        assert len(set(layers.values())) == 1, "the three services must share every layer (one build)"
        for name in ("serve", "export"):
            assert run(["docker", "image", "inspect", f"{project}_{name}"], check=False).returncode != 0, \
                f"a plain `compose build` must leave {name} (profile serve) out"

        service("train")
        assert run(["docker", "volume", "inspect", volume], check=False).returncode == 0, \
            f"named volume {volume} missing"
        assert inspect_volume()["epoch"] == 1

        service("evaluate")
        service("infer")
        found = inspect_volume()
        assert found["epoch"] == 1, "evaluate or infer must not train (no depends_on)"
        leftover = run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"]).stdout
        assert leftover.strip() == "", "`run` must not have started other services' containers"
        assert found["accuracy"] is not None and found["accuracy"] > 0.95, found
        pngs = [name for name in found["results"] if name.endswith(".png")]
        assert len(pngs) == 5 and all(found["png_magic"]), found
        assert all(re.fullmatch(r"[0-9](_[0-9]+)?\.png", name) for name in pngs), pngs
        # evaluate kept the checkpoint as version 1 and, above the threshold, made it production
        assert [(v["version"], v["epoch"], v["aliases"]) for v in versions()] == [(1, 1, ["production"])]

        check_serve(compose, project, {**images, "serve": f"{project}_serve", "export": f"{project}_export"}, pngs)
        assert inspect_volume()["results"] == found["results"], "export and serve must leave results/ alone"

        service("train")
        assert inspect_volume()["epoch"] == 2, "a second train must resume from the checkpoint in the volume"

        # profile ddp: two containers, one rank each, meet over the Compose network and train one epoch
        # (one thread each: they share this machine's cores)
        ddp = run(compose + ["--profile", "ddp", "up", "ddp-leader", "ddp-worker"], project, timeout=1800,
                  settings={"MNIST_THREADS": "1"})
        assert (ddp.stdout + ddp.stderr).count("exited with code 0") == 2, ddp.stdout[-3000:] + ddp.stderr[-3000:]
        assert inspect_volume()["epoch"] == 3, "the ddp profile must train one more epoch on the same volume"

        # `up` starts train, evaluate and infer at once on a volume whose checkpoint is already evaluated:
        # evaluate and infer must wait for the new epoch, not use the old one (train's early lock, --grace)
        up = run(compose + ["up"], project, timeout=1800)
        assert (up.stdout + up.stderr).count("exited with code 0") == 3, up.stdout[-3000:] + up.stderr[-3000:]
        found = inspect_volume()
        assert (found["epoch"], found["evaluated"], found["inferred"]) == (4, 4, 4), found
        assert [(v["version"], v["epoch"]) for v in versions()] == [(1, 1), (2, 4)], "one version per evaluate"
    finally:
        run(compose + ["rm", "-s", "-f", "serve", "export"], project, timeout=120, check=False)
        run(compose + ["--profile", "ddp", "down", "--volumes", "--remove-orphans"], project, timeout=300,
            check=False)
        run(["docker", "volume", "rm", "-f", volume], check=False)
        # --no-prune keeps the cached build layers, so the next run builds in seconds
        run(["docker", "rmi", "--no-prune", *images.values(), f"{project}_serve", f"{project}_export"], check=False)
