"""``imtext pipeline compile | run | submit``: the Kubeflow pipeline from the command line.

The pipeline itself lives outside the package, in the repository's ``pipelines/`` and
``components/``; :mod:`imtext.cli.repository` loads them when a subcommand runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imtext.cli.flags import device_arg, log
from imtext.cli.repository import call_pipelines, component_image, pipelines_module
from imtext.errors import ImtextError

if TYPE_CHECKING:
    from imtext.console import Console

#: Environment variable holding the bearer token for ``imtext pipeline submit``.
TOKEN_ENV = "KF_PIPELINES_TOKEN"


#: Environment variable kfp.Client reads the endpoint from when ``--host`` is not given.
HOST_ENV = "KF_PIPELINES_ENDPOINT"


DEFAULT_PACKAGE = Path("imtext-pipeline.yaml")


DEFAULT_PIPELINE_ROOT = Path("artifacts/kfp")


DEFAULT_DATA = Path("data/shapes")


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


def _run_compile(args: argparse.Namespace) -> None:
    compile_module = pipelines_module(args.repo, "compile")
    params_text, _ = _checked_params(_params_file(args), [])
    out = call_pipelines(
        compile_module.compile_pipeline,
        args.out,
        params=params_text,
        finetune_nodes=args.finetune_nodes,
    )
    image = component_image()
    log.info("wrote the pipeline (image %s) -> %s", image, out)


def _run_local(args: argparse.Namespace) -> None:
    run_module = pipelines_module(args.repo, "run_local")
    params_text, params = _checked_params(_params_file(args), args.overrides)
    arguments = _local_arguments(args, params_text)
    console = None if args.verbose else _console(params)
    result = call_pipelines(
        run_module.run_local,
        arguments,
        args.out,
        params=params_text,
        cache=args.cache,
        retries=args.retries,
        events=console,
    )
    _report_local_run(args, params, result, console)


def _local_arguments(args: argparse.Namespace, params_text: str) -> dict[str, Any]:
    """The pipeline's arguments for a local run; a local --data must exist (as an absolute
    path: the steps run in other directories)."""
    from imtext.data.remote import is_s3

    data = str(args.data)
    if not is_s3(data):
        if not Path(data).is_dir():
            raise ImtextError(
                f"{data}: data directory not found; generate the built-in dataset with "
                "`imtext data shapes --out data/shapes` or pass --data"
            )
        data = str(Path(data).resolve())
    return {
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


def _report_local_run(
    args: argparse.Namespace, params: dict[str, Any], result: Any, console: Console | None
) -> None:
    """The end of ``imtext pipeline run``: recall, report, version, promotion, what next."""
    from imtext.config import stage_config_from_params
    from imtext.console import next_steps
    from imtext.registry import resolve_tracking_uri
    from imtext.ui import ui_command

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


def _run_submit(args: argparse.Namespace) -> None:
    submit_module = pipelines_module(args.repo, "submit")
    host = args.host or os.environ.get(HOST_ENV)
    if not host:
        raise ImtextError(f"no Kubeflow Pipelines endpoint; pass --host URL or set {HOST_ENV}")
    params_text, _ = _checked_params(_params_file(args), args.overrides)
    arguments = dict(call_pipelines(submit_module.parse_arguments, args.param))
    if "params" in arguments or "overrides" in arguments:
        raise ImtextError(
            "--param params=... and --param overrides=...: use --params FILE and --set "
            "section.key=value instead"
        )
    if args.overrides:
        arguments["overrides"] = list(args.overrides)
    run = call_pipelines(
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
    _add_compile(commands)
    _add_run(commands)
    _add_submit(commands)


def _add_compile(commands: argparse._SubParsersAction) -> None:
    """``imtext pipeline compile``."""
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


def _add_run(commands: argparse._SubParsersAction) -> None:
    """``imtext pipeline run``."""
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
    _data_flags(p)
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
    device_arg(p)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the local runner's whole log (each step's executor input and output, every "
        "line of its output) instead of a line per step; without it, each step's log goes to "
        "OUT/imtext-<time>/<step>/<step>.log",
    )
    _common(p)
    p.set_defaults(func=_run_local)


def _data_flags(p: argparse.ArgumentParser) -> None:
    """Where ``imtext pipeline run`` reads the raw data from."""
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


def _add_submit(commands: argparse._SubParsersAction) -> None:
    """``imtext pipeline submit``."""
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
