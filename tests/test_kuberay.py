"""cluster/kuberay/ against KubeRay's own CRD schemas, offline, plus what a schema cannot say: token auth on, GPUs requested, no public Service, the shared volume everywhere,
an entrypoint that this repository's CLI accepts, one Ray version from Dockerfile to manifests."""

import copy
import os
import re
import shlex
from functools import cache, reduce
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml

import train
from distributed_cl.config import Config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}


def structural(node):
    """The apiserver prunes or, under kubectl's default strict validation, rejects fields a CRD does not
    declare; JSON Schema allows them. So every object that lists its properties is closed here (none of these
    CRDs uses x-kubernetes-preserve-unknown-fields). x-kubernetes-int-or-string gets its anyOf if it lacks
    one: on its own jsonschema would ignore it and accept anything. Other x-kubernetes-* keys (list types, CEL
    rules) are not checked, and neither is `format` (int32, date-time): no format checker is passed."""
    if isinstance(node, list):
        return [structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: structural(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return node


def find_crds() -> Path | None:
    """KubeRay's CRD files (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml): in $KUBERAY_CRDS, else in a
    kuberay-crds directory beside this checkout or one level into a sibling directory."""
    candidates = [Path(os.environ["KUBERAY_CRDS"])] if os.environ.get("KUBERAY_CRDS") else [
        ROOT.parent / "kuberay-crds", *sorted(ROOT.parent.glob("*/kuberay-crds"))]
    return next((d for d in candidates if all((d / f).is_file() for f in CRDS.values())), None)


CRD_DIR = find_crds()
needs_crds = pytest.mark.skipif(
    CRD_DIR is None,
    reason="KubeRay's CRD schemas not found: set KUBERAY_CRDS to a directory holding ray.io_rayclusters.yaml and "
           "ray.io_rayjobs.yaml, from a KubeRay release (ray-operator/config/crd/bases/ in its source, or the "
           "kuberay-operator Helm chart's crds/) or from a cluster: kubectl get crd rayclusters.ray.io -o yaml")


@cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    path = CRD_DIR / CRDS[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 43k lines
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft202012Validator(structural(schema))


@cache
def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1, name
    return docs[0]


def cluster_specs() -> dict[str, dict]:
    """The RayCluster's spec and the one a RayJob creates its cluster from."""
    return {"RayCluster": manifest("raycluster.yaml")["spec"],
            "RayJob": manifest("rayjob.yaml")["spec"]["rayClusterSpec"]}


def pods(spec: dict) -> list[dict]:
    return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]


def dicts(node):
    """Every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    for child in node if isinstance(node, list) else ():
        yield from dicts(child)


@needs_crds
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_its_crd(name):
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", MANIFESTS[name])
    validator(doc["kind"]).validate(doc)


def test_shared_claim_is_read_write_many():
    pvc = manifest("storage.yaml")
    assert (pvc["apiVersion"], pvc["kind"], pvc["spec"]["accessModes"]) == ("v1", "PersistentVolumeClaim", ["ReadWriteMany"])


def shared_mounts(spec: dict) -> set[str]:
    """Where the containers mount storage.yaml's claim; every container of every pod must."""
    claim, paths = manifest("storage.yaml")["metadata"]["name"], set()
    for pod in pods(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        for container in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            assert shared and shared[0] in mounts, f"{container['name']} does not mount {claim}"
            shm = [n for n, path in mounts.items() if path == "/dev/shm"]
            assert shm and volumes[shm[0]]["emptyDir"]["medium"] == "Memory"
            paths.add(mounts[shared[0]])
    return paths


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_token_auth_gpu_workers_and_shared_storage(owner):
    spec = cluster_specs()[owner]
    assert spec["authOptions"]["mode"] == "token"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    for container in gpu["template"]["spec"]["containers"]:
        resources = container["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations", []))
    assert shared_mounts(spec) == {"/mnt/shared"}


@pytest.mark.parametrize("name", [*MANIFESTS, "storage.yaml"])
def test_nothing_is_exposed_outside_the_cluster(name):
    for d in dicts(manifest(name)):  # the head Service stays ClusterIP: kubectl port-forward reaches it
        assert not {d.get("serviceType"), d.get("type")} & {"LoadBalancer", "NodePort"}, d
        assert not d.get("enableIngress"), d


def test_rayjob_entrypoint_is_a_valid_train_command(tmp_path):
    job = manifest("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    # The schema has no enum here (any string passes), so the modes KubeRay knows are listed by hand.
    assert job.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "train.py"]
    args = train.parse_args(argv[2:])  # unknown flags exit here
    assert re.fullmatch(r"experiments/\S+\.yaml", args.config) and (ROOT / args.config).is_file()
    # The whole config with the flags applied; the image holds the dataset, this machine need not.
    config = Config.load(ROOT / args.config, train.overrides_from_flags(args) + [f"data.root={tmp_path}"])
    (mount,) = shared_mounts(job["rayClusterSpec"])
    assert PurePosixPath(config.train.storage_path).is_relative_to(mount)
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in job["rayClusterSpec"]["workerGroupSpecs"])
    assert config.train.use_gpu and config.train.num_workers <= gpus  # else the job waits forever for GPUs


def test_one_ray_version_from_dockerfile_to_manifests():
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", (ROOT / "cluster" / "Dockerfile").read_text(), re.M)
    assert base and base[1] == ray.__version__ == "2.60.0"
    assert {s["rayVersion"] for s in cluster_specs().values()} == {ray.__version__}


DELETE = object()
MUTATIONS = {  # id: (manifest, dotted path that must exist, new value or DELETE, the JSON Schema keyword that fails)
    "auth-mode-not-in-enum": ("raycluster.yaml", "spec.authOptions.mode", "password", "enum"),
    "replicas-not-an-integer": ("raycluster.yaml", "spec.workerGroupSpecs.0.replicas", "two", "type"),
    "worker-group-without-name": ("raycluster.yaml", "spec.workerGroupSpecs.0.groupName", DELETE, "required"),
    "ray-start-param-not-a-string": ("raycluster.yaml", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "type"),
    "memory-not-a-quantity": ("raycluster.yaml",
                              "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", "lots", "pattern"),
    "job-auth-mode-not-in-enum": ("rayjob.yaml", "spec.rayClusterSpec.authOptions.mode", "password", "enum"),
    "job-without-head-template": ("rayjob.yaml", "spec.rayClusterSpec.headGroupSpec.template", DELETE, "required"),
    "shutdown-not-a-boolean": ("rayjob.yaml", "spec.shutdownAfterJobFinishes", "yes", "type"),
    "misspelt-field": ("rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.replicas", ("replica", 2),
                       "additionalProperties"),  # rejected only because structural() closes objects
}


@needs_crds
@pytest.mark.parametrize("name, path, value, keyword", MUTATIONS.values(), ids=MUTATIONS)
def test_broken_copy_fails(name, path, value, keyword):
    doc = copy.deepcopy(manifest(name))
    *parents, last = path.split(".")
    node = reduce(lambda n, k: n[int(k)] if isinstance(n, list) else n[k], parents, doc)
    node.pop(last)  # KeyError if the path names nothing: such a mutation would prove nothing
    if isinstance(value, tuple):  # a renamed key
        node[value[0]] = value[1]
    elif value is not DELETE:
        node[last] = value
    with pytest.raises(jsonschema.ValidationError):
        validator(doc["kind"]).validate(doc)
    assert keyword in {e.validator for e in validator(doc["kind"]).iter_errors(doc)}
