"""Start a run of the pipeline on a Kubeflow Pipelines endpoint with ``kfp.Client``."""

import json
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from pipelines.compile import compile_pipeline
from pipelines.errors import PipelineError
from pipelines.imtext_pipeline import PIPELINE_NAME, build_pipeline

#: Checks of a parsed ``NAME=VALUE`` value, by the parameter's type in the pipeline.
_CHECKS = {
    "Boolean": lambda v: isinstance(v, bool),
    "Integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "Float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "List": lambda v: isinstance(v, list),
    "Dict": lambda v: isinstance(v, dict),
}


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    url: str


def pipeline_parameters() -> dict[str, str]:
    """The pipeline's parameters and their types (``STRING``, ``BOOLEAN``, ...)."""
    inputs = build_pipeline("{}", for_cluster=True).component_spec.inputs or {}
    return {name: spec.type for name, spec in inputs.items()}


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    """``["data=s3://b/p", "skip_bad=true"]`` -> arguments typed as the pipeline declares them
    (strings as given; booleans and numbers as YAML; lists and dicts as JSON)."""
    types = pipeline_parameters()
    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise PipelineError(
                f"--param {pair!r}: expected NAME=VALUE, e.g. data=s3://bucket/data"
            )
        if name not in types:
            raise PipelineError(
                f"--param {pair!r}: the pipeline has no parameter {name!r}; "
                f"it has {', '.join(sorted(types))}"
            )
        kind = types[name]
        if kind == "String":
            arguments[name] = text
            continue
        try:
            value = json.loads(text) if kind in ("List", "Dict") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            value = None
        if value is None or not _CHECKS[kind](value):
            raise PipelineError(f"--param {pair!r}: {name} takes a {kind.lower()} value")
        arguments[name] = value
    return arguments


def submit(
    host: str,
    *,
    arguments: dict[str, Any],
    params: str | None = None,
    experiment: str = PIPELINE_NAME,
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    token: str | None = None,
    finetune_nodes: int = 1,
) -> SubmittedRun:
    """Compile the pipeline (``params``: params.yaml text compiled in as the default) and create a
    run of it in ``experiment`` on the endpoint ``host``, authenticated with ``token``;
    ``finetune_nodes`` > 1 runs Stage II as a PyTorchJob of that many pods."""
    import kfp

    with tempfile.TemporaryDirectory(prefix="imtext-submit-") as tmp:
        package = compile_pipeline(
            Path(tmp) / "imtext-pipeline.yaml", params=params, finetune_nodes=finetune_nodes
        )
        run_name = run_name or f"{PIPELINE_NAME} {datetime.now():%Y-%m-%d %H:%M:%S}"
        try:
            with warnings.catch_warnings():
                # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": noise
                warnings.filterwarnings("ignore", category=FutureWarning, module="kfp.client")
                client = kfp.Client(
                    host=host, existing_token=token, namespace=namespace or "kubeflow"
                )
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
                service_account=service_account,
            )
        except Exception as exc:
            # kfp_server_api raises ApiException for HTTP errors and urllib3 errors for network
            # ones, kfp.Client a TimeoutError when the health check never answers: all of them
            # are about the endpoint, not about this code.
            about_endpoint = isinstance(exc, TimeoutError) or type(exc).__module__.split(".")[
                0
            ] in ("kfp_server_api", "urllib3")
            if not about_endpoint:
                raise
            raise PipelineError(f"{host}: could not create the run: {_one_line(exc)}") from exc
    return SubmittedRun(result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}")


def _one_line(exc: Exception, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
