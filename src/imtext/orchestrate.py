"""``imtext pipeline compile | run | submit``: the Kubeflow pipeline from the command line.

The pipeline itself lives outside the package, in the repository's ``pipelines/`` and
``components/`` (they import kfp, and the package must not import them): this module puts the
repository root on ``sys.path`` and loads them with :mod:`importlib` when a subcommand runs.

It also holds the helpers the pipeline's steps share inside the container: :func:`step_params`
(the ``params`` and ``overrides`` pipeline arguments -> the parameter dict) and
:func:`log_metrics`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from imtext.errors import ConfigError, ImtextError

if TYPE_CHECKING:
    from imtext.console import Console

log = logging.getLogger("imtext")

#: Environment variable holding the bearer token for ``imtext pipeline submit``.
TOKEN_ENV = "KF_PIPELINES_TOKEN"
#: Environment variable kfp.Client reads the endpoint from when ``--host`` is not given.
HOST_ENV = "KF_PIPELINES_ENDPOINT"
DEFAULT_PACKAGE = Path("imtext-pipeline.yaml")
DEFAULT_PIPELINE_ROOT = Path("artifacts/kfp")
DEFAULT_DATA = Path("data/shapes")


# --- helpers of the pipeline steps (run inside the components) ---------------------------------


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


def log_metrics(artifact: Any, values: dict[str, Any]) -> None:
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
    import json

    from imtext.config import stage_config_from_params
    from imtext.train.loop import train_stage

    out = Path(out)
    work = step_workdir(stage, out, os.environ if env is None else env)
    work.mkdir(parents=True, exist_ok=True)

    def log(step_metrics: dict[str, float], step: int) -> None:
        line = json.dumps({"stage": stage, "step": step, **step_metrics})
        print(line, flush=True)
        with (work / "log.jsonl").open("a", encoding="utf-8") as file:
            file.write(line + "\n")
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


# --- loading pipelines/ and components/ ---------------------------------------------------------


def load_pipelines(repo: Path) -> ModuleType:
    """The ``pipelines`` package of the repository at ``repo`` (which also holds ``components``)."""
    repo = Path(repo).resolve()
    for package in ("pipelines", "components"):
        if not (repo / package / "__init__.py").is_file():
            raise ImtextError(
                f"{repo}: no {package}/ package here; run from the root of the imtext repository "
                "or pass --repo with its path"
            )
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    package = importlib.import_module("pipelines")
    where = Path(package.__file__).resolve().parent
    if where != repo / "pipelines":
        raise ImtextError(
            f"the module 'pipelines' was loaded from {where}, not from {repo}; "
            "run in a fresh process or pass --repo with the repository that holds it"
        )
    return package


def _module(repo: Path, name: str) -> ModuleType:
    load_pipelines(repo)
    return importlib.import_module(f"pipelines.{name}")


# --- arguments -------------------------------------------------------------------------------


def _params_file(args: argparse.Namespace) -> Path:
    return args.params if args.params is not None else Path(args.repo) / "params.yaml"


def _checked_params(path: Path, overrides: list[str]) -> tuple[str, dict[str, Any]]:
    """The text of ``path`` and its parameters with ``overrides``, after checking that they give a
    valid config for every stage: a typo fails here, not an hour into a cluster run."""
    from imtext.config import (
        STAGE_CONFIGS,
        apply_overrides,
        check_method,
        read_params,
        stage_config_from_params,
    )

    params = apply_overrides(read_params(path), overrides)
    configs = {stage: stage_config_from_params(stage, params, str(path)) for stage in STAGE_CONFIGS}
    # Sections valid on their own can still not fit together (a loss the model cannot train);
    # the training step would find out only after prepare and pretrain.
    for stage in ("pretrain", "finetune"):
        check_method(configs["model"], configs[stage], f"{path}: {stage}")
    return path.read_text(encoding="utf-8"), params


def _pipeline_errors(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into ``pipelines/``, whose errors a user can act on are ``PipelineError``s."""
    errors = importlib.import_module("pipelines.errors")
    try:
        return func(*args, **kwargs)
    except errors.PipelineError as exc:
        raise ImtextError(str(exc)) from exc


# --- compile --------------------------------------------------------------------------------


def _run_compile(args: argparse.Namespace) -> None:
    compile_module = _module(args.repo, "compile")
    params_text, _ = _checked_params(_params_file(args), [])
    out = _pipeline_errors(
        compile_module.compile_pipeline,
        args.out,
        params=params_text,
        finetune_nodes=args.finetune_nodes,
    )
    image = importlib.import_module("components.image").IMAGE
    log.info("wrote the pipeline (image %s) -> %s", image, out)


# --- run ------------------------------------------------------------------------------------


def _run_local(args: argparse.Namespace) -> None:
    from imtext.config import stage_config_from_params
    from imtext.console import next_steps
    from imtext.data.remote import is_s3
    from imtext.registry import resolve_tracking_uri
    from imtext.ui import ui_command

    run_module = _module(args.repo, "run_local")
    params_text, params = _checked_params(_params_file(args), args.overrides)
    data = str(args.data)
    if not is_s3(data):
        if not Path(data).is_dir():
            raise ImtextError(
                f"{data}: data directory not found; generate the built-in dataset with "
                "`imtext data shapes --out data/shapes` or pass --data"
            )
        data = str(Path(data).resolve())
    arguments = {
        "data": data,
        "annotations": args.annotations,
        "images": args.images,
        "data_format": args.format,
        "skip_bad": args.skip_bad,
        "params": params_text,
        "overrides": list(args.overrides),
        "tracking_uri": args.tracking_uri,
        "model_name": args.model_name,
        "device": args.device,
    }
    console = None if args.verbose else _console(params)
    result = _pipeline_errors(
        run_module.run_local,
        arguments,
        args.out,
        params=params_text,
        cache=args.cache,
        retries=args.retries,
        events=console,
    )

    cfg = stage_config_from_params("register", params)
    tracking_uri = resolve_tracking_uri(cfg, args.tracking_uri or None)
    if console is not None and result.promotion is None:
        console.step_skipped("promote", "by the gate in register (see promotion below)")
    print(f"\nrecall on the {params['evaluate']['split']} split:\n{result.recall_table.rstrip()}")
    print(f"report: {result.report}")
    print(
        f"registered: {args.model_name or cfg.model_name} version {result.model_version} "
        f"(MLflow {tracking_uri})"
    )
    if result.promotion is None:
        print(f"promotion: skipped by the gate: {result.gate}")
    elif result.promotion["promoted"]:
        print(
            f"promotion: version {result.model_version} is now @{cfg.alias}: "
            f"{result.promotion['decision']}"
        )
    else:
        print(f"promotion: refused: {result.promotion['decision']}")
    if console is not None and console.log_pattern():
        print(f"step logs: {console.log_pattern()} (--verbose prints them instead)")
    print("\n" + "\n".join(next_steps(result.report, ui_command(tracking_uri))))


def _console(params: dict[str, Any]) -> Console:
    """The concise view of a local run: a line per step, a bar per training epoch."""
    from imtext.console import TRAINING_STEPS, Console

    epochs = {stage: params[stage]["epochs"] for stage in TRAINING_STEPS}
    console = Console(epochs=epochs)
    console.message(
        "KFP local run: digest -> prepare -> pretrain -> finetune -> evaluate -> export -> "
        "register -> promote"
    )
    return console


# --- submit ---------------------------------------------------------------------------------


def _run_submit(args: argparse.Namespace) -> None:
    submit_module = _module(args.repo, "submit")
    host = args.host or os.environ.get(HOST_ENV)
    if not host:
        raise ImtextError(f"no Kubeflow Pipelines endpoint; pass --host URL or set {HOST_ENV}")
    params_text, _ = _checked_params(_params_file(args), args.overrides)
    arguments = dict(_pipeline_errors(submit_module.parse_arguments, args.param))
    if "params" in arguments or "overrides" in arguments:
        raise ImtextError(
            "--param params=... and --param overrides=...: use --params FILE and --set "
            "section.key=value instead"
        )
    if args.overrides:
        arguments["overrides"] = list(args.overrides)
    run = _pipeline_errors(
        submit_module.submit,
        host,
        arguments=arguments,
        params=params_text,
        experiment=args.experiment,
        run_name=args.run_name,
        namespace=args.namespace,
        service_account=args.service_account,
        token=os.environ.get(TOKEN_ENV) or None,
        finetune_nodes=args.finetune_nodes,
    )
    print(f"run {run.run_id}: {run.url}")


# --- the parser ---------------------------------------------------------------------------------


def _override(text: str) -> str:
    if "=" not in text or "." not in text.partition("=")[0]:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    return text


def _finetune_nodes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finetune-nodes",
        type=int,
        default=1,
        metavar="N",
        help="N > 1: Stage II runs as a PyTorchJob of N pods on the Kubeflow Training Operator "
        "(the step finetune-job; k8s/training/), data-parallel, one process per GPU "
        "(default: %(default)s, one process in the step's own pod)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="parameter file, checked against every stage's config first; compile and submit "
        "make it the default of the pipeline's `params` argument (default: REPO/params.yaml)",
    )
    p.add_argument(
        "--repo",
        type=Path,
        default=Path("."),
        help="repository root holding pipelines/ and components/ (default: the current directory)",
    )


def _sets(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        type=_override,
        action="append",
        default=[],
        help="override one setting of the parameter file for this run (YAML value; repeatable), "
        "e.g. --set finetune.epochs=2",
    )


def add_pipeline_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``imtext pipeline {compile,run,submit}`` on the top-level subcommands."""
    pipeline = sub.add_parser(
        "pipeline",
        help="compile, run locally or submit the Kubeflow pipeline",
        description=(
            "The Kubeflow Pipelines (v2) DAG prepare -> pretrain -> finetune -> evaluate -> "
            "export -> register -> promote (the last only when the candidate beats the champion "
            "on register.gate_metric). Every step runs one imtext stage in the project image; "
            "the DAG is in pipelines/, the steps in components/."
        ),
    )
    commands = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "compile",
        help="write the pipeline as KFP IR YAML (for the Kubeflow UI or `kfp run create`)",
        description=(
            "Compile the pipeline for a cluster: GPU requests, node selector and tolerations on "
            "pretrain, finetune and evaluate; CPU and memory on every step; retries on the "
            "training steps; MLflow and S3 settings from the Kubernetes secret "
            "imtext-credentials. Components run in $IMTEXT_IMAGE (default: the image named in "
            "components/image.py). --params becomes the default of the `params` argument."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_PACKAGE, help="output file (default: %(default)s)"
    )
    _finetune_nodes(p)
    _common(p)
    p.set_defaults(func=_run_compile)

    p = commands.add_parser(
        "run",
        help="run the whole pipeline here with KFP's local runner",
        description=(
            "Run every step of the pipeline in a subprocess of this Python environment (KFP's "
            "SubprocessRunner; no cluster, no container): a line as each step starts and ends, "
            "one per training epoch (a progress bar on a terminal), then the recall table, the "
            "report, the registered version, the promotion decision and what to try next. Step "
            "outputs go to OUT/imtext-<time>/<step>/, each step's whole log to <step>/<step>.log "
            "there (--verbose prints it instead). MLflow: --tracking-uri, else "
            "register.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
            "current directory."
        ),
    )
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="raw data: a directory or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--annotations",
        default="dataset.json",
        help="annotation file under --data (default: %(default)s)",
    )
    p.add_argument(
        "--images",
        default="images",
        help="directory under --data that image paths are relative to (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        choices=("karpathy", "cuhk-pedes"),
        default="karpathy",
        help="annotation format (default: %(default)s)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out unusable images and captions")
    _sets(p)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_PIPELINE_ROOT,
        help="pipeline root: where the steps' outputs go (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="reuse the outputs of an earlier run under --out for each step whose component, "
        "arguments and inputs are unchanged (register and promote always run; prepare reruns "
        "when the data's content digest changes). The key does not cover the imtext package's "
        "own code: after changing it, run without --cache",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="run a failed pretrain or finetune step again up to N times; each retry resumes "
        "from the checkpoint of the last finished epoch (default: %(default)s)",
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: register.tracking_uri, else $MLFLOW_TRACKING_URI, "
        "else sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--model-name", default="", help="registered model name (default: register.model_name)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the local runner's whole log (each step's executor input and output, every "
        "line of its output) instead of a line per step; without it, each step's log goes to "
        "OUT/imtext-<time>/<step>/<step>.log",
    )
    _common(p)
    p.set_defaults(func=_run_local)

    p = commands.add_parser(
        "submit",
        help="compile the pipeline and start a run on a Kubeflow Pipelines endpoint",
        description=(
            "Compile the pipeline for a cluster (as `imtext pipeline compile`) and create a run "
            f"with kfp.Client. The bearer token comes from ${TOKEN_ENV} when set (multi-user "
            f"Kubeflow: `export {TOKEN_ENV}=$(kubectl -n NAMESPACE create token default-editor "
            "--audience=pipelines.kubeflow.org)`); without it the endpoint must accept the "
            "request as it is (a port-forward to a standalone KFP). "
            "Credentials for MLflow and S3 never pass as parameters: the steps read them from "
            "the Kubernetes secret imtext-credentials."
        ),
    )
    p.add_argument(
        "--host",
        default=None,
        help=f"Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 (default: ${HOST_ENV})",
    )
    p.add_argument(
        "--experiment", default="imtext", help="KFP experiment of the run (default: %(default)s)"
    )
    p.add_argument("--run-name", default=None, help="run name (default: imtext <date time>)")
    p.add_argument(
        "--param",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="pipeline argument (repeatable): data=s3://bucket/prefix, annotations=, images=, "
        "data_format=, skip_bad=, tracking_uri=, model_name=, device=",
    )
    _sets(p)
    p.add_argument(
        "--namespace", default=None, help="Kubernetes namespace (multi-user Kubeflow profiles)"
    )
    p.add_argument("--service-account", default=None, help="service account the run's pods use")
    _finetune_nodes(p)
    _common(p)
    p.set_defaults(func=_run_submit)
