"""What the Kubeflow pipeline's steps run inside their container, beside the stage functions.

The components (``components/``) import these in their bodies: :func:`step_params` (the
``params`` and ``overrides`` pipeline arguments -> the parameter dict), :func:`write_kfp_metrics`
(a stage's numbers -> the step's KFP ``Metrics`` artifact), :func:`train_step` (a training step
that resumes in :func:`step_workdir`) and :func:`tracked_step` (its MLflow run).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imtext._process import tune_collector_for_a_short_process
from imtext.errors import ConfigError, ImtextError

# Each step is one short process (see the function).
tune_collector_for_a_short_process()


def step_params(params: str, overrides: list[str], model_name: str = "") -> dict[str, Any]:
    """The parameter dict a pipeline step works with.

    ``params`` is the text of a params.yaml (a pipeline argument: KFP cannot carry the file's
    ``null`` values in a dict argument), ``overrides`` are ``section.key=value`` settings applied
    over it, and a non-empty ``model_name`` replaces ``register.model_name``.
    """
    import yaml

    from imtext.config import apply_overrides

    try:
        values = yaml.safe_load(params)
    except yaml.YAMLError as exc:
        raise ConfigError(f"params: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError("params: expected the text of a params.yaml (a mapping of sections)")
    values = apply_overrides(values, list(overrides))
    if model_name:
        if not isinstance(values.get("register"), dict):
            raise ConfigError("params: missing section 'register'")
        values["register"]["model_name"] = model_name
    return values


def write_kfp_metrics(artifact: Any, values: dict[str, Any]) -> None:
    """Log the numbers of ``values`` to a KFP ``Metrics`` artifact, and write them to its file.

    KFP keeps logged metrics in the artifact's metadata only; the file makes the artifact exist
    in storage too, which KFP's local cache requires before it reuses a step's outputs.
    """
    import json

    for name, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            artifact.log_metric(name, value)
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(artifact.metadata), indent=1) + "\n", encoding="utf-8")


#: On a cluster, the mount of the shared training volume (a PVC) and the KFP run's id: a training
#: step keeps its checkpoint at WORKSPACE/runs/RUN_ID/<stage>, where a retried step finds it.
WORKSPACE_ENV = "IMTEXT_WORKSPACE"
RUN_ID_ENV = "IMTEXT_RUN_ID"
#: What a training step hands on in its ``model`` output (its working directory holds no more).
TRAIN_OUTPUTS = ("model.pt", "checkpoint.pt", "history.json", "metrics.json", "log.jsonl")


def pipeline_run_id(given: str, env: Mapping[str, str] | None = None) -> str | None:
    """The KFP run a training step belongs to: ``given`` (the local runner passes the run-id
    placeholder as an input), else ``$IMTEXT_RUN_ID`` (a cluster step reads it from its pod's
    label, so that the id is no input of the step and no part of its cache key), else None."""
    env = os.environ if env is None else env
    return given.strip() or env.get(RUN_ID_ENV, "").strip() or None


def step_workdir(stage: str, out: Path, env: Mapping[str, str]) -> Path:
    """Where a training step trains, so that a retry of the step resumes from its checkpoint.

    Without ``IMTEXT_WORKSPACE`` (KFP's local runner, which retries a step in the same output
    directory) that is ``out`` itself. With it (a cluster step whose output directory is new in
    every pod) it is ``$IMTEXT_WORKSPACE/runs/$IMTEXT_RUN_ID/<stage>`` on the shared volume: one
    directory per pipeline run and step, which no other run writes.
    """
    workspace = env.get(WORKSPACE_ENV, "").strip()
    if not workspace:
        return Path(out)
    run_id = env.get(RUN_ID_ENV, "").strip()
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ImtextError(
            f"{WORKSPACE_ENV} is set ({workspace}) but {RUN_ID_ENV} is {run_id!r}, not a run id; "
            "compile the pipeline with pipelines/cluster.py, which sets both"
        )
    return Path(workspace) / "runs" / run_id / stage


def hand_on(work: Path, out: Path) -> None:
    """Copy a finished stage's files from its working directory to the step's output, then
    remove the working directory (imtext made it; the run's other steps' stay)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_OUTPUTS:
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    shutil.rmtree(work)


def tracked_step(
    stage: str,
    values: dict[str, Any],
    prepared: Path,
    *,
    mlflow_run_id: str,
    kfp_run_id: str,
    tracking_uri: str,
):
    """The MLflow run a training component logs to (``imtext.registry.tracked_training``):
    ``mlflow_run_id`` resumed when given, else a new one with the params, the data's lineage
    (``prepared``'s source.json) and the pipeline run's id. Empty strings are KFP's "not given"."""
    from imtext.config import stage_config_from_params
    from imtext.data.lineage import read_source
    from imtext.registry import tracked_training

    return tracked_training(
        stage_config_from_params("register", values),
        stage,
        run_id=mlflow_run_id or None,
        params=values,
        source=read_source(prepared),
        kfp_run_id=pipeline_run_id(kfp_run_id),
        tracking_uri=tracking_uri or None,
        log=print,
    )


def train_step(
    stage: str,
    params: dict[str, Any],
    prepared: Path,
    out: Path,
    *,
    init: Path | None = None,
    device: str = "auto",
    also_log: Callable[[dict[str, float], int], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """A pipeline's ``pretrain`` or ``finetune`` step: ``train_stage`` with the step's parameters,
    every logged step's metrics printed (KFP's log), appended to ``log.jsonl`` and passed to
    ``also_log`` (the MLflow run's logger).

    It always resumes: the directory it trains in (:func:`step_workdir`, from ``env``, default
    the process environment) belongs to this run and step, so a checkpoint found there was
    written by an earlier attempt of this very step, and a retry continues after its last epoch
    with the result an uninterrupted run would have had.
    """
    from imtext.config import stage_config_from_params
    from imtext.metrics_log import jsonl_metrics_log
    from imtext.train.loop import train_stage

    out = Path(out)
    work = step_workdir(stage, out, os.environ if env is None else env)
    work.mkdir(parents=True, exist_ok=True)
    write = jsonl_metrics_log(work / "log.jsonl", stage, echo=lambda line: print(line, flush=True))

    def log(step_metrics: dict[str, float], step: int) -> None:
        write(step_metrics, step)
        if also_log is not None:
            also_log(step_metrics, step)

    result = train_stage(
        stage,
        stage_config_from_params("model", params),
        stage_config_from_params(stage, params),
        Path(prepared),
        work,
        init=init,
        resume=True,
        device=device,
        log=log,
        progress=False,
    )
    if work != out:
        hand_on(work, out)
    return result
