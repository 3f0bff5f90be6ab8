"""KFP component ``finetune``: Stage II, ranking + instance loss (``imtext finetune``)."""

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
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train Stage II of the dual-path method end to end from Stage I's weights.

    Args:
        prepared: Output of prepare.
        init: Output of pretrain (its model.pt is the starting point).
        params: The text of params.yaml (sections model and finetune are used).
        overrides: section.key=value settings applied over params.
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        model: Directory with model.pt (best validation epoch), checkpoint.pt, history.json,
            metrics.json and log.jsonl.
        metrics: The stage's final metrics (validation recall of the best epoch).
    """
    from pathlib import Path

    from imtext.orchestrate import log_metrics, step_params, train_step

    result = train_step(
        "finetune",
        step_params(params, overrides),
        Path(prepared.path),
        Path(model.path),
        init=Path(init.path) / "model.pt",
        device=device,
    )
    log_metrics(metrics, result)
