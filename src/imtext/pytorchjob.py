"""Stage II on several nodes from a pipeline step: a Kubeflow Training Operator PyTorchJob.

The pipeline's ``finetune-job`` step (compiled with ``--finetune-nodes N``, N > 1) stages its
inputs on the shared workspace volume, creates a ``kubeflow.org/v1`` PyTorchJob built from
``k8s/training/finetune-pytorchjob.yaml`` whose pods run ``torchrun ... imtext finetune`` on that
volume, waits for it, and hands ``model.pt`` and the metrics on as the single-process step does.

The job is named after the KFP run, so a retried step finds the job its earlier attempt created
and waits for it instead of starting a second one; the job's replicas resume from their own
checkpoint (``--resume``) when the operator restarts them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imtext.errors import ImtextError
from imtext.logs import MessageLog

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
#: The namespace of the pod this runs in (Kubernetes mounts it with the service account token).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
GPU_RESOURCE = "nvidia.com/gpu"
#: As the pipeline's GPU steps (pipelines/cluster.py): the GPU operator's label, the usual taint.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: The volume of the template that holds the workspace (a ReadWriteMany PVC).
WORKSPACE_VOLUME = "workspace"


def job_name(run_id: str, stage: str = "finetune") -> str:
    """A DNS-1123 name unique to the KFP run: ``imtext-<stage>-<run id>``, at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"imtext-{stage}-{run_id}".lower())
    return name[:63].strip("-")


def torchrun_finetune(workdir: str) -> str:
    """The replicas' command: torchrun over the operator's variables, ``imtext finetune`` on the
    files the step staged in ``workdir`` (on the workspace volume)."""
    return (
        'exec torchrun --nnodes="$WORLD_SIZE" --node-rank="$RANK" '
        '--nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" '
        '--master-port="$MASTER_PORT" -m imtext.cli finetune '
        f"--prepared {workdir}/prepared --init {workdir}/init/model.pt --out {workdir}/out "
        f"--params {workdir}/params.yaml --device auto --resume"
    )


def finetune_job(
    template: Mapping[str, Any],
    *,
    name: str,
    namespace: str,
    image: str,
    nodes: int,
    workdir: str,
    gpus_per_node: int = 0,
) -> dict[str, Any]:
    """The PyTorchJob for one run: ``template`` (k8s/training/finetune-pytorchjob.yaml) with this
    run's name, namespace, image and ``nodes`` pods (one Master, ``nodes - 1`` Workers), each
    running :func:`torchrun_finetune` with one process per GPU (``gpus_per_node``; one process
    on a CPU node)."""
    if nodes < 2:
        raise ImtextError(f"finetune nodes: {nodes}; a PyTorchJob is for 2 or more nodes")
    if gpus_per_node < 0:
        raise ImtextError(f"gpus per node: {gpus_per_node}; expected 0 (CPU) or more")
    job = copy.deepcopy(dict(template))
    job["metadata"] = {**job.get("metadata", {}), "name": name, "namespace": namespace}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    if "Master" not in replicas or "Worker" not in replicas:
        raise ImtextError("PyTorchJob template: expected a Master and a Worker replica spec")
    replicas["Master"]["replicas"] = 1
    replicas["Worker"]["replicas"] = nodes - 1
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
        container["image"] = image
        container["command"] = ["/bin/sh", "-c"]
        container["args"] = [torchrun_finetune(workdir)]
        env = [e for e in container.get("env", []) if e["name"] != "NPROC_PER_NODE"]
        container["env"] = [{"name": "NPROC_PER_NODE", "value": str(max(gpus_per_node, 1))}, *env]
        if gpus_per_node:
            resources = container.setdefault("resources", {})
            resources.setdefault("limits", {})[GPU_RESOURCE] = gpus_per_node
            pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **GPU_NODE_SELECTOR}
            pod["tolerations"] = [*pod.get("tolerations", []), GPU_TOLERATION]
    return job


def condition(job: Mapping[str, Any]) -> tuple[str, str]:
    """``(type, "reason: message")`` of the job's latest true condition (Created, Running,
    Restarting, Succeeded, Failed); ``("", "")`` before the operator has reported any."""
    conditions = [
        c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"
    ]
    if not conditions:
        return "", ""
    last = conditions[-1]
    return last.get("type", ""), f"{last.get('reason', '')}: {last.get('message', '')}".strip(": ")


def run_job(
    api: Any,
    job: Mapping[str, Any],
    *,
    poll_s: float = 15.0,
    log: MessageLog = print,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create ``job`` with ``api`` (a ``kubernetes.client.CustomObjectsApi``) unless it exists,
    and wait until it succeeds; returns its last state. Raises :class:`ImtextError` with the
    job's own reason and message when it fails, and a message that says what to install or grant
    when the cluster refuses it."""
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    where = f"PyTorchJob {namespace}/{name}"
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        log(f"{where}: created ({_replica_counts(job)})")
    except ApiException as exc:
        if exc.status == 409:  # a retried step: the earlier attempt's job goes on
            log(f"{where}: exists already; waiting for it")
        else:
            raise ImtextError(_refusal(where, exc)) from None
    seen: str | None = None
    while True:
        try:
            state = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            raise ImtextError(_refusal(where, exc)) from None
        kind, detail = condition(state)
        if kind != seen:
            log(f"{where}: {kind or 'pending'}{f' ({detail})' if detail else ''}")
            seen = kind
        if kind == "Succeeded":
            return dict(state)
        if kind == "Failed":
            raise ImtextError(
                f"{where} failed: {detail or 'no reason given'}; its pods' logs: "
                f"kubectl logs -n {namespace} -l training.kubeflow.org/job-name={name}"
            )
        sleep(poll_s)


def _replica_counts(job: Mapping[str, Any]) -> str:
    replicas = job["spec"]["pytorchReplicaSpecs"]
    return ", ".join(f"{r['replicas']} {kind}" for kind, r in replicas.items())


def _refusal(where: str, exc: Any) -> str:
    reason = f"HTTP {exc.status} {exc.reason}"
    if exc.status == 404:
        return (
            f"{where}: {reason}; the cluster does not know kubeflow.org/v1 PyTorchJobs: install "
            "the Kubeflow Training Operator, or compile the pipeline without --finetune-nodes"
        )
    if exc.status in (401, 403):
        return (
            f"{where}: {reason}; the run's service account may not create or read PyTorchJobs: "
            "apply k8s/base/rbac.yaml and run as imtext-pipeline-runner"
        )
    return f"{where}: {reason}"


def replay(log_file: Path, log: Callable[[dict[str, float], int], None]) -> None:
    """Pass each record of a training ``log.jsonl`` to ``log(metrics, step)``, as the training
    loop would have."""
    if not log_file.is_file():
        return
    for line in log_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        step = int(record.pop("step"))
        record.pop("stage", None)
        log(record, step)


def stage_inputs(workdir: Path, prepared: Path, init: Path, params: Mapping[str, Any]) -> None:
    """Copy what the replicas read onto the workspace volume (again after a retry: the copy
    is cheap next to training, and an interrupted copy must not be trusted)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared, workdir / "prepared", dirs_exist_ok=True)
    (workdir / "init").mkdir(exist_ok=True)
    shutil.copy2(init, workdir / "init" / "model.pt")
    (workdir / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))


def run_finetune_job(
    params: Mapping[str, Any],
    prepared: Path,
    init: Path,
    out: Path,
    *,
    template: Mapping[str, Any],
    image: str,
    nodes: int,
    gpus_per_node: int,
    env: Mapping[str, str] | None = None,
    api: Any = None,
    namespace: str | None = None,
    log: MessageLog = print,
    also_log: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """The ``finetune-job`` pipeline step: stage, run the PyTorchJob, hand on its outputs.

    ``env`` defaults to the process environment, ``api`` to the in-cluster client,
    ``namespace`` to the pod's own. ``also_log`` (the MLflow run's logger) gets the job's
    ``log.jsonl`` records once the job has succeeded: the job's pods do not log to MLflow.
    """
    import os

    from imtext.pipeline_steps import RUN_ID_ENV, WORKSPACE_ENV, hand_on, step_workdir

    env = os.environ if env is None else env
    if not env.get(WORKSPACE_ENV):
        raise ImtextError(
            f"{WORKSPACE_ENV} is not set: a multi-node finetune needs the workspace volume "
            "(compile with pipelines/cluster.py; k8s/training/workspace-pvc.yaml)"
        )
    workdir = step_workdir("finetune", Path(out), env)
    stage_inputs(workdir, Path(prepared), Path(init), params)
    if namespace is None:
        namespace = NAMESPACE_FILE.read_text().strip()
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    job = finetune_job(
        template,
        name=job_name(env[RUN_ID_ENV]),
        namespace=namespace,
        image=image,
        nodes=nodes,
        workdir=str(workdir),
        gpus_per_node=gpus_per_node,
    )
    run_job(api, job, log=log)
    metrics_file = workdir / "out" / "metrics.json"
    if not metrics_file.is_file():
        raise ImtextError(f"{metrics_file}: the PyTorchJob succeeded but wrote no metrics")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    if also_log is not None:
        replay(workdir / "out" / "log.jsonl", also_log)
    hand_on(workdir / "out", Path(out))
    shutil.rmtree(workdir)
    return metrics
