"""``imtext register`` and ``imtext promote``: the MLflow model registry from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from imtext.cli.flags import log, params_arg, tracking_arg


def add_registry_commands(sub: argparse._SubParsersAction) -> None:
    """``imtext register`` and ``imtext promote``."""
    _add_register(sub)
    _add_promote(sub)


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="log a trained, evaluated and exported model to MLflow as a new model version",
        description=(
            "Create an MLflow run with the parameters, the training history, the evaluation "
            "metrics and report, the PyTorch model file and the ONNX encoders, tagged with the git "
            "commit, the data hash (data.dvc) and a hash of the parameters; register the ONNX "
            "encoders as a new version of register.model_name. Nothing on disk is changed, so a "
            "failed registration (unreachable server) can simply be run again. With --promote, "
            "the version then goes through the same gate as `imtext promote`."
        ),
    )
    p.add_argument(
        "--train-dir", type=Path, required=True, help="finetune's output (model.pt, history)"
    )
    p.add_argument(
        "--eval-dir", type=Path, required=True, help="evaluate's output (metrics, report)"
    )
    p.add_argument("--export-dir", type=Path, required=True, help="export's output (ONNX encoders)")
    params_arg(p)
    p.add_argument(
        "--data-dvc",
        type=Path,
        default=Path("data.dvc"),
        help="DVC file of the raw data, for the data-hash tag (default: %(default)s)",
    )
    tracking_arg(p)
    p.add_argument(
        "--promote",
        action="store_true",
        help="then move the serving alias to the new version if it beats the champion "
        "(a refusal is reported, not an error)",
    )
    p.set_defaults(func=_run_register)


def _run_register(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config, read_params
    from imtext.registry import register

    cfg = load_stage_config("register", args.params)
    version = register(
        cfg,
        params=read_params(args.params),
        train_dir=args.train_dir,
        eval_dir=args.eval_dir,
        export_dir=args.export_dir,
        data_dvc=args.data_dvc if args.data_dvc.exists() else None,
        tracking_uri=args.tracking_uri,
        log=log.info,
    )
    print(f"registered {version.name} version {version.version} (run {version.run_id})")
    if args.promote:
        _report_decision(_promote(cfg, version.version, args.tracking_uri, None), cfg)


def _promote(cfg, version, tracking_uri, force_reason):
    from imtext.registry import promote

    return promote(cfg, version, tracking_uri=tracking_uri, force_reason=force_reason, log=log.info)


def _report_decision(decision, cfg) -> None:
    target = f"models:/{cfg.model_name}@{cfg.alias}"
    if decision.promoted:
        print(f"promoted version {decision.version} to {target}: {decision.reason}")
    else:
        print(f"not promoted: version {decision.version} stays out of {target}: {decision.reason}")


def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="move the serving alias to a model version, gated on its evaluation metric",
        description=(
            "Move the alias register.alias (champion) of register.model_name to VERSION only if "
            "its register.gate_metric (rsum) beats the current champion's by more than "
            "register.gate_min_delta. The evidence (both values, the previous champion, the time) "
            "is recorded as tags of the version. A refusal exits with status 3. --force REASON "
            "promotes regardless and records the reason."
        ),
    )
    p.add_argument("--version", required=True, help="model version number to promote")
    p.add_argument(
        "--force",
        metavar="REASON",
        default=None,
        help="promote even if the gate refuses; REASON is recorded on the version",
    )
    params_arg(p)
    tracking_arg(p)
    p.set_defaults(func=_run_promote)


#: Exit status of `imtext promote` when the gate refuses (1 is for errors).
REFUSED = 3


def _run_promote(args: argparse.Namespace) -> int:
    from imtext.config import load_stage_config

    cfg = load_stage_config("register", args.params)
    decision = _promote(cfg, args.version, args.tracking_uri, args.force)
    _report_decision(decision, cfg)
    return 0 if decision.promoted else REFUSED
