"""KFP component ``finetune``: Stage II, ranking + instance loss (``imtext finetune``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune(
    prepared: Input[Dataset],
    init: Input[Model],
    params: str,
    overrides: list,
    device: str,
    tracking_uri: str,
    kfp_run_id: str,
    mlflow_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("mlflow_run_url", str)]):
    """Train Stage II of the dual-path method end to end from Stage I's weights, logging to the
    pipeline run's MLflow run.

    Args:
        prepared: Output of prepare.
        init: Output of pretrain (its model.pt is the starting point).
        params: The text of params.yaml (sections model and finetune are used).
        overrides: section.key=value settings applied over params.
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        tracking_uri: MLflow tracking URI; empty: register.tracking_uri, else $MLFLOW_TRACKING_URI.
        kfp_run_id: The pipeline run's id (dsl.PIPELINE_JOB_ID_PLACEHOLDER on the local runner;
            empty on a cluster, where $IMTEXT_RUN_ID holds it).
        mlflow_run_id: pretrain's MLflow run, resumed when it is this pipeline run's (a cached
            pretrain's belongs to another: a run of its own is opened then).
        model: Directory with model.pt (best validation epoch), checkpoint.pt, history.json,
            metrics.json and log.jsonl.
        metrics: The stage's final metrics (validation recall of the best epoch).

    Returns:
        mlflow_run_id: The MLflow run this step logged to (register logs the model there).
        mlflow_run_url: Its page in MLflow's UI.
    """
    from collections import namedtuple
    from pathlib import Path

    from imtext.pipeline_steps import step_params, tracked_step, train_step, write_kfp_metrics

    values = step_params(params, overrides)
    with tracked_step(
        "finetune",
        values,
        Path(prepared.path),
        mlflow_run_id=mlflow_run_id,
        kfp_run_id=kfp_run_id,
        tracking_uri=tracking_uri,
    ) as run:
        result = train_step(
            "finetune",
            values,
            Path(prepared.path),
            Path(model.path),
            init=Path(init.path) / "model.pt",
            device=device,
            also_log=run.log,
        )
    write_kfp_metrics(metrics, result)
    print(f"MLflow run: {run.url}")
    return namedtuple("TrainOutputs", ["mlflow_run_id", "mlflow_run_url"])(run.run_id, run.url)
