"""KFP component ``export``: ONNX encoders for serving, verified against PyTorch."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    prepared: Input[Dataset],
    params: str,
    overrides: list,
    onnx: Output[Model],
    metrics: Output[Metrics],
):
    """Export both encoders of the finetuned model to ONNX and check them against PyTorch.

    Args:
        model: Output of finetune (its model.pt is exported).
        prepared: Output of prepare (vocabulary, and the split whose recall is compared).
        params: The text of params.yaml (section export is used).
        overrides: section.key=value settings applied over params.
        onnx: Directory with image_encoder.onnx, text_encoder.onnx, preprocess.json, vocab.json
            and parity.json.
        metrics: Parity (largest embedding difference) and recall of the ONNX encoders.
    """
    from pathlib import Path

    from imtext.config import stage_config_from_params
    from imtext.export import export as export_stage
    from imtext.pipeline_steps import step_params, write_kfp_metrics

    values = step_params(params, overrides)
    result = export_stage(
        stage_config_from_params("export", values),
        Path(model.path) / "model.pt",
        Path(prepared.path),
        Path(onnx.path),
        log=print,
    )
    write_kfp_metrics(metrics, result)
