"""KFP component ``register``: the candidate as an MLflow run and a new registered model version."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, OutputPath

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    params: str,
    overrides: list,
    tracking_uri: str,
    model_name: str,
    mlflow_run_id: str,
    model: Input[Model],
    evaluation: Input[Artifact],
    onnx: Input[Model],
    model_version: OutputPath(str),
    gate: OutputPath(str),
) -> bool:
    """Register the candidate without moving the serving alias, and say whether it passes the gate.

    Args:
        params: The text of params.yaml (section register is used; all of it is logged).
        overrides: section.key=value settings applied over params.
        tracking_uri: MLflow tracking URI; empty: register.tracking_uri, else $MLFLOW_TRACKING_URI.
        model_name: Registered model name; empty: register.model_name.
        mlflow_run_id: finetune's MLflow run, where the model is logged; a run registered before
            (every step up to here from KFP's cache) keeps its version and gets no second one.
        model: Output of finetune (model.pt, history.json, metrics.json, log.jsonl).
        evaluation: Output of evaluate (metrics.json and the report).
        onnx: Output of export (the ONNX encoders served by the registered model).
        model_version: The new version of the registered model.
        gate: The comparison with the champion in words.

    Returns:
        Whether the new version beats the champion on register.gate_metric by more than
        register.gate_min_delta (always true while no version is the champion). The pipeline
        gates promote on it; it is the single return value because KFP's local runner resolves
        a condition only on a task's ``Output``.
    """
    from pathlib import Path

    from imtext.config import stage_config_from_params
    from imtext.pipeline_steps import step_params
    from imtext.registry import preview_promotion
    from imtext.registry import register as register_stage

    values = step_params(params, overrides, model_name)
    cfg = stage_config_from_params("register", values)
    registered = register_stage(
        cfg,
        params=values,
        train_dir=Path(model.path),
        eval_dir=Path(evaluation.path),
        export_dir=Path(onnx.path),
        data_dvc=None,  # the run has the data's URI and digests (prepare's source.json)
        tracking_uri=tracking_uri or None,
        run_id=mlflow_run_id or None,
        log=print,
    )
    decision = preview_promotion(
        cfg, registered.version, tracking_uri=tracking_uri or None, log=print
    )
    print(f"gate: {decision.reason}")
    Path(model_version).write_text(registered.version, encoding="utf-8")
    Path(gate).write_text(decision.reason, encoding="utf-8")
    return decision.promoted
