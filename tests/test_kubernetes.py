"""deploy/kubernetes, checked without a cluster: each manifest against the real schemas, the kustomizations rendered.

Core kinds are validated against the strict JSON schemas of pinned Kubernetes versions (kubernetes-validate
bundles them: an unknown field is an error, as under `kubectl apply --validate=strict`), the TrainJob against
the CRD schema of Kubeflow Trainer v2.3.0 vendored in deploy/kubernetes/schemas/, made strict the same way.
The kustomizations are rendered here by `render`, which does the part of kustomize they use; where kubectl is
installed, its own kustomize renders them too and must agree.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
BASE, SINGLE_NODE = DEPLOY / "base", DEPLOY / "overlays" / "single-node"
KUSTOMIZATIONS = (BASE, SINGLE_NODE)
# the oldest and newest Kubernetes that Kubeflow Trainer v2.3.0 runs its end-to-end tests on
KUBERNETES_VERSIONS = ("1.32", "1.35")
TRAINJOB_SCHEMA = DEPLOY / "schemas" / "trainjob-v1alpha1.json"
# torchrun's settings that the runtime sets, and so its webhook refuses in spec.trainer.env
PET_NAMES = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
IMAGE_USER = 1000  # the Dockerfile's `useradd --uid 1000`


# --- a small kustomize: resources, labels, images, replicas (with configurations), patches ---------

def load_all(path: Path) -> List[Dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def field_paths(kustomization: Path, kind: str) -> Dict[str, List[str]]:
    """kustomize's own field specs for `images` / `replicas`, plus those of the `configurations` files."""
    paths = {"images": [], "replicas": ["spec/replicas"] if kind in ("Deployment", "StatefulSet", "ReplicaSet") else []}
    for name in yaml.safe_load((kustomization / "kustomization.yaml").read_text()).get("configurations", []):
        for category, specs in yaml.safe_load((kustomization / name).read_text()).items():
            paths[category] += [spec["path"] for spec in specs if spec["kind"] == kind]
    return paths


def set_path(obj: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        obj = obj[key]
    if last in obj:
        obj[last] = value


def containers(node: Any) -> Iterator[dict]:
    """Every container anywhere below `node` (kustomize's image transformer finds them at any depth)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)


def merge(target: dict, patch: dict) -> None:
    """A strategic-merge patch of maps only (the patches here hold no lists)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def json6902(target: dict, operations: List[dict]) -> None:
    for operation in operations:
        *parents, last = operation["path"].lstrip("/").split("/")
        node = target
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        assert operation["op"] in ("replace", "add"), operation
        assert operation["op"] == "add" or last in node, f"{operation['path']} is not in {target['metadata']['name']}"
        node[last] = operation["value"]


def matches(obj: dict, selector: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    found = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(found[key] == value for key, value in selector.items())


def render(kustomization: Path) -> List[Dict[str, Any]]:
    spec = yaml.safe_load((kustomization / "kustomization.yaml").read_text())
    objects: List[Dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = kustomization / entry
        objects += render(path) if path.is_dir() else load_all(path)
    for obj in objects:
        for label in spec.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        paths = field_paths(kustomization, obj["kind"])
        for image in spec.get("images", []):
            new = f"{image.get('newName', image['name'])}:{image['newTag']}"
            for container in containers(obj):
                if container.get("image") == image["name"]:
                    container["image"] = new
            for path in paths["images"]:
                if _get(obj, path) == image["name"]:
                    set_path(obj, path, new)
        for replicas in spec.get("replicas", []):
            if obj["metadata"]["name"] == replicas["name"]:
                for path in paths["replicas"]:
                    set_path(obj, path, replicas["count"])
    for patch in spec.get("patches", []):
        if "path" in patch:
            (content,) = load_all(kustomization / patch["path"])
            targets = [o for o in objects if o["kind"] == content["kind"]
                       and o["metadata"]["name"] == content["metadata"]["name"]]
            assert len(targets) == 1, f"{patch['path']} patches {len(targets)} resources"
            merge(targets[0], content)
        else:
            targets = [o for o in objects if matches(o, patch["target"])]
            assert len(targets) == 1, f"{patch['target']} matches {len(targets)} resources"
            json6902(targets[0], yaml.safe_load(patch["patch"]))
    return objects


def _get(obj: dict, path: str) -> Any:
    for key in path.split("/"):
        obj = obj.get(key, {}) if isinstance(obj, dict) else {}
    return obj


# --- validation --------------------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones, as a strict apply does."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def trainjob_validator() -> jsonschema.Draft7Validator:
    vendored = json.loads(TRAINJOB_SCHEMA.read_text())
    assert vendored["source"].startswith("https://github.com/kubeflow/trainer/") and vendored["release"] == "v2.3.0"
    return jsonschema.Draft7Validator(strict(vendored["openAPIV3Schema"]))


def problems(obj: dict, trainjob_validator: jsonschema.Draft7Validator) -> List[str]:
    """What the schemas find wrong with `obj`: nothing for a valid object."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") == "trainer.kubeflow.org/v1alpha1" and obj.get("kind") == "TrainJob":
        found = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                 for e in trainjob_validator.iter_errors(obj)]
        # the CRD leaves metadata open (the API server checks it): check it as any object's metadata
        as_core = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
        return found + problems(as_core, trainjob_validator)
    found = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            found.append(f"{name} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
    return found


def rendered(kustomization: Path) -> Dict[str, dict]:
    return {f"{obj['kind']}/{obj['metadata']['name']}": obj for obj in render(kustomization)}


def pod_specs(objects: Dict[str, dict]) -> Dict[str, dict]:
    """Each workload's pod spec; the TrainJob's is the runtime patch (the runtime holds the rest)."""
    specs = {}
    for key, obj in objects.items():
        if obj["kind"] in ("Deployment", "Job"):
            specs[key] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "TrainJob":
            (patch,) = obj["spec"]["runtimePatches"]
            (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            specs[key] = node["template"]["spec"]["template"]["spec"]
    return specs


# --- the tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_rendered_object_validates_against_its_schema(kustomization, trainjob_validator):
    objects = render(kustomization)
    assert {obj["kind"] for obj in objects} >= {"PersistentVolumeClaim", "TrainJob", "Job", "Deployment",
                                                 "Service", "HorizontalPodAutoscaler"}
    assert [p for obj in objects for p in problems(obj, trainjob_validator)] == []


def test_every_manifest_is_in_a_kustomization():
    """No file that `kubectl apply -k` would silently leave out; every listed one exists."""
    listed = set()
    for kustomization in KUSTOMIZATIONS:
        spec = yaml.safe_load((kustomization / "kustomization.yaml").read_text())
        files = spec.get("resources", []) + spec.get("configurations", []) + [
            p["path"] for p in spec.get("patches", []) if "path" in p]
        for name in files:
            assert (kustomization / name).exists(), f"{kustomization.name}/kustomization.yaml lists missing {name}"
            listed.add((kustomization / name).resolve())
    manifests = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - listed == set()


@pytest.mark.parametrize("mistake", [
    ("Deployment/mnist-serve", ["spec", "template", "spec", "containers", 0], "readinesProbe", {"httpGet": {}}),
    ("Deployment/mnist-serve", ["spec", "template", "spec", "containers", 0, "ports", 0], "containerPort", "8000"),
    ("Job/mnist-evaluate", ["spec"], "backoffLimit", "two"),
    ("TrainJob/mnist-train", ["spec", "trainer"], "numNode", 2),
    ("TrainJob/mnist-train", ["spec", "trainer"], "numNodes", "2"),
    ("TrainJob/mnist-train", ["metadata"], "lables", {}),
], ids=["misspelled probe", "port as a string", "job retries as a word", "misspelled numNodes",
        "numNodes as a string", "misspelled metadata field"])
def test_a_misspelled_field_or_a_wrong_type_is_rejected(mistake, trainjob_validator):
    key, where, field, value = mistake
    obj = copy.deepcopy(rendered(BASE)[key])
    node = obj
    for step in where:
        node = node[step]
    node[field] = value
    found = problems(obj, trainjob_validator)
    assert found and all(field in p or repr(value) in p for p in found), found


def test_every_step_mounts_the_one_claim_at_opt_mount():
    objects = rendered(BASE)
    (claim,) = [obj for obj in objects.values() if obj["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    specs = pod_specs(objects)
    assert sorted(specs) == ["Deployment/mnist-serve", "Job/mnist-evaluate", "Job/mnist-infer",
                             "TrainJob/mnist-train"]
    for key, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/mount"]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], key
        # serve only reads the volume; the others write it
        assert mount.get("readOnly", False) == (key == "Deployment/mnist-serve"), key


def test_every_pod_runs_as_the_image_user_on_a_read_only_root_with_a_writable_tmp():
    for key, spec in pod_specs(rendered(BASE)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, key
        assert spec["securityContext"]["runAsUser"] == IMAGE_USER, key
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, key
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, key
        volumes = {v["name"]: v for v in spec["volumes"]}
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]], key
    assert f"--uid {IMAGE_USER}" in (REPO / "Dockerfile").read_text()


def test_serve_is_probed_on_routes_that_serve_has():
    source = (REPO / "src" / "mnist_pipeline" / "serve" / "http.py").read_text()
    (routes,) = [ast.literal_eval(node.value) for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "ROUTES"]
    deployment = rendered(BASE)["Deployment/mnist-serve"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    # ready only with a model that passes the gate; started and alive while the process answers
    assert probes == {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert set(probes.values()) <= set(routes)
    assert container["ports"][0]["containerPort"] == 8000  # the image's MNIST_PORT default
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_the_trainjob_runs_train_under_torchrun_on_n_nodes_from_the_kustomization():
    spec = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (count,) = [r["count"] for r in spec["replicas"] if r["name"] == "mnist-train"]
    trainjob = rendered(BASE)["TrainJob/mnist-train"]
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == count
    assert trainer["command"] == ["torchrun", "--module", "mnist_pipeline", "train"]
    assert {env["name"] for env in trainer["env"]} & PET_NAMES == set()
    # what Trainer v2.3.0's webhook asks of runtimePatches (pkg/runtime/framework/plugins/jobset/jobset.go):
    # a domain-prefixed manager; only the runtime's own jobs and containers; no env for its `node` container
    (patch,) = trainjob["spec"]["runtimePatches"]
    domain, _, path = patch["manager"].partition("/")
    assert "." in domain and path, patch["manager"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert (job["name"], container["name"]) == ("node", "node")  # the torch-distributed runtime's names
    assert "env" not in container
    assert trainer["image"] == rendered(BASE)["Deployment/mnist-serve"]["spec"]["template"]["spec"][
        "containers"][0]["image"]


def test_the_single_node_overlay_binds_the_claim_to_a_shared_host_folder():
    objects = rendered(SINGLE_NODE)
    volume, claim = objects["PersistentVolume/mnist-single-node"], objects["PersistentVolumeClaim/mnist"]
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == volume["spec"]["storageClassName"] == ""
    assert "ReadWriteMany" in volume["spec"]["accessModes"]
    assert volume["spec"]["hostPath"]["type"] == "Directory"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_kustomize_renders_what_render_does(kustomization):
    out = subprocess.run(["kubectl", "kustomize", str(kustomization)], capture_output=True, text=True, check=True)
    by_key = {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(out.stdout)}
    assert by_key == rendered(kustomization)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_sets_the_node_count_and_image_of_the_trainjob(tmp_path):
    """What docs/kubernetes.md tells a user to edit reaches the TrainJob's own fields."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(BASE, tmp_path)],  # kustomize takes no absolute path
        "replicas": [{"name": "mnist-train", "count": 3}],
        "images": [{"name": "registry.example.com/mnist-compose", "newName": "r.test/m", "newTag": "v2"}]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
    (trainjob,) = [o for o in yaml.safe_load_all(out.stdout) if o["kind"] == "TrainJob"]
    assert (trainjob["spec"]["trainer"]["numNodes"], trainjob["spec"]["trainer"]["image"]) == (3, "r.test/m:v2")
