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
    import json
    from pathlib import Path

    from imtext.config import stage_config_from_params
    from imtext.orchestrate import log_metrics, step_params
    from imtext.train.loop import train_stage

    values = step_params(params, overrides)
    out = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)

    def log(step_metrics: dict, step: int) -> None:
        line = json.dumps({"stage": "finetune", "step": step, **step_metrics})
        print(line, flush=True)
        with (out / "log.jsonl").open("a", encoding="utf-8") as file:
            file.write(line + "\n")

    result = train_stage(
        "finetune",
        stage_config_from_params("model", values),
        stage_config_from_params("finetune", values),
        Path(prepared.path),
        out,
        init=Path(init.path) / "model.pt",
        device=device,
        log=log,
        progress=False,
    )
    log_metrics(metrics, result)
