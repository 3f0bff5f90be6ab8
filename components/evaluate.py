"""KFP component ``evaluate``: retrieval metrics and the report of the trained model."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    prepared: Input[Dataset],
    params: str,
    overrides: list,
    device: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    recall_table: Output[Markdown],
) -> float:
    """Evaluate the finetuned model on the split and protocol of params' evaluate section.

    Args:
        model: Output of finetune (its model.pt is evaluated).
        prepared: Output of prepare.
        params: The text of params.yaml (sections evaluate and register are used).
        overrides: section.key=value settings applied over params.
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        evaluation: Directory with metrics.json, evaluation.json, recall_curve.json/png,
            report.html and report.png.
        metrics: Recall@K, median and mean ranks, rsum.
        report: The self-contained HTML report (metrics, recall curve, sample queries).
        recall_table: R@1/5/10, median rank and rsum as a markdown table.

    Returns:
        The value of the gate metric (register.gate_metric, higher is better).
    """
    import shutil
    from pathlib import Path

    from imtext.config import stage_config_from_params
    from imtext.errors import ConfigError
    from imtext.eval.evaluate import evaluate as evaluate_stage
    from imtext.eval.evaluate import format_recall_table
    from imtext.pipeline_steps import step_params, write_kfp_metrics

    values = step_params(params, overrides)
    gate_metric = stage_config_from_params("register", values).gate_metric
    out = Path(evaluation.path)
    result = evaluate_stage(
        stage_config_from_params("evaluate", values),
        Path(model.path) / "model.pt",
        Path(prepared.path),
        out,
        device=device,
        log=print,
    )
    if gate_metric not in result:
        raise ConfigError(
            f"register.gate_metric: {gate_metric!r} is not a metric of evaluate; "
            f"choose one of {', '.join(sorted(result))}"
        )
    write_kfp_metrics(metrics, result)
    shutil.copyfile(out / "report.html", report.path)
    table = format_recall_table(result)
    Path(recall_table.path).write_text(table + "\n", encoding="utf-8")
    print(table)
    return float(result[gate_metric])
