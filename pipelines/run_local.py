"""Run the whole pipeline on this machine with KFP's local ``SubprocessRunner``.

Each step runs as a subprocess of the current Python (``use_venv=False``: the environment that
has imtext installed stands in for the project image) and writes its outputs under
``PIPELINE_ROOT/imtext-<time>/<step>/``. The DAG is the cluster's, without the settings of
:mod:`pipelines.cluster`, which the local runner cannot apply.
"""

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import local

from pipelines.errors import PipelineError
from pipelines.imtext_pipeline import PIPELINE_NAME, build_pipeline, compact_params
from pipelines.step_logs import StepEvents, captured_steps

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class LocalRun:
    """What a local run produced."""

    #: ``PIPELINE_ROOT/imtext-<time>``: one directory per step.
    run_dir: Path
    #: ``format_recall_table`` of the evaluation.
    recall_table: str
    #: The self-contained HTML report.
    report: Path
    gate_metric: float
    model_version: str
    beats_champion: bool
    #: The gate's comparison in words, as ``register`` saw it.
    gate: str
    #: ``{"promoted": bool, "decision": str}`` from ``promote``; ``None`` when the gate skipped it.
    promotion: dict[str, Any] | None


def run_local(
    arguments: dict[str, Any],
    pipeline_root: Path,
    *,
    params: str,
    cache: bool = False,
    retries: int = 0,
    events: StepEvents | None = None,
) -> LocalRun:
    """Run the pipeline with ``arguments`` (its parameters by name) and wait for it.

    ``params`` (params.yaml text) is also the default of the ``params`` argument. With ``cache``,
    a step whose component, arguments and input artifacts match an earlier run under
    ``pipeline_root`` reuses that run's outputs (``digest``, ``register`` and ``promote`` always
    run; ``prepare`` is keyed on the data's digest). A training step that fails is run again up
    to ``retries`` times, resuming from the checkpoint of its last finished epoch.

    Without ``events`` the runner's whole log goes to stdout, as KFP prints it. With ``events``,
    each step's log goes to ``<step>/<step>.log`` in its output directory and ``events`` hears of
    each step and each line (:mod:`pipelines.step_logs`). Raises :class:`PipelineError` naming
    the failed step and, when captured, its log file.
    """
    pipeline_root = Path(pipeline_root).resolve()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
        enable_caching=cache,
        cache_root=str(pipeline_root / ".kfp_cache") if cache else None,
    )
    earlier = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    pipeline = build_pipeline(params, for_cluster=False, retries=retries)
    if "params" in arguments:  # one line in the runner's log of every step, not the whole file
        arguments = {**arguments, "params": compact_params(arguments["params"])}
    with warnings.catch_warnings():
        # The runner warns that the project image's name does not say "python"; locally the
        # current environment stands in for the image, which is what we want.
        warnings.filterwarnings(
            "ignore", message=".*non-Python base image", category=RuntimeWarning
        )
        failed: dict[str, Path | None] = {}
        try:
            with captured_steps(events) if events else contextlib.nullcontext({}) as failed:
                task = pipeline(**arguments)
        except RuntimeError as exc:
            message = _ANSI.sub("", str(exc))
            if not message.startswith("Pipeline "):
                raise
            raise PipelineError(_failure(message, failed, pipeline_root)) from None
    outputs = task.outputs
    evaluation = Path(outputs["evaluation"].path)
    # Cached steps' artifacts live in the run that made them, so this run's directory is the one
    # that appeared (register always runs in it), not the parent of an artifact.
    appeared = set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - earlier
    run_dir = max(appeared) if appeared else evaluation.parents[1]
    return LocalRun(
        run_dir=run_dir,
        recall_table=Path(outputs["recall_table"].path).read_text(encoding="utf-8"),
        report=evaluation / "report.html",
        gate_metric=float(outputs["gate_metric"]),
        model_version=str(outputs["model_version"]),
        beats_champion=bool(outputs["beats_champion"]),
        gate=str(outputs["gate"]),
        promotion=_step_outputs(run_dir, "promote"),
    )


def _failure(message: str, failed: dict[str, Path | None], pipeline_root: Path) -> str:
    """What went wrong, in one line: the step and its log file when the logs were captured."""
    logs = [f"step {step!r} failed; its log: {log}" for step, log in failed.items() if log]
    if logs:
        return f"the local pipeline run failed: {'; '.join(logs)}"
    return (
        f"the local pipeline run failed: {message} Its log is above; outputs are under "
        f"{pipeline_root}"
    )


def _step_outputs(run_dir: Path, step: str) -> dict[str, Any] | None:
    """The output parameters of ``step`` from its ExecutorOutput file (KFP's executor writes it
    into the step's directory), or ``None`` when the step did not run."""
    path = run_dir / step / "executor_output.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("parameterValues", {})
