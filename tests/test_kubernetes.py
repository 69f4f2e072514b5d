"""deploy/kubernetes, checked without a cluster: each manifest against the real schemas, the kustomizations rendered.

Core kinds are validated against the strict JSON schemas of pinned Kubernetes versions (kubernetes-validate
bundles them: an unknown field is an error, as under `kubectl apply --validate=strict`), the TrainJob against
the CRD schema of Kubeflow Trainer v2.3.0 and the InferenceService against KServe v0.20.0's, both vendored in
deploy/kubernetes/schemas/ and made strict the same way.
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
BASE, SINGLE_NODE, KSERVE = DEPLOY / "base", DEPLOY / "overlays" / "single-node", DEPLOY / "overlays" / "kserve"
FEEDBACK = DEPLOY / "overlays" / "feedback"
KUSTOMIZATIONS = (BASE, SINGLE_NODE, KSERVE, FEEDBACK)
# the oldest and newest Kubernetes that Kubeflow Trainer v2.3.0 runs its end-to-end tests on
KUBERNETES_VERSIONS = ("1.32", "1.35")
TRAINJOB_SCHEMA = DEPLOY / "schemas" / "trainjob-v1alpha1.json"
INFERENCESERVICE_SCHEMA = DEPLOY / "schemas" / "inferenceservice-v1beta1.json"
# the custom resources, by apiVersion and kind: their vendored schema, its source and release
CUSTOM = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): (TRAINJOB_SCHEMA, "https://github.com/kubeflow/trainer/", "v2.3.0"),
    ("serving.kserve.io/v1beta1", "InferenceService"): (INFERENCESERVICE_SCHEMA, "https://github.com/kserve/kserve/",
                                                        "v0.20.0"),
}
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
        assert operation["op"] in ("replace", "add", "test"), operation
        where = f"{operation['path']} in {target['metadata']['name']}"
        if isinstance(node, list):  # an index, or `-` (after the last) for add
            index = len(node) if last == "-" and operation["op"] == "add" else int(last)
            if operation["op"] == "add":
                node.insert(index, operation["value"])
                continue
            assert index < len(node), f"{where} is not there"
            last = index
        else:
            assert operation["op"] == "add" or last in node, f"{where} is not there"
        if operation["op"] == "test":
            assert node[last] == operation["value"], f"{where} is {node[last]!r}, not {operation['value']!r}"
        else:
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
        content = yaml.safe_load(patch.get("patch", "[]"))
        if isinstance(content, dict) and content.get("$patch") == "delete":
            targets = [o for o in objects if matches(o, patch["target"])]
            assert len(targets) == 1, f"{patch['target']} matches {len(targets)} resources"
            objects.remove(targets[0])
        elif "path" in patch:
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
def validators() -> Dict[tuple, jsonschema.Draft7Validator]:
    """A strict validator for each custom resource, from its vendored CRD schema."""
    found = {}
    for key, (path, source, release) in CUSTOM.items():
        vendored = json.loads(path.read_text())
        assert vendored["source"].startswith(source) and vendored["release"] == release, path
        found[key] = jsonschema.Draft7Validator(strict(vendored["openAPIV3Schema"]))
    return found


def problems(obj: dict, validators: Dict[tuple, jsonschema.Draft7Validator]) -> List[str]:
    """What the schemas find wrong with `obj`: nothing for a valid object."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    custom = validators.get((obj.get("apiVersion"), obj.get("kind")))
    if custom is not None:
        found = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in custom.iter_errors(obj)]
        # the CRD leaves metadata open (the API server checks it): check it as any object's metadata
        as_core = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
        return found + problems(as_core, validators)
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
    """Each workload's pod spec; the TrainJob's is the runtime patch (the runtime holds the rest), the
    InferenceService's its predictor (a pod spec with KServe's fields beside)."""
    specs = {}
    for key, obj in objects.items():
        if obj["kind"] in ("Deployment", "Job"):
            specs[key] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "TrainJob":
            (patch,) = obj["spec"]["runtimePatches"]
            (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            specs[key] = node["template"]["spec"]["template"]["spec"]
        elif obj["kind"] == "InferenceService":
            specs[key] = obj["spec"]["predictor"]
    return specs


def pod_labels(obj: dict) -> Dict[str, str]:
    """The labels a workload's pods carry: the TrainJob's get the JobSet's, which Trainer names after it."""
    if obj["kind"] == "TrainJob":
        return {"jobset.sigs.k8s.io/jobset-name": obj["metadata"]["name"]}
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: Dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions with In) against a pod's labels."""
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


SERVE = {BASE: "Deployment/mnist-serve", SINGLE_NODE: "Deployment/mnist-serve", KSERVE: "InferenceService/mnist",
         FEEDBACK: "Deployment/mnist-serve"}
WRITERS = {"TrainJob/mnist-train", "Job/mnist-evaluate", "Job/mnist-infer", "Deployment/mnist-export"}


def writers(kustomization: Path) -> set:
    """The workloads that mount the claim writable: the pipeline's steps, and serve where it keeps feedback."""
    return WRITERS | ({SERVE[kustomization]} if kustomization == FEEDBACK else set())


# --- the tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_rendered_object_validates_against_its_schema(kustomization, validators):
    objects = render(kustomization)
    serving = ({"InferenceService"} if kustomization == KSERVE else {"Service", "HorizontalPodAutoscaler"})
    assert {obj["kind"] for obj in objects} >= {"PersistentVolumeClaim", "TrainJob", "Job", "Deployment",
                                                 "NetworkPolicy", "ServiceAccount"} | serving
    assert [p for obj in objects for p in problems(obj, validators)] == []


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
    ("NetworkPolicy/mnist-serve", ["spec"], "policyType", ["Ingress"]),
    ("InferenceService/mnist", ["spec", "predictor"], "minReplica", 1),
    ("InferenceService/mnist", ["spec", "predictor", "containers", 0], "readinesProbe", {"httpGet": {}}),
    ("InferenceService/mnist", ["spec", "predictor", "containers", 0, "securityContext"], "readOnlyRootFileSystem",
     True),
    ("InferenceService/mnist", ["spec", "predictor"], "maxReplicas", "4"),
    ("InferenceService/mnist", ["metadata"], "anotations", {}),
], ids=["misspelled probe", "port as a string", "job retries as a word", "misspelled numNodes",
        "numNodes as a string", "misspelled metadata field", "misspelled policyTypes",
        "misspelled minReplicas", "misspelled probe of the predictor", "misspelled readOnlyRootFilesystem",
        "maxReplicas as a string", "misspelled metadata field of the InferenceService"])
def test_a_misspelled_field_or_a_wrong_type_is_rejected(mistake, validators):
    key, where, field, value = mistake
    obj = copy.deepcopy(rendered(KSERVE if key.startswith("InferenceService/") else BASE)[key])
    assert problems(obj, validators) == []
    node = obj
    for step in where:
        node = node[step]
    node[field] = value
    found = problems(obj, validators)
    assert found and all(field in p or repr(value) in p for p in found), found


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_step_mounts_the_one_claim_at_opt_mount(kustomization):
    objects = rendered(kustomization)
    (claim,) = [obj for obj in objects.values() if obj["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    specs = pod_specs(objects)
    assert set(specs) == WRITERS | {SERVE[kustomization]}
    for key, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/mount"]
        claimed = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claimed["claimName"] == claim["metadata"]["name"], key
        # serve only reads the volume (but for feedback/ in the feedback overlay); the others write it
        assert mount.get("readOnly", False) == claimed.get("readOnly", False) == (key not in writers(kustomization)), \
            key


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_pod_runs_confined_as_the_image_user_without_an_api_token(kustomization):
    """uid 1000, non-root, the runtime's seccomp profile, no capabilities, a read-only root with a writable
    /tmp, and no service account token (the pod says so, or, where its spec cannot, its account)."""
    objects = rendered(kustomization)
    accounts = {obj["metadata"]["name"]: obj for obj in objects.values() if obj["kind"] == "ServiceAccount"}
    for key, spec in pod_specs(objects).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, key
        assert spec["securityContext"]["runAsUser"] == IMAGE_USER, key
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, key
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, key
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, key
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, key
        volumes = {v["name"]: v for v in spec["volumes"]}
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]], key
        # the pod's own field wins over its account's; a pod with neither gets a token
        account = accounts[spec["serviceAccountName"]]
        assert spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken")) is False, key
        assert account.get("automountServiceAccountToken") is False, key
    assert f"--uid {IMAGE_USER}" in (REPO / "Dockerfile").read_text()


def serve_strings() -> set:
    """Every string constant in serve's source: its routes among them, however the app declares them."""
    found = set()
    for path in (REPO / "src" / "mnist_pipeline" / "serve").rglob("*.py"):
        found |= {node.value for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return found


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_serve_is_probed_on_routes_that_serve_has(kustomization):
    (container,) = pod_specs(rendered(kustomization))[SERVE[kustomization]]["containers"]
    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    # ready only with a model that passes the gate; started and alive while the process answers
    assert probes == {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert set(probes.values()) <= serve_strings()
    assert container["ports"][0]["containerPort"] == 8000  # the image's MNIST_PORT default
    assert {(e["name"], e["value"]) for e in container["env"]} >= {("MNIST_WORKERS", "1")}


def test_serve_runs_the_slim_image_and_export_writes_what_it_answers_from():
    """As under Compose: serve in the image of the Dockerfile's target `serve` (no torch), which answers from
    the ONNX models that export (target `export`, `mnist export --follow`) writes; without export it is never
    ready. The autoscaler owns serve's replicas; one exporter, replaced rather than doubled on an update."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    objects = rendered(BASE)
    specs = pod_specs(objects)
    images = {key: spec["containers"][0].get("image") for key, spec in specs.items()}
    images["TrainJob/mnist-train"] = objects["TrainJob/mnist-train"]["spec"]["trainer"]["image"]
    assert images["Deployment/mnist-serve"] == "registry.example.com/mnist-compose-serve:0.1.0"
    assert images["Deployment/mnist-export"] == "registry.example.com/mnist-compose-export:0.1.0"
    assert {images[key] for key in ("TrainJob/mnist-train", "Job/mnist-evaluate", "Job/mnist-infer")} == {
        "registry.example.com/mnist-compose:0.1.0"}
    for name in ("serve", "export"):
        assert compose[name]["build"]["target"] == name
        (container,) = specs[f"Deployment/mnist-{name}"]["containers"]
        assert container["command"] == compose[name]["command"], name
    assert "replicas" not in objects["Deployment/mnist-serve"]["spec"]
    export = objects["Deployment/mnist-export"]["spec"]
    assert (export["replicas"], export["strategy"]["type"]) == (1, "Recreate")


def test_the_inferenceservice_serves_as_the_deployment_does():
    """The kserve overlay: the base's serve Deployment, Service and autoscaler replaced by an InferenceService
    (KServe's RawDeployment mode, the v2 protocol) whose predictor says what the Deployment says."""
    base, kserve = rendered(BASE), rendered(KSERVE)
    assert set(base) - set(kserve) == {"Deployment/mnist-serve", "Service/mnist-serve",
                                       "HorizontalPodAutoscaler/mnist-serve"}
    assert set(kserve) - set(base) == {"InferenceService/mnist"}
    service = kserve["InferenceService/mnist"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "serve"
    predictor = service["spec"]["predictor"]
    deployment = base["Deployment/mnist-serve"]
    pod = deployment["spec"]["template"]["spec"]
    assert predictor["labels"] == deployment["spec"]["template"]["metadata"]["labels"]
    for field in ("securityContext", "serviceAccountName", "automountServiceAccountToken", "volumes"):
        assert predictor[field] == pod[field], field
    assert predictor["deploymentStrategy"] == deployment["spec"]["strategy"]
    (container,) = predictor["containers"]
    (served,) = pod["containers"]
    assert container["name"] == "kserve-container"  # where KServe looks for the model server
    for field in ("image", "command", "ports", "startupProbe", "readinessProbe", "livenessProbe", "resources",
                  "securityContext", "volumeMounts"):
        assert container[field] == served[field], field
    # a custom predictor's protocol: the PROTOCOL variable, which KServe reads (v0.20.0's predictor_custom.go)
    assert container["env"] == served["env"] + [{"name": "PROTOCOL", "value": "v2"}]
    hpa = base["HorizontalPodAutoscaler/mnist-serve"]["spec"]
    (metric,) = hpa["metrics"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == (
        metric["resource"]["name"], metric["resource"]["target"]["averageUtilization"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_network_policies_open_only_what_each_step_needs(kustomization):
    """One policy a workload, naming both directions: serve takes TCP on its port and opens nothing;
    evaluate, infer and export have no network; the training pods reach each other on every port (torchrun's
    rendezvous, the process group's own ports), DNS and HTTPS (the MNIST download), and take traffic from
    each other only."""
    objects = rendered(kustomization)
    policies = [obj for obj in objects.values() if obj["kind"] == "NetworkPolicy"]
    rules = {}
    for key in pod_specs(objects):
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels(objects[key]))]
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"], key
        rules[key] = (policy["spec"].get("ingress", []), policy["spec"].get("egress", []))
    assert rules.pop(SERVE[kustomization]) == ([{"ports": [{"port": 8000, "protocol": "TCP"}]}], [])
    (container,) = pod_specs(objects)[SERVE[kustomization]]["containers"]
    assert container["ports"][0]["containerPort"] == 8000
    train = {"podSelector": {"matchLabels": pod_labels(objects["TrainJob/mnist-train"])}}
    ingress, egress = rules.pop("TrainJob/mnist-train")
    assert ingress == [{"from": [train]}]
    assert egress == [{"to": [train]},
                      {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                      {"ports": [{"port": 443, "protocol": "TCP"}]}]
    assert rules == {key: ([], []) for key in ("Job/mnist-evaluate", "Job/mnist-infer", "Deployment/mnist-export")}
    # the rank-to-rank rule names the TrainJob by the label its pods get: that of the JobSet, named as it is
    assert objects["TrainJob/mnist-train"]["metadata"]["name"] == "mnist-train"


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
    assert trainer["image"] == rendered(BASE)["Job/mnist-evaluate"]["spec"]["template"]["spec"][
        "containers"][0]["image"]


def test_the_feedback_overlay_lets_serve_alone_write_and_turns_feedback_on():
    """overlays/feedback: the serve Deployment mounts the claim writable, in both places, with MNIST_FEEDBACK=on;
    no other object changes, so no other serving object gets write access (docs/feedback.md)."""
    from mnist_pipeline import parse
    from mnist_pipeline.settings import SETTINGS

    base, feedback = rendered(BASE), rendered(FEEDBACK)
    assert set(base) == set(feedback)
    assert [key for key in base if base[key] != feedback[key]] == ["Deployment/mnist-serve"]
    specs = pod_specs(feedback)
    writable = set()
    for key, spec in specs.items():
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/mount"]
        claimed = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["persistentVolumeClaim"]
        if not mount.get("readOnly", False) or not claimed.get("readOnly", False):
            writable.add(key)
    assert writable - WRITERS == {"Deployment/mnist-serve"}
    # nothing else about serve changes: undo the overlay's three edits and the base's Deployment is back
    served = copy.deepcopy(feedback["Deployment/mnist-serve"])
    pod = served["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["env"][-1] == {"name": "MNIST_FEEDBACK", "value": "on"}
    assert parse.on_off(container["env"].pop()["value"]) is True
    assert "MNIST_FEEDBACK" in {setting.env for setting in SETTINGS.values()}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/mount"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    mount["readOnly"] = volume["persistentVolumeClaim"]["readOnly"] = True
    assert served == base["Deployment/mnist-serve"]
    # the serve's root stays read-only: it writes the claim (its feedback/) and its /tmp only
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


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
