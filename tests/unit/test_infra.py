"""The deployment files in infra/: every manifest and config parses, carries the fields the
service relies on, and passes the arguments its entry points accept (checked with their own
parsers: `python -m jobs.pretrain`, `cmacc`, `ray start`).

Schemas: the pod templates and the Secret are validated against the Kubernetes 1.34 schemas
(strict) that `kubernetes-validate` carries offline. No offline validator for KubeRay's CRDs
installs from the registries here, so the RayCluster and RayJob fields we rely on are
checked against a schema of our own (`KUBERAY_SUBSET` below), which requires them and fixes
their types; fields it does not name are left to KubeRay.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import torch
import yaml
from ray.scripts.scripts import start as ray_start

from cli.cluster import submission
from cli.main import build_parser
from jobs import pretrain
from service.ray_jobs import RUN_ID_KEY, job_entrypoint

pytestmark = pytest.mark.unit

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S_VERSION = "1.34"
IMAGE = "registry.example.com/cmacc:0.1.0"


def load(path: str) -> dict:
    return yaml.safe_load((INFRA / path).read_text())


RAYCLUSTER = load("k8s/raycluster.yaml")
PRETRAIN_JOB = load("k8s/rayjob-pretrain.yaml")
PREPARE_JOB = load("k8s/rayjob-prepare.yaml")
CLUSTER_SPECS = {
    "raycluster": RAYCLUSTER["spec"],
    "rayjob-pretrain": PRETRAIN_JOB["spec"]["rayClusterSpec"],
    "rayjob-prepare": PREPARE_JOB["spec"]["rayClusterSpec"],
}

_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "template": {"type": "object", "required": ["spec"]},
    },
    "additionalProperties": False,  # a misspelt field is an error, not an ignored setting
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs", "authOptions"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {
            "type": "object",
            "required": ["mode"],
            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}},
            "additionalProperties": False,
        },
        "headGroupSpec": _GROUP,
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                **_GROUP,
                "required": [*_GROUP["required"], "groupName", "minReplicas", "maxReplicas"],
                "properties": {
                    **_GROUP["properties"],
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                },
            },
        },
    },
    "additionalProperties": False,
}
KUBERAY_SUBSET = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": _CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "spec": {
                "type": "object",
                "required": [
                    "entrypoint",
                    "submissionMode",
                    "backoffLimit",
                    "shutdownAfterJobFinishes",
                    "ttlSecondsAfterFinished",
                    "rayClusterSpec",
                ],
                "properties": {
                    "entrypoint": {"type": "string"},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "jobId": {"type": "string"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
                "additionalProperties": False,
            },
        },
    },
}


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def containers(spec: dict) -> list[dict]:
    return [c for _, group in groups(spec) for c in group["template"]["spec"]["containers"]]


def test_kuberay_resources_match_our_schema_of_the_fields_we_rely_on():
    for document in (RAYCLUSTER, PRETRAIN_JOB, PREPARE_JOB):
        jsonschema.validate(document, KUBERAY_SUBSET[document["kind"]])
    misspelt = {**RAYCLUSTER, "spec": {**RAYCLUSTER["spec"], "enableIntreeAutoscaling": True}}
    with pytest.raises(jsonschema.ValidationError, match="enableIntreeAutoscaling"):
        jsonschema.validate(misspelt, KUBERAY_SUBSET["RayCluster"])


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_every_pod_template_is_a_valid_kubernetes_pod_template(name):
    for group, spec in groups(CLUSTER_SPECS[name]):
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name}-{group}"},
            "template": spec["template"],
        }
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_the_secret_example_is_a_valid_secret_with_the_keys_the_pods_read():
    secret = load("k8s/secret-s3.example.yaml")
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    for spec in CLUSTER_SPECS.values():
        for container in containers(spec):
            for env in container["env"]:
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in secret["stringData"] or ref.get("optional"), ref


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_clusters_run_our_image_with_token_auth_shared_memory_and_s3_credentials_from_a_secret(name):
    spec = CLUSTER_SPECS[name]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group_name, group in groups(spec):
        pod = group["template"]["spec"]
        shm = {v["name"]: v for v in pod["volumes"]}["shm"]
        assert shm["emptyDir"]["medium"] == "Memory", group_name
        for container in pod["containers"]:
            assert container["image"] == IMAGE
            assert "/dev/shm" in [m["mountPath"] for m in container["volumeMounts"]]
            env = {e["name"]: e for e in container["env"]}
            for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[variable]["valueFrom"], f"{group_name}: {variable} not from a Secret"
            assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        store = group["rayStartParams"].get("object-store-memory")
        if store is not None:
            assert int(store) < _bytes(shm["emptyDir"]["sizeLimit"]), f"{group_name}: object store larger than /dev/shm"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * 1024 ** (" KMGT".index(unit[0]) if unit else 0)


def test_the_gpu_group_asks_for_gpus_on_gpu_nodes():
    (gpu,) = [g for g in RAYCLUSTER["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["resources"]["limits"]["cpu"] == gpu["rayStartParams"]["num-cpus"]


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_ray_start_accepts_every_group_s_parameters(name):
    for group_name, group in groups(CLUSTER_SPECS[name]):
        argv = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
        ray_start.make_context("ray start", [*argv, "--head"] if group_name == "head" else argv)


def test_the_pretraining_rayjob_names_one_run_everywhere_and_resumes_on_retry():
    spec = PRETRAIN_JOB["spec"]
    assert spec["submissionMode"] == "HTTPMode"
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"] == RAYCLUSTER["spec"], "the RayJob's cluster differs from raycluster.yaml"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pretrain"]
    args = pretrain.parser().parse_args(argv[3:])
    assert args.run_id == spec["jobId"] == spec["metadata"][RUN_ID_KEY]
    assert args.storage == spec["metadata"]["cmacc_storage"] and args.recipe == spec["metadata"]["cmacc_recipe"]
    assert args.resume_if_any, "a retried attempt must continue from the newest checkpoint"


def test_cmacc_submit_and_the_rayjob_run_the_same_command_for_the_same_run():
    spec = PRETRAIN_JOB["spec"]
    manifest_args = shlex.split(spec["entrypoint"])[3:]
    args = build_parser().parse_args(["submit", *manifest_args])
    request, _ = submission(args)
    assert shlex.join(job_entrypoint(request)) == spec["entrypoint"]


def test_the_preparation_rayjob_passes_arguments_cmacc_accepts_and_mounts_its_source_everywhere():
    spec = PREPARE_JOB["spec"]
    assert spec["submissionMode"] == "HTTPMode" and spec["shutdownAfterJobFinishes"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "cmacc"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.subcommand) == ("data", "prepare")
    assert args.out.startswith("s3://")
    for container in containers(spec["rayClusterSpec"]):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        (source_mount,) = [path for path in mounts if args.src.startswith(path + "/")]
        assert mounts[source_mount]["readOnly"]


def test_the_cluster_launcher_config_has_gpu_workers_an_instance_profile_and_valid_commands():
    config = load("aws/cluster.yaml")
    assert config["provider"]["type"] == "aws" and config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())
    for name, node in types.items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert config["setup_commands"], "set-up commands check the image"
    assert any("jobs.pretrain --help" in command for command in config["setup_commands"])
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [c.split(";")[-1].strip() for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        argv = shlex.split(starts[0].replace("$RAY_HEAD_IP", "10.0.0.1"))[2:]
        context = ray_start.make_context("ray start", argv)
        assert context.params["head"] is head


def test_the_dockerfile_matches_the_pins_runs_as_a_user_and_installs_torch_before_the_code():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-runtime-(ubuntu[\d.]+)", text)
    assert base and base.group(1) == torch.version.cuda, "the CUDA base must match torch's CUDA wheels"
    if base.group(2) == "ubuntu24.04":  # it ships a user `ubuntu` with uid 1000
        assert "userdel --remove ubuntu" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    final = text[text.index("FROM ${CUDA_IMAGE}") :]  # the image's own stage
    steps = [line for line in final.splitlines() if line.startswith(("COPY", "RUN"))]
    deps = next(i for i, line in enumerate(steps) if "install.sh deps" in line)
    code = next(i for i, line in enumerate(steps) if line.startswith("COPY") and " . " in line)
    assert deps < code, "a code change must not reinstall the dependencies"
    for line in steps[:deps]:
        if line.startswith("COPY"):
            assert "requirements" in line or line.endswith("install.sh /tmp/cmacc-install.sh"), line
    assert "python -m jobs.pretrain --help" in final and "cd /" in final
    for package in ("rsync", "openssh-client"):  # the Ray cluster launcher needs them in the image
        assert package in final
    ignored = (INFRA.parent / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "runs", "**/.env", "**/*.pem", "**/*.key", "**/.aws", "**/.netrc"):
        assert path in ignored, f".dockerignore lets {path} into the image"
