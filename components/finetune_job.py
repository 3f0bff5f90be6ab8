"""KFP component ``finetune-job``: Stage II on several nodes, as a Kubeflow PyTorchJob."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_job(
    prepared: Input[Dataset],
    init: Input[Model],
    params: str,
    overrides: list,
    nodes: int,
    gpus_per_node: int,
    job_template: str,
    image: str,
    tracking_uri: str,
    kfp_run_id: str,
    mlflow_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("mlflow_run_url", str)]):
    """Train Stage II on ``nodes`` pods of a PyTorchJob (Kubeflow Training Operator) and wait.

    The inputs are staged on the workspace volume, which the job's pods mount too; the job's
    model.pt, checkpoint.pt, history.json, metrics.json and log.jsonl come back into ``model``,
    as from the single-process ``finetune`` step.

    Args:
        prepared: Output of prepare.
        init: Output of pretrain (its model.pt is the starting point).
        params: The text of params.yaml (sections model and finetune are used).
        overrides: section.key=value settings applied over params.
        nodes: Pods of the job (one Master, nodes - 1 Workers); 2 or more.
        gpus_per_node: GPUs (and processes) per pod; 0 trains on CPUs, one process per pod.
        job_template: k8s/training/finetune-pytorchjob.yaml as JSON (read when compiled).
        image: The project image the job's pods run (this step's own).
        tracking_uri: MLflow tracking URI; empty: register.tracking_uri, else $MLFLOW_TRACKING_URI.
        kfp_run_id: The pipeline run's id (dsl.PIPELINE_JOB_ID_PLACEHOLDER on the local runner;
            empty on a cluster, where $IMTEXT_RUN_ID holds it).
        mlflow_run_id: pretrain's MLflow run, resumed as by ``finetune``. The job's per-epoch
            records are logged to it when the job has finished (its pods do not log to MLflow).
        model: Directory with model.pt (best validation epoch), checkpoint.pt, history.json,
            metrics.json and log.jsonl.
        metrics: The stage's final metrics (validation recall of the best epoch).

    Returns:
        mlflow_run_id: The MLflow run this step logged to (register logs the model there).
        mlflow_run_url: Its page in MLflow's UI.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from imtext.pipeline_steps import step_params, tracked_step, write_kfp_metrics
    from imtext.pytorchjob import run_finetune_job

    values = step_params(params, overrides)
    with tracked_step(
        "finetune",
        values,
        Path(prepared.path),
        mlflow_run_id=mlflow_run_id,
        kfp_run_id=kfp_run_id,
        tracking_uri=tracking_uri,
    ) as run:
        result = run_finetune_job(
            values,
            Path(prepared.path),
            Path(init.path) / "model.pt",
            Path(model.path),
            template=json.loads(job_template),
            image=image,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            also_log=run.log,
        )
    write_kfp_metrics(metrics, result)
    print(f"MLflow run: {run.url}")
    return namedtuple("TrainOutputs", ["mlflow_run_id", "mlflow_run_url"])(run.run_id, run.url)
