"""k8s/: every overlay renders with `kubectl kustomize` and holds the cluster conventions.

Offline: built-in objects are validated against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields are errors); the PyTorchJob (a CRD those schemas
lack) is checked structurally, its pod templates against the Pod schema; the KServe
InferenceService against a reduced copy of its CRD schema (schemas/, with jsonschema), its
predictor's pod against the Pod schema.
"""

from __future__ import annotations

import base64
import configparser
import copy
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "k8s"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()
)
# The oldest Kubernetes minor still in upstream support when this was written: manifests valid
# against it are valid on every newer one (the schemas are strict, so removed fields fail too).
K8S_VERSION = "1.32"
NAMESPACE = "imtext"
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE")
PLACEHOLDER = "change-me"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PROJECT_IMAGE = f"ghcr.io/imtext/imtext:{PROJECT['version']}"  # docker/build-push.sh's default
PIPELINE_SECRET = "imtext-credentials"
PIPELINE_SECRET_KEYS = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
ISVC_SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.schema.json").read_text()
)
#: The image of KServe's Triton runtime (ClusterServingRuntime kserve-tritonserver), whose tag an
#: InferenceService sets with runtimeVersion.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not on PATH; CI must have it (kubectl kustomize renders k8s/)")
        pytest.skip("kubectl is not on PATH: cannot render the kustomize overlays")
    return path


def render(overlay: str) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_rendered: dict[str, list[dict]] = {}


@pytest.fixture(params=OVERLAYS)
def objects(request) -> list[dict]:
    """The rendered objects of one overlay (rendered once per session)."""
    if request.param not in _rendered:
        _rendered[request.param] = render(request.param)
    return _rendered[request.param]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodSpec) of every pod template an object carries."""
    spec = obj.get("spec", {})
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "Pod":
        yield where, spec
    elif obj["kind"] == "CronJob":
        yield where, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "PyTorchJob":
        for rtype, replica in spec["pytorchReplicaSpecs"].items():
            yield f"{where}/{rtype}", replica["template"]["spec"]
    elif obj["kind"] == "InferenceService":
        yield where, predictor_pod_spec(obj)
    elif "template" in spec:
        yield where, spec["template"]["spec"]


def containers(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, PodSpec, container) for every container and init container."""
    for obj in objects:
        for where, pod in pod_specs(obj):
            for c in pod.get("initContainers", []) + pod["containers"]:
                yield f"{where}/{c['name']}", pod, c


def inlined_fields(definition: str) -> set[str]:
    """The fields KServe inlines from a Kubernetes type into ``definition`` of the vendored schema."""
    properties = ISVC_SCHEMA["$defs"][definition]["properties"]
    return {name for name, rule in properties.items() if "x-inlined" in rule}


def predictor_pod_spec(isvc: dict) -> dict:
    """The PodSpec KServe builds for an InferenceService's predictor, as far as the manifest
    decides it: the predictor's PodSpec fields, and the runtime's container ``kserve-container``
    with the model's container fields over it, its image the runtime's at ``runtimeVersion``.
    (KServe adds its storage-initializer init container, configured in KServe itself.)"""
    predictor = isvc["spec"]["predictor"]
    model = predictor.get("model", {})
    container = {k: v for k, v in model.items() if k in inlined_fields("ModelSpec")}
    container.setdefault("name", "kserve-container")
    container.setdefault("image", f"{TRITON_IMAGE}:{model.get('runtimeVersion', 'unset')}")
    pod = {k: v for k, v in predictor.items() if k in inlined_fields("PredictorSpec")}
    pod["containers"] = [container, *predictor.get("containers", [])]
    return pod


#: The predictor implementations of KServe's PredictorSpec, of which exactly one must be given
#: (a custom predictor gives ``containers`` instead).
PREDICTOR_IMPLEMENTATIONS = {
    name
    for name, rule in ISVC_SCHEMA["$defs"]["PredictorSpec"]["properties"].items()
    if rule.get("x-implementation")
}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # KServe's InferenceServiceProtocol


def validate_inferenceservice(isvc: dict) -> None:
    """A serving.kserve.io/v1beta1 InferenceService: the CRD's schema (vendored, reduced), the
    checks of KServe's webhook the manifest could fail, and the predictor's pod against the Pod
    schema. Raises jsonschema's or kubernetes-validate's ValidationError, or AssertionError."""
    jsonschema.validate(isvc, ISVC_SCHEMA, cls=jsonschema.Draft202012Validator)
    predictor = isvc["spec"]["predictor"]
    given = sorted(PREDICTOR_IMPLEMENTATIONS & set(predictor))
    assert len(given) + bool(predictor.get("containers")) == 1, (
        f"exactly one predictor implementation, got {given}"
    )
    if "model" in predictor:
        protocol = predictor["model"].get("protocolVersion", "v1")
        assert protocol in PROTOCOLS, f"protocolVersion {protocol!r} is not one of {PROTOCOLS}"
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    assert high == 0 or low <= high, f"minReplicas {low} > maxReplicas {high}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{isvc['metadata']['name']}-predictor"},
        "spec": predictor_pod_spec(isvc),
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def validate_pytorchjob(job: dict) -> None:
    """The kubeflow.org/v1 PyTorchJob fields the Training Operator reads, checked by hand."""
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
    assert set(spec.get("runPolicy", {})) <= {
        "cleanPodPolicy",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimit",
        "schedulingPolicy",
        "suspend",
        "managedBy",
    }
    assert spec.get("runPolicy", {}).get("cleanPodPolicy", "None") in {"None", "All", "Running"}
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and "Master" in replicas
    assert replicas["Master"]["replicas"] == 1, "exactly one Master (rank 0)"
    for rtype, replica in replicas.items():
        assert set(replica) <= {"replicas", "restartPolicy", "template"}, rtype
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1
        assert replica["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        template = replica["template"]
        names = [c["name"] for c in template["spec"]["containers"]]
        assert "pytorch" in names, f"{rtype}: the operator needs a container named 'pytorch'"
        # The pod template itself is a PodSpec: validate it with the real schema.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{job['metadata']['name']}-{rtype.lower()}-0"}
            | {k: v for k, v in template.get("metadata", {}).items() if k != "name"},
            "spec": template["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_overlays_exist():
    assert {"local", "gpu"} <= set(OVERLAYS)
    assert (K8S / "base" / "kustomization.yaml").is_file()


def test_every_object_validates_offline(objects):
    assert objects
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].split("/")[0].endswith("kubeflow.org"):
            validate_pytorchjob(obj)
            continue
        if obj["apiVersion"] == "serving.kserve.io/v1beta1":
            try:
                validate_inferenceservice(obj)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(f"{name}: {path}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{name}: {path}: {error.message}")


def test_the_strict_schema_catches_mistakes():
    """Guards the test above: a misspelt field must fail validation."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i:1", "resource": {}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_everything_lives_in_the_imtext_namespace(objects):
    assert one(objects, "Namespace", NAMESPACE)
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


def test_every_container_has_requests_limits_and_runs_non_root(objects):
    seen = 0
    for where, pod, c in containers(objects):
        seen += 1
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: no {kind}"
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser {uid}"
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged", False), where
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
    assert seen >= 7  # mlflow, postgres, minio, bucket job, MLflow user job, Master, Worker


def test_images_are_pinned_and_the_project_image_is_the_built_one(objects):
    images = {c["image"] for _, _, c in containers(objects)}
    for image in images:
        name = image.rsplit("/", 1)[-1]
        assert ":" in name or "@" in name, f"{image}: no tag"
        assert not name.endswith(":latest"), f"{image}: 'latest' is not reproducible"
    assert PROJECT_IMAGE in images
    mlflow_pin = next(d for d in PROJECT["dependencies"] if d.startswith("mlflow=="))
    mlflow_version = mlflow_pin.split("==")[1]
    assert any(
        re.fullmatch(rf"ghcr\.io/mlflow/mlflow:v{mlflow_version}(-full)?", i) for i in images
    )


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return data | secret.get("stringData", {})


def test_secrets_hold_placeholders_only(objects):
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        for key, value in secret_data(secret).items():
            if CREDENTIAL_KEY.search(key):
                assert value.startswith(PLACEHOLDER), f"{secret['metadata']['name']}.{key}"
    # Credentials reach containers only by reference, never as literal env values.
    for where, _, c in containers(objects):
        for env in c.get("env", []):
            if CREDENTIAL_KEY.search(env["name"]) or env["name"].startswith("AWS_"):
                assert "valueFrom" in env, f"{where}: {env['name']} is a literal"
            userinfo = re.search(r"://([^/@\s]+)@", env.get("value", ""))
            if userinfo:
                assert re.fullmatch(r"(\$\(\w+\):?)+", userinfo.group(1)), f"{where}: {env}"
    rendered = yaml.safe_dump_all(objects)
    assert not re.search(r"AKIA[0-9A-Z]{16}", rendered)
    assert "PRIVATE KEY" not in rendered


def test_the_pipeline_secret_has_its_fixed_name_and_keys(objects):
    secret = one(objects, "Secret", PIPELINE_SECRET)  # no hash suffix: KFP mounts it by name
    data = secret_data(secret)
    assert set(data) == PIPELINE_SECRET_KEYS
    assert data["MLFLOW_TRACKING_URI"] == f"http://imtext-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert (
        data["MLFLOW_S3_ENDPOINT_URL"] == f"http://imtext-minio.{NAMESPACE}.svc.cluster.local:9000"
    )


def test_every_reference_resolves(objects):
    """Secrets, keys, ConfigMaps and claims named by pods exist in the same rendering."""
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objects if o["kind"] == "Secret"}
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for obj in objects:
        for where, pod in pod_specs(obj):
            templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, where
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, where
            for c in pod.get("initContainers", []) + pod["containers"]:
                for source in c.get("envFrom", []):
                    assert source["secretRef"]["name"] in secrets, where
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]], f"{where}: {ref}"
                for mount in c.get("volumeMounts", []):
                    names = {v["name"] for v in pod.get("volumes", [])} | templates
                    assert mount["name"] in names, f"{where}: {mount['name']}"


def test_mlflow_server_proxies_artifacts_to_s3_with_a_database_backend(objects):
    deployment = one(objects, "Deployment", "imtext-mlflow")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    args = c["command"] + c["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--artifacts-destination=s3://mlflow-artifacts" in args
    assert "--serve-artifacts" in args and "--host=0.0.0.0" in args
    env = {e["name"]: e for e in c["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]  # mlflow server reads it as --backend-store-uri
    assert uri.startswith("postgresql") and "$(POSTGRES_PASSWORD)" in uri
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "imtext-postgres"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http://imtext-minio")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    service = one(objects, "Service", "imtext-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000
    one(objects, "StatefulSet", "imtext-postgres")
    one(objects, "Service", "imtext-postgres")


def test_object_store_and_its_buckets(objects):
    one(objects, "Deployment", "imtext-minio")
    one(objects, "Service", "imtext-minio")
    one(objects, "PersistentVolumeClaim", "imtext-minio-data")
    job = one(objects, "Job", "imtext-minio-setup")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    dvc_url = re.search(r"url = s3://([^/\s]+)", (REPO / ".dvc" / "config").read_text())
    for bucket in ("mlflow-artifacts", "imtext-data", dvc_url.group(1)):
        assert bucket in script.split("for bucket in ")[1].split(";")[0], bucket


#: What lets an identity run code of its choosing, mount any secret of the namespace or act as
#: another identity: creating (or changing) a workload, exec/attach into a pod, minting tokens.
#: (group, resource); "*" anywhere in a rule counts as all of these.
POD_STARTERS = {
    ("", "pods"),
    ("", "pods/exec"),
    ("", "pods/attach"),
    ("", "pods/ephemeralcontainers"),
    ("", "replicationcontrollers"),
    ("", "serviceaccounts/token"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("apps", "replicasets"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("kubeflow.org", "pytorchjobs"),
    ("argoproj.io", "workflows"),
}
WRITE_VERBS = {"create", "update", "patch", "*"}


def role_allows(role: dict, group: str, resource: str, verb: str, name: str | None = None) -> bool:
    """Whether one of the Role's rules grants `verb` on `resource` (wildcards included)."""
    return any(
        {group, "*"} & set(rule.get("apiGroups", []))
        and {resource, "*"} & set(rule.get("resources", []))
        and {verb, "*"} & set(rule.get("verbs", []))
        and (name is None or name in rule.get("resourceNames", [name]))
        for rule in role["rules"]
    )


def test_pipeline_runner_reads_only_its_secrets_and_starts_nothing(objects):
    one(objects, "ServiceAccount", "imtext-pipeline-runner")
    role = one(objects, "Role", "imtext-pipeline-runner")
    assert role_allows(role, "", "secrets", "get", PIPELINE_SECRET)
    assert not role_allows(role, "", "secrets", "list")  # only the named secrets
    assert not role_allows(role, "", "secrets", "get", "imtext-postgres")
    # Argo's executor reports outputs; KFP's launcher reads its settings and its own pod.
    assert role_allows(role, "argoproj.io", "workflowtaskresults", "create")
    assert role_allows(role, "", "configmaps", "get", "kfp-launcher")
    assert role_allows(role, "", "pods", "get")
    assert not role_allows(role, "", "persistentvolumeclaims", "create")  # no step makes one
    for group, resource in sorted(POD_STARTERS):
        for verb in sorted(WRITE_VERBS):
            assert not role_allows(role, group, resource, verb), (
                f"Role imtext-pipeline-runner may {verb} {group or 'core'}/{resource}: that lets "
                "a pipeline run mount any secret of the namespace; no step needs it"
            )
    binding = one(objects, "RoleBinding", "imtext-pipeline-runner")
    assert binding["roleRef"]["name"] == "imtext-pipeline-runner"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "imtext-pipeline-runner", "namespace": NAMESPACE}
    ]


def test_role_check_sees_wildcards():
    """Guards the test above: a wildcard rule must count as creating pods."""
    role = {"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "create"]}]}
    assert role_allows(role, "", "pods", "create")
    assert role_allows(role, "kubeflow.org", "pytorchjobs", "create")
    assert not role_allows(role, "", "pods", "delete")


def test_no_pipeline_step_starts_pods_or_claims():
    """The Role grants no create on pods or PVCs because no step makes any: a step that starts to
    (kfp.kubernetes.CreatePVC, the Kubernetes client) must get its verbs in k8s/base/rbac.yaml,
    with a test. The one step that starts a PyTorchJob, finetune-job, gets exactly that from the
    training component (test below)."""
    starters = re.compile(r"CreatePVC|DeletePVC|kubernetes\.client|create_namespaced")
    sources = sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "components").glob("*.py"))
    assert len(sources) >= 10
    for path in sources:
        found = starters.search(path.read_text())
        assert not found, f"{path.relative_to(REPO)}: {found.group(0)}: update rbac.yaml"


def test_only_the_training_component_lets_the_pipeline_create_pytorchjobs(objects):
    """The runner's identity may start pods only through one PyTorchJob per multi-node run: the
    Role in k8s/training/ (create and get pytorchjobs), bound to the runner; nothing else."""
    bound = {
        b["roleRef"]["name"]
        for b in objects
        if b["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": "imtext-pipeline-runner", "namespace": NAMESPACE}
        in b["subjects"]
    }
    assert bound == {"imtext-pipeline-runner", "imtext-training-launcher"}
    roles = [one(objects, "Role", name) for name in sorted(bound)]
    for group, resource in sorted(POD_STARTERS):
        for verb in sorted(WRITE_VERBS):
            allowed = any(role_allows(role, group, resource, verb) for role in roles)
            assert allowed == ((resource, verb) == ("pytorchjobs", "create")), (resource, verb)
    launcher = one(objects, "Role", "imtext-training-launcher")
    assert role_allows(launcher, "kubeflow.org", "pytorchjobs", "get")
    assert not role_allows(launcher, "kubeflow.org", "pytorchjobs", "delete")
    assert len(launcher["rules"]) == 1


def test_the_job_the_multi_node_step_creates_validates_with_real_cli_flags():
    """imtext.pytorchjob.finetune_job on the template the pipeline compiles in, as the step
    builds it: valid offline, torchrun over the operator's variables, real `imtext finetune` flags
    on the run's directory of the workspace volume."""
    from imtext.pytorchjob import finetune_job

    template = yaml.safe_load((K8S / "training" / "finetune-pytorchjob.yaml").read_text())
    help_text = subprocess.run(
        [sys.executable, "-m", "imtext.cli", "finetune", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    workdir = "/workspace/runs/0f3c9a/finetune"
    for per_node in (0, 2):
        job = finetune_job(
            template, name="imtext-finetune-0f3c9a", namespace=NAMESPACE, image=PROJECT_IMAGE,
            nodes=4, workdir=workdir, gpus_per_node=per_node,
        )  # fmt: skip
        validate_pytorchjob(job)
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
        for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
            pod = replica["template"]["spec"]
            (c,) = pod["containers"]
            command = " ".join(c["command"] + c["args"])
            flags = re.findall(r"(--[a-z][a-z-]*)", command.split("-m imtext.cli finetune", 1)[1])
            assert {"--prepared", "--init", "--out", "--params", "--resume"} <= set(flags)
            assert all(flag in help_text for flag in flags), (rtype, flags)
            for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NPROC_PER_NODE"):
                assert f'"${name}"' in command, (rtype, name)
            assert command.count(f"{workdir}/") == 4
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            claim = volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"]
            assert claim == "imtext-workspace"
            assert gpus(c) == per_node, rtype


def test_pytorchjob_runs_finetune_under_torchrun_with_real_cli_flags(objects):
    job = one(objects, "PyTorchJob", "imtext-finetune")
    help_text = subprocess.run(
        [sys.executable, "-m", "imtext.cli", "finetune", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
        (c,) = replica["template"]["spec"]["containers"]
        command = " ".join(c["command"] + c["args"])
        assert "torchrun" in command and "-m imtext.cli finetune" in command, rtype
        cli_args = command.split("-m imtext.cli finetune", 1)[1]
        flags = re.findall(r"(--[a-z][a-z-]*)", cli_args)
        assert {"--prepared", "--init", "--out", "--params", "--resume"} <= set(flags)
        for flag in flags:
            assert flag in help_text, f"{rtype}: `imtext finetune` has no {flag}"
        for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
            assert f'"${name}"' in command, f"{rtype}: torchrun ignores the operator's {name}"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/workspace" in mounts and "/dev/shm" in mounts
        assert c["image"] == PROJECT_IMAGE


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_only_the_gpu_overlay_puts_training_on_gpus(objects, request):
    overlay = request.node.callspec.params["objects"]
    job = one(objects, "PyTorchJob", "imtext-finetune")
    training = {id(c) for _, _, c in containers([job])}
    for where, _, c in containers(objects):
        if id(c) not in training:
            assert gpus(c) == 0, f"{where}: only training needs a GPU"
    for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
        pod = replica["template"]["spec"]
        (c,) = pod["containers"]
        if overlay != "gpu":
            assert gpus(c) == 0, f"{overlay}: {rtype} asks for a GPU"
            continue
        assert gpus(c) >= 1, f"{rtype}: no nvidia.com/gpu limit"
        requested = c["resources"]["requests"].get("nvidia.com/gpu", gpus(c))
        assert int(requested) == gpus(c)  # extended resources: requests == limits
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NPROC_PER_NODE"] == str(gpus(c)), "one training process per GPU"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]


def test_k8s_tree_holds_no_real_credentials():
    """Source files too (an overlay a user adds by hand must keep its env files out of git)."""
    for path in K8S.rglob("*"):
        if path.is_file():
            assert path.suffix != ".env", f"{path}: keep env files out of git (.env.example only)"
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
            for key, value in re.findall(r"(\w*(?:PASSWORD|SECRET)\w*)=(\S+)", text):
                # a placeholder, a shell variable or an elision in the README
                assert value.startswith((PLACEHOLDER, "$", "<", "...")), f"{path}: {key}"


def test_base_renders_on_its_own():
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "base")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert "PyTorchJob" not in kinds  # training is a component the overlays opt into
    assert Path(K8S / "training" / "kustomization.yaml").is_file()


# --- Read-only root filesystems --------------------------------------------------------------

#: Where the project image puts HOME and MPLCONFIGDIR (its Dockerfile's ENV).
IMAGE_ENV = dict(re.findall(r"\b(HOME|MPLCONFIGDIR)=(\S+)", (REPO / "Dockerfile").read_text()))
#: Environment variables naming a directory their program writes to.
WRITTEN_ENV = ("HOME", "TMPDIR", "MPLCONFIGDIR", "MC_CONFIG_DIR", "PGDATA", "XDG_CACHE_HOME")
#: Directories an image writes that no environment variable names, by image (without tag).
IMAGE_WRITES = {
    "ghcr.io/imtext/imtext": (IMAGE_ENV["HOME"], IMAGE_ENV["MPLCONFIGDIR"]),
    "docker.io/library/postgres": ("/var/run/postgresql",),  # its Unix socket and lock file
    "quay.io/minio/minio": ("/data",),  # `minio server /data`
}


def paths_written(c: dict) -> set[str]:
    """Directories the container's processes write: /tmp, those its environment names (else its
    image's defaults)."""
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    paths = {"/tmp"} | {env[name] for name in WRITTEN_ENV if name in env}
    image_defaults = IMAGE_WRITES.get(re.sub(r"[:@].*$", "", c["image"]), ())
    if c["image"].startswith("ghcr.io/imtext/imtext") and "HOME" in env:
        image_defaults = tuple(p for p in image_defaults if p != IMAGE_ENV["HOME"])
    return paths | set(image_defaults)


def unwritable(pod: dict, c: dict, templates: set[str] = frozenset()) -> list[str]:
    """The paths of `paths_written` that no writable volume (emptyDir, claim) holds."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    missing = []
    for path in sorted(paths_written(c)):
        holders = [
            m
            for m in c.get("volumeMounts", [])
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        # the innermost mount decides
        holder = max(holders, key=lambda m: len(m["mountPath"]), default=None)
        volume = volumes.get(holder["name"], {}) if holder else {}
        writable = holder is not None and not holder.get("readOnly", False)
        writable = writable and (
            "emptyDir" in volume or "persistentVolumeClaim" in volume or holder["name"] in templates
        )
        if not writable:
            missing.append(path)
    return missing


def test_every_root_filesystem_is_read_only_with_volumes_where_processes_write(objects):
    seen = 0
    for obj in objects:
        templates = {
            t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])
        }
        for where, pod in pod_specs(obj):
            for c in pod.get("initContainers", []) + pod["containers"]:
                seen += 1
                sc = c.get("securityContext", {})
                assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
                missing = unwritable(pod, c, templates)
                assert not missing, f"{where}/{c['name']}: nothing writable at {missing}"
    assert seen >= 7


def test_the_writable_path_check_catches_a_missing_volume(objects):
    """Guards the test above: without its /tmp emptyDir, or with /tmp from a ConfigMap, the
    MLflow server has nowhere to write."""
    pod = copy.deepcopy(one(objects, "Deployment", "imtext-mlflow")["spec"]["template"]["spec"])
    (c,) = pod["containers"]
    assert unwritable(pod, c) == []
    assert "/tmp" in paths_written(c)
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    tmp.pop("emptyDir")
    tmp["configMap"] = {"name": "x"}
    assert unwritable(pod, c) == ["/tmp"]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]
    assert unwritable(pod, c) == ["/tmp"]
    job = one(objects, "PyTorchJob", "imtext-finetune")
    master = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"])
    (c,) = master["containers"]
    assert {IMAGE_ENV["HOME"], IMAGE_ENV["MPLCONFIGDIR"]} <= paths_written(c)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != IMAGE_ENV["HOME"]]
    assert unwritable(master, c) == [IMAGE_ENV["HOME"]]


# --- MinIO's console -------------------------------------------------------------------------


def container_port(pod: dict, port: int | str) -> int | None:
    """A Service targetPort or NetworkPolicy port (number or name) as a container port number."""
    if isinstance(port, int):
        return port
    for c in pod["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
    return None


def test_minio_console_is_in_no_service(objects):
    minio = one(objects, "Deployment", "imtext-minio")["spec"]["template"]
    labels = minio["metadata"]["labels"]
    console = container_port(minio["spec"], "console")
    assert console == 9001
    exposed = set()
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"].get("selector", {})
        if selector and selector.items() <= labels.items():
            for p in service["spec"]["ports"]:
                exposed.add(container_port(minio["spec"], p.get("targetPort", p["port"])))
    assert exposed == {9000}, f"MinIO's Services reach container ports {sorted(exposed)}"


# --- MLflow authentication -------------------------------------------------------------------

MLFLOW_AUTH_SECRET = "imtext-mlflow-auth"


def env_sources(c: dict) -> dict[str, tuple[str, str] | str]:
    """Environment variable -> (secret, key) for secretKeyRefs, else its literal value."""
    found = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        found[e["name"]] = (ref["name"], ref["key"]) if ref else e.get("value")
    return found


def mounted_file(objects, pod: dict, c: dict, path: str) -> str:
    """The text of `path` in the container, when a ConfigMap volume holds it."""
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in pod["volumes"] if v["name"] == m["name"])
            name = volume["configMap"]["name"]
            configmap = one(objects, "ConfigMap", name)
            return configmap["data"][path[len(prefix) :]]
    raise AssertionError(f"nothing mounted at {path}")


def test_mlflow_server_requires_authentication(objects):
    deployment = one(objects, "Deployment", "imtext-mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = env_sources(c)
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == (MLFLOW_AUTH_SECRET, "MLFLOW_AUTH_ADMIN_USERNAME")
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == (MLFLOW_AUTH_SECRET, "MLFLOW_AUTH_ADMIN_PASSWORD")
    # static, so that every worker and replica accepts the login form's CSRF token
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == MLFLOW_AUTH_SECRET
    config = configparser.ConfigParser()
    config.read_string(mounted_file(objects, pod, c, env["MLFLOW_AUTH_CONFIG_PATH"]))
    auth = config["mlflow"]
    assert auth["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert auth["authorization_function"].endswith(":authenticate_request_basic_auth")
    assert "admin_password" not in auth  # from the secret, never a file in git
    # Users in the PostgreSQL database (a SQLite file in the pod would vanish on restart and
    # differ between replicas); the login comes from libpq's variables, not the file.
    uri = auth["database_uri"]
    assert uri.startswith("postgresql") and "@" not in uri, uri
    assert env["PGUSER"] == ("imtext-postgres", "POSTGRES_USER")
    assert env["PGPASSWORD"] == ("imtext-postgres", "POSTGRES_PASSWORD")
    assert env["PGDATABASE"] == ("imtext-postgres", "POSTGRES_DB")


def test_clients_log_in_as_their_own_mlflow_user(objects):
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objects if o["kind"] == "Secret"}
    client = secrets[PIPELINE_SECRET]
    admin = secrets[MLFLOW_AUTH_SECRET]
    assert client["MLFLOW_TRACKING_USERNAME"] != admin["MLFLOW_AUTH_ADMIN_USERNAME"]
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert admin[key].startswith(PLACEHOLDER), key
    for value in (client["MLFLOW_TRACKING_PASSWORD"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"]):
        assert len(value) >= 12  # MLflow refuses shorter passwords, placeholders included
    # The Job that makes the client's user signs in as the admin, with both from the secrets.
    job = one(objects, "Job", "imtext-mlflow-setup")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = env_sources(c)
    assert env["MLFLOW_TRACKING_USERNAME"] == (PIPELINE_SECRET, "MLFLOW_TRACKING_USERNAME")
    assert env["MLFLOW_TRACKING_PASSWORD"] == (PIPELINE_SECRET, "MLFLOW_TRACKING_PASSWORD")
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == (MLFLOW_AUTH_SECRET, "MLFLOW_AUTH_ADMIN_PASSWORD")
    script = c["command"][-1]
    assert (
        mounted_file(objects, pod, c, script)
        == (K8S / "base" / "mlflow-auth" / "create_user.py").read_text()
    )
    # The training pods get the same client identity (envFrom the pipeline secret).
    for _, _, c in containers([one(objects, "PyTorchJob", "imtext-finetune")]):
        assert {"secretRef": {"name": PIPELINE_SECRET}} in c["envFrom"]


def test_pipeline_steps_get_the_mlflow_login():
    from pipelines.cluster import MLFLOW_ENV, SECRET_ENV

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert MLFLOW_ENV.get(key) == key
    assert SECRET_ENV["register"] is MLFLOW_ENV and SECRET_ENV["promote"] is MLFLOW_ENV


# --- NetworkPolicies -------------------------------------------------------------------------

KFP_STEP = {"pipelines.kubeflow.org/v2_component": "true"}


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def port_matches(rule_port: dict, dst: dict, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True
    first = container_port(dst["spec"], rule_port["port"])
    return first is not None and first <= port <= rule_port.get("endPort", first)


def ingress_allowed(objects, dst: dict, port: int, src_ns: str, src_labels: dict) -> bool:
    """Whether the rendered NetworkPolicies let a pod (src_ns, src_labels) open TCP `port` of the
    pod template `dst` in namespace imtext. A pod no Ingress policy selects accepts everything."""
    policies = [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], dst["metadata"]["labels"])
    ]
    if not policies:
        return True
    src_ns_labels = {"kubernetes.io/metadata.name": src_ns}
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(port_matches(p, dst, port) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    ns_ok = selects(peer["namespaceSelector"], src_ns_labels)
                else:
                    ns_ok = src_ns == policy["metadata"]["namespace"]
                if ns_ok and selects(peer.get("podSelector", {}), src_labels):
                    return True
    return False


def pod_template(objects, kind: str, name: str) -> dict:
    return one(objects, kind, name)["spec"]["template"]


def sources(objects) -> dict[str, tuple[str, dict]]:
    """Every pod that might connect: (namespace, labels) by a readable name."""
    found = {}
    for obj in objects:
        for where, _ in pod_specs(obj):
            if obj["kind"] == "PyTorchJob":
                rtype = where.rsplit("/", 1)[1]
                labels = obj["spec"]["pytorchReplicaSpecs"][rtype]["template"]["metadata"]
            elif obj["kind"] == "InferenceService":
                labels = obj["spec"]["predictor"]  # KServe puts these labels on its pods
            else:
                labels = obj["spec"]["template"]["metadata"]
            found[where] = (NAMESPACE, labels["labels"])
    found |= {
        "KFP step in imtext": (NAMESPACE, KFP_STEP),
        "KFP step in kubeflow": ("kubeflow", KFP_STEP),
        "KFP step in another namespace": ("team-a", KFP_STEP),
        "another pod in imtext": (NAMESPACE, {"app": "notebook"}),
        "an 'imtext-mlflow' in another namespace": (
            "team-a",
            {"app.kubernetes.io/name": "imtext-mlflow"},
        ),
    }
    return found


#: (service, port) -> who may connect; everyone else must be refused.
EXPECTED_CLIENTS = {
    ("imtext-postgres", 5432): {"Deployment/imtext-mlflow"},
    ("imtext-mlflow", 5000): {
        "KFP step in imtext",
        "KFP step in kubeflow",
        "Job/imtext-mlflow-setup",
        "Deployment/imtext-search",  # the champion (artifacts through MLflow's proxy)
    },
    ("imtext-minio", 9000): {
        "Deployment/imtext-mlflow",
        "Job/imtext-minio-setup",
        "PyTorchJob/imtext-finetune/Master",
        "PyTorchJob/imtext-finetune/Worker",
        "KFP step in imtext",
        "KFP step in kubeflow",
        "Deployment/imtext-search",  # its init container copies the gallery
        "InferenceService/imtext-encoders",  # KServe's storage initializer
        "Job/imtext-serving-setup",
    },
    ("imtext-minio", 9001): set(),  # the console: port-forward only
}
SERVER_KIND = {"imtext-postgres": "StatefulSet", "imtext-mlflow": "Deployment"}


def allowed_clients(objects, service: str, port: int) -> set[str]:
    dst = pod_template(objects, SERVER_KIND.get(service, "Deployment"), service)
    return {
        name
        for name, (ns, labels) in sources(objects).items()
        if ingress_allowed(objects, dst, port, ns, labels)
    }


def test_services_are_reachable_only_from_the_pods_that_need_them(objects):
    for (service, port), expected in EXPECTED_CLIENTS.items():
        allowed = allowed_clients(objects, service, port)
        assert allowed == expected, (
            f"{service}:{port}: also from {sorted(allowed - expected)}, "
            f"not from {sorted(expected - allowed)}"
        )


def test_a_default_deny_covers_every_server(objects):
    """Even with every allow policy deleted, nobody reaches the three servers."""
    deny_only = [o for o in objects if o["kind"] != "NetworkPolicy" or not o["spec"].get("ingress")]
    assert any(o["kind"] == "NetworkPolicy" for o in deny_only)
    for service, port in EXPECTED_CLIENTS:
        assert allowed_clients(deny_only, service, port) == set(), service


def test_the_network_check_sees_an_open_policy(objects):
    """Guards the tests above: one policy that admits everyone to PostgreSQL must show up."""
    open_to_all = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "x", "namespace": NAMESPACE},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]},
    }
    allowed = allowed_clients(objects + [open_to_all], "imtext-postgres", 5432)
    assert "another pod in imtext" in allowed and "KFP step in another namespace" in allowed
    no_policies = [o for o in objects if o["kind"] != "NetworkPolicy"]
    assert "another pod in imtext" in allowed_clients(no_policies, "imtext-mlflow", 5000)


# --- The deploy-time secret check ------------------------------------------------------------

CHECK = K8S / "check_secrets.py"
#: Values fit to deploy, for every key the base's secrets hold.
REAL_SECRETS = {
    "imtext-credentials": {
        "MLFLOW_TRACKING_URI": "http://imtext-mlflow.imtext.svc.cluster.local:5000",
        "MLFLOW_TRACKING_USERNAME": "imtext-pipeline",
        "MLFLOW_TRACKING_PASSWORD": "Vb7-pipeline-mlflow-pw",
        "MLFLOW_S3_ENDPOINT_URL": "http://imtext-minio.imtext.svc.cluster.local:9000",
        "AWS_ACCESS_KEY_ID": "imtext-pipeline",
        "AWS_SECRET_ACCESS_KEY": "q8Rr2-pipeline-s3-secret",
    },
    "imtext-mlflow-server": {
        "AWS_ACCESS_KEY_ID": "imtext-mlflow",
        "AWS_SECRET_ACCESS_KEY": "w4Tt9-mlflow-s3-secret",
    },
    "imtext-mlflow-auth": {
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "Zx3-admin-mlflow-pw",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k2Jq8-flask-csrf-key",
    },
    "imtext-postgres": {
        "POSTGRES_USER": "mlflow",
        "POSTGRES_PASSWORD": "Pg5-real_password.x",
        "POSTGRES_DB": "mlflow",
    },
    "imtext-minio": {"MINIO_ROOT_USER": "imtext-admin", "MINIO_ROOT_PASSWORD": "m1N-root-pw-x"},
    "imtext-serving-s3": {
        "AWS_ACCESS_KEY_ID": "imtext-serving",
        "AWS_SECRET_ACCESS_KEY": "s6Gh1-serving-s3-secret",
    },
}


def check_secrets(overlay: Path, *flags: str) -> subprocess.CompletedProcess:
    kubectl()  # skips (or fails in CI) without it, like the other tests
    return subprocess.run(
        [sys.executable, str(CHECK), *flags, str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def my_overlay(tmp_path: Path, secrets: dict[str, dict[str, str]]) -> Path:
    """An overlay of k8s/overlays/gpu that replaces the base's secrets, as k8s/README.md says."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
                "secretGenerator": [
                    {
                        "name": name,
                        "namespace": NAMESPACE,
                        "behavior": "replace",
                        "options": {"disableNameSuffixHash": True},
                        "literals": [f"{k}={v}" for k, v in data.items()],
                    }
                    for name, data in secrets.items()
                ],
            }
        )
    )
    return tmp_path


def test_secret_check_refuses_every_placeholder_naming_secret_and_key():
    base = {o["metadata"]["name"]: secret_data(o) for o in render("gpu") if o["kind"] == "Secret"}
    placeholders = {
        (name, key) for name, data in base.items() for key, v in data.items() if PLACEHOLDER in v
    }
    assert len(placeholders) >= 7
    result = check_secrets(K8S / "overlays" / "gpu")
    assert result.returncode == 1, result.stdout + result.stderr
    for name, key in placeholders:
        assert f"Secret {name}, key {key}: still a placeholder" in result.stderr, (name, key)
    assert result.stderr.count("still a placeholder") == len(placeholders)


def test_secret_check_accepts_real_values(tmp_path):
    result = check_secrets(my_overlay(tmp_path, REAL_SECRETS))
    assert result.returncode == 0, result.stderr
    assert "no placeholders" in result.stdout
    assert "Pg5-real_password" not in result.stdout + result.stderr  # never echoes a value


def test_secret_check_refuses_one_placeholder_left(tmp_path):
    secrets = copy.deepcopy(REAL_SECRETS)
    secrets["imtext-postgres"]["POSTGRES_PASSWORD"] = "change-me-postgres-password"
    result = check_secrets(my_overlay(tmp_path, secrets))
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if "key " in ln]
    assert "Secret imtext-postgres, key POSTGRES_PASSWORD" in line


@pytest.mark.parametrize(
    ("secret", "key", "value", "why"),
    [
        ("imtext-mlflow-auth", "MLFLOW_AUTH_ADMIN_PASSWORD", "short-pw", "at least 12"),
        ("imtext-credentials", "MLFLOW_TRACKING_PASSWORD", "", "empty"),
        ("imtext-postgres", "POSTGRES_PASSWORD", "p@ss/word:1234", "not URL-safe"),
    ],
)
def test_secret_check_refuses_values_the_services_reject(tmp_path, secret, key, value, why):
    secrets = copy.deepcopy(REAL_SECRETS)
    secrets[secret][key] = value
    result = check_secrets(my_overlay(tmp_path, secrets))
    assert result.returncode == 1, result.stdout
    assert f"Secret {secret}, key {key}" in result.stderr and why in result.stderr
    if value:
        assert value not in result.stderr


def test_secret_check_flags_and_failures(tmp_path):
    result = check_secrets(K8S / "overlays" / "local", "--allow-placeholders")
    assert result.returncode == 0 and "warning" in result.stderr
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    result = check_secrets(tmp_path)
    assert result.returncode == 2 and "kustomize" in result.stderr


def make_deploy_lines(*settings: str) -> list[str]:
    result = subprocess.run(
        ["make", "-n", "deploy", "OVERLAY=my-cluster", *settings],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_make_deploy_checks_the_secrets_before_applying():
    lines = make_deploy_lines()
    check = next(i for i, ln in enumerate(lines) if "k8s/check_secrets.py" in ln)
    apply = next(i for i, ln in enumerate(lines) if "kubectl apply -k my-cluster" in ln)
    assert check < apply and lines[check].endswith(" my-cluster")
    assert "--allow-placeholders" not in lines[check]
    (check,) = [ln for ln in make_deploy_lines("ALLOW_PLACEHOLDERS=1") if "check_secrets" in ln]
    assert "--allow-placeholders" in check


class FakeMlflowUsers(http.server.BaseHTTPRequestHandler):
    """MLflow's user API as far as create_user.py uses it, behind basic auth for one admin."""

    admin = "Basic " + base64.b64encode(b"admin:admin-password-1").decode()
    users: dict[str, str] = {}

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def reply(self, status: int, body: dict | None = None):
        self.send_response(status)
        self.end_headers()
        self.wfile.write(json.dumps(body or {}).encode())

    def handle_request(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/health":
            return self.reply(200)
        if self.headers.get("Authorization") != self.admin:
            return self.reply(401)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.command == "GET" and url.path.endswith("/users/get"):
            (name,) = urllib.parse.parse_qs(url.query)["username"]
            return self.reply(200 if name in self.users else 404)
        if self.command == "POST" and url.path.endswith("/users/create"):
            self.users[body["username"]] = body["password"]
            return self.reply(200)
        if self.command == "PATCH" and url.path.endswith("/users/update-password"):
            self.users[body["username"]] = body["password"]
            return self.reply(200)
        return self.reply(400)

    do_GET = do_POST = do_PATCH = handle_request


def test_mlflow_user_job_creates_then_updates_the_pipeline_user():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMlflowUsers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeMlflowUsers.users = {}

    def run(**env: str) -> subprocess.CompletedProcess:
        base = {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_address[1]}",
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
            "MLFLOW_TRACKING_USERNAME": "imtext-pipeline",
            "MLFLOW_TRACKING_PASSWORD": "pipeline-password-1",
        }
        return subprocess.run(
            [sys.executable, str(K8S / "base" / "mlflow-auth" / "create_user.py")],
            env={"PATH": os.environ["PATH"]} | base | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        result = run()
        assert result.returncode == 0 and "created" in result.stdout, result.stderr
        result = run(MLFLOW_TRACKING_PASSWORD="pipeline-password-2")
        assert result.returncode == 0 and "password set" in result.stdout, result.stderr
        assert FakeMlflowUsers.users == {"imtext-pipeline": "pipeline-password-2"}
        result = run(MLFLOW_AUTH_ADMIN_PASSWORD="wrong-password")
        assert result.returncode == 1 and "HTTP 401" in result.stderr
        result = run(MLFLOW_TRACKING_USERNAME="admin")  # the pipeline must not be the admin
        assert result.returncode == 2 and "admin" in result.stderr
        result = run(MLFLOW_TRACKING_PASSWORD="")
        assert result.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in result.stderr
        assert FakeMlflowUsers.users == {"imtext-pipeline": "pipeline-password-2"}
    finally:
        server.shutdown()


# --- Serving (k8s/serving/) -------------------------------------------------------------------

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
SERVING_SECRET = "imtext-serving-s3"
ISVC = "imtext-encoders"


def test_inferenceservice_serves_both_encoders_on_triton_over_v2(objects):
    from imtext.export.triton import IMAGE_MODEL, TEXT_MODEL

    isvc = one(objects, "InferenceService", ISVC)
    validate_inferenceservice(isvc)
    # A plain Deployment: no Knative or Istio needed, and storageUri changes roll it.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    # One Triton repository (python -m imtext.export.triton) of one registered version.
    model_name = PARAMS["register"]["model_name"]
    assert re.fullmatch(
        rf"s3://imtext-data/serving/{re.escape(model_name)}/[1-9][0-9]*", model["storageUri"]
    )
    # The v2 model names clients use are the repository's directories, as imtext serve's routes.
    assert {TEXT_MODEL, IMAGE_MODEL} == {"text_encoder", "image_encoder"}
    # The Triton release reads the export's ONNX (IR 10, opset 18 need ONNX Runtime >= 1.16,
    # Triton 23.10 and later).
    year, month = map(int, re.fullmatch(r"(\d\d)\.(\d\d)-py3", model["runtimeVersion"]).groups())
    assert (year, month) >= (23, 10)
    assert predictor["minReplicas"] >= 1  # no scale to zero: a cold start downloads the model


@pytest.mark.parametrize(
    ("where", "change", "why"),
    [
        ("model", {"storageURI": "s3://x/y"}, "Additional properties"),  # misspelt field
        ("model", {"modelFormat": {"version": "1"}}, "'name' is a required property"),
        ("model", {"protocolVersion": "v3"}, "protocolVersion 'v3'"),
        ("model", {"resource": {}}, "Additional properties"),
        ("model", {"resources": {"limits": {"cpu": []}}}, ""),  # a bad Container value
        ("predictor", {"triton": {"storageUri": "s3://x/y"}}, "exactly one predictor"),
        ("predictor", {"minReplicas": -1}, "less than the minimum"),
        ("predictor", {"minReplicas": 3, "maxReplicas": 2}, "minReplicas 3 > maxReplicas 2"),
        ("predictor", {"scaleMetric": "gpu"}, "is not one of"),
        ("predictor", {"volumes": [{"name": "tmp", "emptyDir": {"size": "1Gi"}}]}, ""),
        ("spec", {"predictors": {}}, "Additional properties"),
    ],
)
def test_a_broken_inferenceservice_is_rejected(objects, where, change, why):
    """Guards the validation above: each mistake fails it (the API server would drop a misspelt
    field silently and KServe's webhook refuse the rest)."""
    isvc = copy.deepcopy(one(objects, "InferenceService", ISVC))
    target = {
        "spec": isvc["spec"],
        "predictor": isvc["spec"]["predictor"],
        "model": isvc["spec"]["predictor"]["model"],
    }[where]
    target.update(change)
    errors = (jsonschema.ValidationError, kubernetes_validate.ValidationError, AssertionError)
    with pytest.raises(errors) as caught:
        validate_inferenceservice(isvc)
    message = getattr(caught.value, "message", None) or str(caught.value)
    assert why in message


def test_serving_reads_the_object_store_with_its_own_read_only_user(objects):
    isvc = one(objects, "InferenceService", ISVC)
    account = one(objects, "ServiceAccount", isvc["spec"]["predictor"]["serviceAccountName"])
    assert {"name": SERVING_SECRET} in account["secrets"]
    secret = one(objects, "Secret", SERVING_SECRET)
    assert set(secret_data(secret)) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # The endpoint KServe's storage initializer uses is the MinIO the pipeline writes to.
    endpoint = urllib.parse.urlsplit(
        secret_data(one(objects, "Secret", PIPELINE_SECRET))["MLFLOW_S3_ENDPOINT_URL"]
    )
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == endpoint.netloc
    assert annotations["serving.kserve.io/s3-usehttps"] == (
        "1" if endpoint.scheme == "https" else "0"
    )
    # Its policy reads the Triton repositories and the galleries, and writes nothing.
    policy = json.loads((K8S / "serving" / "policies" / "imtext-serving.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject"}
    readable = [
        r for s in policy["Statement"] if "s3:GetObject" in s["Action"] for r in s["Resource"]
    ]
    assert sorted(readable) == [
        "arn:aws:s3:::imtext-data/datasets/*",
        "arn:aws:s3:::imtext-data/serving/*",
    ]
    uri = urllib.parse.urlsplit(isvc["spec"]["predictor"]["model"]["storageUri"])
    assert f"arn:aws:s3:::{uri.netloc}/{uri.path.strip('/').split('/')[0]}/*" in readable
    # The Job that makes the user takes its keys from the same secret.
    job = one(objects, "Job", "imtext-serving-setup")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = env_sources(c)
    assert env["SERVING_ACCESS_KEY"] == (SERVING_SECRET, "AWS_ACCESS_KEY_ID")
    assert env["SERVING_SECRET_KEY"] == (SERVING_SECRET, "AWS_SECRET_ACCESS_KEY")
    assert "/policies/imtext-serving.json" in c["args"][0]


def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "imtext.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "invalid choice" in result.stderr:
        pytest.skip("`imtext serve` is not in this tree yet (issue 14, item 1)")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_search_app_runs_imtext_serve_on_the_champion(objects):
    deployment = one(objects, "Deployment", "imtext-search")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == PROJECT_IMAGE and c["args"][0] == "serve"
    flags = dict(a.split("=", 1) for a in c["args"][1:])
    register = PARAMS["register"]
    assert flags["--model"] == f"models:/{register['model_name']}@{register['alias']}"
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8080"
    assert {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}[flags["--gallery"]]
    (port,) = c["ports"]
    assert port["containerPort"] == 8080
    service = one(objects, "Service", "imtext-search")
    assert container_port(pod, service["spec"]["ports"][0]["targetPort"]) == 8080
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = env_sources(c)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key] == (PIPELINE_SECRET, key)
    # Artifacts come through MLflow's proxy: the app itself holds no object-store keys, only
    # the init container that copies the gallery, with the read-only serving user.
    assert not any(k.startswith("AWS_") for k in env) and "envFrom" not in c
    (init,) = pod["initContainers"]
    init_env = env_sources(init)
    assert init_env["AWS_SECRET_ACCESS_KEY"] == (SERVING_SECRET, "AWS_SECRET_ACCESS_KEY")
    assert init_env["GALLERY"].startswith("imtext-data/datasets/")


def test_search_app_passes_only_flags_imtext_serve_has(objects):
    (c,) = one(objects, "Deployment", "imtext-search")["spec"]["template"]["spec"]["containers"]
    help_text = serve_help()
    for flag in (a.split("=", 1)[0] for a in c["args"][1:]):
        assert flag in help_text, f"`imtext serve` has no {flag}"


def test_the_inferenceservice_can_be_left_out_as_the_readme_says(tmp_path):
    """k8s/README.md, "Serving": an overlay for a cluster without KServe deletes it."""
    readme = (K8S / "README.md").read_text()
    snippet = readme.split("A cluster without KServe")[1].split("```yaml\n")[1].split("```")[0]
    kustomization = yaml.safe_load(snippet) | {
        "resources": [os.path.relpath(K8S / "overlays" / "local", tmp_path)]
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert "InferenceService" not in kinds
    assert len(kinds) == len(render("local")) - 1
