"""What a Kubeflow cluster needs beyond the DAG: resources, GPUs, retries and credentials.

Kept apart from the DAG because KFP's local runner has no use for any of it: it warns about
resource and accelerator settings, ignores the Kubernetes platform config and would rerun a failed
training step as it would on a preempted node. The pipeline applies :func:`configure_for_cluster`
when compiled for a cluster and leaves it out for ``imtext pipeline run``.
"""

from kfp import dsl, kubernetes

#: Kubernetes secret holding the tracking server's and the object store's settings (see k8s/).
SECRET_NAME = "imtext-credentials"

#: Secret key -> environment variable, for the steps that talk to MLflow (and, through it, to the
#: object store holding its artifacts).
MLFLOW_ENV = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    # The tracking server runs MLflow's basic-auth app (k8s/base/mlflow.yaml).
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
#: ... and for the step that reads the raw data from the same object store with boto3, which takes
#: its endpoint from AWS_ENDPOINT_URL.
S3_ENV = {
    "MLFLOW_S3_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
SECRET_ENV = {
    "digest": S3_ENV,
    "prepare": S3_ENV,
    # The training steps log to the tracking server as they train (imtext.registry.runs).
    "pretrain": MLFLOW_ENV,
    "finetune": MLFLOW_ENV,
    "finetune-job": MLFLOW_ENV,
    "register": MLFLOW_ENV,
    "promote": MLFLOW_ENV,
}

#: (cpu request, cpu limit, memory request, memory limit) per step. Training and evaluation are
#: sized for the paper's models on Flickr30k/COCO with one GPU; the data loaders decode images on
#: the CPUs.
RESOURCES = {
    "digest": ("500m", "1", "512Mi", "1Gi"),
    "prepare": ("4", "8", "8Gi", "16Gi"),
    "pretrain": ("8", "16", "32Gi", "64Gi"),
    "finetune": ("8", "16", "32Gi", "64Gi"),
    # Multi-node Stage II: this step copies the inputs to the workspace and waits for the
    # PyTorchJob, whose pods hold the GPUs.
    "finetune-job": ("500m", "1", "2Gi", "4Gi"),
    "evaluate": ("4", "8", "16Gi", "32Gi"),
    "export": ("2", "4", "8Gi", "16Gi"),
    "register": ("1", "2", "2Gi", "4Gi"),
    "promote": ("500m", "1", "1Gi", "2Gi"),
}

GPU_STEPS = ("pretrain", "finetune", "evaluate")
ACCELERATOR_TYPE = "nvidia.com/gpu"
GPUS_PER_STEP = 1
#: The label the NVIDIA GPU operator puts on GPU nodes, and the taint GPU node pools usually carry.
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: PyTorch data-loader workers pass batches through /dev/shm, which a container gets only 64 MB of.
SHM_SIZE = "8Gi"

#: Training survives a preempted or failed node: a retried step resumes from the checkpoint its
#: earlier attempt left on the workspace volume (imtext.pipeline_steps.step_workdir).
RETRY_STEPS = ("pretrain", "finetune", "finetune-job")
RETRIES = 2
RETRY_BACKOFF = "120s"

#: The ReadWriteMany volume of k8s/training/workspace-pvc.yaml, mounted in the training steps at
#: WORKSPACE: checkpoints live at WORKSPACE/runs/<KFP run id>/<step> for the run's duration.
WORKSPACE_PVC = "imtext-workspace"
WORKSPACE = "/workspace"
#: The KFP API server labels every pod of a run with the run's id. Read through the downward API,
#: not passed as an input: an input would be part of KFP's cache key and no step would ever be
#: taken from the cache.
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


def configure_for_cluster(tasks: dict[str, dsl.PipelineTask]) -> None:
    """Apply the settings of this module to the pipeline's tasks, keyed by step name."""
    unknown = sorted(set(tasks) - set(RESOURCES))
    if unknown:
        raise ValueError(f"no cluster settings for step(s) {', '.join(unknown)}")
    for name, task in tasks.items():
        cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[name]
        task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
        task.set_memory_request(memory_request).set_memory_limit(memory_limit)
        if name in GPU_STEPS:
            task.set_accelerator_type(ACCELERATOR_TYPE).set_accelerator_limit(GPUS_PER_STEP)
            kubernetes.add_node_selector(
                task, label_key=GPU_NODE_SELECTOR[0], label_value=GPU_NODE_SELECTOR[1]
            )
            kubernetes.add_toleration(task, **GPU_TOLERATION)
            kubernetes.empty_dir_mount(
                task,
                volume_name="dshm",
                mount_path="/dev/shm",
                medium="Memory",
                size_limit=SHM_SIZE,
            )
        if name in RETRY_STEPS:
            task.set_retry(num_retries=RETRIES, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
            mount_workspace(task)
        if name in SECRET_ENV:
            kubernetes.use_secret_as_env(
                task, secret_name=SECRET_NAME, secret_key_to_env=SECRET_ENV[name]
            )


def mount_workspace(task: dsl.PipelineTask) -> None:
    """The workspace volume at WORKSPACE, and the two variables that locate the step's directory
    on it (``IMTEXT_WORKSPACE``, ``IMTEXT_RUN_ID``: imtext.pipeline_steps reads them)."""
    kubernetes.mount_pvc(task, pvc_name=WORKSPACE_PVC, mount_path=WORKSPACE)
    task.set_env_variable("IMTEXT_WORKSPACE", WORKSPACE)
    kubernetes.use_field_path_as_env(task, env_name="IMTEXT_RUN_ID", field_path=RUN_ID_FIELD)
