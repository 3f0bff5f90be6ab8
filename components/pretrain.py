"""KFP component ``pretrain``: Stage I, the instance loss (``imtext pretrain``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(
    prepared: Input[Dataset],
    params: str,
    overrides: list,
    device: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train Stage I of the dual-path method (instance loss only).

    Args:
        prepared: Output of prepare.
        params: The text of params.yaml (sections model and pretrain are used).
        overrides: section.key=value settings applied over params.
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        model: Directory with model.pt (best validation epoch), checkpoint.pt, history.json,
            metrics.json and log.jsonl.
        metrics: The stage's final metrics (validation recall of the best epoch).
    """
    from pathlib import Path

    from imtext.orchestrate import log_metrics, step_params, train_step

    result = train_step(
        "pretrain",
        step_params(params, overrides),
        Path(prepared.path),
        Path(model.path),
        device=device,
    )
    log_metrics(metrics, result)
